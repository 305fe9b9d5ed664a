"""Parameter counts and FLOPs per token against hand-computed values; the datasheet peak of each device."""

import pytest
from conftest import tiny_config

from configs import small_lm
from trainer.modeling import counts
from trainer.modeling.model_setup import model_config
from trainer.runtime import flops

# tiny_config: L=3 layers, D=24, F=40, V=38, 4 query heads of H=6, seq_len T=12.
# llama: 2 key/value heads, untied unembedding, no biases. Per layer: wq 24*4*6 + wk 24*2*6 + wv 24*2*6 +
# wo 4*6*24 + SwiGLU 3*24*40 + 2 norms of 24 = 576 + 288 + 288 + 576 + 2880 + 48 = 4656.
LLAMA_NON_EMBEDDING = 3 * 4656 + 24  # + the final norm
LLAMA_TOTAL = LLAMA_NON_EMBEDDING + 2 * 38 * 24  # + token table + unembedding
LLAMA_MATMUL = 3 * (576 + 288 + 288 + 576 + 2880) + 24 * 38  # matrices (no norms) + the unembedding
# gpt2: 4 key/value heads, tied, biases. Per layer: 4 * 576 attention matrices + 4 * 24 attention biases +
# 2 * 960 MLP matrices + 40 + 24 MLP biases + 2 LayerNorms of 2 * 24 = 2304 + 96 + 1920 + 64 + 96 = 4480.
GPT2_NON_EMBEDDING = 3 * 4480 + 48  # + the final LayerNorm
GPT2_TOTAL = GPT2_NON_EMBEDDING + 38 * 24 + 16 * 24  # + token table + position table (max_seq_len 16)
GPT2_MATMUL = 3 * (4 * 576 + 2 * 960) + 24 * 38  # the tied table is the unembedding: multiplied once
# Causal attention at T=12: a query sees (12 + 1) / 2 keys on average; scores and values, 2 FLOPs a product.
ATTENTION = 3 * 4 * 4 * 6 * 6.5  # layers * 4 * heads * H * mean keys


@pytest.mark.parametrize(
    'family, total, non_embedding, matmul',
    [
        ('llama', LLAMA_TOTAL, LLAMA_NON_EMBEDDING, LLAMA_MATMUL),
        ('gpt2', GPT2_TOTAL, GPT2_NON_EMBEDDING, GPT2_MATMUL),
    ],
)
def test_counts_by_hand(family, total, non_embedding, matmul):
    found = counts.count(model_config(tiny_config(family)), seq_len=12)
    assert (found.params, found.non_embedding_params, found.matmul_params) == (total, non_embedding, matmul)
    assert found.attention_flops_per_token == ATTENTION
    assert found.train_flops_per_token == 3 * (2 * matmul + ATTENTION)


def test_gpt2_124m():
    """GPT-2 small, tied: 124,439,808 parameters (the published count)."""
    config = small_lm.get_config()
    config.model.update(
        family='gpt2',
        num_layers=12,
        num_heads=12,
        num_kv_heads=12,
        d_model=768,
        d_ff=3072,
        vocab_size=50257,
        max_seq_len=1024,
        tie_embeddings=True,
        use_bias=True,
    )
    found = counts.count(model_config(config), seq_len=1024)
    assert found.params == 124_439_808
    assert found.non_embedding_params == 124_439_808 - 50257 * 768 - 1024 * 768
    # Per layer 768 x 2304 (qkv) + 768 x 768 + 2 x 768 x 3072 multiplied, and the 768 x 50257 unembedding.
    assert found.matmul_params == 12 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072) + 768 * 50257 == 123_532_032
    assert found.attention_flops_per_token == 4 * 12 * 12 * 64 * 512.5
    assert found.train_flops_per_token == 3 * (2 * 123_532_032 + 18_892_800) == 797_870_592


def test_a_sliding_window_caps_the_keys_seen():
    assert counts.mean_keys_seen(12) == 6.5
    assert counts.mean_keys_seen(12, window=4) == (1 + 2 + 3 + 4 + 8 * 4) / 12
    assert counts.mean_keys_seen(12, window=100) == 6.5


DEVICE_KINDS = {  # device_kind as JAX reports it -> dense bf16 peak
    'NVIDIA H100 80GB HBM3': 989e12,
    'NVIDIA H100 PCIe': 756e12,
    'NVIDIA H100 NVL': 835e12,
    'NVIDIA GH200 480GB': 989e12,
    'NVIDIA H200': 989e12,
    'NVIDIA H800': 989e12,
    'NVIDIA B200': 2250e12,
    'NVIDIA A100-SXM4-80GB': 312e12,
    'NVIDIA A800-SXM4-80GB': 312e12,
    'NVIDIA L40S': 362e12,
    'NVIDIA L40': 181e12,
    'NVIDIA L4': 121e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v5': 459e12,
    'TPU v6 lite': 918e12,
    'TPU v6e': 918e12,
    'NVIDIA GeForce RTX 4090': None,
    'Tesla T4': None,
    'cpu': None,
}


@pytest.mark.parametrize('kind, peak', DEVICE_KINDS.items())
def test_each_device_gets_its_own_datasheet_peak(kind, peak):
    assert flops.table_peak_flops(kind) == peak


def test_every_table_entry_is_tested():
    tested = {name for name, _ in flops.PEAK_BF16_FLOPS if any(name in kind.lower() for kind in DEVICE_KINDS)}
    assert tested == {name for name, _ in flops.PEAK_BF16_FLOPS}
