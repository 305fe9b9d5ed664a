"""The train state, one pytree, created directly in its sharded layout."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding

from models.transformer import Decoder, ModelConfig
from trainer.errors import ConfigError
from trainer.modeling import param_roles
from trainer.modeling.model_setup import abstract_model
from trainer.runtime.mesh import logical_sharding, replicated


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; params are a plain nested dict of arrays."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict[str, Any]
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key data: folded with the step inside the step for dropout


@dataclasses.dataclass
class ShardedState:
    """A train state's shapes and shardings, the model's structure, and a fresh state made on first use.

    A resumed run restores into `abstract` and never pays for (or holds the memory of) a fresh init.
    """

    abstract: TrainState  # jax.ShapeDtypeStruct leaves carrying their shardings
    shardings: TrainState  # same tree, NamedSharding leaves
    graphdef: nnx.GraphDef  # merged with params to rebuild the model inside a step
    logical_axes: dict[str, Any]  # params tree of logical axis-name tuples
    partition: param_roles.Partition  # which params train (and have optimizer state)
    _init: Callable[[], TrainState]
    _init_around: Callable[[Any], TrainState]

    @functools.cached_property
    def state(self) -> TrainState:
        """A freshly initialized state, computed straight into its shardings."""
        return self._init()

    def start_from(self, params: Any) -> TrainState:
        """A state at step 0 around given params (donated: no second copy) with a fresh optimizer.

        Parameters missing from `params` (LoRA adapters, a classifier head new to a pre-trained model) are
        initialized as in a fresh run; the initialization of the given ones is never computed (XLA drops it).
        """
        return self._init_around(params)

    def missing(self, params: Any) -> list[str]:
        """Paths of the model's parameters that `params` lacks."""
        given = set(param_roles.leaf_names(params))
        return [name for name in param_roles.leaf_names(self.abstract.params) if name not in given]


def param_shardings(shapes: Any, logical: Any, mesh: Mesh, rules) -> Any:
    """Each parameter's sharding; a dimension its mesh axes do not divide is a ConfigError."""

    def sharding(path, shape_struct, names) -> NamedSharding:
        result = logical_sharding(names, mesh, rules)
        for dim, (size, axes) in enumerate(zip(shape_struct.shape, result.spec, strict=False)):
            split = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)) if a)
            if size % split:
                fix = (
                    f'set config.model.vocab_multiple to a multiple of {split} (the embedding rows are padded)'
                    if names[dim] == 'vocab'
                    else 'change the model size or config.mesh'
                )
                raise ConfigError(
                    f'parameter {jax.tree_util.keystr(path, simple=True, separator="/")} has {size} along '
                    f'{names[dim]!r}, which mesh axes {axes!r} ({split} devices) do not divide: {fix} (or the '
                    f'rule for {names[dim]!r} in config.mesh.rules).'
                )
        return result

    return jax.tree_util.tree_map_with_path(sharding, shapes, logical, is_leaf=lambda x: isinstance(x, tuple))


def create_train_state(
    model_cfg: ModelConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    seed: int,
    partition: param_roles.Partition | None = None,
) -> ShardedState:
    """The state's layout; `.state` initializes params and optimizer state inside jit, into their shardings.

    Only the params `partition` calls trainable have optimizer state (all of them by default).
    """
    graphdef, shapes, logical = abstract_model(model_cfg)
    params_sharding = param_shardings(shapes, logical, mesh, model_cfg.sharding_rules)
    partition = partition or param_roles.Partition(jax.tree.map(lambda _: param_roles.Role(), shapes))

    def fresh_params() -> Any:
        params = nnx.to_pure_dict(nnx.state(Decoder(model_cfg, nnx.Rngs(seed)), nnx.Param))
        # Roles may scale a fresh init (muP's hidden matrices, a zero readout); restored params are never scaled.
        return jax.tree.map(
            lambda p, role: p if role.init_multiplier == 1.0 else (p * role.init_multiplier).astype(p.dtype),
            params,
            partition.roles,
        )

    def init_around(params: Any) -> TrainState:
        given = set(param_roles.leaf_names(params))
        params = param_roles.merge(params, param_roles.select_paths(fresh_params(), lambda name: name not in given))
        # What trains is stored in param_dtype, whatever the model made it: under LoRA the base is made in
        # lora.base_dtype, and a base weight that train.param_roles unfreezes would see its updates round away.
        params = jax.tree.map(
            lambda p, role: p.astype(model_cfg.param_dtype) if role.trainable else p, params, partition.roles
        )
        rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
        opt_state = tx.init(partition.trainable(params))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, rng=rng)

    def init() -> TrainState:
        return init_around(fresh_params())

    abstract_state = jax.eval_shape(init)
    # Optimizer moments follow their parameters; scalars such as Adam's count are replicated
    # (left to jit, they may land on one device and break the next step).
    # Parameter groups of their own (optax.multi_transform) leave MaskedNode placeholders, which hold nothing.
    opt_sharding = optax.tree_map_params(
        tx,
        lambda value, s: value if isinstance(value, optax.MaskedNode) else s,
        abstract_state.opt_state,
        partition.trainable(params_sharding),
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda value: isinstance(value, optax.MaskedNode),
    )
    shardings = TrainState(step=replicated(mesh), params=params_sharding, opt_state=opt_sharding, rng=replicated(mesh))
    abstract = jax.tree.map(
        lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
        abstract_state,
        shardings,
    )
    return ShardedState(
        abstract=abstract,
        shardings=shardings,
        graphdef=graphdef,
        logical_axes=logical,
        partition=partition,
        _init=jax.jit(init, out_shardings=shardings),
        # Given params keep the shardings they arrive in (those of `abstract`, or a subset of them).
        _init_around=jax.jit(init_around, out_shardings=shardings, donate_argnums=0),
    )
