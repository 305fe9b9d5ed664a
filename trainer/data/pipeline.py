"""The grain input pipeline: documents -> tokens -> packed rows -> this process's slice of each batch.

Train: per epoch the file list is reshuffled (from config.seed and the epoch), files are read
lazily and interleaved, documents are tokenized with an EOS after each, packed into rows of
seq_len + 1 tokens (grain's concat-then-split: long documents continue in the next row), and a
window shuffle mixes rows. Pre-tokenized ArrayRecord shards are shuffled globally instead. The
iterator's state is a small JSON-able dict: restoring it replays exactly the batches that follow.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import NamedSharding
from ml_collections import config_dict

from trainer.data import sources
from trainer.data.tokenizers import Tokenizer, fingerprint
from trainer.errors import ConfigError

Batch = dict[str, np.ndarray]
_INTERLEAVED_FILES = 16  # files read at once per source: more mixes better, each holds a read block


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> slice:
    """The rows of a batch-sharded global array that this process's devices hold."""
    indices = sharding.addressable_devices_indices_map(global_shape).values()
    starts = [index[0].start or 0 for index in indices]
    stops = [global_shape[0] if index[0].stop is None else index[0].stop for index in indices]
    return slice(min(starts), max(stops))


@dataclasses.dataclass(frozen=True)
class Source:
    """Files of one kind, and their weight in the mixture."""

    files: tuple[str, ...]
    weight: float
    format: str  # text/jsonl/parquet, or 'arrayrecord' for pre-tokenized shards


def train_sources(data_cfg: config_dict.ConfigDict) -> list[Source]:
    """config.data.mixture's components, or config.data.train_files alone."""
    if data_cfg.mixture:
        entries = [
            (pattern, float(weight), f'config.data.mixture[{i}]')
            for i, (pattern, weight) in enumerate(data_cfg.mixture)
        ]
    else:
        entries = [(data_cfg.train_files, 1.0, 'config.data.train_files')]
    return [_source(pattern, weight, field, data_cfg) for pattern, weight, field in entries]


def _source(pattern: str, weight: float, field: str, data_cfg: config_dict.ConfigDict) -> Source:
    files = sources.resolve_files(pattern, field)
    formats = {sources.file_format(f, data_cfg.format) for f in files}
    if len(formats) > 1:
        raise ConfigError(f'{field} mixes file formats {sorted(formats)}: give each format its own mixture entry.')
    return Source(files=tuple(files), weight=weight, format=formats.pop())


def eval_source(data_cfg: config_dict.ConfigDict) -> Source:
    """config.data.eval_files as one source."""
    return _source(data_cfg.eval_files, 1.0, 'config.data.eval_files', data_cfg)


def check_sources(srcs: list[Source], data_cfg: config_dict.ConfigDict, vocab_size: int) -> None:
    """Checks what can be checked before training: Parquet columns, pre-tokenized shards' tokenizer."""
    for src in srcs:
        if src.format == 'parquet':
            for path in src.files:
                sources.check_parquet_column(path, data_cfg.text_field)
        if src.format == 'arrayrecord':
            manifest = sources.read_manifest(list(src.files))
            if manifest['tokenizer_fingerprint'] != fingerprint(data_cfg.tokenizer):
                raise ConfigError(
                    f'{src.files[0]} was tokenized with {manifest["tokenizer"]!r}, not config.data.tokenizer='
                    f'{data_cfg.tokenizer!r}: use the same tokenizer or prepare the data again.'
                )
            if manifest['vocab_size'] > vocab_size:
                raise ConfigError(
                    f'{src.files[0]} holds ids up to {manifest["vocab_size"] - 1} but config.model.vocab_size='
                    f'{vocab_size}: raise vocab_size to at least {manifest["vocab_size"]}.'
                )


def _documents(
    src: Source, data_cfg: config_dict.ConfigDict, tokenizer: Tokenizer, seed: int, shuffle: bool
) -> grain.IterDataset:
    """One source's documents as token arrays ending in EOS, this process's share of them only."""
    index, count = jax.process_index(), jax.process_count()
    eos = np.array([tokenizer.eos_id], np.int32)
    if src.format == 'arrayrecord':
        manifest = sources.read_manifest(list(src.files))
        records = sources.token_records(list(src.files), manifest['dtype'])[index::count]
        records = records.shuffle(seed) if shuffle else records
        return records.repeat(None).map(lambda ids: {'tokens': np.concatenate([ids, eos])}).to_iter_dataset()
    files = grain.MapDataset.source(list(src.files))
    # Whole files per process when there are enough of them; otherwise every process reads all
    # files and keeps every count-th document.
    if len(src.files) >= count:
        files, shard = files[index::count], (0, 1)
    else:
        shard = (index, count)
    files = files.shuffle(seed) if shuffle else files
    per_file = files.repeat(None).map(lambda path: sources.FileDocuments(path, data_cfg, shard))
    # At most one epoch's files open at once: a wider cycle would read the next epoch's copies early.
    documents = grain.experimental.InterleaveIterDataset(per_file, cycle_length=min(len(files), _INTERLEAVED_FILES))
    return documents.map(lambda text: {'tokens': np.concatenate([tokenizer.encode(text), eos])})


def _features(row: dict[str, np.ndarray]) -> Batch:
    """A packed row of seq_len + 1 tokens -> model inputs, next-token targets and loss weights."""
    tokens, segments, positions = row['tokens'], row['tokens_segment_ids'], row['tokens_positions']
    # A target counts when it continues the same document: not across documents, not padding.
    weights = (segments[1:] == segments[:-1]) & (segments[1:] != 0)
    return {
        'inputs': tokens[:-1],
        'targets': tokens[1:],
        'segment_ids': segments[:-1],
        'positions': positions[:-1],
        'weights': weights.astype(np.float32),
    }


def make_dataset(
    srcs: list[Source],
    data_cfg: config_dict.ConfigDict,
    tokenizer: Tokenizer,
    seed: int,
    local_batch: int,
    shuffle: bool,
) -> grain.IterDataset:
    """The whole pipeline up to batches of `local_batch` rows, before prefetching."""
    streams = [_documents(src, data_cfg, tokenizer, seed + i, shuffle) for i, src in enumerate(srcs)]
    documents = streams[0] if len(streams) == 1 else grain.IterDataset.mix(streams, [s.weight for s in srcs])
    rows = grain.experimental.ConcatThenSplitIterDataset(documents, length_struct={'tokens': data_cfg.seq_len + 1})
    rows = rows.map(_features)
    if shuffle and data_cfg.shuffle_buffer > 1:
        rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=data_cfg.shuffle_buffer, seed=seed)
    return rows.batch(local_batch, drop_remainder=True)


def prefetch(dataset: grain.IterDataset, data_cfg: config_dict.ConfigDict) -> grain.IterDataset:
    """Background work: worker processes when num_workers > 0, else one thread."""
    if data_cfg.num_workers > 0:
        # grain's workers read its absl flags; outside absl.app.run (tests, notebooks) nothing has
        # parsed them, and their defaults are what we want.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        options = grain.MultiprocessingOptions(
            num_workers=data_cfg.num_workers, per_worker_buffer_size=data_cfg.prefetch_batches
        )
        return dataset.mp_prefetch(options)
    return grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=data_cfg.prefetch_batches)


class GlobalBatches:
    """Iterates global batches on the mesh; each process supplies its own rows. Tracks data waits."""

    def __init__(self, dataset: grain.IterDataset, sharding: NamedSharding, global_shape: tuple[int, int]):
        self._iterator = iter(dataset)
        self._sharding, self._shape = sharding, global_shape
        self.wait_s = 0.0  # seconds spent waiting for the pipeline since the last `take_wait`

    def __iter__(self) -> GlobalBatches:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        start = time.perf_counter()
        local = next(self._iterator)
        self.wait_s += time.perf_counter() - start
        return {
            name: jax.make_array_from_process_local_data(self._sharding, rows, self._shape)
            for name, rows in local.items()
        }

    def take_wait(self) -> float:
        """Seconds waited since the last call."""
        wait, self.wait_s = self.wait_s, 0.0
        return wait

    def get_state(self) -> dict[str, Any]:
        return self._iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._iterator.set_state(state)

    def close(self) -> None:
        """Stops background threads and worker processes."""
        self._iterator.close()


def train_batches(config: config_dict.ConfigDict, tokenizer: Tokenizer, sharding: NamedSharding) -> GlobalBatches:
    """The training stream: shuffled, repeated forever, prefetched."""
    shape = (config.train.global_batch_size, config.data.seq_len)
    rows = process_rows(sharding, shape)
    dataset = make_dataset(
        train_sources(config.data), config.data, tokenizer, config.seed, rows.stop - rows.start, shuffle=True
    )
    return GlobalBatches(prefetch(dataset, config.data), sharding, shape)


def eval_batches(config: config_dict.ConfigDict, tokenizer: Tokenizer, sharding: NamedSharding) -> list[Batch]:
    """The same `eval_steps` batches every time: the eval files in order, unshuffled."""
    shape = (config.train.global_batch_size, config.data.seq_len)
    rows = process_rows(sharding, shape)
    dataset = make_dataset(
        [eval_source(config.data)], config.data, tokenizer, config.seed, rows.stop - rows.start, shuffle=False
    )
    batches = GlobalBatches(dataset, sharding, shape)
    return [next(batches) for _ in range(config.train.eval_steps)]
