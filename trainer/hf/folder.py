"""Writes a Hugging Face model folder that transformers loads: config.json, weights, tokenizer files.

The folder is written under a temporary name beside the destination and renamed when complete, so an
interrupted export leaves nothing that looks like a model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from models.transformer import ModelConfig
from trainer.data import tokenizers
from trainer.data.tokenizers import Tokenizer
from trainer.errors import ConfigError
from trainer.hf import config as hf_config
from trainer.hf import tensors as hf_tensors

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' own default for save_pretrained
# The files of a Hugging Face tokenizer, copied when the run's tokenizer came from such a folder: its special
# tokens and its chat template (chat_template.jinja where transformers 5 saves it, else tokenizer_config.json's).
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'chat_template.jinja')
CHAT_TEMPLATES_FOLDER = 'additional_chat_templates'  # transformers 5's named templates, one .jinja file each


def _shards(named_sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Tensor names grouped, in order, into files of at most max_bytes (a bigger tensor gets a file alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in named_sizes:
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _copy_tokenizer(spec: str, out: pathlib.Path) -> None:
    """The tokenizer files of a Hugging Face folder or a tokenizer.json; for 'byte', a tokenizer.json of the same
    ids; nothing for a SentencePiece file."""
    if spec == 'byte':
        tokenizers.write_byte_tokenizer_json(str(out / 'tokenizer.json'))
        settings = {'tokenizer_class': 'PreTrainedTokenizerFast', 'eos_token': tokenizers.BYTE_EOS_TOKEN}
        (out / 'tokenizer_config.json').write_text(json.dumps(settings, indent=2, ensure_ascii=False) + '\n')
    elif os.path.isdir(spec):
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(spec, name)):
                shutil.copyfile(os.path.join(spec, name), out / name)
        if os.path.isdir(os.path.join(spec, CHAT_TEMPLATES_FOLDER)):
            shutil.copytree(os.path.join(spec, CHAT_TEMPLATES_FOLDER), out / CHAT_TEMPLATES_FOLDER)
    elif spec.endswith('.json') and os.path.isfile(spec):
        shutil.copyfile(spec, out / 'tokenizer.json')


def generation_config(spec: str, bos: int | None, eos: int | None) -> dict[str, Any]:
    """generation_config.json for the export: the source folder's when the run's tokenizer came from one that has
    it (every stop id, as an Instruct model's list, and its sampling defaults), with the run's EOS among the stop
    ids; else greedy, stopping at the run's EOS."""
    source = os.path.join(spec, 'generation_config.json') if os.path.isdir(spec) else ''
    if not source or not os.path.isfile(source):
        return {'bos_token_id': bos, 'eos_token_id': eos, 'do_sample': False}
    generation = json.loads(pathlib.Path(source).read_text(encoding='utf-8'))
    stops = generation.get('eos_token_id')
    stops = stops if isinstance(stops, list) else [] if stops is None else [stops]
    if eos is not None and eos not in stops:  # config.data.eos_token chose another: it must stop too
        generation['eos_token_id'] = [eos, *stops] if stops else eos
    if generation.get('bos_token_id') is None:
        generation['bos_token_id'] = bos
    return generation


def _scaled(tree: dict[str, Any], names: tuple[str, ...], factor: float) -> dict[str, Any]:
    """A copy of the dict `tree` with its entries `names` (where present) multiplied by factor, in float32."""
    return {k: np.asarray(v, np.float32) * factor if k in names else v for k, v in tree.items()}


def fold_parametrization(params: dict[str, Any], cfg: ModelConfig) -> tuple[dict[str, Any], ModelConfig]:
    """muP's and CompleteP's forward multipliers folded into the weights (host arrays), so a standard model
    computes the same: the logits' output multiplier / m into the unembedding, the input multiplier into the
    embeddings, the attention's sqrt(base_head_dim / head_dim) into the queries, the residual branches' scale
    into the output projections."""
    if cfg.parametrization != 'mup' and cfg.depth_scaling == 'none':
        return params, cfg
    logit, q_scale = cfg.logit_scale, cfg.attention_scale * cfg.head_dim**0.5
    inputs, residual = cfg.input_scale, cfg.residual_scale
    if cfg.tie_embeddings and (logit != 1.0 or inputs != 1.0):
        raise ConfigError(
            f'this muP model ties its embeddings and multiplies its logits by {logit:g} (its embeddings by '
            f'{inputs:g}): a standard model cannot compute that with one shared matrix, so it does not export to '
            'Hugging Face (train it untied).'
        )
    folded = dict(params)
    if logit != 1.0:
        folded['unembedding_DV'] = np.asarray(params['unembedding_DV'], np.float32) * logit
    if inputs != 1.0:
        folded = _scaled(folded, ('embedding_VD', 'position_embedding_PD'), inputs)
    blocks = dict(params['blocks'])
    if q_scale != 1.0:
        attention = _scaled(blocks['attention'], ('wq_DNH',), q_scale)
        if 'biases' in attention:
            attention['biases'] = _scaled(attention['biases'], ('q_NH',), q_scale)
        blocks['attention'] = attention
    if residual != 1.0:  # x + s * (y W + b) = x + y (s W) + s b
        attention = _scaled(blocks['attention'], ('wo_NHD',), residual)
        if 'biases' in attention:
            attention['biases'] = _scaled(attention['biases'], ('o_D',), residual)
        mlp = _scaled(blocks['mlp'], ('w_down_FD',), residual)
        if 'biases' in mlp:
            mlp['biases'] = _scaled(mlp['biases'], ('down_D',), residual)
        blocks |= {'attention': attention, 'mlp': mlp}
    folded['blocks'] = blocks
    plain = dict(parametrization='sp', base_width=0, base_head_dim=0, depth_scaling='none', base_depth=0)
    plain |= dict(mup_input_multiplier=1.0, mup_output_multiplier=1.0)
    return folded, dataclasses.replace(cfg, **plain)


def write(
    params: dict[str, Any],
    cfg: ModelConfig,
    model_fields: dict[str, Any],
    tokenizer: Tokenizer | None,
    tokenizer_spec: str,
    out: pathlib.Path,
    dtype: str = 'float32',
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Writes `params` (on the host) as a Hugging Face folder at `out`; returns the weight files written."""
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f'--out {out} exists and is not empty: remove it or give another folder.')
    bos = tokenizer.bos_id if tokenizer is not None else None
    eos = tokenizer.eos_id if tokenizer is not None else None
    config = hf_config.to_hf(model_fields, bos, eos, dtype)  # raises for a model with no HF counterpart
    temporary = out.with_name(f'.{out.name}.incomplete')
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    itemsize = 2 if dtype == 'bfloat16' else 4
    table = hf_tensors.places(cfg, {'transformer.wte.weight'})  # GPT-2 as GPT2LMHeadModel names
    shapes = hf_tensors.expected_shapes(cfg, table, hf_tensors.flat_shapes(params))
    names = sorted(shapes, key=hf_tensors.natural_order)
    shards = _shards([(name, int(np.prod(shapes[name])) * itemsize) for name in names], max_shard_bytes)
    files = (
        ['model.safetensors']
        if len(shards) == 1
        else [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))]
    )
    produced = hf_tensors.tensors(params, cfg, dtype)
    weight_map = {}
    for file, shard in zip(files, shards, strict=True):
        batch = dict(next(produced) for _ in shard)  # tensors come in the same order as `names`
        assert list(batch) == shard
        save_file(batch, str(temporary / file), metadata={'format': 'pt'})
        weight_map.update(dict.fromkeys(shard, file))
    if len(files) > 1:
        total = sum(int(np.prod(shapes[name])) * itemsize for name in names)
        index = {'metadata': {'total_size': total}, 'weight_map': weight_map}
        (temporary / 'model.safetensors.index.json').write_text(json.dumps(index, indent=2) + '\n')
    (temporary / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
    # safetensors writes its files 0600 (a private temporary file, renamed): give them the mode the umask gives
    # every other file of the folder, so that whoever may read config.json may read the weights.
    mode = (temporary / 'config.json').stat().st_mode & 0o777
    for file in files:
        (temporary / file).chmod(mode)
    generation = generation_config(tokenizer_spec, bos, eos)
    (temporary / 'generation_config.json').write_text(json.dumps(generation, indent=2) + '\n')
    _copy_tokenizer(tokenizer_spec, temporary)
    if out.exists():
        out.rmdir()  # empty, checked above
    temporary.rename(out)
    return files
