"""A model to use from a path: a run's workdir (its newest checkpoint), a checkpoint, or a Hugging Face folder."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from ml_collections import config_dict

from models.transformer import ModelConfig
from trainer.data import tokenizers
from trainer.errors import ConfigError
from trainer.hf import config as hf_config
from trainer.hf import tensors as hf_tensors
from trainer.modeling import model_setup
from trainer.runtime import mesh as mesh_lib
from trainer.training import checkpoints, saved_config
from trainer.training import state as state_lib


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model's config, structure and sharded params, its tokenizer, and the mesh they live on."""

    config: config_dict.ConfigDict  # the run's config (or, for a Hugging Face folder, configs/finetune_hf.py's)
    model_cfg: ModelConfig
    graphdef: nnx.GraphDef
    params: Any
    tokenizer: tokenizers.Tokenizer | None  # None for a Hugging Face folder without tokenizer.json
    mesh: jax.sharding.Mesh
    source: str  # what was loaded: a checkpoint folder or a Hugging Face folder


def _config_of(path: str) -> tuple[config_dict.ConfigDict, pathlib.Path | None]:
    """The config that describes the model at `path`, and its checkpoint folder (None for Hugging Face)."""
    if hf_config.is_model_folder(path):
        from configs import finetune_hf  # a config file: imported only here

        return finetune_hf.get_config(path), None
    folder = pathlib.Path(path)
    if (folder / 'checkpoints').is_dir():  # a run's workdir
        folder = folder / 'checkpoints'
    if not folder.is_dir():
        raise ConfigError(
            f"--model={path} is not a folder: give a run's workdir, a checkpoint or a Hugging Face folder."
        )
    try:
        checkpoint = checkpoints.find_checkpoint(str(folder), '--model')
    except ConfigError:
        raise ConfigError(
            f"--model={path} holds no model: give a run's workdir (runs/NAME), a checkpoint folder "
            '(runs/NAME/checkpoints/600) or a Hugging Face model folder (config.json and *.safetensors).'
        ) from None
    manager = checkpoints.open_read_only(checkpoint.parent)
    try:
        saved = manager.restore(int(checkpoint.name), args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    finally:
        manager.close()
    return saved_config.parse(saved['config']['config']), checkpoint


def folder_dtype(path: str) -> str | None:
    """A Hugging Face folder's `dtype` (transformers 5) or `torch_dtype`: what transformers computes in; None
    when it names none or one we do not compute in."""
    hf = hf_config.read(path)
    dtype = hf.get('dtype') or hf.get('torch_dtype')
    return dtype if dtype in ('float32', 'bfloat16', 'float16') else None


def load(path: str, mesh_sizes: dict[str, int] | None = None, dtype: str | None = None) -> LoadedModel:
    """The model at `path` on a mesh of `mesh_sizes` (default: the config's), compute dtype `dtype` if given,
    else a run's own, or a Hugging Face folder's (a float32 folder computes in float32, as in transformers)."""
    config, checkpoint = _config_of(path)
    if mesh_sizes is not None:
        config.mesh.update(mesh_sizes)
    if dtype is None and checkpoint is None:
        dtype = folder_dtype(path)
    if dtype is not None:
        config.model.dtype = dtype
    sizes = {axis: config.mesh[axis] for axis in mesh_lib.MESH_AXES}
    devices = jax.devices()[: max(1, _device_count(sizes))]
    mesh = mesh_lib.make_mesh(sizes, devices)
    model_cfg = model_setup.model_config(config)
    graphdef, shapes, logical = model_setup.abstract_model(model_cfg)
    shardings = state_lib.param_shardings(shapes, logical, mesh, model_cfg.sharding_rules)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    without_tokenizer = checkpoint is None and not (pathlib.Path(path) / 'tokenizer.json').is_file()
    tokenizer = None if without_tokenizer else tokenizers.make_tokenizer(config.data.tokenizer, config.data.eos_token)
    with jax.set_mesh(mesh):
        if checkpoint is None:
            params, source = hf_tensors.load(path, model_cfg, abstract), path
        else:
            params, source = checkpoints.restore_params(checkpoint, abstract), str(checkpoint)
    return LoadedModel(config, model_cfg, graphdef, params, tokenizer, mesh, source)


def _device_count(sizes: dict[str, int]) -> int:
    """Devices a mesh of these sizes takes: all of them when one size is -1."""
    if -1 in sizes.values():
        return jax.device_count()
    count = 1
    for size in sizes.values():
        count *= size
    return count
