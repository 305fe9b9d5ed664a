"""The jitted train and eval steps: pure functions of (state, batch), shardings from the mesh."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from models.transformer import ModelConfig, constrain
from trainer.mesh import batch_sharding, replicated
from trainer.state import TrainState

Batch = dict[str, jax.Array]
# Every batch array is (batch, sequence): token ids, next-token targets, packing metadata, loss weights.
BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'weights')


def summed_loss(params: Any, batch: Batch, graphdef: nnx.GraphDef, dropout_rng: jax.Array | None) -> jax.Array:
    """Sum over the batch of weighted next-token losses; packed documents do not attend to each other."""
    model = nnx.merge(graphdef, params)
    logits_BTV = model(batch['inputs'], batch['positions'], batch['segment_ids'], dropout_rng=dropout_rng)
    losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch['targets'])
    return (losses_BT * batch['weights']).sum()


def split_micro_batches(batch: Batch, num_micro: int, rules) -> Batch:
    """(B, T) -> (num_micro, B / num_micro, T), each micro-batch spread over all batch devices.

    Micro-batch i takes rows i, i + num_micro, ...: every device's block of rows holds some of
    every micro-batch, so the split needs no communication.
    """

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)
        return constrain(x, (None, 'activation_batch', 'activation_length'), rules)

    return jax.tree.map(split, batch)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    graphdef: nnx.GraphDef,
    model_cfg: ModelConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum_steps: int,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step over the global batch, accumulating gradients over micro-batches."""
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    # Each micro-batch's summed loss is divided by the whole batch's weight, so the accumulated
    # gradient is exactly that of the mean over all counted tokens of the global batch.
    total_weight = jnp.maximum(batch['weights'].sum(), 1.0)

    def micro_loss(params: Any, micro: Batch, dropout_rng: jax.Array | None) -> jax.Array:
        return summed_loss(params, micro, graphdef, dropout_rng) / total_weight

    def micro_step(i: jax.Array, micro: Batch) -> tuple[jax.Array, Any]:
        dropout_rng = jax.random.fold_in(rng, i) if model_cfg.dropout > 0 else None
        return jax.value_and_grad(micro_loss)(state.params, micro, dropout_rng)

    if grad_accum_steps == 1:
        loss, grads = micro_step(jnp.int32(0), batch)
    else:

        def accumulate(carry, indexed_micro):
            loss_sum, grad_sum = carry
            loss, grads = micro_step(*indexed_micro)
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        micro_batches = split_micro_batches(batch, grad_accum_steps, model_cfg.sharding_rules)
        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
        (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), micro_batches))

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'learning_rate': schedule(state.step)}
    return new_state, metrics


def eval_step(
    params: Any, batch: Batch, *, graphdef: nnx.GraphDef, byte_lengths: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Summed loss, counted tokens, and the UTF-8 bytes those tokens stand for, of one batch, without dropout."""
    text_bytes = (byte_lengths[batch['targets']] * batch['weights']).sum()
    return summed_loss(params, batch, graphdef, dropout_rng=None), batch['weights'].sum(), text_bytes


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
    """The jitted steps, their layouts fixed by the mesh."""

    train: Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]
    eval: Callable[[Any, Batch], tuple[jax.Array, jax.Array, jax.Array]]


def jit_steps(
    graphdef: nnx.GraphDef,
    model_cfg: ModelConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum_steps: int,
    state_shardings: TrainState,
    mesh: Mesh,
    byte_lengths: Any,
) -> CompiledSteps:
    """Jits train_step (state donated) and eval_step with explicit in/out shardings."""
    batch = dict.fromkeys(BATCH_KEYS, batch_sharding(mesh, model_cfg.sharding_rules))
    train = jax.jit(
        functools.partial(
            train_step,
            graphdef=graphdef,
            model_cfg=model_cfg,
            tx=tx,
            schedule=schedule,
            grad_accum_steps=grad_accum_steps,
        ),
        in_shardings=(state_shardings, batch),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=0,
    )
    evaluate = jax.jit(
        functools.partial(eval_step, graphdef=graphdef, byte_lengths=jnp.asarray(byte_lengths, jnp.float32)),
        in_shardings=(state_shardings.params, batch),
        out_shardings=replicated(mesh),
    )
    return CompiledSteps(train=train, eval=evaluate)
