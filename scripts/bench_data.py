"""Tokens/s the input pipeline delivers on this machine, beside the tokens/s the default model consumes.

Usage: python scripts/bench_data.py [--inputs 'corpus/*.txt'] [--batches 400]

Measured side by side in one run: (1) text files tokenized on the fly (byte tokenizer, then a BPE
tokenizer trained on the same text), (2) the same text prepared as ArrayRecord shards, (3) train
steps of configs/small_lm.py. Prints each rate and the ratio of pipeline to model; the goal is at
least 10x.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time
import types

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from configs import small_lm  # noqa: E402
from trainer.data import pipeline, sources, tokenizers  # noqa: E402
from trainer.runtime import mesh as mesh_lib  # noqa: E402
from trainer.training import train  # noqa: E402

DEFAULT_INPUTS = str(pathlib.Path(small_lm.sample_file('train')) / '*.txt')


def pipeline_rate(config, batches: int) -> float:
    """Tokens/s out of the prefetched pipeline (this process's rows), after a warm-up."""
    tokenizer = tokenizers.make_tokenizer(config.data.tokenizer, config.data.eos_token)
    dataset = pipeline.make_dataset(
        pipeline.train_sources(config.data),
        config.data,
        tokenizer,
        config.seed,
        config.train.global_batch_size,
        shuffle=True,
    )
    iterator = iter(pipeline.prefetch(dataset, config.data))
    for _ in range(20):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    iterator.close()
    return batches * config.train.global_batch_size * config.data.seq_len / seconds


def model_rate(config, steps: int) -> float:
    """Tokens/s of the default model's train step, on all local devices."""
    mesh = mesh_lib.make_mesh({axis: config.mesh[axis] for axis in mesh_lib.MESH_AXES})
    with jax.set_mesh(mesh):
        setup = train.build(config, mesh)
        tokenizer = tokenizers.make_tokenizer(config.data.tokenizer)
        batches = pipeline.train_batches(config, tokenizer, setup.batch_sharding)
        batch = next(batches)
        batches.close()
        state, metrics = setup.compiled.train(setup.sharded.state, batch)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = setup.compiled.train(state, batch)
        jax.block_until_ready(metrics)
        return steps * config.train.global_batch_size * config.data.seq_len / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--inputs', default=DEFAULT_INPUTS, help='text files to read (default: the bundled sample)')
    parser.add_argument('--batches', type=int, default=400)
    parser.add_argument('--steps', type=int, default=30)
    args = parser.parse_args()
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import prepare_data
    import train_tokenizer

    base = small_lm.get_config()
    base.data.train_files = args.inputs
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results['text, byte tokenizer'] = pipeline_rate(base, args.batches)
        bpe = str(pathlib.Path(tmp) / 'bpe.json')
        options = types.SimpleNamespace(
            format='auto', text_field='text', sample_by='paragraph', max_document_bytes=1 << 20
        )
        train_tokenizer.train(sources.resolve_files(args.inputs, '--inputs'), 4096, bpe, options)
        bpe_config = base.copy_and_resolve_references()
        bpe_config.data.tokenizer = bpe
        results['text, BPE tokenizer (4096)'] = pipeline_rate(bpe_config, args.batches)
        prepared = pathlib.Path(tmp) / 'prepared'
        prepare_data.prepare(args.inputs, str(prepared), dict(prepare_data.DEFAULT_OPTIONS), workers=2)
        shards = base.copy_and_resolve_references()
        shards.data.train_files = str(prepared / '*.arrayrecord')
        results['ArrayRecord, pre-tokenized'] = pipeline_rate(shards, args.batches)
    consumed = model_rate(small_lm.get_config(), args.steps)
    print(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}')
    print(f'{"model (configs/small_lm.py train step)":42s} {consumed:>12,.0f} tokens/s')
    for name, rate in results.items():
        print(f'{"pipeline: " + name:42s} {rate:>12,.0f} tokens/s  {rate / consumed:6.1f}x the model')
    return 0


if __name__ == '__main__':
    sys.exit(main())
