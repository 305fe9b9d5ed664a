"""The batches of one config on any topology: data in every format, and the global batches a mesh gets.

tests/test_data.py imports it, and runs it as each process of a multi-process job:
  python tests/batch_topologies.py DATA_FOLDER OUT.npz FORMAT [FORMAT ...]
(under scripts/launch_local.py) writes every process's whole global batches, gathered, to OUT.npz from
process 0, keyed `FORMAT/kind/step/field`.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'scripts'))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from ml_collections import config_dict  # noqa: E402

from configs import small_lm  # noqa: E402
from trainer.data import pipeline, tokenizers  # noqa: E402
from trainer.runtime import distributed  # noqa: E402
from trainer.runtime import mesh as mesh_lib  # noqa: E402

STEPS = 3  # global batches compared per format
BATCH = 16
WORDS = 'the quick brown fox jumps over a lazy dog while seven wizards quietly hex jovial bakers'.split()
# format -> what it sets in config.data (paths relative to the data folder)
FORMATS = {
    'text': {'train_files': 'text/*.txt', 'eval_files': 'eval.txt'},
    'text_whole_files': {'train_files': 'many/*.txt'},  # >= 4 files per stream: whole files each
    # fewer documents than the 8 streams: each stream reads its byte range of the text
    'one_paragraph': {'train_files': 'one_paragraph.txt', 'eval_files': 'one_paragraph.txt'},
    'jsonl_few': {'train_files': 'few.jsonl', 'eval_files': 'few.jsonl'},
    'jsonl': {'train_files': 'docs.jsonl', 'eval_files': 'docs.jsonl'},
    'parquet': {'train_files': 'docs.parquet'},
    'arrayrecord': {'train_files': 'prepared/*.arrayrecord'},
    'mixture': {'mixture': (('text/*.txt', 0.7), ('docs.jsonl', 0.3))},
    'sft': {'format': 'sft', 'train_files': 'sft.jsonl', 'eval_files': 'sft.jsonl'},
}


def _paragraphs(rng: np.random.Generator, tag: str, count: int) -> list[str]:
    return [f'{tag}.{p}: ' + ' '.join(rng.choice(WORDS, rng.integers(3, 30))) for p in range(count)]


def write_data(folder: pathlib.Path) -> None:
    """Every format's files in `folder` (deterministic)."""
    import prepare_data
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    for name, files, paragraphs in (('text', 6, 40), ('many', 36, 4)):
        (folder / name).mkdir(parents=True)
        for f in range(files):
            (folder / name / f'part{f}.txt').write_text('\n\n'.join(_paragraphs(rng, f'{name} {f}', paragraphs)) + '\n')
    (folder / 'eval.txt').write_text('\n\n'.join(_paragraphs(rng, 'eval', 60)))
    (folder / 'one_paragraph.txt').write_text(' '.join(_paragraphs(rng, 'one', 200)) + '\n')
    few = [' '.join(_paragraphs(rng, f'few {i}', 20)) for i in range(3)]
    (folder / 'few.jsonl').write_text(''.join(json.dumps({'text': d}) + '\n' for d in few))
    docs = _paragraphs(rng, 'json', 120)
    (folder / 'docs.jsonl').write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
    pq.write_table(pa.table({'text': docs}), folder / 'docs.parquet', row_group_size=16)
    pairs = zip(_paragraphs(rng, 'ask', 80), _paragraphs(rng, 'answer', 80), strict=True)
    (folder / 'sft.jsonl').write_text(''.join(json.dumps({'prompt': p, 'completion': c}) + '\n' for p, c in pairs))
    options = dict(prepare_data.DEFAULT_OPTIONS)
    prepare_data.prepare(str(folder / 'text/*.txt'), str(folder / 'prepared'), options, workers=1)


def config_for(folder: pathlib.Path, name: str, mesh_shape: tuple[int, int, int]) -> config_dict.ConfigDict:
    """small_lm reading format `name` from `folder`, with a mesh of `mesh_shape` (data, fsdp, tensor)."""
    config = small_lm.get_config()
    config.data.update(seq_len=24, shuffle_buffer=8, eval_files='')
    config.train.global_batch_size, config.train.eval_steps = BATCH, 2
    for field, value in FORMATS[name].items():
        if field == 'mixture':
            value = tuple((str(folder / pattern), weight) for pattern, weight in value)
        elif field.endswith('_files'):
            value = str(folder / value)
        config.data[field] = value
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh_shape
    return config


def global_batches(config: config_dict.ConfigDict, devices: list[jax.Device]) -> dict[str, np.ndarray]:
    """The first STEPS train batches and the eval batches on `devices`, whole, as host arrays by name."""
    mesh = mesh_lib.make_mesh({axis: config.mesh[axis] for axis in mesh_lib.MESH_AXES}, devices)
    sharding = mesh_lib.batch_sharding(mesh, tuple(config.mesh.rules))
    tokenizer = tokenizers.make_tokenizer(config.data.tokenizer)
    result = {}
    with jax.set_mesh(mesh):
        train = pipeline.train_batches(config, tokenizer, sharding)
        batches = [('train', step, next(train)) for step in range(STEPS)]
        train.close()
        if config.data.eval_files:
            batches += [
                ('eval', i, batch) for i, batch in enumerate(pipeline.eval_batches(config, tokenizer, sharding))
            ]
        for kind, step, batch in batches:
            for key, array in batch.items():
                # A process holds only its rows: gather the others' (a no-op in one process).
                whole = array if array.is_fully_addressable else multihost_utils.process_allgather(array, tiled=True)
                result[f'{kind}/{step}/{key}'] = np.asarray(whole)
    return result


def main(folder: str, out: str, *names: str) -> None:
    """Each format's global batches on every device of the job (a mesh over the batch axes), from process 0."""
    job = distributed.find_job(None, None, None, os.environ)
    if job is not None:
        distributed.join(job, join_timeout_s=120, peer_timeout_s=60)
    devices = jax.devices()
    found = {}
    for name in names:
        config = config_for(pathlib.Path(folder), name, (jax.process_count(), len(devices) // jax.process_count(), 1))
        found.update({f'{name}/{key}': array for key, array in global_batches(config, devices).items()})
    if jax.process_index() == 0:
        np.savez(out, **found)


if __name__ == '__main__':
    main(*sys.argv[1:])
