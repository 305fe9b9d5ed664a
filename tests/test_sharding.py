"""Sharded training computes what one device computes, and the state really is split."""

import jax
import numpy as np
import pytest
from conftest import mesh_for, random_batch, tiny_config

from trainer.training import train

MESHES = [dict(data=2, fsdp=2, tensor=2), dict(data=1, fsdp=4, tensor=2), dict(data=8, fsdp=1, tensor=1)]


def two_steps(config) -> tuple[list[float], dict]:
    """Losses of two train steps on fixed batches, and the params after them (on the host)."""
    mesh = mesh_for(config)
    with jax.set_mesh(mesh):
        setup = train.build(config, mesh)
        state, losses = setup.sharded.state, []
        for seed in (0, 1):
            state, metrics = setup.compiled.train(state, random_batch(setup, config, seed))
            losses.append(float(metrics['loss']))
        return losses, jax.device_get(state.params)


@pytest.mark.parametrize('family', ['llama', pytest.param('gpt2', marks=pytest.mark.slow)])
def test_sharded_losses_equal_the_single_device_loss(family):
    reference_losses, reference_params = two_steps(tiny_config(family))
    for sizes in MESHES:
        losses, params = two_steps(tiny_config(family, **sizes))
        # ~1 float32 ulp apart: sharded reductions add in another order.
        np.testing.assert_allclose(losses, reference_losses, rtol=2e-6, err_msg=str(sizes))
        message = str(sizes)
        jax.tree.map(
            lambda a, b, m=message: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=m),
            params,
            reference_params,
        )


@pytest.mark.slow  # gpt2's parameters sharded are also checked by test_hf.py's sharded import
def test_gpt2_sharded_over_every_axis_equals_one_device():
    """The gpt2 family on the (2, 2, 2) mesh alone; all meshes in the slow test above."""
    reference_losses, reference_params = two_steps(tiny_config('gpt2'))
    losses, params = two_steps(tiny_config('gpt2', **MESHES[0]))
    np.testing.assert_allclose(losses, reference_losses, rtol=2e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, reference_params)


def shard_shape(array: jax.Array) -> tuple[int, ...]:
    return array.addressable_shards[0].data.shape


def test_large_matrices_are_split_across_devices_under_fsdp_and_tensor():
    config = tiny_config('llama', data=1, fsdp=4, tensor=2)
    mesh = mesh_for(config)
    with jax.set_mesh(mesh):
        state = train.build(config, mesh).sharded.state
    params = state.params
    L, D, F, V = 3, 24, 40, 38
    # (layers, embed/fsdp, mlp/tensor)
    assert params['blocks']['mlp']['w_up_DF'].shape == (L, D, F)
    assert shard_shape(params['blocks']['mlp']['w_up_DF']) == (L, D // 4, F // 2)
    assert shard_shape(params['blocks']['mlp']['w_down_FD']) == (L, F // 2, D // 4)
    # (layers, embed/fsdp, heads/tensor, head_dim)
    assert shard_shape(params['blocks']['attention']['wq_DNH']) == (L, D // 4, 2, 6)
    assert shard_shape(params['embedding_VD']) == (V // 2, D // 4)
    assert shard_shape(params['unembedding_DV']) == (D // 4, V // 2)
    # Adam's moments are laid out like their parameters; its step count is replicated.
    adam = state.opt_state[1][0]
    assert adam.mu['blocks']['mlp']['w_up_DF'].sharding == params['blocks']['mlp']['w_up_DF'].sharding
    assert adam.count.sharding.is_fully_replicated
    assert len(params['blocks']['mlp']['w_up_DF'].addressable_shards) == 8
