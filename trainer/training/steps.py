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

from models.transformer import ModelConfig, constrain, dense
from trainer.modeling.param_roles import Partition
from trainer.modeling.param_roles import merge as merge_params
from trainer.runtime.mesh import batch_sharding, replicated
from trainer.training.state import TrainState

Batch = dict[str, jax.Array]
# Every batch array is (batch, sequence): token ids, next-token targets, packing metadata, loss weights.
BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'weights')


def pooled_logits(logits_BTC: jax.Array, weights_BT: jax.Array, pool: str) -> jax.Array:
    """A classifier's logits per row: at the last counted position, or their mean over the counted positions."""
    if pool == 'mean':  # the head is linear: the mean of the logits is the logits of the mean state
        return (logits_BTC * weights_BT[..., None]).sum(1) / jnp.maximum(weights_BT.sum(1), 1.0)[:, None]
    last_B = weights_BT.shape[1] - 1 - jnp.argmax(weights_BT[:, ::-1] > 0, axis=1)
    return jnp.take_along_axis(logits_BTC, last_B[:, None, None], axis=1)[:, 0]


def counted(batch: Batch, model_cfg: ModelConfig) -> jax.Array:
    """What the loss is a mean over: counted tokens, or (a classifier) rows holding an example."""
    if model_cfg.head == 'classify':
        return (batch['weights'].sum(1) > 0).sum().astype(jnp.float32)
    return batch['weights'].sum()


def chunked_next_token_losses(model: Any, batch: Batch, dropout_rng: jax.Array | None, chunk: int) -> jax.Array:
    """Per-token cross-entropy read over blocks of `chunk` vocabulary ids, never the whole (B, T, V) logits.

    An online log-sum-exp runs over the blocks in a scan whose body is rematerialized, so the backward
    pass recomputes each block's logits instead of keeping them: memory O(B x T x chunk), not x V.
    (optax's softmax_cross_entropy needs the whole logits; this is the blockwise form of the same sum.)
    """
    cfg = model.cfg
    x_BTD = model.final_norm(model.states(batch['inputs'], batch['positions'], batch['segment_ids'], dropout_rng))
    w_DV = model.output_matrix()
    blocks = -(-w_DV.shape[1] // chunk)
    w_DV = jnp.pad(w_DV, ((0, 0), (0, blocks * chunk - w_DV.shape[1])))  # ids past the vocabulary: masked below
    w_NDC = w_DV.reshape(w_DV.shape[0], blocks, chunk).transpose(1, 0, 2)
    targets_BT = batch['targets']

    @jax.checkpoint
    def block(carry, inputs):
        running_max_BT, sum_exp_BT, target_logit_BT = carry
        w_DC, start = inputs
        logits_BTC = dense(x_BTD, w_DC).astype(jnp.float32) * cfg.logit_scale
        ids_C = start + jnp.arange(chunk)
        logits_BTC = jnp.where(ids_C < cfg.vocab_size, logits_BTC, -jnp.inf)
        new_max_BT = jnp.maximum(running_max_BT, logits_BTC.max(-1))
        sum_exp_BT = sum_exp_BT * jnp.exp(running_max_BT - new_max_BT) + jnp.exp(
            logits_BTC - new_max_BT[..., None]
        ).sum(-1)
        inside_BT = (targets_BT >= start) & (targets_BT < start + chunk)
        picked_BT = jnp.take_along_axis(logits_BTC, jnp.clip(targets_BT - start, 0, chunk - 1)[..., None], -1)[..., 0]
        return (new_max_BT, sum_exp_BT, target_logit_BT + jnp.where(inside_BT, picked_BT, 0.0)), None

    zeros = jnp.zeros(targets_BT.shape, jnp.float32)
    init = (jnp.full(targets_BT.shape, -jnp.inf), zeros, zeros)
    (max_BT, sum_exp_BT, target_BT), _ = jax.lax.scan(block, init, (w_NDC, jnp.arange(blocks) * chunk))
    return max_BT + jnp.log(sum_exp_BT) - target_BT


def summed_loss(
    params: Any, batch: Batch, graphdef: nnx.GraphDef, model_cfg: ModelConfig, dropout_rng: jax.Array | None
) -> tuple[jax.Array, jax.Array]:
    """Sum over the batch of weighted next-token losses (or per-example class losses), and the correct labels.

    Packed documents do not attend to each other. A classifier's label is each row's first target.
    """
    model = nnx.merge(graphdef, params)
    if model_cfg.head == 'lm' and model_cfg.loss_vocab_chunk:
        losses_BT = chunked_next_token_losses(model, batch, dropout_rng, model_cfg.loss_vocab_chunk)
        return (losses_BT * batch['weights']).sum(), jnp.zeros((), jnp.float32)
    logits = model(batch['inputs'], batch['positions'], batch['segment_ids'], dropout_rng=dropout_rng)
    if model_cfg.head == 'classify':
        logits_BC = pooled_logits(logits, batch['weights'], model_cfg.pool)
        labels_B, has_example_B = batch['targets'][:, 0], batch['weights'].sum(1) > 0
        losses_B = optax.softmax_cross_entropy_with_integer_labels(logits_BC, labels_B)
        correct_B = jnp.argmax(logits_BC, -1) == labels_B
        return jnp.where(has_example_B, losses_B, 0.0).sum(), (correct_B & has_example_B).sum().astype(jnp.float32)
    losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
    return (losses_BT * batch['weights']).sum(), jnp.zeros((), jnp.float32)


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
    partition: Partition,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum_steps: int,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step over the global batch, accumulating gradients over micro-batches.

    Only the trainable params are differentiated and updated; the frozen ones (LoRA's base) pass through.
    """
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    # Each micro-batch's summed loss is divided by the whole batch's weight, so the accumulated
    # gradient is exactly that of the mean over all counted tokens of the global batch.
    total_weight = jnp.maximum(counted(batch, model_cfg), 1.0)
    trainable, frozen = partition.trainable(state.params), partition.frozen(state.params)
    uses_rng = model_cfg.dropout > 0 or (model_cfg.lora_rank > 0 and model_cfg.lora_dropout > 0)

    def micro_loss(trained: Any, micro: Batch, dropout_rng: jax.Array | None) -> jax.Array:
        params = merge_params(trained, frozen)
        return summed_loss(params, micro, graphdef, model_cfg, dropout_rng)[0] / total_weight

    def micro_step(i: jax.Array, micro: Batch) -> tuple[jax.Array, Any]:
        dropout_rng = jax.random.fold_in(rng, i) if uses_rng else None
        return jax.value_and_grad(micro_loss)(trainable, micro, dropout_rng)

    if grad_accum_steps == 1:
        loss, grads = micro_step(jnp.int32(0), batch)
    else:

        def accumulate(carry, indexed_micro):
            loss_sum, grad_sum = carry
            loss, grads = micro_step(*indexed_micro)
            return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        micro_batches = split_micro_batches(batch, grad_accum_steps, model_cfg.sharding_rules)
        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, trainable))
        (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), micro_batches))

    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    new_params = merge_params(optax.apply_updates(trainable, updates), frozen)
    new_state = state.replace(step=state.step + 1, params=new_params, opt_state=opt_state)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'learning_rate': schedule(state.step)}
    return new_state, metrics


def eval_step(params: Any, batch: Batch, *, graphdef: nnx.GraphDef, model_cfg: ModelConfig) -> dict[str, jax.Array]:
    """One batch's sums, without dropout: loss, what it counted (tokens or examples), and the UTF-8 bytes of
    text those tokens stand for (language models: the batch's `target_bytes`) or the correctly labeled
    examples (classifiers)."""
    loss, correct = summed_loss(params, batch, graphdef, model_cfg, dropout_rng=None)
    sums = {'loss': loss, 'count': counted(batch, model_cfg)}
    if model_cfg.head == 'classify':
        return sums | {'correct': correct}
    return sums | {'bytes': (batch['target_bytes'] * batch['weights']).sum()}


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
    """The jitted steps, their layouts fixed by the mesh."""

    train: Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]
    eval: Callable[[Any, Batch], dict[str, jax.Array]]


def jit_steps(
    graphdef: nnx.GraphDef,
    model_cfg: ModelConfig,
    partition: Partition,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum_steps: int,
    state_shardings: TrainState,
    mesh: Mesh,
) -> CompiledSteps:
    """Jits train_step (state donated) and eval_step with explicit in/out shardings."""
    batch = dict.fromkeys(BATCH_KEYS, batch_sharding(mesh, model_cfg.sharding_rules))
    train = jax.jit(
        functools.partial(
            train_step,
            graphdef=graphdef,
            model_cfg=model_cfg,
            partition=partition,
            tx=tx,
            schedule=schedule,
            grad_accum_steps=grad_accum_steps,
        ),
        in_shardings=(state_shardings, batch),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=0,
    )
    evaluate = jax.jit(
        functools.partial(eval_step, graphdef=graphdef, model_cfg=model_cfg),
        # One sharding for every array of the batch, whichever they are (language models' carry target_bytes).
        in_shardings=(state_shardings.params, batch_sharding(mesh, model_cfg.sharding_rules)),
        out_shardings=replicated(mesh),
    )
    return CompiledSteps(train=train, eval=evaluate)
