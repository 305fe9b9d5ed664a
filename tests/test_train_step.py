"""The optimizer step: accumulation, compilation once, schedules and the weight-decay mask."""

import jax
import numpy as np
import pytest
from conftest import BATCH, mesh_for, random_batch, tiny_config

from trainer.modeling import param_roles
from trainer.training import optimizer, train

GOLDEN_LOSS = 3.6234543
GOLDEN_GRAD_NORM = 0.7354351


def one_step(config, batch_seed: int = 0, unequal_rows: bool = False):
    mesh = mesh_for(config)
    with jax.set_mesh(mesh):
        setup = train.build(config, mesh)
        batch = random_batch(setup, config, batch_seed)
        if unequal_rows:  # row r counts only its first r + 1 targets: micro-batches of unequal weight
            weights = np.asarray(batch['weights']) * (np.arange(config.data.seq_len)[None] <= np.arange(BATCH)[:, None])
            batch['weights'] = jax.device_put(weights.astype(np.float32), setup.batch_sharding)
        state, metrics = setup.compiled.train(setup.sharded.state, batch)
        return jax.device_get(metrics), jax.device_get(state.params)


@pytest.mark.parametrize('sizes', [dict(fsdp=4, tensor=2), pytest.param(dict(data=2, fsdp=1), marks=pytest.mark.slow)])
def test_k_accumulation_steps_of_b_equal_one_step_of_k_times_b(sizes):
    whole = tiny_config('llama', **sizes)
    accumulated = tiny_config('llama', **sizes)
    accumulated.train.grad_accum_steps = 4  # 4 micro-batches of 2 sequences = one batch of 8
    # Rows of unequal weight: a mean per micro-batch would differ from the batch's mean over all its tokens.
    whole_metrics, whole_params = one_step(whole, unequal_rows=True)
    accum_metrics, accum_params = one_step(accumulated, unequal_rows=True)
    np.testing.assert_allclose(accum_metrics['loss'], whole_metrics['loss'], rtol=1e-6)
    np.testing.assert_allclose(accum_metrics['grad_norm'], whole_metrics['grad_norm'], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), accum_params, whole_params)


def test_train_step_compiles_once():
    compiles = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == '/jax/core/compile/backend_compile_duration':
            compiles.append(event)

    config = tiny_config('llama', fsdp=4, tensor=2)
    mesh = mesh_for(config)
    with jax.set_mesh(mesh):
        setup = train.build(config, mesh)
        batches = [random_batch(setup, config, seed) for seed in range(4)]
        state, metrics = setup.compiled.train(setup.sharded.state, batches[0])
        jax.block_until_ready(metrics)
        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            for batch in batches[1:]:
                state, metrics = setup.compiled.train(state, batch)
            jax.block_until_ready(metrics)
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [], f'{len(compiles)} compilations after the first step'


def test_state_is_donated_to_the_step():
    config = tiny_config('llama', fsdp=8)
    mesh = mesh_for(config)
    with jax.set_mesh(mesh):
        setup = train.build(config, mesh)
        old = setup.sharded.state
        setup.compiled.train(old, random_batch(setup, config))
        assert old.params['embedding_VD'].is_deleted()


@pytest.mark.parametrize('schedule', ['cosine', 'linear', 'constant', 'wsd'])
def test_schedules_warm_up_to_the_peak_and_end_at_their_floor(schedule):
    config = tiny_config()
    config.train.update(lr_schedule=schedule, steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1)
    lr = optimizer.make_schedule(config.train)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(5)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(lr(10)), 1.0, rtol=1e-6)
    final = {'constant': 1.0}.get(schedule, 0.1)
    np.testing.assert_allclose(float(lr(100)), final, rtol=1e-5)
    if schedule == 'wsd':  # stable at the peak until the last 20% of steps
        np.testing.assert_allclose(float(lr(80)), 1.0, rtol=1e-6)
        assert float(lr(90)) < 1.0


@pytest.mark.parametrize('schedule', ['cosine', 'linear', 'constant', 'wsd'])
@pytest.mark.parametrize('steps', [10, 4])  # as long as the warmup, and shorter (the warmup is clamped)
def test_every_schedule_works_for_a_run_no_longer_than_its_warmup(schedule, steps):
    config = tiny_config()
    config.train.update(lr_schedule=schedule, steps=steps, warmup_steps=10, learning_rate=1.0)
    lr = optimizer.make_schedule(config.train)
    rates = [float(lr(step)) for step in range(steps + 1)]
    assert all(np.isfinite(rates)), rates
    np.testing.assert_allclose(rates[:steps], np.arange(steps) / steps, rtol=1e-6)  # warms up over the run
    assert rates[steps] == pytest.approx(1.0)


def test_one_step_golden_loss():
    """The first step's loss and gradient norm on a fixed batch, to float32 rounding.

    They change legitimately when the init, the model's math, tiny_config or random_batch change: then
    check the reason and update the numbers. Any other change that moves them is a bug.
    """
    metrics, _ = one_step(tiny_config('llama'))
    assert float(metrics['loss']) == pytest.approx(GOLDEN_LOSS, rel=1e-5)
    assert float(metrics['grad_norm']) == pytest.approx(GOLDEN_GRAD_NORM, rel=1e-4)


@pytest.mark.parametrize('decay_embeddings', [False, True])
def test_weight_decay_skips_norms_biases_and_optionally_embeddings(decay_embeddings):
    from trainer.modeling.model_setup import abstract_model

    config = tiny_config('gpt2')
    config.train.decay_embeddings = decay_embeddings
    _, shapes, _ = abstract_model(train.model_config(config))
    mask = jax.tree.map(lambda r: r.weight_decay_multiplier > 0, param_roles.partition(config, shapes).roles)
    assert mask['blocks']['mlp']['w_up_DF'] and mask['blocks']['attention']['wq_DNH']
    assert not mask['blocks']['attention_norm']['scale'] and not mask['final_norm']['bias']
    assert not mask['blocks']['mlp']['biases']['up_F'] and not mask['blocks']['attention']['biases']['o_D']
    assert mask['embedding_VD'] == decay_embeddings and mask['position_embedding_PD'] == decay_embeddings


def test_weight_decay_leaves_norm_scales_alone():
    """With zero gradients, AdamW moves exactly the decayed parameters."""
    config = tiny_config('llama', fsdp=8)
    config.train.update(weight_decay=0.5, learning_rate=0.1, warmup_steps=0, grad_clip=0.0)
    from trainer.modeling.model_setup import abstract_model

    _, shapes, _ = abstract_model(train.model_config(config))
    tx, _ = optimizer.make_optimizer(config.train, param_roles.partition(config, shapes).roles)
    params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes)
    updates, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(params), params)
    assert np.all(np.asarray(updates['blocks']['mlp_norm']['scale']) == 0)
    assert np.all(np.asarray(updates['embedding_VD']) == 0)
    assert np.all(np.asarray(updates['blocks']['mlp']['w_up_DF']) < 0)


# blocks that do not divide the vocabulary (38, the default suite's), one block (16) and many (7): 40-46 s each here
@pytest.mark.parametrize(
    'chunk', [pytest.param(7, marks=pytest.mark.slow), pytest.param(16, marks=pytest.mark.slow), 38]
)
def test_the_vocabulary_chunked_loss_equals_the_plain_one_with_its_gradient(chunk):
    from flax import nnx

    from trainer.training import steps

    config = tiny_config('llama', fsdp=4, tensor=2)
    config.model.vocab_multiple = 8  # 38 ids in 40 rows: the padded rows (and a last block's excess) never count
    mesh = mesh_for(config)
    with jax.set_mesh(mesh):
        setup = train.build(config, mesh)
        batch = random_batch(setup, config)
        params = setup.sharded.state.params
        plain_cfg = setup.model_cfg
        chunked_cfg = plain_cfg.__class__(**{**plain_cfg.__dict__, 'loss_vocab_chunk': chunk})
        chunked_graphdef = nnx.graphdef(nnx.merge(setup.sharded.graphdef, params))

        def loss_and_grads(cfg, graphdef):
            # Jitted: op by op, a backward pass on 8 simulated devices can abort in XLA's rendezvous (test_finetune).
            loss = lambda p: steps.summed_loss(p, batch, graphdef, cfg, None)[0]  # noqa: E731
            return jax.jit(jax.value_and_grad(loss))(params)

        plain, plain_grads = loss_and_grads(plain_cfg, setup.sharded.graphdef)
        chunked, chunked_grads = loss_and_grads(chunked_cfg, chunked_graphdef)
    np.testing.assert_allclose(float(chunked), float(plain), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), chunked_grads, plain_grads)
