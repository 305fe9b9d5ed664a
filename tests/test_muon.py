"""Muon (config.train.optimizer='muon'): which parameters it updates, its rule, every mesh, and resume."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY_RUN_OVERRIDES, losses_by_step, mesh_for, random_batch, run_trainer_in, tiny_config

from configs import small_lm
from trainer.errors import ConfigError
from trainer.modeling import param_roles
from trainer.training import config_checks, optimizer, train

HIDDEN = ('wq_DNH', 'wk_DKH', 'wv_DKH', 'wo_NHD', 'w_up_DF', 'w_gate_DF', 'w_down_FD')


def muon_config(**mesh_sizes: int):
    config = tiny_config('llama', **mesh_sizes)
    config.train.optimizer = 'muon'
    return config


def one_update(config, params: dict, grads: dict) -> dict:
    """The first update Muon's optimizer (no clipping) gives `grads`, at the schedule's peak rate."""
    config.train.grad_clip = 0.0
    config.train.warmup_steps = 0
    config.train.learning_rate = 1.0
    config.train.weight_decay = 0.0
    roles = param_roles.partition(config, params).trainable_roles()
    tx, _ = optimizer.make_optimizer(config.train, roles)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    return jax.device_get(updates)


def test_muon_updates_exactly_the_hidden_matrices_and_adamw_the_rest():
    names = ['blocks/attention/' + n for n in HIDDEN[:4]] + ['blocks/mlp/' + n for n in HIDDEN[4:]]
    for name in names:
        assert optimizer.muon_dimensions(name, 4) is not None, name
    for name in ('embedding_VD', 'unembedding_DV', 'blocks/attention_norm/scale', 'final_norm/scale',
                 'classifier_DC', 'classifier_bias', 'blocks/attention/lora/q/a_DR', 'blocks/mlp/b_up_F'):  # fmt: skip
        assert optimizer.muon_dimensions(name, 2) is None, name
    # A head-split weight is its layer's fan-in x fan-out matrix: wq (L, D, N, H) is D x (N*H),
    # wo (L, N, H, D) is (N*H) x D.
    assert optimizer.muon_dimensions('blocks/attention/wq_DNH', 4) == optax.contrib.MuonDimensionNumbers((1,), (2, 3))
    assert optimizer.muon_dimensions('blocks/attention/wo_NHD', 4) == optax.contrib.MuonDimensionNumbers((1, 2), (3,))
    assert optimizer.muon_dimensions('blocks/mlp/w_down_FD', 3) == optax.contrib.MuonDimensionNumbers((1,), (2,))


def test_muon_state_holds_one_momentum_per_hidden_matrix_and_adam_moments_for_the_rest():
    config = muon_config()
    mesh = mesh_for(config)
    with jax.set_mesh(mesh):
        state = train.build(config, mesh).sharded.state
    muon_groups = [s for name, s in state.opt_state[1].inner_states.items() if name.startswith('muon_')]
    adam_groups = [s for name, s in state.opt_state[1].inner_states.items() if not name.startswith('muon_')]
    assert muon_groups and adam_groups
    momentum = muon_groups[0].inner_state[0].mu
    attention = momentum['blocks']['attention']
    assert not isinstance(attention['wq_DNH'], optax.MaskedNode)
    assert isinstance(momentum['embedding_VD'], optax.MaskedNode)
    adam = adam_groups[0].inner_state[0]
    assert not isinstance(adam.mu['embedding_VD'], optax.MaskedNode)
    assert isinstance(adam.mu['blocks']['attention']['wq_DNH'], optax.MaskedNode)


def test_each_hidden_update_is_orthogonal_with_adamw_rms():
    """Every layer's update is the orthogonalized gradient of its fan-in x fan-out matrix, scaled to RMS ~0.2."""
    config = muon_config()
    shapes = {
        'blocks': {
            'attention': {'wq_DNH': (3, 24, 4, 6), 'wo_NHD': (3, 4, 6, 24)},
            'mlp': {'w_up_DF': (3, 24, 40)},
        },
        'embedding_VD': (38, 24),
    }
    rng = np.random.default_rng(0)
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x)  # noqa: E731
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes, is_leaf=is_shape)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    updates = one_update(config, params, grads)
    matrices = {
        'wq_DNH': lambda u: u.reshape(3, 24, 24),
        'wo_NHD': lambda u: u.reshape(3, 24, 24),
        'w_up_DF': lambda u: u,
    }
    for group, name in (('attention', 'wq_DNH'), ('attention', 'wo_NHD'), ('mlp', 'w_up_DF')):
        update = -updates['blocks'][group][name]  # gradient descent: the update is minus the step
        matrix = matrices[name](update)
        fan_in, fan_out = matrix.shape[1:]
        # Moonlight's scale: RMS about 0.2 whatever the shape.
        rms = np.sqrt(np.mean(update**2))
        assert 0.12 < rms < 0.25, (name, rms)
        for layer in range(3):
            singular = np.linalg.svd(matrix[layer] / (0.2 * np.sqrt(max(fan_in, fan_out))), compute_uv=False)
            # The quintic Newton-Schulz iteration leaves singular values in roughly [0.68, 1.13], not exactly 1
            # (Jordan et al.), except the few smallest of a square random matrix, which five steps do not lift.
            assert singular.max() < 1.2 and np.mean(singular > 0.6) >= 0.9, (name, layer, singular)
            # ... and it is the gradient's own direction, orthogonalized: the polar factor's inner product.
            g = grads['blocks'][group][name]
            g = np.asarray(matrices[name](g))[layer]
            u_svd, _, vt = np.linalg.svd(g, full_matrices=False)
            polar = u_svd @ vt
            cosine = np.sum(polar * matrix[layer]) / np.linalg.norm(polar) / np.linalg.norm(matrix[layer])
            assert cosine > 0.95, (name, layer, cosine)
    # The embedding is AdamW's: its first update is sign-like, every entry of magnitude ~1 (lr 1).
    np.testing.assert_allclose(np.abs(updates['embedding_VD']), 1.0, rtol=1e-3)


def test_learning_rate_multipliers_apply_to_muon_groups():
    config = muon_config()
    config.train.param_roles = ((r'mlp/w_up_DF', True, 0.5, 1.0),)
    rng = np.random.default_rng(1)
    params = {'blocks': {'mlp': {'w_up_DF': jnp.asarray(rng.normal(size=(3, 24, 40)), jnp.float32)}}}
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    half = one_update(config, params, grads)['blocks']['mlp']['w_up_DF']
    config.train.param_roles = ()
    full = one_update(config, params, grads)['blocks']['mlp']['w_up_DF']
    np.testing.assert_allclose(half, 0.5 * full, rtol=1e-5, atol=1e-7)


def two_steps(config) -> list[float]:
    mesh = mesh_for(config)
    with jax.set_mesh(mesh):
        setup = train.build(config, mesh)
        state, losses = setup.sharded.state, []
        for seed in (0, 1, 2):
            state, metrics = setup.compiled.train(state, random_batch(setup, config, seed))
            losses.append(float(metrics['loss']))
        return losses


def test_muon_losses_equal_one_devices_on_every_mesh():
    """Newton-Schulz on matrices split by fsdp and tensor is the same computation as on one device."""
    reference = two_steps(muon_config())
    assert reference[2] != reference[0]
    for sizes in (dict(data=2, fsdp=2, tensor=2), dict(data=1, fsdp=4, tensor=2), dict(data=8, fsdp=1, tensor=1)):
        np.testing.assert_allclose(two_steps(muon_config(**sizes)), reference, rtol=1e-4, err_msg=str(sizes))


@pytest.mark.slow  # the mesh test above runs the same Muon step; this adds accumulation's scan around it
def test_muon_with_gradient_accumulation_equals_one_big_batch():
    reference = two_steps(muon_config())
    config = muon_config()
    config.train.grad_accum_steps = 2
    np.testing.assert_allclose(two_steps(config), reference, rtol=1e-4)


def test_muon_under_mup_is_refused_in_one_line():
    config = small_lm.get_config()
    config.train.optimizer = 'muon'
    config.model.parametrization = 'mup'
    with pytest.raises(ConfigError, match="optimizer='muon' with config.model.parametrization='mup'"):
        config_checks.validate(config, 1)
    config.train.optimizer = 'lion'
    config.model.parametrization = 'sp'
    with pytest.raises(ConfigError, match="config.train.optimizer='lion' is not known"):
        config_checks.validate(config, 1)


def test_a_muon_run_resumes_bit_exactly(tmp_path):
    args = [
        '--config', 'configs/small_lm.py', *TINY_RUN_OVERRIDES, '--config.train.optimizer=muon',
        '--config.train.steps=8', '--config.train.log_every=1', '--config.train.eval_every=0',
        '--config.data.eval_files=', '--config.checkpoint.every_steps=4',
    ]  # fmt: skip
    whole = run_trainer_in(tmp_path / 'whole', *args)
    assert whole.returncode == 0, whole.stderr[-2000:]
    uninterrupted = losses_by_step(tmp_path / 'whole')
    # As if killed after step 4's checkpoint: the same command resumes with Muon's momentum restored.
    shutil.copytree(tmp_path / 'whole', tmp_path / 'split')
    shutil.rmtree(tmp_path / 'split' / 'checkpoints' / '8')
    again = run_trainer_in(tmp_path / 'split', *args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert 'resumed from step 4 ' in again.stdout
    assert losses_by_step(tmp_path / 'split') == uninterrupted
    # A resume with the other optimizer names the field instead of a missing array.
    shutil.rmtree(tmp_path / 'split' / 'checkpoints' / '8')
    adamw = run_trainer_in(tmp_path / 'split', *args, '--config.train.optimizer=adamw')
    assert adamw.returncode == 2, adamw.stderr[-2000:]
    assert 'config.train.optimizer is muon there but adamw here' in adamw.stderr
