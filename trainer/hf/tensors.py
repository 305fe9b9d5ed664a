"""Our parameter tree <-> a Hugging Face checkpoint's tensors, read slice by slice into sharded arrays.

Every parameter of ours (each layer of it, for the stacked block parameters) is a view of one Hugging
Face tensor: possibly transposed (torch's Linear stores (out, in), we store (in, out)), possibly a
block of columns (GPT-2's fused query/key/value), reshaped to our shape-suffixed layout. Importing
reads, for each device, only the slice of each tensor that the device holds (safetensors' lazy
slices), so a model never exists whole and unsharded on one host; exporting writes the tensors back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Iterator
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

from models.transformer import ModelConfig
from trainer.errors import ConfigError
from trainer.modeling import param_roles

# Buffers that some checkpoints carry but no model computes with: GPT-2's causal masks, RoPE tables.
_BUFFERS = ('.attn.bias', '.attn.masked_bias', '.rotary_emb.inv_freq')
_VOCAB_PARAMS = ('embedding_VD', 'unembedding_DV')


@dataclasses.dataclass(frozen=True)
class Place:
    """Where one of our parameters (each layer of it) lies in a Hugging Face tensor."""

    name: str  # the tensor's name; '{layer}' for stacked block parameters
    split: int  # our dims [:split] come from the (transposed) tensor's first axis, [split:] from its second
    transpose: bool = False  # torch's Linear stores (out, in), we store (in, out)
    columns: tuple[int, int] | None = None  # a block of the last axis of a fused tensor (GPT-2's c_attn)


def places(cfg: ModelConfig, names: set[str]) -> dict[str, Place]:
    """Each of our parameter paths ('blocks/mlp/w_up_DF') and where it lies in a checkpoint of this family."""
    if cfg.family == 'gpt2':
        p = 'transformer.' if 'transformer.wte.weight' in names else ''  # GPT2LMHeadModel vs GPT2Model
        D, layer = cfg.d_model, p + 'h.{layer}.'
        table = {
            'embedding_VD': Place(p + 'wte.weight', 1),
            'position_embedding_PD': Place(p + 'wpe.weight', 1),
            'final_norm/scale': Place(p + 'ln_f.weight', 1),
            'final_norm/bias': Place(p + 'ln_f.bias', 1),
            'blocks/attention_norm/scale': Place(layer + 'ln_1.weight', 1),
            'blocks/attention_norm/bias': Place(layer + 'ln_1.bias', 1),
            'blocks/mlp_norm/scale': Place(layer + 'ln_2.weight', 1),
            'blocks/mlp_norm/bias': Place(layer + 'ln_2.bias', 1),
            'blocks/attention/wo_NHD': Place(layer + 'attn.c_proj.weight', 2),  # Conv1D: (in, out)
            'blocks/attention/biases/o_D': Place(layer + 'attn.c_proj.bias', 1),
            'blocks/mlp/w_up_DF': Place(layer + 'mlp.c_fc.weight', 1),
            'blocks/mlp/biases/up_F': Place(layer + 'mlp.c_fc.bias', 1),
            'blocks/mlp/w_down_FD': Place(layer + 'mlp.c_proj.weight', 1),
            'blocks/mlp/biases/down_D': Place(layer + 'mlp.c_proj.bias', 1),
        }
        for i, (weight, bias) in enumerate((('wq_DNH', 'q_NH'), ('wk_DKH', 'k_KH'), ('wv_DKH', 'v_KH'))):
            block = (i * D, (i + 1) * D)
            table[f'blocks/attention/{weight}'] = Place(layer + 'attn.c_attn.weight', 1, columns=block)
            table[f'blocks/attention/biases/{bias}'] = Place(layer + 'attn.c_attn.bias', 2, columns=block)
    else:
        layer = 'model.layers.{layer}.'
        table = {
            'embedding_VD': Place('model.embed_tokens.weight', 1),
            'final_norm/scale': Place('model.norm.weight', 1),
            'blocks/attention_norm/scale': Place(layer + 'input_layernorm.weight', 1),
            'blocks/mlp_norm/scale': Place(layer + 'post_attention_layernorm.weight', 1),
            'blocks/attention/wq_DNH': Place(layer + 'self_attn.q_proj.weight', 1, transpose=True),
            'blocks/attention/wk_DKH': Place(layer + 'self_attn.k_proj.weight', 1, transpose=True),
            'blocks/attention/wv_DKH': Place(layer + 'self_attn.v_proj.weight', 1, transpose=True),
            'blocks/attention/wo_NHD': Place(layer + 'self_attn.o_proj.weight', 2, transpose=True),
            'blocks/mlp/w_gate_DF': Place(layer + 'mlp.gate_proj.weight', 1, transpose=True),
            'blocks/mlp/w_up_DF': Place(layer + 'mlp.up_proj.weight', 1, transpose=True),
            'blocks/mlp/w_down_FD': Place(layer + 'mlp.down_proj.weight', 1, transpose=True),
        }
        if cfg.qkv_bias:
            for bias, proj in (('q_NH', 'q_proj'), ('k_KH', 'k_proj'), ('v_KH', 'v_proj')):
                table[f'blocks/attention/biases/{bias}'] = Place(f'{layer}self_attn.{proj}.bias', 2)
    if not cfg.tie_embeddings:
        table['unembedding_DV'] = Place('lm_head.weight', 1, transpose=True)
    return table


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """'blocks/mlp/w_up_DF' -> shape, for a params tree of arrays or shapes."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator='/'): tuple(leaf.shape) for path, leaf in leaves}


def _layer_shape(path: str, shape: tuple[int, ...], cfg: ModelConfig) -> tuple[int, ...]:
    """One layer's shape of a parameter (all of it for unstacked ones), without the vocabulary padding."""
    layer = shape[1:] if path.startswith('blocks/') else shape
    if path in _VOCAB_PARAMS:
        return tuple(cfg.vocab_size if size == cfg.padded_vocab else size for size in layer)
    return layer


def _view_shape(shape: tuple[int, ...], split: int) -> tuple[int, ...]:
    """Our (per-layer) shape as the 1-D or 2-D view of a tensor it comes from."""
    return (math.prod(shape[:split]),) + ((math.prod(shape[split:]),) if split < len(shape) else ())


def expected_shapes(cfg: ModelConfig, table: dict[str, Place], shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple]:
    """Each Hugging Face tensor name (layers filled in) and the shape this config needs it to have."""
    expected: dict[str, list[int]] = {}
    for path, place in table.items():
        view = list(_view_shape(_layer_shape(path, shapes[path], cfg), place.split))
        if place.transpose:
            view.reverse()
        layers = range(cfg.num_layers) if path.startswith('blocks/') else [None]
        for layer in layers:
            name = place.name.format(layer=layer)
            if place.columns is not None:  # fused: the widest block's end is the tensor's width
                current = expected.setdefault(name, list(view))
                current[-1] = max(current[-1], place.columns[1])
            else:
                expected[name] = view
    return {name: tuple(shape) for name, shape in expected.items()}


class Checkpoint:
    """The safetensors files of a Hugging Face folder, opened lazily: tensor name -> slice reader."""

    def __init__(self, folder: str | pathlib.Path):
        folder = pathlib.Path(folder)
        index = folder / 'model.safetensors.index.json'
        if index.is_file():
            weight_map = json.loads(index.read_text())['weight_map']
            self._files = {name: folder / file for name, file in weight_map.items()}
        else:
            self._files = {}
            # model.safetensors, or model-00001-of-00002.safetensors...: not other safetensors files beside them
            # (Mistral's consolidated.safetensors is another layout).
            for file in sorted(folder.glob('model*.safetensors')):
                with safe_open(file, framework='numpy') as f:
                    self._files.update(dict.fromkeys(f.keys(), file))
        self._open: dict[pathlib.Path, Any] = {}

    @property
    def names(self) -> set[str]:
        return set(self._files)

    def slice(self, name: str) -> Any:
        file = self._files[name]
        if file not in self._open:
            self._open[file] = safe_open(file, framework='numpy')
        return self._open[file].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.slice(name).get_shape())


def check(
    checkpoint: Checkpoint, cfg: ModelConfig, table: dict[str, Place], shapes: dict, folder: str, unused=frozenset()
) -> None:
    """Names a missing, unexpected or misshapen tensor in one line; `unused` tensors are known and left alone."""
    expected = expected_shapes(cfg, table, shapes)
    extra = {n for n in checkpoint.names - set(expected) - unused if not n.endswith(_BUFFERS)}
    if cfg.tie_embeddings:
        extra.discard('lm_head.weight')  # some tied checkpoints store the shared matrix twice
    for name in sorted(expected):
        if name not in checkpoint.names:
            raise ConfigError(f'{folder} lacks the tensor {name}, which this {cfg.family} model needs.')
        if checkpoint.shape(name) != expected[name]:
            raise ConfigError(
                f'{folder}: tensor {name} has shape {checkpoint.shape(name)} but this config needs '
                f'{expected[name]}: the config.model fields do not match the checkpoint.'
            )
    if extra:
        raise ConfigError(f'{folder} has a tensor this model does not use: {sorted(extra)[0]}.')


def _span(dims: tuple[int, ...], index: tuple[slice, ...]) -> tuple[int, int, tuple[int, ...]]:
    """The flat range of a view axis that covers `index` over `dims` (inner dims taken whole), and its shape."""
    first = index[0].indices(dims[0])
    inner = math.prod(dims[1:])
    return first[0] * inner, first[1] * inner, (first[1] - first[0], *dims[1:])


def _read(tensor: Any, place: Place, rows: tuple[int, int], cols: tuple[int, int] | None) -> np.ndarray:
    """rows x cols of the tensor's view (transposed, column block); zeros past its end (vocabulary padding)."""
    shape = tensor.get_shape()
    view_rows = shape[1] if place.transpose else shape[0]
    r0, r1 = rows[0], min(rows[1], view_rows)
    if cols is None:
        offset = place.columns[0] if place.columns else 0
        block = tensor[offset + r0 : offset + r1]
        pad = [(0, rows[1] - rows[0] - (r1 - r0))]
    else:
        offset = place.columns[0] if place.columns else 0
        view_cols = shape[0] if place.transpose else (place.columns[1] - offset if place.columns else shape[1])
        c0, c1 = cols[0], min(cols[1], view_cols)
        block = (
            tensor[offset + c0 : offset + c1, r0:r1].T if place.transpose else tensor[r0:r1, offset + c0 : offset + c1]
        )
        pad = [(0, rows[1] - rows[0] - (r1 - r0)), (0, cols[1] - cols[0] - (c1 - c0))]
    return np.pad(block, pad) if any(after for _, after in pad) else block


def read_slice(tensor: Any, place: Place, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """The part `index` of one layer of our parameter (per-layer `shape`), read from its tensor."""
    row_dims, col_dims = shape[: place.split], shape[place.split :]
    r0, r1, row_shape = _span(row_dims, index[: place.split])
    if col_dims:
        c0, c1, col_shape = _span(col_dims, index[place.split :])
        block = _read(tensor, place, (r0, r1), (c0, c1)).reshape(row_shape + col_shape)
        inner = (slice(None), *index[1 : place.split], slice(None), *index[place.split + 1 :])
    else:
        block = _read(tensor, place, (r0, r1), None).reshape(row_shape)
        inner = (slice(None), *index[1:])
    return block[inner]


def load(folder: str, cfg: ModelConfig, abstract_params: Any) -> Any:
    """The folder's weights as our params tree, each array read straight into its sharding and dtype.

    Parameters no Hugging Face model of the family has (LoRA adapters, a classifier head) are left out of
    the tree; a classifier leaves the folder's language-model head unread.
    """
    checkpoint = Checkpoint(folder)
    shapes = flat_shapes(abstract_params)
    known = places(cfg, checkpoint.names)
    table = {path: place for path, place in known.items() if path in shapes}
    unused = {place.name for path, place in known.items() if path not in shapes}
    check(checkpoint, cfg, table, shapes, folder, unused)
    abstract_params = param_roles.select_paths(abstract_params, lambda name: name in table)

    def load_one(path, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        key = jax.tree_util.keystr(path, simple=True, separator='/')
        place, stacked = table[key], key.startswith('blocks/')
        layer_shape = leaf.shape[1:] if stacked else leaf.shape
        dtype = np.dtype(leaf.dtype)

        def callback(index: tuple[slice, ...]) -> np.ndarray:
            if not stacked:
                return read_slice(checkpoint.slice(place.name), place, layer_shape, index).astype(dtype)
            layers = range(*index[0].indices(cfg.num_layers))
            parts = [
                read_slice(checkpoint.slice(place.name.format(layer=layer)), place, layer_shape, index[1:])
                for layer in layers
            ]
            return np.stack(parts).astype(dtype)

        return jax.make_array_from_callback(leaf.shape, leaf.sharding, callback)

    return jax.tree_util.tree_map_with_path(load_one, abstract_params)


def tensors(params: dict[str, np.ndarray], cfg: ModelConfig, dtype: str) -> Iterator[tuple[str, np.ndarray]]:
    """Our params (flat, on the host) as Hugging Face tensors, in a fixed order, cast to `dtype`."""
    flat = flat_shapes(params)
    table = places(cfg, {'transformer.wte.weight'})  # GPT-2 as GPT2LMHeadModel names
    expected = expected_shapes(cfg, table, flat)
    by_name: dict[str, list[tuple[str, Place, int | None]]] = {}
    for path, place in table.items():
        for layer in range(cfg.num_layers) if path.startswith('blocks/') else [None]:
            by_name.setdefault(place.name.format(layer=layer), []).append((path, place, layer))
    target = ml_dtypes.bfloat16 if dtype == 'bfloat16' else np.float32
    for name in sorted(by_name, key=natural_order):
        out = np.zeros(expected[name], np.float32)
        for path, place, layer in by_name[name]:
            value = _lookup(params, path)
            value = np.asarray(value if layer is None else value[layer], np.float32)
            layer_shape = _layer_shape(path, flat[path], cfg)
            value = value[tuple(slice(0, n) for n in layer_shape)]  # without the vocabulary padding
            view = value.reshape(_view_shape(layer_shape, place.split))
            view = view.T if place.transpose else view
            if place.columns is None:
                out = view
            else:
                out[..., place.columns[0] : place.columns[1]] = view
        yield name, np.ascontiguousarray(out.astype(target))


def _lookup(params: dict, path: str) -> Any:
    for key in path.split('/'):
        params = params[key]
    return params


def natural_order(name: str) -> list[tuple[int, int | str]]:
    """Sort key putting layer 2 before layer 10."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in name.split('.')]
