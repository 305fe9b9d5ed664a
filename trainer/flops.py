"""Model FLOPs per token and each device's peak FLOP/s, for MFU."""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.transformer import ModelConfig

# Dense bf16 peak FLOP/s per device, from the vendors' datasheets, matched against
# `device.device_kind` (lower-cased) in this order, so that specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ('h100 pcie', 756e12),
    ('h100', 989e12),  # SXM
    ('h200', 989e12),
    ('h800', 989e12),
    ('gh200', 989e12),
    ('b200', 2250e12),
    ('a100', 312e12),
    ('a800', 312e12),
    ('l40s', 362e12),
    ('l4', 121e12),
    ('tpu v4', 275e12),
    ('tpu v5 lite', 197e12),  # v5e
    ('tpu v5e', 197e12),
    ('tpu v5p', 459e12),
    ('tpu v5', 459e12),
    ('tpu v6', 918e12),  # v6e (Trillium)
)


def flops_per_token(model_cfg: ModelConfig, num_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6*N + 12*L*H*Q*T (PaLM appendix B).

    N counts parameters without position embeddings; L layers, H heads, Q head dimension,
    T sequence length. 6N is forward plus backward of the weight matmuls, 12*L*H*Q*T the same for
    attention scores and values (counted for the full T x T square, as PaLM does).
    """
    return 6.0 * num_params + 12.0 * model_cfg.num_layers * model_cfg.num_heads * model_cfg.head_dim * seq_len


def table_peak_flops(device_kind: str) -> float | None:
    """The datasheet bf16 peak of a known accelerator, or None."""
    kind = device_kind.lower()
    return next((peak for name, peak in PEAK_BF16_FLOPS if name in kind), None)


def measure_matmul_flops(mesh: Mesh, dtype: str, size: int = 512, repeats: int = 10) -> float:
    """FLOP/s per device of a square matmul run on every device of `mesh` at once.

    Used on CPU, which has no datasheet peak. All devices run together because simulated CPU
    devices share the cores: one device alone would overstate each device's share.
    """
    devices = mesh.devices.size
    flat = Mesh(mesh.devices.reshape(-1), ('all',))
    x = jax.device_put(jnp.ones((devices, size, size), dtype), NamedSharding(flat, PartitionSpec('all')))
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
