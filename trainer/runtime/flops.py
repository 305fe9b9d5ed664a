"""Each device's peak FLOP/s, for MFU (the model's FLOPs per token are trainer.modeling.counts')."""

from __future__ import annotations

import logging
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Dense bf16 peak FLOP/s per device, from the vendors' datasheets. Each name is matched against
# `device.device_kind` (lower-cased) as whole words, most specific first: 'l4' must not match 'NVIDIA
# L40S', nor 'h100' 'NVIDIA H100 PCIe'.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ('h100 pcie', 756e12),
    ('h100 nvl', 835e12),
    ('h100', 989e12),  # SXM
    ('gh200', 989e12),
    ('h200', 989e12),
    ('h800', 989e12),
    ('b200', 2250e12),
    ('a100', 312e12),
    ('a800', 312e12),
    ('l40s', 362e12),
    ('l40', 181e12),
    ('l4', 121e12),
    ('tpu v4', 275e12),
    ('tpu v5 lite', 197e12),  # v5e
    ('tpu v5e', 197e12),
    ('tpu v5p', 459e12),
    ('tpu v5', 459e12),  # v5p reports itself as 'TPU v5'
    ('tpu v6 lite', 918e12),  # v6e (Trillium)
    ('tpu v6e', 918e12),
)


def table_peak_flops(device_kind: str) -> float | None:
    """The datasheet bf16 peak of a known accelerator, or None."""
    kind = device_kind.lower()
    for name, peak in PEAK_BF16_FLOPS:
        if re.search(rf'(?<![a-z0-9]){re.escape(name)}(?![a-z0-9])', kind):
            return peak
    return None


def measure_matmul_flops(mesh: Mesh, dtype: str, size: int = 512, repeats: int = 10) -> float:
    """FLOP/s per device of a square matmul run on every device of `mesh` at once.

    Used on CPU, which has no datasheet peak, and by scripts/bench.py on accelerators (with a size that fills
    the chip). All devices run together because simulated CPU devices share the cores: one device alone would
    overstate each device's share. The operands are random: a GPU multiplies constants measurably faster.
    """
    devices = mesh.devices.size
    flat = Mesh(mesh.devices.reshape(-1), ('all',))
    x = jax.jit(
        lambda key: jax.random.normal(key, (devices, size, size), dtype),
        out_shardings=NamedSharding(flat, PartitionSpec('all')),
    )(jax.random.key(0))
    matmul = jax.jit(lambda a: jnp.einsum('bij,bjk->bik', a, a))
    matmul(x).block_until_ready()
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def peak_flops_per_device(mesh: Mesh, dtype: str, override: float) -> tuple[float | None, str]:
    """Peak FLOP/s of one device and where the number came from."""
    if override > 0:
        return override, 'config.train.peak_flops_per_device'
    device = mesh.devices.flat[0]
    if device.platform == 'cpu':
        return measure_matmul_flops(mesh, dtype), f'measured {dtype} matmul on CPU'
    peak = table_peak_flops(device.device_kind)
    if peak is None:
        logging.warning(
            'No peak FLOP/s known for %r: MFU is not reported. Set config.train.peak_flops_per_device.',
            device.device_kind,
        )
        return None, 'unknown accelerator'
    return peak, f'{device.device_kind} datasheet bf16 dense'
