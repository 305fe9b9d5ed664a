"""The model a run config describes: its frozen ModelConfig, and its structure and parameter shapes without
allocating anything (what training, decoding, counting and conversion all start from)."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from ml_collections import config_dict

from models.transformer import Decoder, ModelConfig


def model_config(config: config_dict.ConfigDict) -> ModelConfig:
    """The model's frozen config: `config.model`, `config.lora` and the mesh rules for its activations."""
    lora = config.lora
    adapters = {}
    if lora.rank:
        adapters = {
            'lora_rank': lora.rank,
            'lora_alpha': lora.alpha,
            'lora_dropout': lora.dropout,
            'lora_targets': tuple(t.strip() for t in lora.targets.split(',') if t.strip()),
            'lora_base_dtype': lora.base_dtype,
        }
    return ModelConfig(**config.model.to_dict(), **adapters, sharding_rules=tuple(config.mesh.rules))


def abstract_model(model_cfg: ModelConfig) -> tuple[nnx.GraphDef, dict[str, Any], dict[str, Any]]:
    """The model's structure, parameter shapes and logical axis names, without allocating anything."""
    # No ambient mesh here: nnx.eval_shape would read the logical names as mesh axes. The trainer maps
    # them with its own rules (linen.logical_to_mesh_axes), the same ones the activations use.
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(model_cfg, nnx.Rngs(0))))
    shapes = nnx.to_pure_dict(abstract)
    logical = jax.tree.map(
        tuple,
        nnx.to_pure_dict(nnx.get_partition_spec(abstract)),
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )
    return graphdef, shapes, logical
