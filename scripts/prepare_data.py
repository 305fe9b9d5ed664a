"""Tokenizes text, JSON-lines or Parquet files once into ArrayRecord shards that train at memory speed.

Usage:
  python scripts/prepare_data.py --inputs 'corpus/*.jsonl' --output_dir data/prepared --tokenizer tok.json

Writes one shard per input file (files are tokenized in parallel, one process each) and, last,
manifest.json: documents, tokens, tokenizer, options and the sha256 of every source. Running it again
on the same inputs with the same options does nothing. Train on the result with
--config.data.train_files='data/prepared/*.arrayrecord' and the same --config.data.tokenizer.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import pathlib
import sys
import types

import fsspec
import numpy as np
import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from trainer.data import sources, tokenizers  # noqa: E402
from trainer.errors import ConfigError  # noqa: E402

MANIFEST = 'manifest.json'
# How documents are read and tokenized; recorded in the manifest (a change means preparing again).
DEFAULT_OPTIONS = {
    'tokenizer': 'byte',
    'eos_token': '',
    'format': 'auto',
    'text_field': 'text',
    'sample_by': 'paragraph',
    'max_document_bytes': 1 << 20,
}


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with fsspec.open(path, 'rb') as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def tokenize_file(job: tuple[int, str, dict, str]) -> dict:
    """Writes one input file's documents to shard number `index`; returns its counts."""
    from array_record.python.array_record_module import ArrayRecordWriter

    index, path, options, out_dir = job
    tokenizer = tokenizers.make_tokenizer(options['tokenizer'], options['eos_token'])
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    shard = f'shard-{index:05d}.arrayrecord'
    writer = ArrayRecordWriter(os.path.join(out_dir, shard + '.tmp'), 'group_size:1')
    documents = tokens = 0
    for text in sources.FileDocuments(path, types.SimpleNamespace(**options)):
        ids = tokenizer.encode(text)
        writer.write(ids.astype(dtype).tobytes())
        documents, tokens = documents + 1, tokens + len(ids)
    writer.close()
    os.replace(os.path.join(out_dir, shard + '.tmp'), os.path.join(out_dir, shard))
    return {'file': shard, 'source': path, 'sha256': sha256(path), 'documents': documents, 'tokens': tokens}


def up_to_date(out_dir: str, options: dict, files: list[str]) -> bool:
    """True when the manifest there was made from these very inputs and options, and its shards exist."""
    try:
        with open(os.path.join(out_dir, MANIFEST)) as f:
            manifest = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    same_inputs = [s['source'] for s in manifest['shards']] == files and manifest['options'] == options
    return (
        same_inputs
        and manifest['tokenizer_fingerprint'] == tokenizers.fingerprint(options['tokenizer'])
        and all(os.path.exists(os.path.join(out_dir, s['file'])) for s in manifest['shards'])
        and all(sha256(s['source']) == s['sha256'] for s in manifest['shards'])
    )


def prepare(inputs: str, out_dir: str, options: dict, workers: int) -> dict | None:
    """Tokenizes `inputs` into `out_dir`; returns the manifest, or None when it was already up to date."""
    files = sources.resolve_files(inputs, '--inputs')
    tokenizer = tokenizers.make_tokenizer(options['tokenizer'], options['eos_token'])
    os.makedirs(out_dir, exist_ok=True)
    if up_to_date(out_dir, options, files):
        return None
    jobs = [(i, path, options, out_dir) for i, path in enumerate(files)]
    with multiprocessing.get_context('spawn').Pool(min(workers, len(jobs))) as pool:
        # disable=None: a bar on a terminal only; in a log file its every refresh would be a line of its own.
        progress = tqdm.tqdm(
            pool.imap(tokenize_file, jobs), total=len(jobs), unit='file', desc='tokenizing', disable=None
        )
        shards = list(progress)
    manifest = {
        'tokenizer': options['tokenizer'],
        'tokenizer_fingerprint': tokenizers.fingerprint(options['tokenizer']),
        'vocab_size': tokenizer.vocab_size,
        'eos_id': tokenizer.eos_id,
        'dtype': 'uint16' if tokenizer.vocab_size <= 1 << 16 else 'uint32',
        'documents': sum(s['documents'] for s in shards),
        'tokens': sum(s['tokens'] for s in shards),
        'options': options,
        'shards': shards,
    }
    # The manifest is written last: its presence marks a complete preparation.
    with open(os.path.join(out_dir, MANIFEST + '.tmp'), 'w') as f:
        json.dump(manifest, f, indent=2)
    os.replace(os.path.join(out_dir, MANIFEST + '.tmp'), os.path.join(out_dir, MANIFEST))
    return manifest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--inputs', required=True, help='comma-separated paths, globs or fsspec URLs')
    parser.add_argument('--output_dir', required=True)
    parser.add_argument('--tokenizer', help="'byte', a tokenizers .json or a SentencePiece .model")
    parser.add_argument('--eos_token')
    parser.add_argument('--format', choices=sources.FORMATS[:-1])
    parser.add_argument('--text_field')
    parser.add_argument('--sample_by', choices=sources.SAMPLE_BY)
    parser.add_argument('--max_document_bytes', type=int)
    parser.set_defaults(**DEFAULT_OPTIONS)
    parser.add_argument('--workers', type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    options = {key: getattr(args, key) for key in DEFAULT_OPTIONS}
    try:
        manifest = prepare(args.inputs, args.output_dir, options, args.workers)
    except ConfigError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    if manifest is None:
        print(f'{args.output_dir} is up to date: nothing to do.')
    else:
        print(
            f'{manifest["documents"]:,} documents, {manifest["tokens"]:,} tokens in {len(manifest["shards"])} '
            f'shards; manifest in {os.path.join(args.output_dir, MANIFEST)}'
        )
    return 0


if __name__ == '__main__':
    sys.exit(main())
