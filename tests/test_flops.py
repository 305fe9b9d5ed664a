"""FLOPs per token and parameter counts against hand-computed values; the datasheet peak of each device."""

import pytest
from conftest import tiny_config

from trainer import flops
from trainer.state import abstract_model
from trainer.train import model_config

# tiny_config: L=3 layers, D=24, F=40, V=38, 4 query heads of H=6, seq_len T=12.
# llama: 2 key/value heads, untied unembedding, no biases. Per layer: wq 24*4*6 + wk 24*2*6 + wv 24*2*6 +
# wo 4*6*24 + SwiGLU 3*24*40 + 2 norms of 24 = 576 + 288 + 288 + 576 + 2880 + 48 = 4656.
LLAMA_NON_EMBEDDING = 3 * 4656 + 24  # + the final norm
LLAMA_TOTAL = LLAMA_NON_EMBEDDING + 2 * 38 * 24  # + token table + unembedding
# gpt2: 4 key/value heads, tied, biases. Per layer: 4 * 576 attention matrices + 4 * 24 attention biases +
# 2 * 960 MLP matrices + 40 + 24 MLP biases + 2 LayerNorms of 2 * 24 = 2304 + 96 + 1920 + 64 + 96 = 4480.
GPT2_NON_EMBEDDING = 3 * 4480 + 48  # + the final LayerNorm
GPT2_TOTAL = GPT2_NON_EMBEDDING + 38 * 24 + 16 * 24  # + token table + position table (max_seq_len 16)
ATTENTION = 12 * 3 * 4 * 6 * 12  # 12 * L * heads * H * T


@pytest.mark.parametrize(
    'family, total, non_embedding',
    [('llama', LLAMA_TOTAL, LLAMA_NON_EMBEDDING), ('gpt2', GPT2_TOTAL, GPT2_NON_EMBEDDING)],
)
def test_parameter_counts_and_flops_per_token_by_hand(family, total, non_embedding):
    config = tiny_config(family)
    _, shapes, _ = abstract_model(model_config(config))
    counts = flops.param_counts(shapes)
    assert (counts.total, counts.non_embedding) == (total, non_embedding)
    # The lookups are not matmuls; the unembedding (38 x 24, tied or not) is.
    expected = 6 * (non_embedding + 38 * 24) + ATTENTION
    assert flops.flops_per_token(model_config(config), counts, seq_len=12) == expected


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
