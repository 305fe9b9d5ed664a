"""A model's parameters and training FLOPs per token, counted from its own parameter shapes.

The weight matrices are found in the model's parameter tree (`jax.eval_shape` of models/transformer.py),
not written out as a formula that could drift from the model: every parameter whose logical axes hold
'embed' and another axis is a matrix that each token is multiplied by once. Then, per token:

  forward matmul FLOPs   = 2 x (those matrices' parameters + d_model x vocab_size for the unembedding,
                           tied or not); the token and position tables are looked up: 0 FLOPs
  forward attention      = 4 x heads x head_dim x (mean number of keys a query sees) per layer: scores
                           and weighted values, the causal half only ((T + 1) / 2 keys on average, fewer
                           with a sliding window)
  training FLOPs         = 3 x forward (the backward pass costs twice the forward)

Against the 6N convention (Kaplan et al. 2020, Hoffmann et al. 2022): 6N counts every parameter
(embeddings, norms, biases) and no attention; this count is 6 x the multiplied parameters plus
attention. For GPT-2 124M at 1024 tokens: 6N = 747M, this 798M FLOPs per token.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from models.transformer import ModelConfig
from trainer.modeling.model_setup import abstract_model

# Looked up, not multiplied. The unembedding is counted apart, at the real vocabulary (padding rows are no work).
_LOOKUPS = ('embedding_VD', 'position_embedding_PD')
_UNEMBEDDING = 'unembedding_DV'


@dataclasses.dataclass(frozen=True)
class Counts:
    """What a model costs: its parameters and its FLOPs per token."""

    params: int  # all parameters, padded vocabulary rows included
    non_embedding_params: int  # without the token and position tables and an untied unembedding (Kaplan's N)
    matmul_params: int  # multiplied once per token: weight matrices and the d_model x vocab unembedding
    forward_flops_per_token: float
    attention_flops_per_token: float  # forward, included in forward_flops_per_token

    @property
    def train_flops_per_token(self) -> float:
        """Forward and backward: 3 x forward."""
        return 3.0 * self.forward_flops_per_token


def mean_keys_seen(seq_len: int, window: int = 0) -> float:
    """The average number of keys a query attends to in a causal sequence (with a sliding window)."""
    span = min(window, seq_len) if window else seq_len
    # Positions 1..span see 1..span keys; the rest see `span` each.
    return (span * (span + 1) / 2 + (seq_len - span) * span) / seq_len


def _flat(tree: Any, is_leaf=None) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {jax.tree_util.keystr(path, simple=True, separator='/'): leaf for path, leaf in leaves}


def count(cfg: ModelConfig, seq_len: int) -> Counts:
    """Counts for a model config at `seq_len` tokens per sequence, from the shapes of the model it builds.

    A weight matrix is a parameter whose logical axes hold 'embed' and another one besides 'layers': every
    token is multiplied by it once. Biases and norm scales (one axis of their own) are added, not multiplied.
    """
    _, shapes, logical = abstract_model(cfg)  # jax.eval_shape: nothing is allocated
    sizes = {name: math.prod(leaf.shape) for name, leaf in _flat(shapes).items()}
    axes = _flat(logical, is_leaf=lambda x: isinstance(x, tuple))
    total = sum(sizes.values())
    embedding = sum(sizes[name] for name in (*_LOOKUPS, _UNEMBEDDING) if name in sizes)
    matrices = sum(
        size
        for name, size in sizes.items()
        if name not in (*_LOOKUPS, _UNEMBEDDING) and 'embed' in axes[name] and len(set(axes[name]) - {'layers'}) >= 2
    )
    matmul = matrices + cfg.d_model * cfg.vocab_size
    attention = 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * mean_keys_seen(seq_len, cfg.sliding_window)
    return Counts(
        params=total,
        non_embedding_params=total - embedding,
        matmul_params=matmul,
        forward_flops_per_token=2.0 * matmul + attention,
        attention_flops_per_token=attention,
    )
