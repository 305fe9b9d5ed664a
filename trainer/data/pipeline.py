"""The grain input pipeline: documents -> tokens -> packed rows -> this process's slice of each batch.

Train: per epoch the file list is reshuffled (from config.seed and the epoch), files are read
lazily and interleaved (each at a pace proportional to its size), documents are tokenized with an
EOS after each, packed into rows of seq_len + 1 tokens (grain's concat-then-split: long documents
continue in the next row), and a window shuffle mixes rows. Pre-tokenized ArrayRecord shards are
shuffled globally instead.

The global batch is cut into a fixed number of streams (config.data.num_streams; by default gcd(global batch,
8)), each such a pipeline over its own share of the files (or documents) and each always filling the same rows;
a process runs the streams that cover the rows its devices hold. Nothing here depends on the devices, the mesh
or the process count, so the batches of step s are a function of the config and s alone, on any hardware. Each
stream's state is a small JSON-able dict: restoring it replays exactly the batches that follow, on any topology.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import NamedSharding
from ml_collections import config_dict

from trainer.data import examples, sources
from trainer.data.interleave import SizeBalancedInterleave
from trainer.data.tokenizers import Tokenizer, bytes_of_ids, fingerprint, token_bytes
from trainer.errors import ConfigError
from trainer.runtime import distributed

Batch = dict[str, np.ndarray]
_INTERLEAVED_FILES = 16  # files read at once per source: more mixes better, each holds a read block
# The default stream count's upper bound (config.data.num_streams=0: gcd(global batch, this)). Any fixed
# number keeps the data order hardware-free; this many gives a process of a small job (up to 8 processes)
# streams of its own, while a single device pays only 8 light pipelines instead of one.
DEFAULT_STREAMS = 8
# Streams read whole files of their own when each gets this many; with fewer files, the streams' shares of
# bytes would differ by a whole file, so each stream reads all files and keeps every n-th document instead.
_FILES_PER_STREAM = 4


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> slice:
    """The rows of a batch-sharded global array that this process's devices hold."""
    indices = sharding.addressable_devices_indices_map(global_shape).values()
    starts = [index[0].start or 0 for index in indices]
    stops = [global_shape[0] if index[0].stop is None else index[0].stop for index in indices]
    return slice(min(starts), max(stops))


@dataclasses.dataclass(frozen=True)
class Source:
    """Files of one kind, their sizes, and their weight in the mixture."""

    files: tuple[str, ...]
    sizes: tuple[int, ...]  # bytes, one per file
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
    files = sources.resolve_sized_files(pattern, field)
    formats = {sources.file_format(f, data_cfg.format) for f in files}
    if len(formats) > 1:
        raise ConfigError(f'{field} mixes file formats {sorted(formats)}: give each format its own mixture entry.')
    return Source(files=tuple(files), sizes=tuple(files.values()), weight=weight, format=formats.pop())


def eval_source(data_cfg: config_dict.ConfigDict, field: str = 'config.data.eval_files') -> Source:
    """config.data.eval_files as one source; `field` names them in errors."""
    return _source(data_cfg.eval_files, 1.0, field, data_cfg)


def check_sources(srcs: list[Source], data_cfg: config_dict.ConfigDict, vocab_size: int) -> None:
    """Checks what can be checked before training: Parquet columns, JSON lines' first lines, pre-tokenized shards'
    tokenizer."""
    for src in srcs:
        if src.format == 'parquet':
            for path in src.files:
                sources.check_parquet_column(path, data_cfg.text_field)
        if src.format == 'jsonl':
            for path in src.files:
                sources.check_json_lines(path, data_cfg.text_field, data_cfg.format)
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


# Counting a source's tokens, a document's first (seq_len + 1) x this many characters are tokenized: no tokenizer
# makes fewer than seq_len + 1 tokens of them, and a 1 MiB document is not tokenized whole at start-up.
_CHARS_PER_TOKEN_BOUND = 64


def check_enough_text(src: Source, data_cfg: config_dict.ConfigDict, tokenizer: Tokenizer, field: str) -> None:
    """Refuses a source of less text than one sequence (seq_len + 1 tokens, EOS included) for streams to share.

    Reads its documents in order only until that many tokens are found: the first document, for any corpus.
    """
    if src.format == 'arrayrecord':
        return
    need, found = data_cfg.seq_len + 1, 0
    for path in src.files:
        documents = iter(sources.FileDocuments(path, data_cfg))
        try:
            for text in documents:
                found += len(tokenizer.encode(text[: need * _CHARS_PER_TOKEN_BOUND])) + 1  # and its EOS
                if found >= need:
                    return
        finally:
            documents.close()
    files = ', '.join(src.files[:3]) + (f' and {len(src.files) - 3} more' if len(src.files) > 3 else '')
    raise ConfigError(
        f'{field} ({files}) holds {found} tokens of text, less than one sequence of config.data.seq_len + 1 = '
        f'{need}: give more text, or lower config.data.seq_len.'
    )


def _documents(
    src: Source,
    data_cfg: config_dict.ConfigDict,
    tokenizer: Tokenizer,
    seed: int,
    shuffle: bool,
    stream: int = 0,
    num_streams: int = 1,
    repeat: bool = True,
    with_bytes: bool = False,
) -> grain.IterDataset:
    """One source's documents as token arrays ending in EOS: the share of data stream `stream` only.

    Repeated forever (training, the eval's fixed batches), or read once (`repeat=False`: scoring whole files).
    `with_bytes` adds the UTF-8 bytes of text each token stands for (the EOS none), for bits per byte.
    """
    eos = np.array([tokenizer.eos_id], np.int32)

    def document(ids: np.ndarray, counts: np.ndarray | None) -> dict[str, np.ndarray]:
        tokens = {'tokens': np.concatenate([ids, eos]).astype(np.int32)}
        return tokens | ({'bytes': np.append(counts, 0).astype(np.int32)} if with_bytes else {})

    def from_text(text: str) -> dict[str, np.ndarray]:
        if not with_bytes:
            return document(tokenizer.encode(text), None)
        ids, ends = tokenizer.encode_with_ends(text)
        return document(ids, token_bytes(ends, len(text.encode())))

    if src.format == 'arrayrecord':
        manifest = sources.read_manifest(list(src.files))
        records = sources.token_records(list(src.files), manifest['dtype'])[stream::num_streams]
        records = records.shuffle(seed) if shuffle else records
        records = records.repeat(None) if repeat else records
        return records.map(
            lambda ids: document(ids, bytes_of_ids(tokenizer, ids) if with_bytes else None)
        ).to_iter_dataset(sources.read_options(num_streams))
    shares = _shares(src, data_cfg, stream, num_streams)
    files = list(shares)
    dataset = grain.MapDataset.source(files)
    dataset = dataset.shuffle(seed) if shuffle else dataset
    dataset = dataset.repeat(None) if repeat else dataset
    per_file = dataset.map(lambda path: sources.FileDocuments(path, data_cfg, shares[path]))
    # At most one epoch's files open at once: a wider cycle would read the next epoch's copies early.
    cycle = min(len(files), _INTERLEAVED_FILES)
    documents = SizeBalancedInterleave(per_file, cycle_length=cycle, distinct_files=len(files))
    return documents.map(from_text)


def _shares(src: Source, data_cfg: config_dict.ConfigDict, stream: int, num_streams: int) -> dict[str, sources.Share]:
    """What data stream `stream` reads of each file of `src` (the files it reads nothing of left out)."""
    if len(src.files) >= _FILES_PER_STREAM * num_streams:  # whole files per stream
        return dict.fromkeys(_stream_share(src, stream, num_streams), sources.Share())
    shares = {}
    for i, (path, size) in enumerate(zip(src.files, src.sizes, strict=True)):
        few = sources.text_bytes_if_few(path, size, data_cfg, num_streams) if num_streams > 1 else None
        if few is None:
            # Every stream reads all files and keeps every num_streams-th document; which one it keeps first
            # turns with the file, so that files with an odd number of documents do not favour stream 0.
            shares[path] = sources.Share((stream + i) % num_streams, num_streams)
        else:
            # Fewer documents than streams (one long paragraph, a file of lines read by paragraph): dealt whole,
            # they would leave some streams without text. Each stream reads its own n-th of the text instead.
            shares[path] = sources.Share(stream, num_streams, few)
    return shares


def _stream_share(src: Source, stream: int, num_streams: int) -> list[str]:
    """The files of data stream `stream`, dealt largest first to the stream holding the fewest bytes."""
    # Streams fill equally many rows: a stream with fewer bytes would repeat its files more often.
    loads = [0] * num_streams
    owner = {}
    for size, path in sorted(zip(src.sizes, src.files, strict=True), key=lambda pair: (-pair[0], pair[1])):
        lightest = loads.index(min(loads))
        owner[path], loads[lightest] = lightest, loads[lightest] + size
    return [path for path in src.files if owner[path] == stream]


def _features(row: dict[str, np.ndarray]) -> Batch:
    """A packed row of seq_len + 1 tokens -> model inputs, next-token targets and loss weights (and, for an
    eval, the bytes of text each target stands for)."""
    tokens, segments, positions = row['tokens'], row['tokens_segment_ids'], row['tokens_positions']
    # A target counts when it continues the same document: not across documents, not padding.
    weights = (segments[1:] == segments[:-1]) & (segments[1:] != 0)
    features = {
        'inputs': tokens[:-1],
        'targets': tokens[1:],
        'segment_ids': segments[:-1],
        'positions': positions[:-1],
        'weights': weights.astype(np.float32),
    }
    return features | ({'target_bytes': row['bytes'][1:]} if 'bytes' in row else {})


def make_dataset(
    srcs: list[Source],
    data_cfg: config_dict.ConfigDict,
    tokenizer: Tokenizer,
    seed: int,
    local_batch: int,
    shuffle: bool,
    stream: int = 0,
    num_streams: int = 1,
    repeat: bool = True,
    num_classes: int = 0,
    with_bytes: bool = False,
) -> grain.IterDataset:
    """One data stream's pipeline up to batches of `local_batch` rows, before prefetching.

    Read once (`repeat=False`), the last batch may have fewer rows, the last row padding (segment 0).
    Fine-tuning examples (format 'sft' or 'classify') come from trainer.data.examples. `with_bytes` (evals)
    adds `target_bytes`, the UTF-8 bytes of text each target token stands for.
    """
    if data_cfg.format in examples.FORMATS:
        (src,) = srcs
        found = examples.read(src.files, data_cfg, tokenizer, num_classes, ', '.join(src.files[:2]))
        return examples.make_dataset(
            found, data_cfg, seed, local_batch, shuffle, stream, num_streams, repeat, with_bytes
        )
    per_source = [
        _documents(src, data_cfg, tokenizer, seed + i, shuffle, stream, num_streams, repeat, with_bytes)
        for i, src in enumerate(srcs)
    ]
    documents = per_source[0] if len(per_source) == 1 else grain.IterDataset.mix(per_source, [s.weight for s in srcs])
    length = {'tokens': data_cfg.seq_len + 1} | ({'bytes': data_cfg.seq_len + 1} if with_bytes else {})
    rows = grain.experimental.ConcatThenSplitIterDataset(documents, length_struct=length)
    rows = rows.map(_features)
    if shuffle and data_cfg.shuffle_buffer > 1:
        # Each stream mixes its rows differently (any fixed offset would do; stream 0 keeps `seed`).
        rows = grain.experimental.WindowShuffleIterDataset(
            rows, window_size=data_cfg.shuffle_buffer, seed=seed + 1009 * stream
        )
    return rows.batch(local_batch, drop_remainder=repeat)


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


def batch_shards(sharding: NamedSharding, global_shape: tuple[int, ...]) -> int:
    """How many distinct blocks of rows the devices hold: the product of the batch's mesh axes.

    Asked of a shape every sharding divides (the device count on each axis of `global_shape`'s rank), so that a
    batch that does not split evenly gets its count, for a one-line error, instead of jax's IndivisibleError.
    """
    shape = (sharding.mesh.size,) * len(global_shape)
    return len({(index[0].start, index[0].stop) for index in sharding.devices_indices_map(shape).values()})


def stream_count(num_streams: int, global_batch: int) -> int:
    """config.data.num_streams, or by default (0) gcd(global batch, DEFAULT_STREAMS): the config's alone.

    Refuses a count that does not divide the batch.
    """
    streams = num_streams or math.gcd(global_batch, DEFAULT_STREAMS)
    if global_batch % streams:
        raise ConfigError(
            f'config.train.global_batch_size={global_batch} cannot be cut into {streams} data streams '
            f'(config.data.num_streams={num_streams}): make the batch a multiple of it, or set num_streams to a '
            'divisor of the batch.'
        )
    return streams


@dataclasses.dataclass(frozen=True)
class StreamPlan:
    """How the global batch is cut into streams, and which of them this process runs."""

    num_streams: int
    mine: range  # the streams whose rows overlap this process's rows, in row order
    rows: slice  # this process's rows within the rows of its streams, concatenated


def data_streams(num_streams: int, sharding: NamedSharding, global_shape: tuple[int, int]) -> StreamPlan:
    """The config's stream count, and the streams that fill this process's rows.

    Stream j always fills rows j * B/n to (j + 1) * B/n - 1 of every global batch of B rows, whatever the
    devices: a process runs every stream overlapping its rows and keeps its rows of them (processes that
    hold parts of one stream's rows each run that stream whole, the same on each).
    """
    batch = global_shape[0]
    return plan_streams(stream_count(num_streams, batch), batch, process_rows(sharding, global_shape))


def plan_streams(num_streams: int, global_batch: int, rows: slice) -> StreamPlan:
    """The streams overlapping `rows` of a batch cut into `num_streams`, and where those rows lie in theirs."""
    per_stream = global_batch // num_streams
    first, last = rows.start // per_stream, -(-rows.stop // per_stream)
    offset = first * per_stream
    return StreamPlan(num_streams, range(first, last), slice(rows.start - offset, rows.stop - offset))


def max_documents(config: config_dict.ConfigDict) -> int:
    """How many documents a row may hold: cuDNN attention's bound (config.model.attention_max_segments), else any."""
    return config.model.attention_max_segments if config.model.attention_impl == 'cudnn' else 0


def check_documents(segment_ids: np.ndarray, limit: int) -> None:
    """Refuses rows holding more than `limit` runs of equal segment ids (documents and padding); 0 = no limit."""
    if not limit:
        return
    most = int((segment_ids[:, 1:] != segment_ids[:, :-1]).sum(1).max(initial=0)) + 1
    if most > limit:
        raise ConfigError(
            f'a batch row holds {most} documents (runs of segment ids, padding included), more than '
            f'config.model.attention_max_segments={limit}: raise it, or set 0 (seq_len), and run the same command '
            'to resume from the last checkpoint.'
        )


def _global_arrays(
    parts: list[Batch], rows: slice, sharding: NamedSharding, global_shape: tuple[int, int]
) -> dict[str, jax.Array]:
    """This process's streams' parts of a batch (in row order) -> global arrays, from the rows it holds."""
    return {
        name: jax.make_array_from_process_local_data(
            sharding, np.concatenate([part[name] for part in parts])[rows], global_shape
        )
        for name in parts[0]
    }


class GlobalBatches:
    """Iterates global batches on the mesh; each process supplies the rows of its streams. Tracks data waits."""

    def __init__(
        self,
        datasets: dict[int, grain.IterDataset],
        plan: StreamPlan,
        sharding: NamedSharding,
        global_shape: tuple[int, int],
        max_documents: int = 0,
    ):
        self._iterators = {stream: iter(dataset) for stream, dataset in datasets.items()}
        self.num_streams, self._rows = plan.num_streams, plan.rows
        self._sharding, self._shape = sharding, global_shape
        self._max_documents = max_documents  # per row, checked on each batch; 0 = any number
        self.wait_s = 0.0  # seconds spent waiting for the pipeline since the last `take_wait`

    def __iter__(self) -> GlobalBatches:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        start = time.perf_counter()
        parts = [next(iterator) for iterator in self._iterators.values()]  # in stream order: row order
        self.wait_s += time.perf_counter() - start
        for part in parts:
            check_documents(part['segment_ids'], self._max_documents)
        return _global_arrays(parts, self._rows, self._sharding, self._shape)

    def take_wait(self) -> float:
        """Seconds waited since the last call."""
        wait, self.wait_s = self.wait_s, 0.0
        return wait

    def get_state(self) -> dict[int, dict[str, Any]]:
        """Each of this process's streams' position, by stream index."""
        return {stream: iterator.get_state() for stream, iterator in self._iterators.items()}

    def set_state(self, states: dict[int, dict[str, Any]]) -> None:
        """Rewinds this process's streams; `states` may hold other processes' streams too."""
        for stream, iterator in self._iterators.items():
            iterator.set_state(states[stream])

    def close(self) -> None:
        """Stops background threads and worker processes."""
        for iterator in self._iterators.values():
            iterator.close()


def _stream_batches(
    config: config_dict.ConfigDict,
    srcs: list[Source],
    tokenizer: Tokenizer,
    sharding: NamedSharding,
    shuffle: bool,
    with_bytes: bool = False,
) -> tuple[dict[int, grain.IterDataset], StreamPlan, tuple[int, int]]:
    shape = (config.train.global_batch_size, config.data.seq_len)
    plan = data_streams(config.data.num_streams, sharding, shape)
    rows = shape[0] // plan.num_streams
    datasets = {
        stream: make_dataset(
            srcs,
            config.data,
            tokenizer,
            config.seed,
            rows,
            shuffle,
            stream,
            plan.num_streams,
            True,
            config.model.num_classes,
            with_bytes,
        )
        for stream in plan.mine
    }
    return datasets, plan, shape


def train_batches(config: config_dict.ConfigDict, tokenizer: Tokenizer, sharding: NamedSharding) -> GlobalBatches:
    """The training stream: shuffled, repeated forever, prefetched."""
    datasets, plan, shape = _stream_batches(config, train_sources(config.data), tokenizer, sharding, True)
    prefetched = {stream: prefetch(dataset, config.data) for stream, dataset in datasets.items()}
    return GlobalBatches(prefetched, plan, sharding, shape, max_documents(config))


def eval_batches(config: config_dict.ConfigDict, tokenizer: Tokenizer, sharding: NamedSharding) -> list[Batch]:
    """The same `eval_steps` batches every time: the eval files in order, unshuffled.

    Fine-tuning examples are read once, not repeated: fewer batches when they run out, the last padded
    with rows that count nothing, so each example counts once.
    """
    if config.data.format not in examples.FORMATS:
        datasets, plan, shape = _stream_batches(
            config, [eval_source(config.data)], tokenizer, sharding, False, with_bytes=True
        )
        batches = GlobalBatches(datasets, plan, sharding, shape, max_documents(config))
        return [next(batches) for _ in range(config.train.eval_steps)]
    shape = (config.train.global_batch_size, config.data.seq_len)
    plan = data_streams(config.data.num_streams, sharding, shape)
    rows = shape[0] // plan.num_streams
    once = {
        stream: make_dataset(
            [eval_source(config.data)],
            config.data,
            tokenizer,
            config.seed,
            rows,
            False,
            stream,
            plan.num_streams,
            repeat=False,
            num_classes=config.model.num_classes,
            with_bytes=config.data.format == 'sft',
        )
        for stream in plan.mine
    }
    per_stream = {stream: list(itertools.islice(dataset, config.train.eval_steps)) for stream, dataset in once.items()}
    limit = max_documents(config)
    count = distributed.every_process([max(len(b) for b in per_stream.values())]).max()  # the same on every process
    result = []
    for i in range(int(count)):
        parts = []
        for stream_batches in per_stream.values():
            empty = examples.empty_batch(config.data.seq_len, with_bytes=config.data.format == 'sft')
            part = stream_batches[i] if i < len(stream_batches) else empty
            parts.append({k: np.pad(v, [(0, rows - len(v)), (0, 0)]) for k, v in part.items()})
            check_documents(parts[-1]['segment_ids'], limit)
        result.append(_global_arrays(parts, plan.rows, sharding, shape))
    return result
