"""A decoder-only transformer of the Llama or GPT-2 family, whole, in one file.

Shape suffixes name every array's axes:
  B batch, T sequence (queries), S sequence (keys), D model width, F feed-forward width,
  N query heads, K key/value heads, G query heads per key/value head, H head dimension,
  V vocabulary (padded to vocab_multiple), L layers, P positions (max_seq_len).

Attention builds every mask from query and key positions and segment ids (`attention_mask`): the same
code serves training on packed rows, the prefill of a prompt and decoding one token at a time against
a KVCache, Mistral's sliding window included.

Parameters carry logical axis names only ('embed', 'mlp', 'heads', ...); the trainer maps
them to mesh axes with rules from the config. Activations are constrained with logical names
too, resolved by the same rules against the mesh set with `jax.set_mesh`.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen, nnx, struct

FAMILIES = ('llama', 'gpt2')
ATTENTION_IMPLS = ('xla', 'cudnn')
ROPE_SCALINGS = ('none', 'linear', 'llama3')
# Which intermediates to keep for the backward pass; the rest is recomputed.
REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    'none': None,  # keep everything: fastest, most memory
    'full': jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer
    'dots': jax.checkpoint_policies.dots_saveable,  # keep matmul outputs
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls
}
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics; the trainer builds it from `config.model` (every field is documented there)."""

    family: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    d_model: int
    d_ff: int
    vocab_size: int
    max_seq_len: int
    head_dim: int = 0  # 0: d_model // num_heads
    dtype: str = 'bfloat16'
    param_dtype: str = 'float32'
    remat: str = 'none'
    scan_layers: bool = True
    dropout: float = 0.0
    tie_embeddings: bool = False
    use_bias: bool = False  # every linear layer and LayerNorm (GPT-2)
    qkv_bias: bool = False  # the query, key and value projections only (Qwen2)
    rope_theta: float = 10_000.0
    rope_scaling: str = 'none'
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 scaling
    rope_high_freq_factor: float = 4.0  # llama3 scaling
    rope_original_max_len: int = 8192  # llama3 scaling: the context the model was trained with
    sliding_window: int = 0  # attend to the newest this many tokens (self included); 0 = all (Mistral)
    vocab_multiple: int = 1  # embedding rows padded to a multiple of this; padded ids are never predicted
    norm_eps: float = 1e-5
    init_std: float = 0.02
    attention_impl: str = 'xla'
    sharding_rules: Rules = ()

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, 'head_dim', self.d_model // self.num_heads)

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding tables: vocab_size rounded up to a multiple of vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple


def _param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], names: tuple, cfg: ModelConfig):
    # eager_sharding=False: parameters are laid out by the trainer's jitted init, not here.
    value = init(rngs.params(), tuple(shape), jnp.dtype(cfg.param_dtype))
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def _normal(std: float) -> Callable:
    return jax.nn.initializers.normal(std)


def constrain(x: jax.Array, names: tuple[str | None, ...], rules: Rules) -> jax.Array:
    """Pins an activation's layout by logical axis names; a no-op outside a mesh."""
    if not rules or jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, linen.logical_to_mesh_axes(names, rules))


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Norm(nnx.Module):
    """RMSNorm (llama) or LayerNorm (gpt2), computed in float32."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.scale = _param(rngs, jax.nn.initializers.ones, (cfg.d_model,), ('norm',), cfg)
        has_bias = cfg.family == 'gpt2' and cfg.use_bias
        self.bias = _param(rngs, jax.nn.initializers.zeros, (cfg.d_model,), ('norm',), cfg) if has_bias else None

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x = x_BTD.astype(jnp.float32)
        if self.cfg.family == 'gpt2':
            x = x - x.mean(-1, keepdims=True)
        x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.cfg.norm_eps)
        x = x * self.scale[...][None, None, :]
        if self.bias is not None:
            x = x + self.bias[...][None, None, :]
        return x.astype(self.cfg.dtype)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies of the H/2 rotation pairs, with linear or llama3 (Llama 3.1) scaling."""
    half = cfg.head_dim // 2
    inv_freq = cfg.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if cfg.rope_scaling == 'linear':
        return inv_freq / cfg.rope_scaling_factor
    if cfg.rope_scaling == 'llama3':
        # Long wavelengths are slowed down by the factor, short ones kept, and those between blended.
        wavelength = 2 * jnp.pi / inv_freq
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        blend = (cfg.rope_original_max_len / wavelength - low) / (high - low)
        blended = (1 - blend) * inv_freq / cfg.rope_scaling_factor + blend * inv_freq
        long = wavelength > cfg.rope_original_max_len / low
        short = wavelength < cfg.rope_original_max_len / high
        return jnp.where(long, inv_freq / cfg.rope_scaling_factor, jnp.where(short, inv_freq, blended))
    return inv_freq


def rotary(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates pairs (i, i + H/2) of each head by position-dependent angles (RoPE)."""
    angle_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq[None, None, :]
    sin, cos = jnp.sin(angle_BTh)[:, :, None, :], jnp.cos(angle_BTh)[:, :, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BTNH.dtype)


def attention_mask(
    q_positions_BT: jax.Array,
    k_positions_BS: jax.Array,
    q_segments_BT: jax.Array,
    k_segments_BS: jax.Array,
    window: int,
) -> jax.Array:
    """Which keys each query sees: the same document (segment), not a later position, within the window."""
    mask_BTS = (q_segments_BT[:, :, None] == k_segments_BS[:, None, :]) & (
        k_positions_BS[:, None, :] <= q_positions_BT[:, :, None]
    )
    if window:
        mask_BTS &= q_positions_BT[:, :, None] - k_positions_BS[:, None, :] < window
    return mask_BTS[:, None]


@struct.dataclass
class KVCache:
    """Every layer's keys and values of the tokens seen so far, in S fixed slots, so decoding never recompiles."""

    k_LBSKH: jax.Array
    v_LBSKH: jax.Array
    positions_BS: jax.Array  # each slot's position; -1 while empty
    segment_ids_BS: jax.Array  # each slot's document; 0 while empty and for padding
    index: jax.Array  # int32: the next slot to write, the same for every row (prompts are left-padded)

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, slots: int) -> KVCache:
        shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            k_LBSKH=jnp.zeros(shape, cfg.dtype),
            v_LBSKH=jnp.zeros(shape, cfg.dtype),
            positions_BS=jnp.full((batch, slots), -1, jnp.int32),
            segment_ids_BS=jnp.zeros((batch, slots), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )


@struct.dataclass
class _LayerKeys:
    """One layer's view of a KVCache while new tokens are written into it."""

    k_BSKH: jax.Array
    v_BSKH: jax.Array
    positions_BS: jax.Array  # already holding the new tokens' positions
    segment_ids_BS: jax.Array
    index: jax.Array


class Attention(nnx.Module):
    """Multi-head attention with grouped key/value heads (num_kv_heads <= num_heads)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        init, out_init = _normal(cfg.init_std), _normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
        self.wq_DNH = _param(rngs, init, (D, N, H), ('embed', 'heads', 'head_dim'), cfg)
        self.wk_DKH = _param(rngs, init, (D, K, H), ('embed', 'kv_heads', 'head_dim'), cfg)
        self.wv_DKH = _param(rngs, init, (D, K, H), ('embed', 'kv_heads', 'head_dim'), cfg)
        self.wo_NHD = _param(rngs, out_init, (N, H, D), ('heads', 'head_dim', 'embed'), cfg)
        zeros = jax.nn.initializers.zeros
        biases = {}
        if cfg.use_bias or cfg.qkv_bias:
            biases['q_NH'] = _param(rngs, zeros, (N, H), ('heads', 'head_dim'), cfg)
            biases['k_KH'] = _param(rngs, zeros, (K, H), ('kv_heads', 'head_dim'), cfg)
            biases['v_KH'] = _param(rngs, zeros, (K, H), ('kv_heads', 'head_dim'), cfg)
        if cfg.use_bias:
            biases['o_D'] = _param(rngs, zeros, (D,), ('embed',), cfg)
        self.biases = nnx.Dict(**biases) if biases else None

    def __call__(
        self, x_BTD: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array, keys: _LayerKeys | None
    ) -> tuple[jax.Array, _LayerKeys | None]:
        """Attends to the new tokens themselves (training, keys=None) or to a cache they are written into."""
        cfg, dt = self.cfg, self.cfg.dtype
        q_BTNH = jnp.einsum('btd,dnh->btnh', x_BTD, self.wq_DNH[...].astype(dt))
        k_BTKH = jnp.einsum('btd,dkh->btkh', x_BTD, self.wk_DKH[...].astype(dt))
        v_BTKH = jnp.einsum('btd,dkh->btkh', x_BTD, self.wv_DKH[...].astype(dt))
        if self.biases is not None:
            q_BTNH += self.biases['q_NH'][...].astype(dt)[None, None]
            k_BTKH += self.biases['k_KH'][...].astype(dt)[None, None]
            v_BTKH += self.biases['v_KH'][...].astype(dt)[None, None]
        if cfg.family == 'llama':
            inv_freq = rope_frequencies(cfg)
            q_BTNH = rotary(q_BTNH, positions_BT, inv_freq)
            k_BTKH = rotary(k_BTKH, positions_BT, inv_freq)
        heads = ('activation_batch', 'activation_length', 'activation_heads', None)
        q_BTNH = constrain(q_BTNH, heads, cfg.sharding_rules)
        if keys is None:
            k_BSKH, v_BSKH, k_positions_BS, k_segments_BS = k_BTKH, v_BTKH, positions_BT, segment_ids_BT
        else:
            at = (0, keys.index, 0, 0)
            k_BSKH = jax.lax.dynamic_update_slice(keys.k_BSKH, k_BTKH.astype(keys.k_BSKH.dtype), at)
            v_BSKH = jax.lax.dynamic_update_slice(keys.v_BSKH, v_BTKH.astype(keys.v_BSKH.dtype), at)
            k_positions_BS, k_segments_BS = keys.positions_BS, keys.segment_ids_BS
            keys = keys.replace(k_BSKH=k_BSKH, v_BSKH=v_BSKH)
            k_BSKH = constrain(k_BSKH, heads, cfg.sharding_rules)
            v_BSKH = constrain(v_BSKH, heads, cfg.sharding_rules)
        mask_B1TS = attention_mask(positions_BT, k_positions_BS, segment_ids_BT, k_segments_BS, cfg.sliding_window)
        out_BTNH = jax.nn.dot_product_attention(
            q_BTNH, k_BSKH.astype(dt), v_BSKH.astype(dt), mask=mask_B1TS, implementation=cfg.attention_impl
        )
        out_BTD = jnp.einsum('btnh,nhd->btd', out_BTNH, self.wo_NHD[...].astype(dt))
        if self.biases is not None and 'o_D' in self.biases:
            out_BTD += self.biases['o_D'][...].astype(dt)[None, None]
        return out_BTD, keys


class Mlp(nnx.Module):
    """SwiGLU (llama) or GELU (gpt2) feed-forward block."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        D, F = cfg.d_model, cfg.d_ff
        init, out_init = _normal(cfg.init_std), _normal(cfg.init_std / (2 * cfg.num_layers) ** 0.5)
        self.w_up_DF = _param(rngs, init, (D, F), ('embed', 'mlp'), cfg)
        self.w_gate_DF = _param(rngs, init, (D, F), ('embed', 'mlp'), cfg) if cfg.family == 'llama' else None
        self.w_down_FD = _param(rngs, out_init, (F, D), ('mlp', 'embed'), cfg)
        zeros = jax.nn.initializers.zeros
        self.biases = (
            nnx.Dict(up_F=_param(rngs, zeros, (F,), ('mlp',), cfg), down_D=_param(rngs, zeros, (D,), ('embed',), cfg))
            if cfg.use_bias
            else None
        )

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        dt = self.cfg.dtype
        h_BTF = jnp.einsum('btd,df->btf', x_BTD, self.w_up_DF[...].astype(dt))
        if self.biases is not None:
            h_BTF += self.biases['up_F'][...].astype(dt)[None, None]
        if self.w_gate_DF is not None:
            h_BTF = jax.nn.silu(jnp.einsum('btd,df->btf', x_BTD, self.w_gate_DF[...].astype(dt))) * h_BTF
        else:
            h_BTF = jax.nn.gelu(h_BTF, approximate=True)
        h_BTF = constrain(h_BTF, ('activation_batch', 'activation_length', 'activation_mlp'), self.cfg.sharding_rules)
        out_BTD = jnp.einsum('btf,fd->btd', h_BTF, self.w_down_FD[...].astype(dt))
        if self.biases is not None:
            out_BTD += self.biases['down_D'][...].astype(dt)[None, None]
        return out_BTD


class Block(nnx.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attention_norm, self.attention = Norm(cfg, rngs), Attention(cfg, rngs)
        self.mlp_norm, self.mlp = Norm(cfg, rngs), Mlp(cfg, rngs)

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, dropout_rng, keys=None):
        rngs = (None, None) if dropout_rng is None else tuple(jax.random.split(dropout_rng))
        attended_BTD, keys = self.attention(self.attention_norm(x_BTD), positions_BT, segment_ids_BT, keys)
        x_BTD += _dropout(attended_BTD, self.cfg.dropout, rngs[0])
        x_BTD += _dropout(self.mlp(self.mlp_norm(x_BTD)), self.cfg.dropout, rngs[1])
        x_BTD = constrain(x_BTD, ('activation_batch', 'activation_length', 'activation_embed'), self.cfg.sharding_rules)
        return x_BTD, keys


class Decoder(nnx.Module):
    """Token ids in, next-token logits out. Layer weights are stacked along a leading L axis."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        D, V = cfg.d_model, cfg.padded_vocab
        self.embedding_VD = _param(rngs, _normal(cfg.init_std), (V, D), ('vocab', 'embed'), cfg)
        self.position_embedding_PD = (
            _param(rngs, _normal(cfg.init_std), (cfg.max_seq_len, D), ('position', 'embed'), cfg)
            if cfg.family == 'gpt2'
            else None
        )

        # One Block whose every parameter has a leading layer axis, whatever scan_layers says,
        # so that checkpoints do not depend on how the layers are run.
        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = Norm(cfg, rngs)
        self.unembedding_DV = (
            None if cfg.tie_embeddings else _param(rngs, _normal(cfg.init_std), (D, V), ('embed', 'vocab'), cfg)
        )

    def __call__(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """Returns float32 logits; `dropout_rng=None` means deterministic (no dropout)."""
        return self._run(tokens_BT, positions_BT, segment_ids_BT, dropout_rng, None)[0]

    def extend(
        self, tokens_BT: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """Logits of T new tokens that see the cached ones, and the cache holding them too (prefill, decode)."""
        return self._run(tokens_BT, positions_BT, segment_ids_BT, None, cache)

    def _run(self, tokens_BT, positions_BT, segment_ids_BT, dropout_rng, cache):
        cfg = self.cfg
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones(tokens_BT.shape, jnp.int32)
        x_BTD = jnp.take(self.embedding_VD[...], tokens_BT, axis=0).astype(cfg.dtype)
        if self.position_embedding_PD is not None:
            # Padding has position -1: any row will do, attention never looks at it.
            x_BTD += jnp.take(self.position_embedding_PD[...], jnp.maximum(positions_BT, 0), axis=0).astype(cfg.dtype)
        embed_rng, layer_rng = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
        x_BTD = _dropout(x_BTD, cfg.dropout, embed_rng)
        x_BTD = constrain(x_BTD, ('activation_batch', 'activation_length', 'activation_embed'), cfg.sharding_rules)

        graphdef, layer_params = nnx.split(self.blocks)
        layer_rngs = None if layer_rng is None else jax.random.split(layer_rng, cfg.num_layers)
        if cache is None:
            layer_kv = None
        else:
            at = (0, cache.index)
            k_positions_BS = jax.lax.dynamic_update_slice(cache.positions_BS, positions_BT.astype(jnp.int32), at)
            k_segments_BS = jax.lax.dynamic_update_slice(cache.segment_ids_BS, segment_ids_BT.astype(jnp.int32), at)
            layer_kv = (cache.k_LBSKH, cache.v_LBSKH)

        def run_layer(x_BTD, inputs):
            params, rng, kv = inputs
            keys = None if kv is None else _LayerKeys(kv[0], kv[1], k_positions_BS, k_segments_BS, cache.index)
            x_BTD, keys = nnx.merge(graphdef, params)(x_BTD, positions_BT, segment_ids_BT, rng, keys)
            return x_BTD, (None if keys is None else (keys.k_BSKH, keys.v_BSKH))

        if cfg.remat != 'none':
            run_layer = jax.checkpoint(run_layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            x_BTD, new_kv = jax.lax.scan(run_layer, x_BTD, (layer_params, layer_rngs, layer_kv))
        else:
            per_layer = []
            for i in range(cfg.num_layers):
                x_BTD, kv = run_layer(x_BTD, jax.tree.map(operator.itemgetter(i), (layer_params, layer_rngs, layer_kv)))
                per_layer.append(kv)
            new_kv = None if cache is None else jax.tree.map(lambda *layers: jnp.stack(layers), *per_layer)

        x_BTD = self.final_norm(x_BTD)
        if self.unembedding_DV is None:
            logits_BTV = jnp.einsum('btd,vd->btv', x_BTD, self.embedding_VD[...].astype(cfg.dtype))
        else:
            logits_BTV = jnp.einsum('btd,dv->btv', x_BTD, self.unembedding_DV[...].astype(cfg.dtype))
        logits_BTV = constrain(
            logits_BTV, ('activation_batch', 'activation_length', 'activation_vocab'), cfg.sharding_rules
        ).astype(jnp.float32)
        if cfg.padded_vocab > cfg.vocab_size:  # padding rows exist for the mesh only: never predict them
            is_real_V = jnp.arange(cfg.padded_vocab)[None, None, :] < cfg.vocab_size
            logits_BTV = jnp.where(is_real_V, logits_BTV, -jnp.inf)
        if cache is None:
            return logits_BTV, None
        new_cache = KVCache(
            k_LBSKH=new_kv[0],
            v_LBSKH=new_kv[1],
            positions_BS=k_positions_BS,
            segment_ids_BS=k_segments_BS,
            index=cache.index + tokens_BT.shape[1],
        )
        return logits_BTV, new_cache
