"""Hugging Face models in and out: logits equal transformers' for every family and variant (fixtures made by
scripts/make_hf_fixtures.py; read here with safetensors alone)."""

import pathlib

import jax
import numpy as np
import pytest
from conftest import mesh_for
from flax import nnx
from safetensors.numpy import load_file

from configs import small_lm
from trainer import train
from trainer.hf import config as hf_config
from trainer.hf import tensors as hf_tensors

FIXTURES = pathlib.Path(__file__).resolve().parent / 'fixtures' / 'hf'
VARIANTS = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def fixture_config(name: str, **mesh_sizes):
    """small_lm with the fixture's architecture, in float32, on a mesh of the given sizes."""
    folder = FIXTURES / name
    config = small_lm.get_config()
    config.model.update(hf_config.model_fields(hf_config.read(folder), str(folder)))
    config.model.dtype = 'float32'
    config.model.vocab_multiple = 4  # padded rows (301 -> 304 for gpt2): never predicted, never exported
    for axis in ('data', 'fsdp', 'tensor'):
        config.mesh[axis] = mesh_sizes.get(axis, 1)
    return config


def imported_logits(name: str, input_ids: np.ndarray, **mesh_sizes) -> np.ndarray:
    config = fixture_config(name, **mesh_sizes)
    mesh = mesh_for(config)
    with jax.set_mesh(mesh):
        setup = train.build(config, mesh)
        params = hf_tensors.load(str(FIXTURES / name), setup.model_cfg, setup.sharded.abstract.params)
        logits = nnx.merge(setup.sharded.graphdef, params)(input_ids)
        return np.asarray(jax.device_get(logits))


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def test_every_family_and_variant_has_a_fixture():
    assert VARIANTS == ['gpt2', 'llama3_tied', 'llama_gqa', 'llama_linear_rope', 'mistral_window', 'qwen2_bias']


@pytest.mark.parametrize('name', VARIANTS)
def test_imported_logits_equal_transformers(name):
    reference = load_file(str(FIXTURES / name / 'reference.safetensors'))
    logits = imported_logits(name, reference['input_ids'])
    vocab = reference['logits'].shape[-1]
    assert np.all(np.isneginf(logits[..., vocab:])), 'padded ids are never predicted'
    assert relative_error(logits[..., :vocab], reference['logits']) < 1e-4


@pytest.mark.parametrize('name', ['llama3_tied', 'gpt2'])
def test_an_import_sharded_over_every_mesh_axis_gives_the_same_logits(name):
    reference = load_file(str(FIXTURES / name / 'reference.safetensors'))
    rows = np.concatenate([reference['input_ids']] * 2)  # 4 rows: one per block of the data x fsdp axes
    logits = imported_logits(name, rows, data=2, fsdp=2, tensor=2)
    vocab = reference['logits'].shape[-1]
    assert relative_error(logits[:2, :, :vocab], reference['logits']) < 1e-4
    assert relative_error(logits[2:, :, :vocab], reference['logits']) < 1e-4
