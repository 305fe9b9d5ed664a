"""A decoder-only transformer of the Llama or GPT-2 family, whole, in one file.

Shape suffixes name every array's axes:
  B batch, T sequence (queries), S sequence (keys), D model width, F feed-forward width,
  N query heads, K key/value heads, G query heads per key/value head, H head dimension,
  V vocabulary (padded to vocab_multiple), L layers, P positions (max_seq_len), C classes.

Attention builds every mask from query and key positions and segment ids (`attention_mask`): the same
code serves training on packed rows, the prefill of a prompt and decoding one token at a time against
a KVCache, Mistral's sliding window included. On NVIDIA GPUs, `attention_impl='cudnn'` trains through cuDNN
flash attention instead, packed documents described by their lengths and offsets (`packed_segments`).

Parameters carry logical axis names only ('embed', 'mlp', 'heads', ...); the trainer maps
them to mesh axes with rules from the config. Activations are constrained with logical names
too, resolved by the same rules against the mesh set with `jax.set_mesh`.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen, nnx, struct
from jax.ad_checkpoint import checkpoint_name

# cuDNN flash attention over packed documents: jax.nn.dot_product_attention takes no per-document lengths
# and offsets, the cuDNN wrapper beneath it does (the path Transformer Engine and MaxText take too). It is
# private to jax: a jax without it leaves attention_impl='cudnn' refused by the config checks, nothing else.
try:
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
except ImportError:  # every jax this project installs has it
    cudnn_attention = None

FAMILIES = ('llama', 'gpt2')
PARAMETRIZATIONS = ('sp', 'mup')  # standard, or maximal update (Yang et al. 2022, Tensor Programs V)
DEPTH_SCALINGS = ('none', 'completep')  # residual branches as they are, or x (L / base_depth)^-depth_alpha
MUP_WEIGHT_DECAYS = ('coupled', 'constant')  # muP's hidden-matrix decay: AdamW's lr_i x wd, or the mup package's
HEADS = ('lm', 'classify')  # next-token logits, or one label per sequence
POOLINGS = ('last', 'mean')  # which positions a classifier reads: the last token, or the mean of all
# Projections that LoRA can adapt, and the parameter each one updates.
LORA_TARGETS = {
    'q': 'attention/wq_DNH',
    'k': 'attention/wk_DKH',
    'v': 'attention/wv_DKH',
    'o': 'attention/wo_NHD',
    'gate': 'mlp/w_gate_DF',
    'up': 'mlp/w_up_DF',
    'down': 'mlp/w_down_FD',
}
ATTENTION_IMPLS = ('xla', 'cudnn')
ROPE_SCALINGS = ('none', 'linear', 'llama3')
# Which intermediates to keep for the backward pass; the rest is recomputed.
REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    'none': None,  # keep everything: fastest, most memory
    'full': jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer
    'dots': jax.checkpoint_policies.dots_saveable,  # keep matmul outputs
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls
    # keep each block's attention and MLP outputs (named below), recompute what is inside them
    'attention_mlp_outputs': jax.checkpoint_policies.save_only_these_names('attention_out', 'mlp_out'),
    'attention_outputs': jax.checkpoint_policies.save_only_these_names('attention_out'),  # keep attention's only
    # Offloading: what is kept waits in host memory (copied out in the forward pass, back in the backward), which
    # on a GPU trades device memory for PCIe traffic that overlaps compute. The attention outputs ...
    'offload_attention_outputs': jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=['attention_out'],
        offload_src='device',
        offload_dst='pinned_host',
    ),
    # ... or every weight matmul's output ('dots_no_batch' in host memory)
    'dots_no_batch_offloaded': jax.checkpoint_policies.offload_dot_with_no_batch_dims('device', 'pinned_host'),
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
    attention_max_segments: int = 0  # 'cudnn': runs of segment ids (documents, padding) per row; 0 = seq_len
    head: str = 'lm'  # 'classify': class logits at every position instead of next-token logits
    num_classes: int = 0  # head='classify'
    pool: str = 'last'  # head='classify': the loss reads the last token's logits or the mean over the text
    lora_rank: int = 0  # low-rank adapters (Hu et al. 2021) beside the projections in lora_targets; 0 = none
    lora_alpha: float = 16.0  # the adapters' update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapters' input, in training
    lora_targets: tuple[str, ...] = ('q', 'k', 'v', 'o')  # keys of LORA_TARGETS
    lora_base_dtype: str = ''  # with LoRA, the frozen weights are stored in this dtype; '' = param_dtype
    # muP: the forward multipliers live here (logits / width multiplier, attention by 1/head_dim); the init and
    # learning-rate multipliers of the hidden matrices are roles in the trainer's parameter-role table.
    parametrization: str = 'sp'
    base_width: int = 0  # muP: the d_model where muP equals SP (0 = d_model)
    base_head_dim: int = 0  # muP: the head_dim where attention scales as in SP (0 = head_dim)
    mup_zero_readout: bool = False  # muP: start the output layer at 0 (its multiplier is kept)
    mup_weight_decay: str = 'coupled'  # muP: MUP_WEIGHT_DECAYS; read by trainer.modeling.param_roles, not by the model
    mup_input_multiplier: float = 1.0  # muP: the embedding output x this (the base's tunable alpha_input)
    mup_output_multiplier: float = 1.0  # muP: the logits x this / width multiplier (MuReadout's output_mult)
    # Depth (CompleteP, Dey et al. 2025): each residual branch x (num_layers / base_depth)^-depth_alpha, and the
    # output projections' init std / sqrt(2 base_depth) instead of / sqrt(2 num_layers).
    depth_scaling: str = 'none'
    base_depth: int = 0  # depth_scaling='completep': the depth where it equals the plain model (0 = num_layers)
    depth_alpha: float = 1.0  # depth_scaling='completep': 1 (CompleteP) or 0.5 (the sqrt(depth) rule)
    loss_vocab_chunk: int = 0  # the trainer's loss reads the logits this many vocabulary ids at a time; 0 = all
    sharding_rules: Rules = ()

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, 'head_dim', self.d_model // self.num_heads)

    @property
    def width_multiplier(self) -> float:
        """muP's m = d_model / base_width (1 under SP)."""
        return self.d_model / (self.base_width or self.d_model) if self.parametrization == 'mup' else 1.0

    @property
    def depth_multiplier(self) -> float:
        """CompleteP's num_layers / base_depth (1 without depth scaling)."""
        if self.depth_scaling != 'completep':
            return 1.0
        return self.num_layers / (self.base_depth or self.num_layers)

    @property
    def residual_scale(self) -> float:
        """What each residual branch is multiplied by before it is added: (L / base_depth)^-depth_alpha, else 1."""
        return self.depth_multiplier**-self.depth_alpha

    @property
    def output_init_std(self) -> float:
        """The residual output projections' init (GPT-2's std / sqrt(2 L); CompleteP keeps the base depth's)."""
        depth = (self.base_depth or self.num_layers) if self.depth_scaling == 'completep' else self.num_layers
        return self.init_std / (2 * depth) ** 0.5

    @property
    def input_scale(self) -> float:
        """What the embedding output is multiplied by: muP's tunable input multiplier (1 under SP)."""
        return self.mup_input_multiplier if self.parametrization == 'mup' else 1.0

    @property
    def logit_scale(self) -> float:
        """What the output layer's product is multiplied by: muP's output multiplier / m (1 under SP)."""
        return self.mup_output_multiplier / self.width_multiplier if self.parametrization == 'mup' else 1.0

    @property
    def attention_scale(self) -> float:
        """Query-key scale: 1/sqrt(head_dim) (SP); sqrt(base_head_dim)/head_dim under muP, the same at the base."""
        base = self.base_head_dim or self.head_dim
        if self.parametrization == 'mup' and base != self.head_dim:
            return base**0.5 / self.head_dim
        return self.head_dim**-0.5

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding tables: vocab_size rounded up to a multiple of vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple


def _param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], names: tuple, cfg: ModelConfig, trained=False):
    """A parameter; under LoRA, those not `trained` (the frozen base) are stored in lora_base_dtype."""
    frozen = cfg.lora_rank and not trained and cfg.lora_base_dtype
    # eager_sharding=False: parameters are laid out by the trainer's jitted init, not here.
    value = init(rngs.params(), tuple(shape), jnp.dtype(cfg.lora_base_dtype if frozen else cfg.param_dtype))
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def _normal(std: float) -> Callable:
    return jax.nn.initializers.normal(std)


def dense(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
    """x's last `contract` axes times w's first ones, as one 2-D matmul over all tokens.

    The same product as an einsum such as 'btd,df->btf'; written flat because XLA:CPU otherwise copies
    the activations' gradient to a transposed layout for the weight gradient (which contracts b and t),
    and a 4-layer step spent about a fifth of its time in those copies (docs/performance.md).
    """
    inputs = math.prod(w.shape[:contract])
    out = x.reshape(-1, inputs) @ w.reshape(inputs, -1)
    return out.reshape(*x.shape[: x.ndim - contract], *w.shape[contract:])


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


def packed_segments(segment_ids_BT: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """Packed rows as cuDNN reads them: each run of equal segment ids' length (B, M) and start (B, M + 1), -1 past
    the row's last run.

    Padding (segment 0) is a run of its own, so that every token's output is defined. A row with more than
    `max_segments` runs would see its last one span the rest of the row: the data pipeline refuses such batches.
    """
    B, T = segment_ids_BT.shape
    starts_BT = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    offsets_BM = jax.vmap(lambda s: jnp.nonzero(s, size=max_segments, fill_value=-1)[0])(starts_BT).astype(jnp.int32)
    next_BM = jnp.concatenate([offsets_BM[:, 1:], jnp.full((B, 1), -1, jnp.int32)], axis=1)
    lengths_BM = jnp.where(offsets_BM < 0, -1, jnp.where(next_BM < 0, T, next_BM) - offsets_BM)
    return lengths_BM, jnp.pad(offsets_BM, ((0, 0), (0, 1)), constant_values=-1)


def cudnn_packed_attention(
    q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, segment_ids_BT: jax.Array, cfg: ModelConfig
) -> jax.Array:
    """Causal self-attention within each packed document through cuDNN flash attention: no (T, T) mask is built.

    Causality is by index within a run, which is the positions' order: the pipeline numbers each document's
    tokens consecutively.
    """
    T = q_BTNH.shape[1]
    # At least 2: with one, cuDNN's wrapper takes the descriptors for an unpacked batch.
    lengths_BM, offsets_BM1 = packed_segments(segment_ids_BT, max(cfg.attention_max_segments or T, 2))
    return cudnn_attention.dot_product_attention(
        q_BTNH,
        k_BTKH,
        v_BTKH,
        q_seqlen=lengths_BM,
        kv_seqlen=lengths_BM,
        q_offsets=offsets_BM1,
        kv_offsets=offsets_BM1,
        scale=cfg.attention_scale,
        mask_type=cudnn_attention.MaskType.PADDING_CAUSAL,
        qkv_layout='BTNH',
        sliding_window_length=cfg.sliding_window or None,
    )


@struct.dataclass
class KVCache:
    """Every layer's keys and values of the tokens seen so far, in S fixed slots, so decoding never recompiles."""

    k_LBSKH: jax.Array
    v_LBSKH: jax.Array
    positions_BS: jax.Array  # each slot's position; -1 while empty
    segment_ids_BS: jax.Array  # each slot's document; 0 while empty and for padding
    # int32, each row's next slot to write: all equal when prompts are left-padded to one length
    # (trainer.inference.decoding), each its own where every row holds its own sequence from slot 0 (continuous
    # batching, trainer.serving.batching)
    index_B: jax.Array

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, slots: int) -> KVCache:
        shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            k_LBSKH=jnp.zeros(shape, cfg.dtype),
            v_LBSKH=jnp.zeros(shape, cfg.dtype),
            positions_BS=jnp.full((batch, slots), -1, jnp.int32),
            segment_ids_BS=jnp.zeros((batch, slots), jnp.int32),
            index_B=jnp.zeros((batch,), jnp.int32),
        )


def write_slots(buffer_BS: jax.Array, new_BT: jax.Array, index_B: jax.Array) -> jax.Array:
    """`new_BT` written into `buffer_BS` (slots on axis 1), each row from its own slot `index_B[b]`."""

    def write_row(row_S: jax.Array, new_T: jax.Array, at: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice_in_dim(row_S, new_T, at, axis=0)

    return jax.vmap(write_row)(buffer_BS, new_BT, index_B)


@struct.dataclass
class _LayerKeys:
    """One layer's view of a KVCache while new tokens are written into it."""

    k_BSKH: jax.Array
    v_BSKH: jax.Array
    positions_BS: jax.Array  # already holding the new tokens' positions
    segment_ids_BS: jax.Array
    index_B: jax.Array


class LoRA(nnx.Module):
    """A low-rank update (x @ a @ b) * alpha / rank beside a frozen projection (Hu et al. 2021); b starts at 0."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, inputs: tuple, outputs: tuple):
        """`inputs` and `outputs`: the projection's (size, logical name) pairs on each side."""
        self.cfg, self.num_inputs = cfg, len(inputs)
        fan_in = math.prod(size for size, _ in inputs)
        in_shape, in_names = zip(*inputs, strict=True)
        out_shape, out_names = zip(*outputs, strict=True)
        r, zeros = cfg.lora_rank, jax.nn.initializers.zeros
        self.a = _param(rngs, _normal(fan_in**-0.5), (*in_shape, r), (*in_names, 'lora_rank'), cfg, trained=True)
        self.b = _param(rngs, zeros, (r, *out_shape), ('lora_rank', *out_names), cfg, trained=True)

    def __call__(self, x: jax.Array, dropout_rng: jax.Array | None) -> jax.Array:
        dt = self.cfg.dtype
        x = _dropout(x, self.cfg.lora_dropout, dropout_rng)
        low = dense(x, self.a[...].astype(dt), self.num_inputs)
        return dense(low, self.b[...].astype(dt)) * (self.cfg.lora_alpha / self.cfg.lora_rank)


def _adapters(cfg: ModelConfig, rngs: nnx.Rngs, shapes: dict[str, tuple[tuple, tuple]]) -> nnx.Dict | None:
    """The LoRA adapters of this module's projections named in cfg.lora_targets (None without LoRA)."""
    chosen = {name: shape for name, shape in shapes.items() if cfg.lora_rank and name in cfg.lora_targets}
    return nnx.Dict(**{name: LoRA(cfg, rngs, *shape) for name, shape in chosen.items()}) if chosen else None


def _adapted(adapters: nnx.Dict | None, name: str, x: jax.Array, rng: jax.Array | None) -> jax.Array | int:
    """The named adapter's update for input x, or 0 where there is none."""
    if adapters is None or name not in adapters:
        return 0
    return adapters[name](x, None if rng is None else jax.random.fold_in(rng, list(LORA_TARGETS).index(name)))


class Attention(nnx.Module):
    """Multi-head attention with grouped key/value heads (num_kv_heads <= num_heads)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        init, out_init = _normal(cfg.init_std), _normal(cfg.output_init_std)
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
        d, n, k = ((D, 'embed'),), ((N, 'heads'), (H, 'head_dim')), ((K, 'kv_heads'), (H, 'head_dim'))
        self.lora = _adapters(cfg, rngs, {'q': (d, n), 'k': (d, k), 'v': (d, k), 'o': (n, d)})

    def __call__(
        self,
        x_BTD: jax.Array,
        positions_BT: jax.Array,
        segment_ids_BT: jax.Array,
        keys: _LayerKeys | None,
        lora_rng: jax.Array | None = None,
    ) -> tuple[jax.Array, _LayerKeys | None]:
        """Attends to the new tokens themselves (training, keys=None) or to a cache they are written into."""
        cfg, dt = self.cfg, self.cfg.dtype
        q_BTNH = dense(x_BTD, self.wq_DNH[...].astype(dt))
        k_BTKH = dense(x_BTD, self.wk_DKH[...].astype(dt))
        v_BTKH = dense(x_BTD, self.wv_DKH[...].astype(dt))
        q_BTNH += _adapted(self.lora, 'q', x_BTD, lora_rng)
        k_BTKH += _adapted(self.lora, 'k', x_BTD, lora_rng)
        v_BTKH += _adapted(self.lora, 'v', x_BTD, lora_rng)
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
            k_BSKH = write_slots(keys.k_BSKH, k_BTKH.astype(keys.k_BSKH.dtype), keys.index_B)
            v_BSKH = write_slots(keys.v_BSKH, v_BTKH.astype(keys.v_BSKH.dtype), keys.index_B)
            k_positions_BS, k_segments_BS = keys.positions_BS, keys.segment_ids_BS
            keys = keys.replace(k_BSKH=k_BSKH, v_BSKH=v_BSKH)
            k_BSKH = constrain(k_BSKH, heads, cfg.sharding_rules)
            v_BSKH = constrain(v_BSKH, heads, cfg.sharding_rules)
        if cfg.attention_impl == 'cudnn' and keys is None:  # training: packed documents, no mask in memory
            out_BTNH = cudnn_packed_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, cfg)
        else:  # XLA, and every cached (prefill, decode) attention: the mask from positions and segments
            mask_B1TS = attention_mask(positions_BT, k_positions_BS, segment_ids_BT, k_segments_BS, cfg.sliding_window)
            out_BTNH = jax.nn.dot_product_attention(
                q_BTNH, k_BSKH.astype(dt), v_BSKH.astype(dt), mask=mask_B1TS, scale=cfg.attention_scale
            )
        out_BTD = dense(out_BTNH, self.wo_NHD[...].astype(dt), 2)
        out_BTD += _adapted(self.lora, 'o', out_BTNH, lora_rng)
        if self.biases is not None and 'o_D' in self.biases:
            out_BTD += self.biases['o_D'][...].astype(dt)[None, None]
        return out_BTD, keys


class Mlp(nnx.Module):
    """SwiGLU (llama) or GELU (gpt2) feed-forward block."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        D, F = cfg.d_model, cfg.d_ff
        init, out_init = _normal(cfg.init_std), _normal(cfg.output_init_std)
        self.w_up_DF = _param(rngs, init, (D, F), ('embed', 'mlp'), cfg)
        self.w_gate_DF = _param(rngs, init, (D, F), ('embed', 'mlp'), cfg) if cfg.family == 'llama' else None
        self.w_down_FD = _param(rngs, out_init, (F, D), ('mlp', 'embed'), cfg)
        zeros = jax.nn.initializers.zeros
        self.biases = (
            nnx.Dict(up_F=_param(rngs, zeros, (F,), ('mlp',), cfg), down_D=_param(rngs, zeros, (D,), ('embed',), cfg))
            if cfg.use_bias
            else None
        )
        d, f = ((D, 'embed'),), ((F, 'mlp'),)
        gate = {'gate': (d, f)} if cfg.family == 'llama' else {}
        self.lora = _adapters(cfg, rngs, {**gate, 'up': (d, f), 'down': (f, d)})

    def __call__(self, x_BTD: jax.Array, lora_rng: jax.Array | None = None) -> jax.Array:
        dt = self.cfg.dtype
        h_BTF = dense(x_BTD, self.w_up_DF[...].astype(dt))
        h_BTF += _adapted(self.lora, 'up', x_BTD, lora_rng)
        if self.biases is not None:
            h_BTF += self.biases['up_F'][...].astype(dt)[None, None]
        if self.w_gate_DF is not None:
            gate_BTF = dense(x_BTD, self.w_gate_DF[...].astype(dt))
            h_BTF = jax.nn.silu(gate_BTF + _adapted(self.lora, 'gate', x_BTD, lora_rng)) * h_BTF
        else:
            h_BTF = jax.nn.gelu(h_BTF, approximate=True)
        h_BTF = constrain(h_BTF, ('activation_batch', 'activation_length', 'activation_mlp'), self.cfg.sharding_rules)
        out_BTD = dense(h_BTF, self.w_down_FD[...].astype(dt))
        out_BTD += _adapted(self.lora, 'down', h_BTF, lora_rng)
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
        lora_rng = jax.random.fold_in(dropout_rng, 1) if dropout_rng is not None and self.cfg.lora_dropout else None
        normed_BTD = self.attention_norm(x_BTD)
        attended_BTD, keys = self.attention(normed_BTD, positions_BT, segment_ids_BT, keys, lora_rng)
        attended_BTD = checkpoint_name(attended_BTD, 'attention_out')
        scale = self.cfg.residual_scale
        if scale != 1.0:  # CompleteP's depth scaling of each branch
            attended_BTD *= jnp.asarray(scale, attended_BTD.dtype)
        x_BTD += _dropout(attended_BTD, self.cfg.dropout, rngs[0])
        mlp_BTD = checkpoint_name(self.mlp(self.mlp_norm(x_BTD), lora_rng), 'mlp_out')
        if scale != 1.0:
            mlp_BTD *= jnp.asarray(scale, mlp_BTD.dtype)
        x_BTD += _dropout(mlp_BTD, self.cfg.dropout, rngs[1])
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
        lm = cfg.head == 'lm'
        self.unembedding_DV = (
            None
            if cfg.tie_embeddings or not lm
            else _param(rngs, _normal(cfg.init_std), (D, V), ('embed', 'vocab'), cfg)
        )
        C, zeros = cfg.num_classes, jax.nn.initializers.zeros
        # A classifier's head is new to any pre-trained model: it starts at 0 (every class equally likely).
        self.classifier_DC = None if lm else _param(rngs, zeros, (D, C), ('embed', 'classes'), cfg, trained=True)
        self.classifier_bias_C = None if lm else _param(rngs, zeros, (C,), ('classes',), cfg, trained=True)

    def __call__(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """Float32 logits (of the next token, or of the classes); `dropout_rng=None` means no dropout."""
        return self._run(tokens_BT, positions_BT, segment_ids_BT, dropout_rng, None)[0]

    def extend(
        self, tokens_BT: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """Logits of T new tokens that see the cached ones, and the cache holding them too (prefill, decode)."""
        return self._run(tokens_BT, positions_BT, segment_ids_BT, None, cache)

    def embed(self, tokens_BT: jax.Array, positions_BT: jax.Array) -> jax.Array:
        """The first layer's input: token embeddings (plus learned positions for gpt2)."""
        x_BTD = jnp.take(self.embedding_VD[...], tokens_BT, axis=0).astype(self.cfg.dtype)
        if self.position_embedding_PD is not None:
            # Padding has position -1: any row will do, attention never looks at it.
            positions = jnp.maximum(positions_BT, 0)
            x_BTD += jnp.take(self.position_embedding_PD[...], positions, axis=0).astype(self.cfg.dtype)
        if self.cfg.input_scale != 1.0:  # muP's input multiplier
            x_BTD *= jnp.asarray(self.cfg.input_scale, x_BTD.dtype)
        return x_BTD

    def logits(self, x_BTD: jax.Array) -> jax.Array:
        """The final norm and the output layer: float32 next-token (or class) logits of the last layer's states."""
        cfg = self.cfg
        x_BTD = self.final_norm(x_BTD)
        if self.classifier_DC is not None:
            logits_BTC = dense(x_BTD, self.classifier_DC[...].astype(cfg.dtype)).astype(jnp.float32)
            # muP's output multiplier / m multiplies the matrix's output, not the bias, as the mup package's MuReadout
            return logits_BTC * cfg.logit_scale + self.classifier_bias_C[...].astype(jnp.float32)[None, None]
        if self.unembedding_DV is None:
            logits_BTV = dense(x_BTD, self.embedding_VD[...].astype(cfg.dtype).T)
        else:
            logits_BTV = dense(x_BTD, self.unembedding_DV[...].astype(cfg.dtype))
        logits_BTV = constrain(
            logits_BTV, ('activation_batch', 'activation_length', 'activation_vocab'), cfg.sharding_rules
        ).astype(jnp.float32)
        if cfg.logit_scale != 1.0:  # muP's readout multiplier: output multiplier / width multiplier
            logits_BTV *= cfg.logit_scale
        return logits_BTV

    def states(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """The last layer's states, before the final norm and the output layer (for a loss over vocabulary blocks)."""
        return self._run(tokens_BT, positions_BT, segment_ids_BT, dropout_rng, None, head=False)[0]

    def output_matrix(self) -> jax.Array:
        """The language-model head as a (D, V) matrix in the compute dtype (the embedding's transpose when tied)."""
        if self.unembedding_DV is None:
            return self.embedding_VD[...].astype(self.cfg.dtype).T
        return self.unembedding_DV[...].astype(self.cfg.dtype)

    def _run(self, tokens_BT, positions_BT, segment_ids_BT, dropout_rng, cache, head=True):
        cfg = self.cfg
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones(tokens_BT.shape, jnp.int32)
        x_BTD = self.embed(tokens_BT, positions_BT)
        embed_rng, layer_rng = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
        x_BTD = _dropout(x_BTD, cfg.dropout, embed_rng)
        x_BTD = constrain(x_BTD, ('activation_batch', 'activation_length', 'activation_embed'), cfg.sharding_rules)

        graphdef, layer_params = nnx.split(self.blocks)
        layer_rngs = None if layer_rng is None else jax.random.split(layer_rng, cfg.num_layers)
        if cache is None:
            layer_kv = None
        else:
            k_positions_BS = write_slots(cache.positions_BS, positions_BT.astype(jnp.int32), cache.index_B)
            k_segments_BS = write_slots(cache.segment_ids_BS, segment_ids_BT.astype(jnp.int32), cache.index_B)
            layer_kv = (cache.k_LBSKH, cache.v_LBSKH)

        def run_layer(x_BTD, inputs):
            params, rng, kv = inputs
            keys = None if kv is None else _LayerKeys(kv[0], kv[1], k_positions_BS, k_segments_BS, cache.index_B)
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

        if not head:
            return x_BTD, None
        logits_BTV = self.logits(x_BTD)
        if cfg.head != 'lm':
            return logits_BTV, None
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
            index_B=cache.index_B + tokens_BT.shape[1],
        )
        return logits_BTV, new_cache
