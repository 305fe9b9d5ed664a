"""The parameter-role table: which parameters train, and their learning-rate, weight-decay and init multipliers.

One mechanism instead of special cases in the optimizer: a list of (regex, Role) searched in order in
each parameter's path ('blocks/attention/wq_DNH', 'final_norm/scale', 'blocks/attention/lora/q/a'); the
first match decides. config.train.param_roles come first, then LoRA's roles, muP's, then the built-in ones.
Frozen parameters get no gradient and no optimizer state.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
from ml_collections import config_dict

from trainer.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Role:
    """How one parameter is trained."""

    trainable: bool = True
    lr_multiplier: float = 1.0
    weight_decay_multiplier: float = 1.0
    init_multiplier: float = 1.0  # a fresh parameter's initial values are scaled by this (0: starts at zero)
    eps_multiplier: float = 1.0  # Adam's epsilon (config.train.eps) x this: CompleteP's depth rule


NO_DECAY = Role(weight_decay_multiplier=0.0)
FROZEN = Role(trainable=False)
# Adapters and a classifier head: what a LoRA run trains.
ADAPTER_PATTERN = r'(^|/)lora/|^classifier_'
# muP's hidden matrices: both their fan-in and fan-out grow with the width.
HIDDEN_PATTERN = r'^blocks/(attention/(wq_DNH|wk_DKH|wv_DKH|wo_NHD)|mlp/(w_up_DF|w_gate_DF|w_down_FD))$'
READOUT_PATTERN = r'^(unembedding_DV|classifier_DC)$'


def parametrization_roles(model: config_dict.ConfigDict) -> list[tuple[str, Role]]:
    """The roles of the width and depth parametrizations: muP's (under parametrization='mup') and CompleteP's
    (under depth_scaling='completep', with SP or muP); none for a plain SP model.

    muP for Adam (Yang et al. 2022, Tensor Programs V, Table 3), with m = d_model / base_width.

    Hidden matrices: init std / sqrt(m), learning rate / m. Embeddings, norms and biases: unchanged. The
    readout keeps its init and learning rate (its output is multiplied by 1/m in the model), or starts at
    zero with mup_zero_readout. Weight decay on hidden matrices: with mup_weight_decay='coupled' AdamW's
    (learning rate / m) x wd; with 'constant' wd x m, so that their decay per step, lr x wd, is the base's
    (the mup package's MuAdam and MuAdamW scale each hidden matrix's weight_decay by its width multiplier).
    CompleteP's depth rule (depth_scaling='completep', Dey et al. 2025, Table 1) multiplies the learning rate
    of the hidden matrices and of the blocks' norms and biases by (L / base_depth)^(depth_alpha - 1) (1 at
    depth_alpha = 1) and their Adam epsilon by (L / base_depth)^-depth_alpha: their gradients carry the
    residual branches' multiplier, so epsilon shrinks with them (as the authors' nanoGPT-mup does for its
    hidden groups, after the paper's Equation 40). Embeddings, readout and final norm keep theirs.
    """
    mup = model.parametrization == 'mup'
    depth = model.num_layers / (model.base_depth or model.num_layers) if model.depth_scaling == 'completep' else 1.0
    depth_lr, depth_eps = depth ** (model.depth_alpha - 1), depth**-model.depth_alpha
    rules = []
    if mup or depth != 1.0:
        m = model.d_model / (model.base_width or model.d_model) if mup else 1.0
        decay = m if mup and model.mup_weight_decay == 'constant' else 1.0
        hidden = Role(
            lr_multiplier=depth_lr / m, weight_decay_multiplier=decay, init_multiplier=m**-0.5, eps_multiplier=depth_eps
        )
        rules.append((HIDDEN_PATTERN, hidden))
    if depth != 1.0:
        blocks = Role(lr_multiplier=depth_lr, weight_decay_multiplier=0.0, eps_multiplier=depth_eps)
        rules.append((r'^blocks/.*(norm/|bias)', blocks))
    if mup:
        rules.append((READOUT_PATTERN, Role(init_multiplier=0.0) if model.mup_zero_readout else Role()))
    return rules


def table(config: config_dict.ConfigDict) -> list[tuple[str, Role]]:
    """The run's roles, in the order they are tried."""
    rules = []
    for i, entry in enumerate(config.train.param_roles):
        field = f'config.train.param_roles[{i}]'
        if len(entry) not in (4, 5) or not isinstance(entry[0], str):
            raise ConfigError(
                f'{field}={entry!r} must be (regex, trainable, lr_multiplier, weight_decay_multiplier'
                '[, init_multiplier]).'
            )
        pattern, trainable, *multipliers = entry
        try:
            re.compile(pattern)
        except re.error as error:
            raise ConfigError(f'{field}: {pattern!r} is not a regular expression ({error}).') from None
        if any(value < 0 for value in multipliers):
            raise ConfigError(f'{field}={entry!r}: the multipliers must not be negative.')
        rules.append((pattern, Role(bool(trainable), *map(float, multipliers))))
    if config.lora.rank:
        rules += [(ADAPTER_PATTERN, Role()), ('', FROZEN)]
    rules += parametrization_roles(config.model)
    rules.append((r'(^|/)(scale|bias|biases)(/|$)|^classifier_bias', NO_DECAY))  # norms and biases
    if not config.train.decay_embeddings:
        rules.append((r'^(embedding_VD|position_embedding_PD)$', NO_DECAY))
    return rules


def path_name(path: tuple) -> str:
    """'blocks/attention/wq_DNH' for a key path into the params dict."""
    return '/'.join(str(getattr(entry, 'key', entry)) for entry in path)


def assign(params: Any, rules: list[tuple[str, Role]]) -> Any:
    """Each parameter's Role (a tree shaped like `params`, arrays or shapes)."""

    def role(path, _) -> Role:
        name = path_name(path)
        return next((r for pattern, r in rules if re.search(pattern, name)), Role())

    return jax.tree_util.tree_map_with_path(role, params)


def select(tree: Any, keep: Any) -> dict[str, Any]:
    """The nested dict `tree` with only the leaves whose `keep` (same structure, bools) is True; empty dicts dropped."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            part = select(value, keep[key])
            if part:
                out[key] = part
        elif keep[key]:
            out[key] = value
    return out


def leaf_names(tree: Any) -> list[str]:
    """The path name of every leaf of a params tree, in the tree's order."""
    return [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def select_paths(tree: dict[str, Any], keep: Callable[[str], bool]) -> dict[str, Any]:
    """The nested dict `tree` with only the leaves whose path name ('blocks/mlp/w_up_DF') `keep` accepts."""
    return select(tree, jax.tree_util.tree_map_with_path(lambda path, _: keep(path_name(path)), tree))


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two nested dicts with disjoint leaves as one."""
    out = dict(a)
    for key, value in b.items():
        out[key] = merge(out[key], value) if key in out else value
    return out


@dataclasses.dataclass(frozen=True)
class Partition:
    """The params split into what trains and what stays frozen, by each parameter's Role."""

    roles: Any  # tree of Role, shaped like the params

    def trainable(self, params: dict[str, Any]) -> dict[str, Any]:
        return select(params, jax.tree.map(lambda r: r.trainable, self.roles))

    def frozen(self, params: dict[str, Any]) -> dict[str, Any]:
        return select(params, jax.tree.map(lambda r: not r.trainable, self.roles))

    def trainable_roles(self) -> dict[str, Any]:
        return select(self.roles, jax.tree.map(lambda r: r.trainable, self.roles))

    @property
    def everything_trains(self) -> bool:
        return all(r.trainable for r in jax.tree.leaves(self.roles))


def partition(config: config_dict.ConfigDict, params: Any) -> Partition:
    """The run's partition of `params` (arrays or shapes)."""
    return Partition(roles=assign(params, table(config)))
