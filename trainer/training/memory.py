"""Memory per device: what the compiled train step needs (parameters, optimizer state, temporaries) and the
peak the devices report while it runs."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from trainer.errors import ConfigError

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes one device needs for a train step, from XLA's memory analysis of the compiled step."""

    parameters: int  # this device's shards of the parameters
    optimizer_state: int  # ... of the optimizer state
    temporaries: int  # activations kept for the backward pass, gradients, and other scratch space
    total: int  # arguments + temporaries + outputs not aliased to (donated) arguments
    limit: int | None  # the device's memory, where the backend reports it (GPU, TPU)

    def line(self) -> str:
        """'memory per device: parameters 3.25 MiB, optimizer state 6.51 MiB, ...; train step 268 MiB'."""
        text = (
            f'memory per device: parameters {format_bytes(self.parameters)}, optimizer state '
            f'{format_bytes(self.optimizer_state)}, activations and temporaries {format_bytes(self.temporaries)}; '
            f'train step {format_bytes(self.total)}'
        )
        if self.limit:
            text += f' of {format_bytes(self.limit)} ({self.total / self.limit:.0%})'
        return text

    def metrics(self) -> dict[str, float]:
        """The same figures as metrics.jsonl / TensorBoard scalars, in GiB."""
        return {
            'memory_parameters_gib': self.parameters / GIB,
            'memory_optimizer_state_gib': self.optimizer_state / GIB,
            'memory_temporaries_gib': self.temporaries / GIB,
            'memory_train_step_gib': self.total / GIB,
        }


def format_bytes(count: int) -> str:
    """268435456 -> '256 MiB'; 43 * 2**30 -> '43 GiB'."""
    return f'{count / GIB:.3g} GiB' if count >= GIB else f'{count / 2**20:.3g} MiB'


def shard_bytes(tree: Any) -> int:
    """Bytes of the shards one device holds of the arrays (or ShapeDtypeStructs with shardings) in `tree`."""

    def one(x) -> int:
        shape = x.sharding.shard_shape(x.shape) if getattr(x, 'sharding', None) is not None else x.shape
        return math.prod(shape) * x.dtype.itemsize

    return sum(one(x) for x in jax.tree.leaves(tree))


def device_limit(device: jax.Device) -> int | None:
    """The device's memory in bytes, where its backend says (GPU, TPU); None on CPU."""
    stats = device.memory_stats()
    return stats.get('bytes_limit') if stats else None


def step_memory(compiled: jax.stages.Compiled, params: Any, opt_state: Any, device: jax.Device) -> StepMemory:
    """The compiled train step's memory analysis, split into what the state holds and what the step adds."""
    analysis = compiled.memory_analysis()
    total = analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
    total += analysis.output_size_in_bytes - analysis.alias_size_in_bytes
    return StepMemory(
        parameters=shard_bytes(params),
        optimizer_state=shard_bytes(opt_state),
        temporaries=analysis.temp_size_in_bytes,
        total=total,
        limit=device_limit(device),
    )


def check_fits(memory: StepMemory) -> None:
    """A step that needs more than the device has is a ConfigError naming what to change, before it runs."""
    if memory.limit and memory.total > memory.limit:
        raise ConfigError(
            f'the train step needs {memory.total / GIB:.3g} GiB per device but a device has {memory.limit / GIB:.3g} '
            f"GiB ({memory.line()}): recompute activations (config.model.remat='full'), shard parameters and "
            'optimizer state over more devices (config.mesh.fsdp), or lower config.train.global_batch_size '
            '(or raise config.train.grad_accum_steps).'
        )


def peak_in_use(devices: list[jax.Device]) -> float | None:
    """The largest peak bytes in use among `devices`, in GiB, where the backend reports it; None on CPU."""
    peaks = [stats.get('peak_bytes_in_use') for stats in (d.memory_stats() for d in devices) if stats]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) / GIB if peaks else None
