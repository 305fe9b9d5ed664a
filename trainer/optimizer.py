"""AdamW with a learning-rate schedule, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

from typing import Any

import jax
import optax
from ml_collections import config_dict

# Parameter-path keys that are never decayed: norm scales and biases.
_NO_DECAY_KEYS = ('scale', 'bias', 'biases')
_EMBEDDING_KEYS = ('embedding_VD', 'position_embedding_PD')


def warmup_steps(train: config_dict.ConfigDict) -> int:
    """config.train.warmup_steps, clamped to the run: a short smoke test warms up over all its steps."""
    return min(train.warmup_steps, train.steps)


def make_schedule(train: config_dict.ConfigDict) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then the named decay over the remaining steps."""
    peak, steps, warmup = train.learning_rate, train.steps, warmup_steps(train)
    end = peak * train.min_lr_ratio
    # With steps == warmup the decay is never reached, but optax's decays need at least one step.
    decay_steps = max(steps - warmup, 1)
    if train.lr_schedule == 'cosine':
        after_warmup = optax.cosine_decay_schedule(peak, decay_steps, alpha=train.min_lr_ratio)
    elif train.lr_schedule == 'constant':
        after_warmup = optax.constant_schedule(peak)
    elif train.lr_schedule == 'linear':
        after_warmup = optax.linear_schedule(peak, end, decay_steps)
    elif train.lr_schedule == 'wsd':
        # Warmup-stable-decay (MiniCPM): constant at the peak, then a linear decay over the last steps.
        # optax has no such schedule; it is its pieces joined.
        decay = min(max(1, round(steps * train.wsd_decay_fraction)), decay_steps)
        stable = decay_steps - decay
        after_warmup = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, end, decay)], [stable]
        )
    else:
        raise ValueError(f'unknown lr_schedule {train.lr_schedule!r}')  # unreachable after config_checks
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after_warmup], [warmup])


def decay_mask(params: Any, decay_embeddings: bool) -> Any:
    """True for the parameters that get weight decay: matrices, not norms, biases or (by choice) embeddings."""

    def decays(path, _) -> bool:
        keys = [getattr(entry, 'key', None) for entry in path]
        if any(key in _NO_DECAY_KEYS for key in keys):
            return False
        return decay_embeddings or keys[-1] not in _EMBEDDING_KEYS

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train: config_dict.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and its schedule (the schedule is also logged as `learning_rate`)."""
    schedule = make_schedule(train)
    adamw = optax.adamw(
        schedule,
        b1=train.b1,
        b2=train.b2,
        eps=train.eps,
        weight_decay=train.weight_decay,
        mask=lambda params: decay_mask(params, train.decay_embeddings),
    )
    if train.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(train.grad_clip), adamw), schedule
    return adamw, schedule
