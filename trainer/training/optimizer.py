"""AdamW or Muon with a learning-rate schedule, global-norm clipping, and each parameter's multipliers from its role."""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import optax
from ml_collections import config_dict
from optax import contrib

from trainer.modeling import param_roles

# Muon (Jordan et al. 2024; Liu et al. 2025, "Muon is scalable for LLM training"): each hidden matrix's momentum
# is orthogonalized by Newton-Schulz iterations. optax.contrib's scale_by_muon does that (with the published
# quintic coefficients, 3.4445, -4.7750, 2.0315); ours are the choice of parameters, their matrix axes, and
# Moonlight's RMS matching (optax has it only inside its private module, not exported).
#
# How many of a hidden matrix's axes, after its leading batch axes (the stacked layers), are its fan-in; the
# rest of the name's shape letters are its fan-out. wq_DNH is the D x (N*H) matrix of each layer, wo_NHD (N*H) x D.
MUON_FAN_IN_AXES = {'wq_DNH': 1, 'wk_DKH': 1, 'wv_DKH': 1, 'wo_NHD': 2, 'w_up_DF': 1, 'w_gate_DF': 1, 'w_down_FD': 1}


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


def muon_dimensions(name: str, ndim: int) -> contrib.MuonDimensionNumbers | None:
    """A hidden matrix's (fan-in, fan-out) axes for Muon, by its path name; None for what AdamW updates."""
    if not re.search(param_roles.HIDDEN_PATTERN, name):
        return None
    leaf = name.rsplit('/', 1)[-1]
    letters = len(leaf.rsplit('_', 1)[-1])  # 'DNH': the matrix's own axes; any before them are batch axes
    first = ndim - letters
    fan_in = MUON_FAN_IN_AXES[leaf]
    return contrib.MuonDimensionNumbers(
        reduction_axis=tuple(range(first, first + fan_in)), output_axis=tuple(range(first + fan_in, ndim))
    )


def _muon(
    train: config_dict.ConfigDict, learning_rate: optax.ScalarOrSchedule, weight_decay: float
) -> optax.GradientTransformation:
    """Muon for the hidden matrices of one parameter group, whatever their shapes (read from their path names).

    Updates are orthogonalized momentum scaled by rms_scale x sqrt(max(fan_in, fan_out)), Moonlight's rule,
    so that their RMS is about AdamW's and learning rate, schedule and decoupled weight decay carry over.
    """

    def dimensions(updates: Any) -> Any:
        # Called on the group's masked tree (optax.MaskedNode where another group's parameters are).
        def one(path, update):
            if isinstance(update, optax.MaskedNode):
                return update
            return muon_dimensions(param_roles.path_name(path), update.ndim)

        return jax.tree_util.tree_map_with_path(one, updates, is_leaf=lambda x: isinstance(x, optax.MaskedNode))

    return optax.chain(
        contrib.scale_by_muon(
            ns_steps=train.muon_ns_steps,
            beta=train.muon_momentum,
            nesterov=True,
            weight_dimension_numbers=dimensions,
        ),
        _scale_to_adamw_rms(dimensions, train.muon_rms_scale),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


def _scale_to_adamw_rms(dimensions: Any, rms_scale: float) -> optax.GradientTransformation:
    """Each orthogonalized update x rms_scale x sqrt(max(fan_in, fan_out)) (Liu et al. 2025, eq. 4)."""

    def scale(update: jax.Array, dims: contrib.MuonDimensionNumbers) -> jax.Array:
        fan_in = math.prod(update.shape[a] for a in dims.reduction_axis)
        fan_out = math.prod(update.shape[a] for a in dims.output_axis)
        return update * (rms_scale * math.sqrt(max(fan_in, fan_out)))

    def update_fn(updates, state, params=None):
        del params
        is_leaf = lambda x: isinstance(x, contrib.MuonDimensionNumbers)  # noqa: E731
        return jax.tree.map(scale, updates, dimensions(updates), is_leaf=is_leaf), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def make_optimizer(train: config_dict.ConfigDict, roles: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer of the trainable params (`roles`: their Role tree) and its schedule (logged as `learning_rate`).

    AdamW with every multiplier 1 (weight decay on or off): one AdamW with a decay mask. Otherwise each group
    of parameters with the same learning-rate, weight-decay and epsilon multipliers, and under Muon the same
    update rule (Muon for the hidden matrices, AdamW for embeddings, the output head, norms, biases and
    adapters), gets its own transform (optax.multi_transform), sharing the clipping.
    """
    schedule = make_schedule(train)
    leaves = jax.tree.leaves(roles)
    plain = train.optimizer == 'adamw' and all(
        r.lr_multiplier == 1.0 and r.weight_decay_multiplier in (0.0, 1.0) and r.eps_multiplier == 1.0 for r in leaves
    )

    def scaled(lr_multiplier: float) -> optax.ScalarOrSchedule:
        return schedule if lr_multiplier == 1.0 else (lambda step: lr_multiplier * schedule(step))

    def adamw(lr_multiplier: float, decay: Any, eps_multiplier: float = 1.0) -> optax.GradientTransformation:
        learning_rate = scaled(lr_multiplier)
        eps = train.eps * eps_multiplier
        if isinstance(decay, float):  # one group's decay
            return optax.adamw(learning_rate, b1=train.b1, b2=train.b2, eps=eps, weight_decay=decay)
        return optax.adamw(
            learning_rate, b1=train.b1, b2=train.b2, eps=eps, weight_decay=train.weight_decay, mask=decay
        )

    if plain:
        tx = adamw(1.0, jax.tree.map(lambda r: r.weight_decay_multiplier > 0, roles))
    else:
        muon = train.optimizer == 'muon'

        def group(path, role) -> tuple[str, float, float, float]:
            if muon and muon_dimensions(param_roles.path_name(path), 2) is not None:
                return 'muon', role.lr_multiplier, role.weight_decay_multiplier, 1.0  # Adam's epsilon: not Muon's
            return 'adamw', role.lr_multiplier, role.weight_decay_multiplier, role.eps_multiplier

        groups = jax.tree_util.tree_map_with_path(group, roles)
        # AdamW's groups keep the labels they had before Muon existed: checkpoints of such runs still resume.
        names = {
            g: ('muon_' if g[0] == 'muon' else '') + f'lr{g[1]:g}_wd{g[2]:g}' + (f'_eps{g[3]:g}' if g[3] != 1.0 else '')
            for g in sorted(set(jax.tree.leaves(groups, is_leaf=_is_group)))
        }
        make = {'adamw': adamw, 'muon': lambda lr, wd, _: _muon(train, scaled(lr), wd)}
        tx = optax.multi_transform(
            {name: make[rule](lr, train.weight_decay * wd, eps) for (rule, lr, wd, eps), name in names.items()},
            jax.tree.map(lambda g: names[g], groups, is_leaf=_is_group),
        )
    if train.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(train.grad_clip), tx), schedule
    return tx, schedule


def _is_group(value: Any) -> bool:
    return isinstance(value, tuple)
