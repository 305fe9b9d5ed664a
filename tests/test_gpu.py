"""On an NVIDIA GPU (`JAX_PLATFORMS=cuda,cpu python -m pytest -m gpu`): the paths a CPU can only lower, run for real.

Skipped elsewhere. The cuDNN kernel against XLA attention is in test_attention.py.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config
from flax import nnx

from models.transformer import Decoder
from trainer.training import train

REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs an NVIDIA GPU'),
]


def loss_and_grads(cfg, tokens_BT):
    graphdef, params = nnx.split(Decoder(cfg, nnx.Rngs(0)))

    def loss(params):
        logits = nnx.merge(graphdef, params)(tokens_BT[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BT[:, 1:]).mean()

    step = jax.jit(jax.value_and_grad(loss))
    return step(params), step.lower(params).compile().as_text()


@pytest.mark.parametrize('policy', ['offload_attention_outputs', 'dots_no_batch_offloaded'])
def test_offloading_remat_runs_and_equals_keeping_everything(policy):
    """The saved outputs really go to pinned host memory and come back: the same loss and gradients."""
    cfg = dataclasses.replace(train.model_config(tiny_config('llama')), d_model=128, d_ff=256, dtype='float32')
    tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, cfg.vocab_size)
    (kept_loss, kept_grads), _ = loss_and_grads(dataclasses.replace(cfg, remat='none'), tokens)
    (loss, grads), compiled = loss_and_grads(dataclasses.replace(cfg, remat=policy), tokens)
    assert 'S(5)' in compiled  # XLA's memory space of pinned host memory: copies out and back are in the program
    np.testing.assert_allclose(loss, kept_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, kept_grads)


def test_training_on_a_gpu_with_cudnn_attention_and_the_xla_flags(tmp_path):
    """`python -m trainer` on the GPU: bf16, cuDNN attention over packed documents, the launcher's XLA GPU flags
    (XLA aborts on a flag it does not know); the loss falls, MFU is reported, and a second run resumes."""
    # One GPU, none of the tests' simulated CPU devices; this process holds part of the GPU's memory already.
    env = {**os.environ, 'XLA_FLAGS': '', 'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}
    common = ['--config', 'configs/small_lm.py', '--workdir', str(tmp_path), '--config.model.attention_impl=cudnn']
    common += ['--config.train.log_every=10', '--config.train.eval_every=0', '--config.checkpoint.every_steps=20']

    def run(steps: int) -> subprocess.CompletedProcess:
        command = [sys.executable, '-m', 'trainer', *common, f'--config.train.steps={steps}']
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)

    first = run(40)
    assert first.returncode == 0, first.stderr[-3000:]
    assert 'devices: 1 x NVIDIA' in first.stdout + first.stderr
    lines = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    losses = [line['loss'] for line in lines if 'loss' in line]
    assert losses[-1] < losses[0] - 0.5 and all(np.isfinite(losses))
    assert all(0 < line['mfu'] < 1 for line in lines if 'mfu' in line)
    second = run(60)
    assert second.returncode == 0, second.stderr[-3000:]
    assert 'resumed from step 40' in second.stderr + second.stdout


def test_cudnn_attention_at_a_training_shape_equals_xla_attention():
    """cuDNN in bf16 against XLA attention in bf16 on one real training batch shape (GQA, 4 documents a row)."""
    cfg = dataclasses.replace(
        train.model_config(tiny_config('llama')), d_model=512, num_heads=8, num_kv_heads=2, head_dim=64, d_ff=1024
    )
    cfg = dataclasses.replace(cfg, max_seq_len=512, dtype='bfloat16')
    B, T = 4, 512
    segments = jnp.asarray(np.repeat(np.arange(1, 5), T // 4)[None].repeat(B, 0), jnp.int32)
    positions = jnp.asarray(np.tile(np.arange(T // 4), 4)[None].repeat(B, 0), jnp.int32)
    tokens = jax.random.randint(jax.random.key(2), (B, T), 0, cfg.vocab_size)
    logits = {}
    for impl in ('xla', 'cudnn'):
        model = Decoder(dataclasses.replace(cfg, attention_impl=impl), nnx.Rngs(0))
        logits[impl] = np.asarray(jax.jit(lambda m, *a: m(*a))(model, tokens, positions, segments), np.float32)
    np.testing.assert_allclose(logits['cudnn'], logits['xla'], rtol=0.05, atol=0.05)
