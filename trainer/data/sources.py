"""Where documents come from: file patterns (local or fsspec URLs) and lazy per-file readers.

Each reader is a grain IterDataset over one file whose iterator state is a position in that file
(byte offset, or Parquet row group and row), so a pipeline resumes without re-reading what it used.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import itertools
import json
import logging
import os
import re
from typing import Any

import fsspec
import grain
import numpy as np

from trainer.data import json_lines
from trainer.errors import ConfigError


def read_options(num_streams: int) -> grain.ReadOptions:
    """Read-ahead of one stream's records: grain's default (16 threads, 500 records) split between the streams.

    Each stream reads ahead on its own; grain's default in every one of 8 streams made 128 threads and 4000
    records read before the first batch (24x slower to start on 2 cores). The order does not depend on it.
    """
    return grain.ReadOptions(num_threads=max(1, 16 // num_streams), prefetch_buffer_size=max(32, 500 // num_streams))


FORMATS = ('auto', 'text', 'jsonl', 'parquet', 'arrayrecord', 'sft', 'classify')
SAMPLE_BY = ('document', 'paragraph', 'line')
_EXTENSIONS = {
    '.jsonl': 'jsonl',
    '.json': 'jsonl',
    '.parquet': 'parquet',
    '.arrayrecord': 'arrayrecord',
    '.array_record': 'arrayrecord',
}
# Line ends of either kind (Windows files, Hugging Face's raw WikiText have '\r\n'); a paragraph ends at a blank line.
_SEPARATORS = {'line': re.compile(rb'\r?\n'), 'paragraph': re.compile(rb'\r?\n\r?\n'), 'document': None}
_BLOCK_BYTES = 1 << 20  # read size; a reader holds at most one block plus one document
# A file of fewer documents than streams is cut into byte ranges, one per stream; each cut moves forward to the
# next line end if one is this close (at most half a range), else to the next character.
_CUT_WINDOW = 4096
# fsspec backends that are separate packages, and the pip extra that brings each.
_BACKEND_EXTRAS = {'gs': 'gcs', 'gcs': 'gcs', 's3': 's3', 'hf': 'hf'}


def _matches(pattern: str, field: str) -> list[str]:
    if '://' not in pattern:
        return sorted(m for m in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(m))
    try:
        fs, path = fsspec.core.url_to_fs(pattern)
    except ImportError as error:
        extra = _BACKEND_EXTRAS.get(pattern.split('://')[0], 'remote')
        raise ConfigError(
            f'{field}={pattern!r} needs an fsspec backend that is not installed: pip install '
            f"'shardtrain[{extra}]' ({error})."
        ) from None
    return sorted(fs.unstrip_protocol(m) for m in fs.glob(path) if fs.isfile(m))


def _size(path: str) -> int:
    if '://' not in path:
        return os.path.getsize(path)
    fs, plain = fsspec.core.url_to_fs(path)
    return fs.size(plain)


_WARNED_EMPTY: set[tuple[str, tuple[str, ...]]] = set()  # the config checks and the pipeline resolve files alike


def resolve_files(patterns: str, field: str) -> list[str]:
    """Expands comma-separated paths, globs and URLs; each must match a file, and some must hold data."""
    return list(resolve_sized_files(patterns, field))


def resolve_sized_files(patterns: str, field: str) -> dict[str, int]:
    """resolve_files, with each file's size in bytes."""
    files = []
    for pattern in (p.strip() for p in patterns.split(',')):
        if not pattern:
            continue
        matches = _matches(pattern, field)
        if not matches:
            raise ConfigError(f'{field}={pattern!r} matches no file: give an existing path or a glob that matches one.')
        files.extend(matches)
    if not files:
        raise ConfigError(f'{field} is empty: give at least one path or glob of data files.')
    sizes = {f: _size(f) for f in files}
    non_empty = {f: size for f, size in sizes.items() if size}
    if not non_empty:
        only = f'the empty file {files[0]!r}' if len(files) == 1 else f'only empty files ({files[0]!r}, ...)'
        raise ConfigError(f'{field} matches {only}: give files with data in them.')
    empty = sorted(f for f, size in sizes.items() if not size)
    if empty and (field, tuple(empty)) not in _WARNED_EMPTY:  # one line, however many, once per process
        _WARNED_EMPTY.add((field, tuple(empty)))
        shown = ', '.join(empty[:3]) + (f' and {len(empty) - 3} more' if len(empty) > 3 else '')
        logging.warning('data: skipping %d empty file(s) of %s: %s', len(empty), field, shown)
    return non_empty


def file_format(path: str, configured: str) -> str:
    """The configured format, or for 'auto' the one the extension names (plain text otherwise)."""
    if configured != 'auto':
        return configured
    return _EXTENSIONS.get(os.path.splitext(path)[1].lower(), 'text')


def check_parquet_column(path: str, column: str) -> None:
    """A Parquet file must have the text column; reads only the footer."""
    import pyarrow.parquet as pq

    with fsspec.open(path, 'rb') as f:
        names = pq.ParquetFile(f).schema_arrow.names
    if column not in names:
        raise ConfigError(
            f'{path} has no column {column!r} (it has {names}): set config.data.text_field to the text column.'
        )


def check_json_lines(path: str, field: str, configured: str) -> None:
    """A JSON-lines file must be JSON objects holding the text field: reads its first few lines only.

    A file that is something else (plain text named .jsonl) is one error naming it, not a skipped-line warning
    from every stream and then no document.
    """
    reads = "config.data.format='auto' reads a .jsonl or .json file" if configured == 'auto' else 'format jsonl reads'
    bad = json_lines.BadLines(
        path,
        f'{reads} as one JSON object per line, its text in config.data.text_field={field!r}: give JSON lines, or '
        "config.data.format='text' to read it as plain text.",
    )
    keys: dict[str, None] = {}  # of the first records, which lack `field`
    first = 0
    with fsspec.open(path, 'rb') as lines:
        numbered = ((number, line) for number, line in enumerate(lines, 1) if line.strip())
        for number, line in itertools.islice(numbered, json_lines.NOT_JSON_LINES):
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                why = f'not JSON ({error.msg})' if isinstance(error, json.JSONDecodeError) else 'not UTF-8'
                bad.skip(number, why, not_json=True)
                continue
            if not isinstance(record, dict):
                bad.skip(number, 'not a JSON object', not_json=True)
            elif field in record:
                return
            else:
                keys.update(dict.fromkeys(record))
                first = first or number
    if keys:
        raise ConfigError(
            f'{path}:{first}: no field {field!r} in its first records (they have {", ".join(map(repr, keys))}): set '
            "config.data.text_field to the field of the text, or config.data.format='sft' for instruction data."
        )
    bad.refuse()


class _TextIterator(grain.DatasetIterator):
    """Documents of one text file, read a block at a time; state is the byte offset of the next one.

    Line ends are normalized to '\n'.
    """

    _warned_pieces: set[str] = set()  # files already warned about (once per process, not once per epoch)

    def __init__(self, path: str, sample_by: str, max_document_bytes: int, shard: tuple[int, int]):
        super().__init__()
        self._path, self._separator, self._max_bytes = path, _SEPARATORS[sample_by], max_document_bytes
        self._sample_by = sample_by
        self._shard_index, self._shard_count = shard
        self._file = None
        self._seek({'offset': 0, 'ordinal': 0})
        self.invalid_utf8 = 0

    def _seek(self, state: dict[str, int]) -> None:
        if self._file is not None:
            self._file.close()
        self._file = fsspec.open(self._path, 'rb').open()
        self._size = self._file.seek(0, os.SEEK_END)
        self._file.seek(state['offset'])
        self._offset, self._ordinal, self._buffer, self._eof = state['offset'], state['ordinal'], b'', False

    def fraction_read(self) -> float:
        """How far into the file the reader is, from 0 to 1."""
        return self._offset / self._size if self._size else 1.0

    def _next_raw(self) -> bytes | None:
        """The next document's bytes, or None at the end of the file."""
        while True:
            found = self._separator.search(self._buffer) if self._separator else None
            if found is not None:
                document, used = self._buffer[: found.start()], found.end()
            elif len(self._buffer) > self._max_bytes:  # the byte after the cut is known: a whole piece
                cut = self._max_bytes
                while cut > 0 and (self._buffer[cut] & 0xC0) == 0x80:  # do not split a UTF-8 character
                    cut -= 1
                document, used = self._buffer[:cut], cut
                self._warn_pieces()
            elif not self._eof:
                block = self._file.read(_BLOCK_BYTES)
                self._eof = not block
                self._buffer += block
                continue
            elif self._buffer:
                document, used = self._buffer, len(self._buffer)
            else:
                return None
            self._buffer = self._buffer[used:]
            self._offset += used
            if document.strip():
                return document.replace(b'\r\n', b'\n')

    def _warn_pieces(self) -> None:
        """A document cut at max_document_bytes is expected with sample_by='document', a sign of trouble otherwise."""
        if self._separator is None or self._path in self._warned_pieces:
            return
        self._warned_pieces.add(self._path)
        logging.warning(
            'data: %s has a %s longer than config.data.max_document_bytes=%d, read in pieces of that size: check '
            'that its %ss are separated as expected, or raise max_document_bytes',
            self._path,
            self._sample_by,
            self._max_bytes,
            self._sample_by,
        )

    def _next_text(self) -> str:
        while True:
            raw = self._next_raw()
            if raw is None:
                if self.invalid_utf8:
                    logging.warning('data: replaced %d invalid UTF-8 sequences in %s', self.invalid_utf8, self._path)
                    self.invalid_utf8 = 0
                raise StopIteration
            ordinal, self._ordinal = self._ordinal, self._ordinal + 1
            if ordinal % self._shard_count != self._shard_index:
                continue  # another stream's document
            text = raw.decode('utf-8', errors='replace')
            self.invalid_utf8 += text.count('\ufffd') - raw.count('\ufffd'.encode())
            return text

    def __next__(self) -> str:
        return self._next_text()

    def get_state(self) -> dict[str, int]:
        return {'offset': self._offset, 'ordinal': self._ordinal}

    def set_state(self, state: dict[str, int]) -> None:
        self._seek(state)

    def close(self) -> None:
        super().close()
        self._file.close()


class _JsonlIterator(_TextIterator):
    """The `field` of each JSON line; lines without it are skipped, counted and logged."""

    def __init__(self, path: str, field: str, shard: tuple[int, int]):
        super().__init__(path, 'line', 1 << 62, shard)  # a JSON line is never cut
        self._field, self.skipped = field, 0

    def __next__(self) -> str:
        while True:
            try:
                line = self._next_text()
            except StopIteration:
                if self.skipped:
                    logging.warning(
                        'data: skipped %d lines of %s without a string field %r', self.skipped, self._path, self._field
                    )
                    self.skipped = 0
                raise
            try:
                value = json.loads(line).get(self._field)
            except (json.JSONDecodeError, AttributeError):
                value = None
            if isinstance(value, str) and value:
                return value
            self.skipped += 1


class _ParquetIterator(grain.DatasetIterator):
    """One column of a Parquet file, a row group at a time; state is (row group, row)."""

    def __init__(self, path: str, column: str, shard: tuple[int, int]):
        super().__init__()
        import pyarrow.parquet as pq

        self._path, self._column = path, column
        self._shard_index, self._shard_count = shard
        self._file = pq.ParquetFile(fsspec.open(path, 'rb').open())
        groups = [self._file.metadata.row_group(g).num_rows for g in range(self._file.num_row_groups)]
        self._rows_before = list(itertools.accumulate(groups, initial=0))  # rows before group g; the total last
        self._load({'row_group': 0, 'row': 0, 'ordinal': 0})

    def fraction_read(self) -> float:
        """How far into the file the reader is, from 0 to 1 (by rows)."""
        total = self._rows_before[-1]
        return (self._rows_before[self._row_group] + self._row) / total if total else 1.0

    def _load(self, state: dict[str, int]) -> None:
        self._row_group, self._row, self._ordinal = state['row_group'], state['row'], state['ordinal']
        groups = self._file.num_row_groups
        self._rows = (
            self._file.read_row_group(self._row_group, columns=[self._column]).column(0).to_pylist()
            if self._row_group < groups
            else []
        )

    def __next__(self) -> str:
        while True:
            if self._row >= len(self._rows):
                if self._row_group + 1 >= self._file.num_row_groups:
                    raise StopIteration
                self._load({'row_group': self._row_group + 1, 'row': 0, 'ordinal': self._ordinal})
                continue
            value, self._row = self._rows[self._row], self._row + 1
            ordinal, self._ordinal = self._ordinal, self._ordinal + 1
            if ordinal % self._shard_count == self._shard_index and isinstance(value, str) and value:
                return value

    def get_state(self) -> dict[str, int]:
        return {'row_group': self._row_group, 'row': self._row, 'ordinal': self._ordinal}

    def set_state(self, state: dict[str, int]) -> None:
        self._load(state)

    def close(self) -> None:
        super().close()
        self._file.close()


@dataclasses.dataclass(frozen=True)
class Share:
    """What one data stream reads of a file: every `count`-th document from the `index`-th on; or, when `text_bytes`
    is set (a file of fewer documents than streams, holding that many bytes of text), the `index`-th of `count`
    equal byte ranges of its documents' text."""

    index: int = 0
    count: int = 1
    text_bytes: int | None = None


def _cut(data: bytes, at: int, window: int) -> int:
    """Where a range of `data` starting or ending near `at` is cut: after a line end within `window` bytes, else
    at the next character (never inside a UTF-8 one); a document's own start and end stay where they are.

    Neighbouring ranges cut each document alike, so together they hold every byte of it once.
    """
    if at <= 0 or at >= len(data):
        return min(max(at, 0), len(data))
    line_end = data.find(b'\n', at, at + window)
    if line_end >= 0:
        return line_end + 1
    while at < len(data) and (data[at] & 0xC0) == 0x80:
        at += 1
    return at


class _RangeIterator(grain.DatasetIterator):
    """One stream's byte range of a file's text (`Share.text_bytes`): the parts of its documents inside it.

    State: the inner reader's (over all documents) and the bytes of text before its next document.
    """

    def __init__(self, documents: grain.DatasetIterator, share: Share):
        super().__init__()
        total = share.text_bytes or 0
        self._documents = documents
        self._start = total * share.index // share.count
        self._stop = total * (share.index + 1) // share.count
        self._window = min(_CUT_WINDOW, total // share.count // 2)  # no cut moves past half a range
        self._at = 0

    def fraction_read(self) -> float:
        """How far through its range the stream is, from 0 to 1."""
        if self._stop <= self._start:
            return 1.0
        return min(max(self._at - self._start, 0) / (self._stop - self._start), 1.0)

    def __next__(self) -> str:
        while self._at < self._stop:
            data = next(self._documents).encode()  # StopIteration: the file ended
            begins, self._at = self._at, self._at + len(data)
            start = _cut(data, self._start - begins, self._window)
            stop = _cut(data, self._stop - begins, self._window)
            piece = data[start:stop].decode() if start < stop else ''
            if piece.strip():
                return piece
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        return {'documents': self._documents.get_state(), 'at': self._at}

    def set_state(self, state: dict[str, Any]) -> None:
        self._documents.set_state(state['documents'])
        self._at = state['at']

    def close(self) -> None:
        super().close()
        self._documents.close()


def _reader(
    path: str, fmt: str, sample_by: str, max_bytes: int, field: str, shard: tuple[int, int]
) -> grain.DatasetIterator:
    if fmt == 'jsonl':
        return _JsonlIterator(path, field, shard)
    if fmt == 'parquet':
        return _ParquetIterator(path, field, shard)
    return _TextIterator(path, sample_by, max_bytes, shard)


class FileDocuments(grain.IterDataset):
    """The text documents of one file, read lazily (text, JSON lines or Parquet): a stream's `share` of them."""

    def __init__(self, path: str, data_cfg: Any, share: Share = Share()):
        super().__init__()
        self._path, self._format = path, file_format(path, data_cfg.format)
        self._sample_by, self._max_bytes = data_cfg.sample_by, data_cfg.max_document_bytes
        self._field, self._share = data_cfg.text_field, share

    def __iter__(self) -> grain.DatasetIterator:
        if self._share.text_bytes is None:
            shard = (self._share.index, self._share.count)
            return _reader(self._path, self._format, self._sample_by, self._max_bytes, self._field, shard)
        everything = _reader(self._path, self._format, self._sample_by, self._max_bytes, self._field, (0, 1))
        return _RangeIterator(everything, self._share)


def text_bytes_if_few(path: str, size: int, data_cfg: Any, limit: int) -> int | None:
    """The bytes of text in the documents of `path` (of `size` bytes) if it holds fewer than `limit` documents,
    else None; reads only as far as its `limit`-th document, once per process."""
    fmt = file_format(path, data_cfg.format)
    return _text_bytes_if_few(
        path, size, fmt, data_cfg.sample_by, data_cfg.max_document_bytes, data_cfg.text_field, limit
    )


@functools.lru_cache(maxsize=4096)  # every stream deals the same files; the size stands for the contents
def _text_bytes_if_few(
    path: str, size: int, fmt: str, sample_by: str, max_bytes: int, field: str, limit: int
) -> int | None:
    del size
    documents = _reader(path, fmt, sample_by, max_bytes, field, (0, 1))
    try:
        sizes = [len(document.encode()) for document in itertools.islice(documents, limit)]
    finally:
        documents.close()
    return sum(sizes) if len(sizes) < limit else None


def read_manifest(files: list[str]) -> dict[str, Any]:
    """The manifest.json that scripts/prepare_data.py wrote beside pre-tokenized shards."""
    path = os.path.join(os.path.dirname(files[0]), 'manifest.json')
    try:
        with fsspec.open(path, 'r') as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(
            f'{files[0]} is an ArrayRecord shard without a manifest.json beside it: prepare it with '
            'scripts/prepare_data.py.'
        ) from None


def token_records(files: list[str], dtype: str) -> grain.MapDataset:
    """Pre-tokenized documents, one ArrayRecord record each, as a random-access dataset of id arrays."""
    source = grain.sources.ArrayRecordDataSource(files)
    return grain.MapDataset.source(source).map(lambda record: np.frombuffer(record, dtype=dtype).astype(np.int32))
