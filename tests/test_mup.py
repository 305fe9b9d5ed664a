"""muP: its roles in the parameter-role table, equality with SP at the base width, the coordinate check, export."""

import pathlib
import sys

import jax
import numpy as np
import pytest
from conftest import mesh_for, random_batch, sharded_logits, tiny_config
from flax import nnx

from models.transformer import Decoder
from trainer.inference import loading
from trainer.modeling import param_roles
from trainer.scaling import coord_check
from trainer.training import checkpoints, optimizer, train

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'scripts'))
import convert_hf  # noqa: E402


def mup_config(width: int = 48, base_width: int = 24, **mesh_sizes):
    config = tiny_config('llama', **mesh_sizes)
    config.model.update(d_model=width, d_ff=2 * width, parametrization='mup', base_width=base_width, base_head_dim=6)
    return config


def test_the_role_table_holds_mups_multipliers():
    config = mup_config(width=96, base_width=24)  # m = 4
    _, shapes, _ = train.state_lib.abstract_model(train.model_config(config))
    roles = param_roles.partition(config, shapes).roles
    hidden = param_roles.Role(lr_multiplier=0.25, init_multiplier=0.5)
    for module, name in [('attention', 'wq_DNH'), ('attention', 'wo_NHD'), ('mlp', 'w_gate_DF'), ('mlp', 'w_down_FD')]:
        assert roles['blocks'][module][name] == hidden, name
    assert roles['embedding_VD'] == param_roles.NO_DECAY  # embeddings, norms: as in SP
    assert roles['blocks']['mlp_norm']['scale'] == param_roles.NO_DECAY
    assert roles['unembedding_DV'] == param_roles.Role()  # the readout's 1/m is a multiplier in the model
    config.model.mup_zero_readout = True
    roles = param_roles.partition(config, shapes).roles
    assert roles['unembedding_DV'].init_multiplier == 0.0
    assert train.model_config(config).width_multiplier == 4.0
    config.model.mup_weight_decay = 'constant'  # the mup package's MuAdamW: weight_decay x m on hidden matrices
    roles = param_roles.partition(config, shapes).roles
    assert roles['blocks']['mlp']['w_up_DF'] == param_roles.Role(
        lr_multiplier=0.25, weight_decay_multiplier=4.0, init_multiplier=0.5
    )


@pytest.mark.parametrize('rule, decay_per_step', [('coupled', 1e-2 * 0.1 / 4), ('constant', 1e-2 * 0.1)])
def test_mup_weight_decay_of_hidden_matrices_follows_its_rule(rule, decay_per_step):
    """With no gradient, an AdamW step is the decay alone: p <- p - lr_i x wd_i x p. MuAdamW (the mup package)
    gives a hidden matrix lr / m and wd x m: the base's lr x wd at every width ('constant')."""
    config = mup_config(width=96, base_width=24)  # m = 4
    config.model.mup_weight_decay = rule
    config.train.update(learning_rate=1e-2, weight_decay=0.1, lr_schedule='constant', warmup_steps=0, grad_clip=0.0)
    params = {'blocks': {'mlp': {'w_up_DF': np.ones((96, 192), np.float32)}}, 'embedding_VD': np.ones((8, 96))}
    tx, _ = optimizer.make_optimizer(config.train, param_roles.partition(config, params).trainable_roles())
    updates, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates['blocks']['mlp']['w_up_DF'], -decay_per_step, rtol=1e-6)
    np.testing.assert_array_equal(updates['embedding_VD'], 0.0)  # embeddings are not decayed, in either rule


def test_a_mup_classifier_divides_its_matrix_not_its_bias_as_mureadout():
    """mup's MuReadout computes linear(x / m, W, b): the bias is added after the 1/m, not divided by it."""
    config = mup_config(width=96, base_width=24)
    config.model.update(head='classify', num_classes=3)
    cfg = train.model_config(config)
    model = Decoder(cfg, nnx.Rngs(0))
    model.classifier_DC[...] = jax.random.normal(jax.random.key(1), model.classifier_DC[...].shape)
    states = jax.random.normal(jax.random.key(2), (2, 5, 96))
    without_bias = model.logits(states)
    model.classifier_bias_C[...] = np.array([1.0, -2.0, 0.5], np.float32)
    np.testing.assert_allclose(
        model.logits(states) - without_bias, np.broadcast_to([1.0, -2.0, 0.5], (2, 5, 3)), rtol=1e-5
    )
    normed = model.final_norm(states)
    expected = np.einsum('btd,dc->btc', normed, model.classifier_DC[...]) / 4 + np.array([1.0, -2.0, 0.5])
    np.testing.assert_allclose(model.logits(states), expected, rtol=1e-4, atol=1e-5)


def test_mup_initializes_and_scales_as_its_roles_say():
    sp, mup = tiny_config('llama', fsdp=8), mup_config(width=96, base_width=24, fsdp=8)
    sp.model.update(d_model=96, d_ff=192)
    params = {}
    for name, config in (('sp', sp), ('mup', mup)):
        mesh = mesh_for(config)
        with jax.set_mesh(mesh):
            params[name] = jax.device_get(train.build(config, mesh).sharded.state.params)
    np.testing.assert_allclose(
        params['mup']['blocks']['mlp']['w_up_DF'], 0.5 * params['sp']['blocks']['mlp']['w_up_DF'], rtol=1e-6
    )
    np.testing.assert_array_equal(params['mup']['embedding_VD'], params['sp']['embedding_VD'])
    np.testing.assert_array_equal(params['mup']['unembedding_DV'], params['sp']['unembedding_DV'])


def step_and_logits(config):
    mesh = mesh_for(config)
    with jax.set_mesh(mesh):
        setup = train.build(config, mesh)
        batch = random_batch(setup, config)
        state = setup.sharded.state
        logits = sharded_logits(setup.sharded.graphdef, state.params, batch['inputs'])
        state, metrics = setup.compiled.train(state, batch)
        return logits, jax.device_get(metrics), jax.device_get(state.params)


def test_mup_at_its_base_width_is_sp_exactly():
    sp = tiny_config('llama', fsdp=4, tensor=2)
    mup = tiny_config('llama', fsdp=4, tensor=2)
    mup.model.update(parametrization='mup', base_width=mup.model.d_model, base_head_dim=6)
    sp_logits, sp_metrics, sp_params = step_and_logits(sp)
    mup_logits, mup_metrics, mup_params = step_and_logits(mup)
    np.testing.assert_array_equal(mup_logits, sp_logits)
    assert float(mup_metrics['loss']) == float(sp_metrics['loss'])
    jax.tree.map(np.testing.assert_array_equal, mup_params, sp_params)


@pytest.mark.slow  # 83 s here; muP's scaling rules are checked by the default suite
def test_the_coordinate_check_stays_flat_under_mup_and_grows_under_sp():
    base = tiny_config('llama')
    base.model.update(num_layers=2, vocab_size=256, max_seq_len=32)
    base.data.update(seq_len=32, shuffle_buffer=0)
    setting = coord_check.Setting(widths=(64, 256, 512), head_dim=16, steps=3, learning_rate=1e-2)
    results = coord_check.run(base, setting, echo=lambda _: None)
    mup, sp = coord_check.growth(results, 'mup', 3), coord_check.growth(results, 'sp', 3)
    assert max(mup.values()) < 2.0, mup  # every layer within a factor 2 from 1x to 8x the base width
    assert sp['block 1'] > 4.0, sp  # SP's hidden states grow with the width
    assert results['mup'][64] == results['sp'][64]  # the base width is the same model either way


@pytest.mark.parametrize(
    'family, tuned',
    [
        ('llama', {}),
        # the base constants and CompleteP's residual scale folded too; gpt2 for position embeddings and biases
        ('gpt2', dict(mup_input_multiplier=3.0, mup_output_multiplier=0.5, depth_scaling='completep', base_depth=1)),
    ],
)
def test_a_mup_model_exports_to_a_standard_model_with_the_same_logits(tmp_path, family, tuned):
    config = mup_config(width=48, base_width=12)  # m = 4; attention by 1/head_dim at head_dim 12, base 6
    config.model.update(vocab_size=256, max_seq_len=16, family=family, **tuned)
    if family == 'gpt2':
        config.model.update(tie_embeddings=False, use_bias=True, num_kv_heads=config.model.num_heads)
    config.mesh.fsdp = 1
    logits_before, _, params = step_and_logits(config)
    assert not np.allclose(logits_before, 0)
    mesh = mesh_for(config)
    with jax.set_mesh(mesh):
        setup = train.build(config, mesh)
        placed = jax.device_put(params, setup.sharded.shardings.params)
        tokens = np.random.default_rng(1).integers(0, 256, (2, 12)).astype(np.int32)
        ours = sharded_logits(setup.sharded.graphdef, placed, tokens)
        checkpoints.save_params(tmp_path / 'ckpt', placed, config.to_json_best_effort())
    convert_hf.export_checkpoint(str(tmp_path / 'ckpt'), tmp_path / 'hf', 'float32', 2**30)
    exported = loading.load(str(tmp_path / 'hf'), {'data': 1, 'fsdp': 1, 'tensor': 1}, 'float32')
    assert exported.model_cfg.parametrization == 'sp' and exported.model_cfg.depth_scaling == 'none'
    with jax.set_mesh(exported.mesh):
        theirs = sharded_logits(exported.graphdef, exported.params, tokens)
    np.testing.assert_allclose(theirs, ours, rtol=2e-5, atol=2e-5)


def test_a_tied_mup_model_does_not_export(tmp_path):
    config = mup_config(width=48, base_width=12)
    config.model.tie_embeddings = True
    cfg = train.model_config(config)
    from trainer.errors import ConfigError
    from trainer.hf import folder

    with pytest.raises(ConfigError, match='ties its embeddings'):
        folder.fold_parametrization({}, cfg)


def test_the_best_rate_is_refined_between_grid_points_and_plotted(tmp_path):
    from trainer.scaling import lr_transfer

    rates = [1e-3, 3e-3, 1e-2, 3e-2]
    losses = [(np.log(r) - np.log(5e-3)) ** 2 + 2.0 for r in rates]  # a parabola in log rate, least at 5e-3
    assert lr_transfer.best_rate(rates, losses) == pytest.approx(5e-3, rel=1e-6)
    assert lr_transfer.best_rate(rates, losses[::-1]) == pytest.approx(1e-3 * 3e-2 / 5e-3, rel=1e-6)
    assert lr_transfer.best_rate(rates, [1.0, 2.0, 3.0, 4.0]) == 1e-3  # at the edge: the edge
    table = {
        'sp': {32: {'lrs': rates, 'losses': losses, 'best_lr': 5e-3}},
        'mup': {32: {'lrs': rates, 'losses': losses, 'best_lr': 5e-3}},
    }
    lr_transfer.plot(table, str(tmp_path / 'lr.png'))
    assert (tmp_path / 'lr.png').stat().st_size > 10_000


def test_mups_input_and_output_multipliers_scale_the_embeddings_and_the_logits():
    config = mup_config(width=96, base_width=24)  # m = 4
    plain = Decoder(train.model_config(config), nnx.Rngs(0))
    config.model.update(mup_input_multiplier=3.0, mup_output_multiplier=2.0)
    tuned = Decoder(train.model_config(config), nnx.Rngs(0))  # the same weights: the same seed, the same init
    tokens = np.arange(10, dtype=np.int32).reshape(2, 5) % 38
    positions = np.broadcast_to(np.arange(5), (2, 5))
    np.testing.assert_allclose(tuned.embed(tokens, positions), 3.0 * plain.embed(tokens, positions), rtol=1e-6)
    states = jax.random.normal(jax.random.key(2), (2, 5, 96))
    np.testing.assert_allclose(tuned.logits(states), 2.0 * plain.logits(states), rtol=1e-5, atol=1e-6)
    assert train.model_config(config).logit_scale == 0.5  # output multiplier 2 / m 4


def test_completep_at_its_base_depth_is_the_plain_model_exactly():
    plain = tiny_config('llama', fsdp=4, tensor=2)
    completep = tiny_config('llama', fsdp=4, tensor=2)
    completep.model.update(depth_scaling='completep', base_depth=completep.model.num_layers)
    plain_logits, plain_metrics, plain_params = step_and_logits(plain)
    logits, metrics, params = step_and_logits(completep)
    np.testing.assert_array_equal(logits, plain_logits)
    assert float(metrics['loss']) == float(plain_metrics['loss'])
    jax.tree.map(np.testing.assert_array_equal, params, plain_params)


def test_completep_scales_the_branches_and_keeps_the_base_depths_init():
    config = tiny_config('llama')
    config.model.update(num_layers=8, depth_scaling='completep', base_depth=2)
    cfg = train.model_config(config)
    assert cfg.residual_scale == 0.25  # (8 / 2)^-1
    assert cfg.output_init_std == pytest.approx(0.02 / 2.0)  # std / sqrt(2 x base depth), not / sqrt(2 x 8)
    config.model.depth_alpha = 0.5
    assert train.model_config(config).residual_scale == 0.5
    config.model.depth_scaling = 'none'
    assert train.model_config(config).output_init_std == pytest.approx(0.02 / 4.0)
    # The roles: (L / base_depth)^(alpha - 1) on the hidden matrices and the blocks' norms; nothing at alpha 1.
    config.model.update(depth_scaling='completep', depth_alpha=0.5)
    _, shapes, _ = train.state_lib.abstract_model(train.model_config(config))
    roles = param_roles.partition(config, shapes).roles
    # and (L / base_depth)^-alpha on their Adam epsilon (the paper's Equation 40, the authors' hidden groups)
    assert roles['blocks']['mlp']['w_up_DF'] == param_roles.Role(lr_multiplier=0.5, eps_multiplier=0.5)
    assert roles['blocks']['mlp_norm']['scale'] == param_roles.Role(
        lr_multiplier=0.5, weight_decay_multiplier=0.0, eps_multiplier=0.5
    )
    assert roles['final_norm']['scale'] == param_roles.NO_DECAY and roles['embedding_VD'] == param_roles.NO_DECAY
    config.model.update(parametrization='mup', d_model=48, d_ff=80, base_width=24)  # with muP: 0.5 / m
    roles = param_roles.partition(config, shapes).roles
    assert roles['blocks']['attention']['wq_DNH'].lr_multiplier == 0.25
    config.model.depth_alpha = 1.0
    roles = param_roles.partition(config, shapes).roles
    assert roles['blocks']['attention']['wq_DNH'].lr_multiplier == 0.5  # muP's 1 / m alone
    assert roles['blocks']['attention']['wq_DNH'].eps_multiplier == 0.25  # (8 / 2)^-1
    assert roles['blocks']['mlp_norm']['scale'] == param_roles.Role(weight_decay_multiplier=0.0, eps_multiplier=0.25)
    assert roles['unembedding_DV'] == param_roles.Role() and roles['final_norm']['scale'] == param_roles.NO_DECAY


@pytest.mark.parametrize('depth_scaling, base_depth, eps_multiplier', [('completep', 2, 0.25), ('completep', 8, 1.0),
                                                                       ('none', 0, 1.0)])  # fmt: skip
def test_completep_scales_adams_epsilon_of_the_blocks_and_nothing_at_its_base_depth(
    depth_scaling, base_depth, eps_multiplier
):
    """A gradient as small as epsilon: Adam's first step is g / (|g| + eps), so it shows the epsilon each
    parameter got. CompleteP at 8 layers based at 2: the blocks' eps / 4; at its base depth or off: eps."""
    config = tiny_config('llama')
    config.model.update(num_layers=8, depth_scaling=depth_scaling, base_depth=base_depth)
    config.train.update(learning_rate=1.0, weight_decay=0.0, lr_schedule='constant', warmup_steps=0, grad_clip=0.0)
    config.train.eps = 1e-3
    params = {
        'blocks': {'mlp': {'w_up_DF': np.ones((2, 3), np.float32)}, 'mlp_norm': {'scale': np.ones(3, np.float32)}},
        'embedding_VD': np.ones((4, 2), np.float32),
        'final_norm': {'scale': np.ones(2, np.float32)},
    }
    tx, _ = optimizer.make_optimizer(config.train, param_roles.partition(config, params).trainable_roles())
    grads = jax.tree.map(lambda p: np.full_like(p, 1e-3), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    blocks = -1e-3 / (1e-3 + 1e-3 * eps_multiplier)  # bias-corrected Adam: m / (sqrt(v) + eps) = g / (|g| + eps)
    np.testing.assert_allclose(updates['blocks']['mlp']['w_up_DF'], blocks, rtol=1e-5)
    np.testing.assert_allclose(updates['blocks']['mlp_norm']['scale'], blocks, rtol=1e-5)
    for outside in (updates['embedding_VD'], updates['final_norm']['scale']):  # outside the blocks: eps as it is
        np.testing.assert_allclose(outside, -0.5, rtol=1e-5)


def test_completep_initializes_the_output_projections_as_at_its_base_depth():
    config = tiny_config('llama', fsdp=8)
    config.model.update(num_layers=8, d_model=96, d_ff=192, init_std=0.05)
    stds = {}
    for scaling in ('none', 'completep'):
        config.model.update(depth_scaling=scaling, base_depth=2 if scaling == 'completep' else 0)
        mesh = mesh_for(config)
        with jax.set_mesh(mesh):
            params = jax.device_get(train.build(config, mesh).sharded.state.params)
        stds[scaling] = float(np.std(params['blocks']['mlp']['w_down_FD']))
    assert stds['none'] == pytest.approx(0.05 / 4, rel=0.05)  # GPT-2's std / sqrt(2 x 8)
    assert stds['completep'] == pytest.approx(0.05 / 2, rel=0.05)  # std / sqrt(2 x 2)
