"""The transformer's own properties: causality, and settings that must not change the math."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config
from flax import nnx

from models.transformer import REMAT_POLICIES, Decoder
from trainer.modeling.model_setup import model_config

FAMILIES = ('llama', 'gpt2')


def tiny_model(family: str, **changes) -> Decoder:
    return Decoder(dataclasses.replace(model_config(tiny_config(family)), **changes), nnx.Rngs(0))


def tokens(seed: int = 0, shape=(2, 12)) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, 38)


@pytest.mark.parametrize('family', FAMILIES)
def test_changing_a_later_token_leaves_earlier_logits_unchanged(family):
    model = tiny_model(family)
    original = tokens()
    changed = original.at[:, 7].set((original[:, 7] + 1) % 38)
    before, after = model(original), model(changed)
    np.testing.assert_array_equal(before[:, :7], after[:, :7])
    assert not np.allclose(before[:, 7:], after[:, 7:]), 'the changed token must affect its own and later logits'


@pytest.mark.parametrize('family', FAMILIES)
def test_documents_in_a_packed_row_do_not_see_each_other(family):
    model = tiny_model(family)
    segment_ids = jnp.array([[1] * 5 + [2] * 7] * 2)
    positions = jnp.array([list(range(5)) + list(range(7))] * 2)
    original = tokens()
    changed = original.at[:, :5].set((original[:, :5] + 1) % 38)  # rewrite the whole first document
    before = model(original, positions, segment_ids)
    after = model(changed, positions, segment_ids)
    np.testing.assert_allclose(before[:, 5:], after[:, 5:], rtol=1e-6, atol=1e-6)


def loss_and_grads(model: Decoder, inputs, targets):
    """The loss and gradients, and the compiled program that computed them (to tell settings apart)."""
    graphdef, params = nnx.split(model)

    def loss(params):
        logits = nnx.merge(graphdef, params)(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    return *compiled(params), compiled


@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('policy', [p for p in REMAT_POLICIES if p != 'none'])
def test_remat_gives_the_same_loss_and_gradients_with_less_memory(family, policy):
    data = tokens(shape=(2, 13))
    inputs, targets = data[:, :-1], data[:, 1:]
    plain_loss, plain_grads, plain = loss_and_grads(tiny_model(family), inputs, targets)
    remat_loss, remat_grads, remat = loss_and_grads(tiny_model(family, remat=policy), inputs, targets)
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), remat_grads, plain_grads)
    # The flag is not ignored: the backward pass recomputes (or offloads) what it does not keep, and keeps fewer
    # intermediates. XLA:CPU in jaxlib 0.10 (Python 3.11's) schedules the recomputation without lowering its peak.
    assert remat.as_text() != plain.as_text()
    if jax.__version_info__ >= (0, 11):
        assert remat.memory_analysis().temp_size_in_bytes < plain.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize('policy', ['offload_attention_outputs', 'dots_no_batch_offloaded'])
def test_offloading_policies_put_the_outputs_in_host_memory_on_a_gpu(policy):
    """Lowered for CUDA (on this CPU, host and device memory are one): the saved outputs go to pinned host memory."""
    model = tiny_model('llama', remat=policy)
    graphdef, params = nnx.split(model)
    data = tokens(shape=(2, 13))

    def loss(params):
        logits = nnx.merge(graphdef, params)(data[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, data[:, 1:]).mean()

    lowered = jax.jit(jax.grad(loss)).trace(params).lower(lowering_platforms=('cuda',)).as_text()
    assert 'pinned_host' in lowered
    graphdef, params = nnx.split(tiny_model('llama', remat='attention_outputs'))  # the same, kept on the device
    assert 'pinned_host' not in jax.jit(jax.grad(loss)).trace(params).lower(lowering_platforms=('cuda',)).as_text()


@pytest.mark.parametrize('family', FAMILIES)
def test_scanned_and_unrolled_layers_agree(family):
    data = tokens(shape=(2, 13))
    inputs, targets = data[:, :-1], data[:, 1:]
    scan_loss, scan_grads, scanned = loss_and_grads(tiny_model(family, scan_layers=True), inputs, targets)
    loop_loss, loop_grads, unrolled = loss_and_grads(tiny_model(family, scan_layers=False), inputs, targets)
    np.testing.assert_allclose(loop_loss, scan_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), loop_grads, scan_grads)
    # The flag is not ignored: only the scanned program loops over the layers.
    assert ' while(' in scanned.as_text() and ' while(' not in unrolled.as_text()


@pytest.mark.parametrize('family', FAMILIES)
def test_a_packed_document_has_the_logits_it_has_alone(family):
    """Segment ids and positions make a packed row compute what separate rows would."""
    model = tiny_model(family)
    first, second = tokens(1, (1, 5)), tokens(2, (1, 7))
    packed = jnp.concatenate([first, second], axis=1)
    segment_ids = jnp.array([[1] * 5 + [2] * 7])
    positions = jnp.array([list(range(5)) + list(range(7))])
    together = model(packed, positions, segment_ids)
    np.testing.assert_allclose(together[:, :5], model(first), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(together[:, 5:], model(second), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('family', FAMILIES)
def test_a_fresh_model_predicts_about_uniformly(family):
    """The initial loss is close to ln(vocab): small init, no token favoured."""
    data = tokens(shape=(4, 13))
    loss, _, _ = loss_and_grads(tiny_model(family), data[:, :-1], data[:, 1:])
    assert abs(float(loss) - np.log(38)) < 0.05, float(loss)


def test_dropout_changes_outputs_only_when_given_a_key():
    model = tiny_model('llama', dropout=0.5)
    data = tokens()
    np.testing.assert_array_equal(model(data), model(data))
    assert not np.allclose(model(data), model(data, dropout_rng=jax.random.key(1)))


def test_a_gpt2_model_may_have_its_own_output_projection():
    model = tiny_model('gpt2', tie_embeddings=False)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert params['unembedding_DV'].shape == (24, 38)
    before = model(tokens())
    model.unembedding_DV[...] = model.unembedding_DV[...] * 2  # the logits come from it, not the token table
    np.testing.assert_allclose(model(tokens()), 2 * before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('family', FAMILIES)
def test_families_have_their_defining_parameters(family):
    params = nnx.to_pure_dict(nnx.state(tiny_model(family), nnx.Param))
    mlp = params['blocks']['mlp']
    if family == 'llama':
        assert 'w_gate_DF' in mlp and 'unembedding_DV' in params and 'position_embedding_PD' not in params
    else:
        assert 'w_gate_DF' not in mlp and 'unembedding_DV' not in params and 'position_embedding_PD' in params
        assert 'biases' in mlp and 'bias' in params['final_norm']
    assert params['blocks']['attention']['wk_DKH'].shape == (3, 24, 2 if family == 'llama' else 4, 6)
