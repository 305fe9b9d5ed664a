"""XLA's GPU flags for overlapping communication with compute, set by the launcher before JAX starts a backend.

XLA reads XLA_FLAGS once, when the first backend starts: `python -m trainer` adds these before joining the
job. A flag the user already gives in XLA_FLAGS keeps the user's value. On other backends they are read and
ignored. The values follow the JAX and NVIDIA JAX-Toolbox GPU performance guides; their effect on our runs is
in docs/performance.md where a GPU has measured it.
"""

from __future__ import annotations

import os
import re

_MiB = 1 << 20
GPU_FLAGS = {
    # Schedule collectives asynchronously and move them so that they overlap with independent compute.
    'xla_gpu_enable_latency_hiding_scheduler': 'true',
    # Combine small collectives (a layer's parameters' all-gathers under FSDP, their gradients' reduce-scatters,
    # data-parallel all-reduces) into fewer, larger ones, up to this many bytes each.
    'xla_gpu_all_gather_combine_threshold_bytes': str(128 * _MiB),
    'xla_gpu_reduce_scatter_combine_threshold_bytes': str(128 * _MiB),
    'xla_gpu_all_reduce_combine_threshold_bytes': str(128 * _MiB),
    # Under lax.scan over layers: start the next layer's all-gather (and finish the last one's reduce-scatter)
    # during this layer's compute.
    'xla_gpu_enable_pipelined_all_gather': 'true',
    'xla_gpu_enable_pipelined_reduce_scatter': 'true',
    'xla_gpu_enable_pipelined_all_reduce': 'true',
    'xla_gpu_enable_while_loop_double_buffering': 'true',
}


def given(xla_flags: str) -> set[str]:
    """The names of the flags an XLA_FLAGS string sets."""
    return set(re.findall(r'--(\w+)', xla_flags))


def with_gpu_flags(xla_flags: str) -> str:
    """XLA_FLAGS with GPU_FLAGS added, except those it already sets."""
    mine = given(xla_flags)
    added = [f'--{name}={value}' for name, value in GPU_FLAGS.items() if name not in mine]
    return ' '.join([xla_flags.strip(), *added]).strip()


def apply(wanted: bool) -> None:
    """Adds GPU_FLAGS to this process's XLA_FLAGS if `wanted` (config.train.xla_gpu_flags), before a backend starts."""
    if wanted:
        os.environ['XLA_FLAGS'] = with_gpu_flags(os.environ.get('XLA_FLAGS', ''))
