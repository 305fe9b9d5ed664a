"""Test setup: 8 simulated CPU devices (set before jax is imported) and a tiny model config."""

import atexit
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Compiled programs are kept on disk for the session: the many end-to-end runs of the same tiny model, each
# a new process, compile it once instead of once each (a tiny run takes 4 s instead of 8).
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='shardtrain-tests-jax-cache-')
    atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_dict  # noqa: E402

from configs import small_lm  # noqa: E402
from trainer.runtime import mesh as mesh_lib  # noqa: E402
from trainer.training import train

jax.config.update('jax_threefry_partitionable', True)

SEQ_LEN = 12
BATCH = 8

# small_lm shrunk for the end-to-end tests that run `python -m trainer`: a few seconds per run on CPU.
TINY_RUN_OVERRIDES = [
    '--config.model.num_layers=2',
    '--config.model.d_model=64',
    '--config.model.d_ff=128',
    '--config.data.seq_len=64',
    '--config.train.global_batch_size=16',
    '--config.train.warmup_steps=5',
]


def tiny_config(family: str = 'llama', **mesh_sizes: int) -> config_dict.ConfigDict:
    """small_lm shrunk to odd little sizes (so shape bugs show) that still split over 8 devices."""
    config = small_lm.get_config()
    model = config.model
    model.family, model.num_layers, model.d_model, model.d_ff = family, 3, 24, 40
    model.num_heads, model.num_kv_heads = 4, (2 if family == 'llama' else 4)
    model.vocab_size, model.max_seq_len, model.dtype = 38, 16, 'float32'
    model.tie_embeddings = model.use_bias = family == 'gpt2'
    config.data.seq_len = SEQ_LEN
    config.train.global_batch_size = BATCH
    config.train.warmup_steps = 2
    config.train.steps = 10
    for axis in mesh_lib.MESH_AXES:
        config.mesh[axis] = mesh_sizes.get(axis, 1)
    return config


def random_batch(setup: train.Setup, config: config_dict.ConfigDict, seed: int = 0, rows: int = BATCH):
    """Random token ids in packed rows of two documents each, with the setup's batch sharding."""
    rng = np.random.default_rng(seed)
    T = config.data.seq_len
    tokens = rng.integers(0, config.model.vocab_size, size=(rows, T + 1), dtype=np.int32)
    split = rng.integers(1, T, size=(rows, 1))  # where the second document starts in each row
    columns = np.arange(T)[None, :]
    segment_ids = np.where(columns < split, 1, 2).astype(np.int32)
    positions = np.where(columns < split, columns, columns - split).astype(np.int32)
    weights = np.ones((rows, T), np.float32)
    weights[np.arange(rows), split[:, 0] - 1] = 0  # the first document's last token does not predict the second's
    arrays = dict(
        inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=segment_ids, positions=positions, weights=weights
    )
    return {name: jax.device_put(array, setup.batch_sharding) for name, array in arrays.items()}


def mesh_for(config: config_dict.ConfigDict) -> jax.sharding.Mesh:
    """The config's mesh over as many of the 8 devices as its axis sizes multiply to."""
    sizes = {axis: config.mesh[axis] for axis in mesh_lib.MESH_AXES}
    return mesh_lib.make_mesh(sizes, jax.devices()[: int(np.prod(list(sizes.values())))])


def sharded_logits(graphdef, params, inputs) -> np.ndarray:
    """The model's logits as one compiled program, on the host."""
    # Not op by op: on 8 simulated devices, hundreds of small eager programs with collectives in flight at once
    # aborted in XLA's rendezvous on a loaded 2-core machine (CI, 2026-12-04: a backward pass in test_finetune).
    return np.asarray(jax.device_get(jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, inputs)))


def run_trainer_in(workdir: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m trainer --workdir workdir args...` from the repository root, its output captured."""
    return subprocess.run(
        [sys.executable, '-m', 'trainer', '--workdir', str(workdir), *args],
        cwd=pathlib.Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    """The lines of a run's metrics.jsonl."""
    return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def losses_by_step(workdir: pathlib.Path) -> dict[int, float]:
    """Each step's loss; for a step logged twice (before a kill and after the restart), the later one."""
    return {line['step']: line['loss'] for line in read_metrics(workdir) if 'loss' in line}


def logged_steps(workdir: pathlib.Path) -> int:
    """The last step with a logged loss; 0 before the first (or while the file is half written)."""
    try:
        return max(losses_by_step(workdir), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
    """Implicit rank broadcasting is a common shape bug: make it an error in tests."""
    with jax.numpy_rank_promotion('raise'):
        yield
