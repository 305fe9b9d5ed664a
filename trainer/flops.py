"""Model FLOPs per token and each device's peak FLOP/s, for MFU."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.transformer import ModelConfig

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
# Parameters that are looked up rather than multiplied: the token and position tables. The
# unembedding (its own matrix, or the token table when tied) is a matmul of D x V per token.
_LOOKUP_TABLES = ('embedding_VD', 'position_embedding_PD')


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """A model's parameter count, with and without its embedding tables (Kaplan et al.'s N)."""

    total: int
    non_embedding: int  # without the token and position tables and the (untied) unembedding


def param_counts(params: Any) -> ParamCounts:
    """Counts a params tree (arrays or shapes)."""
    sizes = {key: sum(math.prod(x.shape) for x in jax.tree.leaves(sub)) for key, sub in params.items()}
    embedding = sum(sizes.get(key, 0) for key in (*_LOOKUP_TABLES, 'unembedding_DV'))
    return ParamCounts(total=sum(sizes.values()), non_embedding=sum(sizes.values()) - embedding)


def flops_per_token(model_cfg: ModelConfig, counts: ParamCounts, seq_len: int) -> float:
    """Training FLOPs per token: 6 * (N + D*V) + 12*L*H*Q*T (PaLM appendix B, lookups not counted).

    N counts the non-embedding parameters and D*V the unembedding matmul (tied or not): the token and
    position tables are looked up, which is no matmul. L layers, H heads, Q head dimension, T sequence
    length. 6 is forward plus backward of the weight matmuls; 12*L*H*Q*T the same for attention
    scores and values (counted for the full T x T square, as PaLM does).
    """
    matmul_params = counts.non_embedding + model_cfg.d_model * model_cfg.vocab_size
    return 6.0 * matmul_params + 12.0 * model_cfg.num_layers * model_cfg.num_heads * model_cfg.head_dim * seq_len


def table_peak_flops(device_kind: str) -> float | None:
    """The datasheet bf16 peak of a known accelerator, or None."""
    kind = device_kind.lower()
    for name, peak in PEAK_BF16_FLOPS:
        if re.search(rf'(?<![a-z0-9]){re.escape(name)}(?![a-z0-9])', kind):
            return peak
    return None


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
