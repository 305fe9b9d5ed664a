"""AdamW with a learning-rate schedule, global-norm clipping, and each parameter's multipliers from its role."""

from __future__ import annotations

from typing import Any

import jax
import optax
from ml_collections import config_dict


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


def make_optimizer(train: config_dict.ConfigDict, roles: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer of the trainable params (`roles`: their Role tree) and its schedule (logged as `learning_rate`).

    Every multiplier 1 (weight decay on or off): one AdamW with a decay mask. Otherwise each group of
    parameters with the same learning-rate, weight-decay and epsilon multipliers gets its own AdamW
    (optax.multi_transform), sharing the clipping.
    """
    schedule = make_schedule(train)
    leaves = jax.tree.leaves(roles)
    plain = all(
        r.lr_multiplier == 1.0 and r.weight_decay_multiplier in (0.0, 1.0) and r.eps_multiplier == 1.0 for r in leaves
    )

    def adamw(lr_multiplier: float, decay: Any, eps_multiplier: float = 1.0) -> optax.GradientTransformation:
        learning_rate = schedule if lr_multiplier == 1.0 else (lambda step: lr_multiplier * schedule(step))
        eps = train.eps * eps_multiplier
        if isinstance(decay, float):  # one group's decay
            return optax.adamw(learning_rate, b1=train.b1, b2=train.b2, eps=eps, weight_decay=decay)
        return optax.adamw(
            learning_rate, b1=train.b1, b2=train.b2, eps=eps, weight_decay=train.weight_decay, mask=decay
        )

    def group(r) -> tuple[float, float, float]:
        return (r.lr_multiplier, r.weight_decay_multiplier, r.eps_multiplier)

    if plain:
        tx = adamw(1.0, jax.tree.map(lambda r: r.weight_decay_multiplier > 0, roles))
    else:
        groups = sorted({group(r) for r in leaves})
        label = {g: f'lr{g[0]:g}_wd{g[1]:g}' + (f'_eps{g[2]:g}' if g[2] != 1.0 else '') for g in groups}
        tx = optax.multi_transform(
            {label[(lr, wd, eps)]: adamw(lr, train.weight_decay * wd, eps) for lr, wd, eps in groups},
            jax.tree.map(lambda r: label[group(r)], roles),
        )
    if train.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(train.grad_clip), tx), schedule
    return tx, schedule
