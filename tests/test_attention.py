"""cuDNN flash attention over packed documents: its descriptors and plumbing on CPU, the kernel on a GPU.

On CPU the cuDNN call is replaced by `emulated_cudnn`, which computes what cuDNN documents for packed,
causal attention from the same arguments; the model's output must then equal its XLA attention.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import mesh_for, random_batch, tiny_config
from flax import nnx

from models import transformer
from models.transformer import Decoder, packed_segments
from trainer.data import pipeline
from trainer.errors import ConfigError
from trainer.training import train

MaskType = transformer.cudnn_attention.MaskType


def packed_rows(lengths_per_row: list[list[int]], T: int) -> tuple[jax.Array, jax.Array]:
    """Segment ids (documents 1, 2, ...; padding 0) and positions (from 0 in each document) of packed rows."""
    segments, positions = np.zeros((len(lengths_per_row), T), np.int32), np.zeros((len(lengths_per_row), T), np.int32)
    for row, lengths in enumerate(lengths_per_row):
        start = 0
        for document, length in enumerate(lengths, 1):
            segments[row, start : start + length] = document
            positions[row, start : start + length] = np.arange(length)
            start += length
    return jnp.asarray(segments), jnp.asarray(positions)


def test_packed_segments_give_each_run_its_length_and_start():
    segments = jnp.array([[1, 1, 2, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3], [1, 2, 3, 4, 5, 6, 7]])
    lengths, offsets = packed_segments(segments, 4)
    np.testing.assert_array_equal(lengths, [[2, 3, 2, -1], [7, -1, -1, -1], [1, 1, 1, 4]])
    np.testing.assert_array_equal(offsets, [[0, 2, 5, -1, -1], [0, -1, -1, -1, -1], [0, 1, 2, 3, -1]])


def emulated_cudnn(
    query, key, value, bias=None, mask=None, q_seqlen=None, kv_seqlen=None, q_offsets=None, kv_offsets=None, **kw
):
    """cuDNN's packed causal attention as its wrapper documents it: token t of a row is in run m when
    offsets[m] <= t < offsets[m] + seqlen[m]; it sees the earlier tokens of its own run (within the window)."""
    assert kw['mask_type'] == MaskType.PADDING_CAUSAL and kw['qkv_layout'] == 'BTNH'
    assert bias is None and mask is None and q_seqlen is kv_seqlen and q_offsets is kv_offsets
    B, T, N, _ = query.shape
    t_11T = jnp.arange(T)[None, None, :]
    starts_BM1, lengths_BM1 = q_offsets[:, :-1, None], q_seqlen[:, :, None]
    inside_BMT = (starts_BM1 <= t_11T) & (t_11T < starts_BM1 + lengths_BM1) & (lengths_BM1 > 0)
    run_BT = jnp.where(inside_BMT.any(1), jnp.argmax(inside_BMT, 1), -1)
    t_TS = jnp.arange(T)[:, None] - jnp.arange(T)[None, :]  # query index minus key index
    mask_BTS = (run_BT[:, :, None] == run_BT[:, None, :]) & (run_BT[:, :, None] >= 0) & (t_TS >= 0)[None]
    if kw.get('sliding_window_length'):
        mask_BTS &= (t_TS < kw['sliding_window_length'])[None]
    groups = N // key.shape[2]
    k, v = jnp.repeat(key, groups, axis=2), jnp.repeat(value, groups, axis=2)
    logits_BNTS = jnp.einsum('btnh,bsnh->bnts', query, k).astype(jnp.float32) * kw['scale']
    weights_BNTS = jax.nn.softmax(jnp.where(mask_BTS[:, None], logits_BNTS, -jnp.inf), axis=-1)
    return jnp.einsum('bnts,bsnh->btnh', jnp.nan_to_num(weights_BNTS).astype(v.dtype), v)


def weighted_loss_and_grads(model: Decoder, inputs, positions, segments):
    """Mean next-token loss over the documents' tokens (padding's outputs are anyone's), and its gradients."""
    graphdef, params = nnx.split(model)
    weights = (segments != 0).astype(jnp.float32)

    def loss(params):
        logits = nnx.merge(graphdef, params)(inputs, positions, segments)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.roll(inputs, -1, axis=1))
        return (losses * weights).sum() / weights.sum()

    return jax.jit(jax.value_and_grad(loss))(params)


def outputs_of(cfg: transformer.ModelConfig, inputs, positions, segments):
    """A fresh model's logits, weighted loss and gradients (the same parameters for every attention_impl)."""
    model = Decoder(cfg, nnx.Rngs(0))
    return model(inputs, positions, segments), *weighted_loss_and_grads(model, inputs, positions, segments)


@pytest.mark.parametrize('changes', [{}, {'sliding_window': 3}, {'family': 'gpt2'}], ids=['gqa', 'window', 'gpt2'])
def test_the_cudnn_path_computes_what_xla_attention_does_on_packed_documents(monkeypatch, changes):
    monkeypatch.setattr(transformer.cudnn_attention, 'dot_product_attention', emulated_cudnn)
    family = changes.pop('family', 'llama')
    cfg = dataclasses.replace(train.model_config(tiny_config(family)), **changes)
    segments, positions = packed_rows([[5, 4, 1], [12], [1, 1, 7]], 12)  # with padding, one-token documents
    inputs = jax.random.randint(jax.random.key(1), segments.shape, 0, cfg.vocab_size)
    real = np.asarray(segments != 0)
    (xla_logits, xla_loss, xla_grads), (cudnn_logits, cudnn_loss, cudnn_grads) = (
        outputs_of(dataclasses.replace(cfg, attention_impl=i), inputs, positions, segments) for i in ('xla', 'cudnn')
    )
    np.testing.assert_allclose(cudnn_logits[real], xla_logits[real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cudnn_loss, xla_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), cudnn_grads, xla_grads)


@pytest.mark.slow  # 53 s here; the default suite keeps the cudnn path computes what xla attention does
def test_the_cudnn_path_trains_sharded_like_xla(monkeypatch):
    """One train step on a (data 2, fsdp 2, tensor 2) mesh: the same loss and gradient norm either way."""
    monkeypatch.setattr(transformer.cudnn_attention, 'dot_product_attention', emulated_cudnn)
    metrics = {}
    for impl, max_segments in (('xla', 0), ('cudnn', 3)):  # rows hold 2 documents; 0 (seq_len) is tested above
        config = tiny_config('llama', data=2, fsdp=2, tensor=2)
        config.model.update(attention_impl=impl, attention_max_segments=max_segments)
        mesh = mesh_for(config)
        with jax.set_mesh(mesh):
            setup = train.build(config, mesh)
            _, step_metrics = setup.compiled.train(setup.sharded.state, random_batch(setup, config))
            metrics[impl, max_segments] = jax.device_get(step_metrics)
    np.testing.assert_allclose(metrics['cudnn', 3]['loss'], metrics['xla', 0]['loss'], rtol=1e-5)
    np.testing.assert_allclose(metrics['cudnn', 3]['grad_norm'], metrics['xla', 0]['grad_norm'], rtol=1e-4)


def test_the_cudnn_path_lowers_for_cuda_into_cudnns_fused_kernels(monkeypatch):
    """Lowered for CUDA on this CPU: jax's real cuDNN wrapper takes our descriptors (its shape, dtype and layout
    checks run) and emits the fused forward and backward kernels. Only its GPU probes are answered here."""
    monkeypatch.setattr(transformer.cudnn_attention, 'check_cudnn_version', lambda: 91000)
    monkeypatch.setattr(transformer.cudnn_attention, 'check_compute_capability', lambda capability: True)
    monkeypatch.setattr(transformer.cudnn_attention, 'is_cuda_compute_capability_equal', lambda capability: False)
    cfg = train.model_config(tiny_config('llama'))
    cfg = dataclasses.replace(cfg, d_model=64, head_dim=16, dtype='bfloat16', attention_impl='cudnn')
    graphdef, params = nnx.split(Decoder(cfg, nnx.Rngs(0)))
    segments, positions = packed_rows([[5, 4], [12]], 12)

    def loss(params):
        return nnx.merge(graphdef, params)(jnp.zeros(segments.shape, jnp.int32), positions, segments).sum()

    lowered = jax.jit(jax.grad(loss)).trace(params).lower(lowering_platforms=('cuda',)).as_text()
    assert '__cudnn$fmhaSoftmax' in lowered and '__cudnn$fmhaSoftmaxBackward' in lowered


def test_a_row_with_more_documents_than_cudnn_is_told_is_refused():
    segments, _ = packed_rows([[3, 3, 2], [8]], 10)  # 4 runs in the first row: 3 documents and padding
    pipeline.check_documents(np.asarray(segments), 4)
    pipeline.check_documents(np.asarray(segments), 0)  # no bound
    with pytest.raises(ConfigError, match=r'holds 4 documents .* config.model.attention_max_segments=3: raise it'):
        pipeline.check_documents(np.asarray(segments), 3)
    config = tiny_config()
    config.model.update(attention_impl='cudnn', attention_max_segments=3)
    assert pipeline.max_documents(config) == 3
    config.model.attention_impl = 'xla'
    assert pipeline.max_documents(config) == 0  # XLA attention reads any packing


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs an NVIDIA GPU')
@pytest.mark.parametrize('max_segments', [0, 4])
def test_cudnn_attention_matches_xla_attention_on_a_gpu(max_segments):
    """The real kernel, bfloat16, head_dim 64, packed rows with padding: logits, loss and gradients."""
    cfg = dataclasses.replace(
        train.model_config(tiny_config('llama')),
        d_model=256,
        num_heads=4,
        num_kv_heads=2,
        d_ff=512,
        head_dim=64,
        max_seq_len=128,
        dtype='bfloat16',
        attention_max_segments=max_segments,
    )
    segments, positions = packed_rows([[50, 30, 20], [128], [1, 1, 100]], 128)
    inputs = jax.random.randint(jax.random.key(1), segments.shape, 0, cfg.vocab_size)
    real = np.asarray(segments != 0)
    (xla_logits, xla_loss, xla_grads), (cudnn_logits, cudnn_loss, cudnn_grads) = (
        outputs_of(dataclasses.replace(cfg, attention_impl=i), inputs, positions, segments) for i in ('xla', 'cudnn')
    )
    np.testing.assert_allclose(cudnn_logits[real], xla_logits[real], rtol=0.05, atol=0.05)
    np.testing.assert_allclose(cudnn_loss, xla_loss, rtol=0.01)
    flat_xla, flat_cudnn = jax.tree.leaves(xla_grads), jax.tree.leaves(cudnn_grads)
    for a, b in zip(flat_cudnn, flat_xla, strict=True):
        np.testing.assert_allclose(np.linalg.norm(a), np.linalg.norm(b), rtol=0.05)
