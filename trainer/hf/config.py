"""A Hugging Face config.json as `config.model` fields, and back, for Llama, Mistral, Qwen2 and GPT-2.

Reads both the transformers 4 layout (`rope_theta`, `rope_scaling`) and the transformers 5 one
(`rope_parameters`); writes both, so that old and new readers (transformers, vLLM, llama.cpp's
converter) find what they look for.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from trainer.errors import ConfigError

# Hugging Face architecture -> its model_type; the families this module maps.
ARCHITECTURES = {
    'LlamaForCausalLM': 'llama',
    'MistralForCausalLM': 'mistral',
    'Qwen2ForCausalLM': 'qwen2',
    'GPT2LMHeadModel': 'gpt2',
}


def is_model_folder(path: str | pathlib.Path) -> bool:
    """Whether `path` looks like a Hugging Face model folder (a config.json beside weights)."""
    folder = pathlib.Path(path)
    weights = any(folder.glob('model*.safetensors')) or any(folder.glob('*.bin'))
    return (folder / 'config.json').is_file() and weights


def read(folder: str | pathlib.Path) -> dict[str, Any]:
    """The folder's config.json, checked to be a family we map and to have safetensors weights."""
    folder = pathlib.Path(folder)
    if not (folder / 'config.json').is_file():
        raise ConfigError(f'{folder} has no config.json: give a Hugging Face model folder.')
    hf = json.loads((folder / 'config.json').read_text())
    if not any(folder.glob('model*.safetensors')):
        if any(folder.glob('*.bin')):
            raise ConfigError(
                f'{folder} holds PyTorch .bin weights only: convert them once with transformers, '
                'AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder), which writes safetensors.'
            )
        raise ConfigError(f'{folder} has no *.safetensors weights: give a Hugging Face model folder.')
    architecture = (hf.get('architectures') or ['?'])[0]
    if hf.get('model_type') not in ARCHITECTURES.values():
        raise ConfigError(
            f'{folder} holds a {architecture} ({hf.get("model_type")!r}) model, which is not supported: '
            f'supported are {", ".join(ARCHITECTURES)}.'
        )
    return hf


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """rope_theta and the scaling parameters, from either transformers layout."""
    parameters = hf.get('rope_parameters') or {}
    scaling = hf.get('rope_scaling') or parameters
    theta = parameters.get('rope_theta', hf.get('rope_theta', 10_000.0))
    return float(theta), scaling


def _unsupported(folder: str, what: str) -> ConfigError:
    return ConfigError(f'{folder}/config.json: {what} is not supported.')


def model_fields(hf: dict[str, Any], folder: str = '') -> dict[str, Any]:
    """The config.model fields that describe this architecture (the others keep their values)."""
    if hf['model_type'] == 'gpt2':
        if hf.get('activation_function', 'gelu_new') not in ('gelu_new', 'gelu_pytorch_tanh'):
            raise _unsupported(folder, f'activation_function={hf["activation_function"]!r}')
        # Attention variants some GPT-2 checkpoints (Stanford CRFM's, for one) set: computed otherwise here, so
        # refused rather than imported silently wrong.
        if hf.get('scale_attn_by_inverse_layer_idx'):
            raise _unsupported(folder, 'scale_attn_by_inverse_layer_idx=true (attention scaled by 1/layer)')
        if hf.get('reorder_and_upcast_attn'):
            raise _unsupported(folder, 'reorder_and_upcast_attn=true (attention scores scaled before a float32 matmul)')
        if not hf.get('scale_attn_weights', True):
            raise _unsupported(folder, 'scale_attn_weights=false (attention without the 1/sqrt(head_dim) scale)')
        return dict(
            family='gpt2',
            num_layers=hf['n_layer'],
            num_heads=hf['n_head'],
            num_kv_heads=hf['n_head'],
            d_model=hf['n_embd'],
            head_dim=0,
            d_ff=hf.get('n_inner') or 4 * hf['n_embd'],
            vocab_size=hf['vocab_size'],
            max_seq_len=hf['n_positions'],
            norm_eps=hf.get('layer_norm_epsilon', 1e-5),
            tie_embeddings=hf.get('tie_word_embeddings', True),
            use_bias=True,
            qkv_bias=False,
            rope_scaling='none',
            sliding_window=0,
        )
    if hf.get('hidden_act', 'silu') != 'silu':
        raise _unsupported(folder, f'hidden_act={hf["hidden_act"]!r}')
    if hf.get('attention_bias') or hf.get('mlp_bias'):
        raise _unsupported(folder, 'attention_bias or mlp_bias on a Llama model')
    sliding_layers = hf.get('use_sliding_window') or 'sliding_attention' in hf.get('layer_types', [])
    if hf['model_type'] == 'qwen2' and sliding_layers:
        raise _unsupported(folder, 'use_sliding_window=true (sliding attention on some layers only)')
    heads = hf['num_attention_heads']
    head_dim = hf.get('head_dim') or hf['hidden_size'] // heads
    theta, scaling = _rope(hf)
    rope_type = scaling.get('rope_type', scaling.get('type', 'default'))
    fields = dict(
        family='llama',
        num_layers=hf['num_hidden_layers'],
        num_heads=heads,
        num_kv_heads=hf.get('num_key_value_heads') or heads,
        d_model=hf['hidden_size'],
        head_dim=0 if head_dim * heads == hf['hidden_size'] else head_dim,
        d_ff=hf['intermediate_size'],
        vocab_size=hf['vocab_size'],
        max_seq_len=hf['max_position_embeddings'],
        norm_eps=hf.get('rms_norm_eps', 1e-6),
        rope_theta=theta,
        tie_embeddings=hf.get('tie_word_embeddings', False),
        use_bias=False,
        qkv_bias=hf['model_type'] == 'qwen2',
        sliding_window=(hf.get('sliding_window') or 0) if hf['model_type'] == 'mistral' else 0,
        rope_scaling='none',
    )
    if rope_type == 'linear':
        fields.update(rope_scaling='linear', rope_scaling_factor=float(scaling['factor']))
    elif rope_type == 'llama3':
        fields.update(
            rope_scaling='llama3',
            rope_scaling_factor=float(scaling['factor']),
            rope_low_freq_factor=float(scaling['low_freq_factor']),
            rope_high_freq_factor=float(scaling['high_freq_factor']),
            rope_original_max_len=int(scaling['original_max_position_embeddings']),
        )
    elif rope_type != 'default':
        raise _unsupported(folder, f'RoPE scaling of type {rope_type!r} (supported: linear, llama3)')
    return fields


def check_matches(model: dict[str, Any], folder: str) -> None:
    """A run's config.model must describe the folder's model: a ConfigError names the first field that differs."""
    expected = model_fields(read(folder), folder)
    for name, value in expected.items():
        ours = model[name]
        if ours != value and not (isinstance(value, float) and isinstance(ours, (int, float)) and ours == value):
            raise ConfigError(
                f'config.model.{name}={ours!r} does not match the model in {folder} ({value!r}): set '
                f'--config.model.{name}={value}, or use configs/finetune_hf.py:{folder}, which reads them all.'
            )


def architecture(model: dict[str, Any]) -> str:
    """The Hugging Face architecture that computes what this config.model computes."""
    if model['family'] == 'gpt2':
        return 'GPT2LMHeadModel'
    if model['use_bias']:
        raise ConfigError('a llama-family model with use_bias=True has no Hugging Face counterpart to export to.')
    if model['qkv_bias']:
        if model['sliding_window']:
            raise ConfigError('a model with qkv_bias and a sliding window has no Hugging Face counterpart.')
        return 'Qwen2ForCausalLM'
    return 'MistralForCausalLM' if model['sliding_window'] else 'LlamaForCausalLM'


def to_hf(model: dict[str, Any], bos_id: int | None, eos_id: int | None, dtype: str) -> dict[str, Any]:
    """config.json for a Hugging Face folder holding this model."""
    name = architecture(model)
    common = dict(architectures=[name], model_type=ARCHITECTURES[name], vocab_size=model['vocab_size'])
    common.update(bos_token_id=bos_id, eos_token_id=eos_id, torch_dtype=dtype, dtype=dtype)
    if name == 'GPT2LMHeadModel':
        return dict(
            common,
            n_layer=model['num_layers'],
            n_head=model['num_heads'],
            n_embd=model['d_model'],
            n_inner=model['d_ff'],
            n_positions=model['max_seq_len'],
            layer_norm_epsilon=model['norm_eps'],
            activation_function='gelu_new',
            tie_word_embeddings=model['tie_embeddings'],
        )
    heads = model['num_heads']
    scaling: dict[str, Any] = {'rope_type': 'default'}
    if model['rope_scaling'] == 'linear':
        scaling = {'rope_type': 'linear', 'factor': model['rope_scaling_factor']}
    elif model['rope_scaling'] == 'llama3':
        scaling = {
            'rope_type': 'llama3',
            'factor': model['rope_scaling_factor'],
            'low_freq_factor': model['rope_low_freq_factor'],
            'high_freq_factor': model['rope_high_freq_factor'],
            'original_max_position_embeddings': model['rope_original_max_len'],
        }
    hf = dict(
        common,
        num_hidden_layers=model['num_layers'],
        num_attention_heads=heads,
        num_key_value_heads=model['num_kv_heads'],
        hidden_size=model['d_model'],
        head_dim=model['head_dim'] or model['d_model'] // heads,
        intermediate_size=model['d_ff'],
        max_position_embeddings=model['max_seq_len'],
        rms_norm_eps=model['norm_eps'],
        rope_theta=model['rope_theta'],
        rope_scaling=None if scaling['rope_type'] == 'default' else scaling,
        rope_parameters=dict(scaling, rope_theta=model['rope_theta']),
        hidden_act='silu',
        tie_word_embeddings=model['tie_embeddings'],
        attention_bias=False,
    )
    if name == 'MistralForCausalLM':
        hf['sliding_window'] = model['sliding_window']
    if name == 'Qwen2ForCausalLM':
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=model['num_layers'])
    return hf
