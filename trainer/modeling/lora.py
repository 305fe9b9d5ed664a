"""LoRA adapters out of a model: merged into its weights, or as a PEFT adapter folder of their own.

Merging adds (a @ b) * alpha / rank to each adapted projection and drops the adapters: the result is a
plain model with the same logits (up to rounding), which every door of the framework and transformers load.
The PEFT folder (adapter_config.json + adapter_model.safetensors) is what Hugging Face `peft`'s
PeftModel.from_pretrained(base, folder) loads on top of the base model exported by scripts/convert_hf.py.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from models.transformer import LORA_TARGETS, ModelConfig
from trainer.errors import ConfigError

# The Hugging Face (Llama, Mistral, Qwen2) module each of our targets adapts.
_HF_MODULES = {
    'q': 'self_attn.q_proj',
    'k': 'self_attn.k_proj',
    'v': 'self_attn.v_proj',
    'o': 'self_attn.o_proj',
    'gate': 'mlp.gate_proj',
    'up': 'mlp.up_proj',
    'down': 'mlp.down_proj',
}


def _adapters(params: dict[str, Any], cfg: ModelConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each adapted target's (a, b), stacked over layers: a (L, *in, r), b (L, r, *out)."""
    found = {}
    for target in cfg.lora_targets:
        module, _ = LORA_TARGETS[target].split('/')
        adapter = params['blocks'][module]['lora'][target]
        found[target] = (np.asarray(adapter['a'], np.float32), np.asarray(adapter['b'], np.float32))
    return found


def _update(a: np.ndarray, b: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """(a @ b) * alpha / rank per layer, shaped like the projection's weight (L, *in, *out)."""
    return np.stack([np.tensordot(a[i], b[i], axes=1) for i in range(len(a))]) * (cfg.lora_alpha / cfg.lora_rank)


def merge(params: dict[str, Any], cfg: ModelConfig) -> tuple[dict[str, Any], ModelConfig]:
    """Host params with every adapter added into its projection (in float32) and removed; the plain config."""
    if not cfg.lora_rank:
        return params, cfg
    merged = {key: value for key, value in params.items() if key != 'blocks'}
    blocks = {module: dict(values) for module, values in params['blocks'].items()}
    for target, (a, b) in _adapters(params, cfg).items():
        module, name = LORA_TARGETS[target].split('/')
        blocks[module][name] = np.asarray(blocks[module][name], np.float32) + _update(a, b, cfg)
    for module in blocks.values():
        module.pop('lora', None)
    merged['blocks'] = blocks
    return merged, dataclasses.replace(cfg, lora_rank=0, lora_base_dtype='')


def write_peft(params: dict[str, Any], cfg: ModelConfig, base: str, out: pathlib.Path) -> None:
    """The adapters alone as a PEFT LoRA folder for the Hugging Face export of the base model."""
    if cfg.family != 'llama':
        raise ConfigError(
            f'a PEFT adapter folder is written for the llama family (Llama, Mistral, Qwen2), not {cfg.family!r} '
            "(GPT-2's fused attention has no per-projection adapters): export the merged model instead."
        )
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f'--out {out} exists and is not empty: remove it or give another folder.')
    tensors = {}
    for target, (a, b) in _adapters(params, cfg).items():
        rank = cfg.lora_rank
        for layer in range(cfg.num_layers):
            prefix = f'base_model.model.model.layers.{layer}.{_HF_MODULES[target]}'
            # torch's Linear computes x @ W.T: lora_A is (r, in), lora_B is (out, r), each a flattened view of ours.
            tensors[f'{prefix}.lora_A.weight'] = np.ascontiguousarray(a[layer].reshape(-1, rank).T)
            tensors[f'{prefix}.lora_B.weight'] = np.ascontiguousarray(b[layer].reshape(rank, -1).T)
    config = {
        'peft_type': 'LORA',
        'task_type': 'CAUSAL_LM',
        'base_model_name_or_path': base,
        'r': cfg.lora_rank,
        'lora_alpha': cfg.lora_alpha,
        'lora_dropout': cfg.lora_dropout,
        'target_modules': sorted(_HF_MODULES[t].split('.')[-1] for t in cfg.lora_targets),
        'bias': 'none',
        'fan_in_fan_out': False,
        'use_rslora': False,
        'inference_mode': True,
    }
    temporary = out.with_name(f'.{out.name}.incomplete')
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_file(tensors, str(temporary / 'adapter_model.safetensors'), metadata={'format': 'pt'})
    (temporary / 'adapter_config.json').write_text(json.dumps(config, indent=2) + '\n')
    if out.exists():
        out.rmdir()
    temporary.rename(out)
