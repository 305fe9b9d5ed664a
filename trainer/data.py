"""Token batches from local text files: a byte tokenizer and random windows that resume exactly.

Each step's batch is a pure function of (seed, step), so a restarted run sees exactly the batches
an uninterrupted one would have. The streaming grain pipeline of the data issue replaces this.
"""

from __future__ import annotations

import dataclasses
import glob
import os

import jax
import numpy as np
from jax.sharding import NamedSharding

from trainer.errors import ConfigError

TOKENIZERS = ('byte',)


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255: needs no vocabulary file."""

    vocab_size = 256

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8)

    def decode(self, ids: np.ndarray) -> str:
        return np.asarray(ids, dtype=np.uint8).tobytes().decode('utf-8', errors='replace')


def make_tokenizer(name: str) -> ByteTokenizer:
    """The tokenizer called `name` in `config.data.tokenizer`."""
    if name != 'byte':
        raise ConfigError(f'config.data.tokenizer={name!r} is not known: use one of {TOKENIZERS}.')
    return ByteTokenizer()


def resolve_files(patterns: str, field: str) -> list[str]:
    """Expands a comma-separated list of paths and globs; each must match at least one file."""
    files = []
    for pattern in (p.strip() for p in patterns.split(',')):
        if not pattern:
            continue
        matches = sorted(m for m in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(m))
        if not matches:
            raise ConfigError(f'{field}={pattern!r} matches no file: give an existing path or a glob that matches one.')
        files.extend(matches)
    if not files:
        raise ConfigError(f'{field} is empty: give at least one path or glob of text files.')
    return files


def load_tokens(files: list[str], tokenizer: ByteTokenizer, field: str) -> np.ndarray:
    """All files' tokens, concatenated; an empty file or corpus is an error."""
    parts = []
    for path in files:
        with open(path, 'rb') as f:
            data = f.read()
        if not data:
            raise ConfigError(f'{field} includes {path!r}, which is empty: remove it or give a file with text.')
        parts.append(tokenizer.encode(data))
    return np.concatenate(parts)


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> slice:
    """The rows of a batch-sharded global array that this process's devices hold."""
    indices = sharding.addressable_devices_indices_map(global_shape).values()
    starts = [index[0].start or 0 for index in indices]
    stops = [global_shape[0] if index[0].stop is None else index[0].stop for index in indices]
    return slice(min(starts), max(stops))


@dataclasses.dataclass
class Batches:
    """Batches of `seq_len`-token windows of a corpus, as global arrays on the mesh."""

    tokens: np.ndarray
    seq_len: int
    global_batch_size: int
    sharding: NamedSharding
    seed: int

    def __post_init__(self):
        if len(self.tokens) < self.seq_len + 1:
            raise ConfigError(
                f'the data has {len(self.tokens)} tokens, fewer than config.data.seq_len + 1 = {self.seq_len + 1}: '
                'give more text or a shorter seq_len.'
            )
        self._rows = process_rows(self.sharding, (self.global_batch_size, self.seq_len))

    def _to_global(self, starts: np.ndarray) -> dict[str, jax.Array]:
        """Windows starting at `starts` (all rows) as `inputs`/`targets` global arrays."""
        local_starts = starts[self._rows]
        windows = self.tokens[local_starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int32)
        shape = (self.global_batch_size, self.seq_len)
        return {
            name: jax.make_array_from_process_local_data(self.sharding, rows, shape)
            for name, rows in (('inputs', windows[:, :-1]), ('targets', windows[:, 1:]))
        }

    def train_batch(self, step: int) -> dict[str, jax.Array]:
        """The batch for optimizer step `step`: random windows drawn from (seed, step) alone."""
        rng = np.random.default_rng((self.seed, step))
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.global_batch_size)
        return self._to_global(starts)

    def eval_batches(self, num_batches: int) -> list[dict[str, jax.Array]]:
        """The same `num_batches` batches every time: windows spread evenly over the corpus."""
        count = num_batches * self.global_batch_size
        starts = np.linspace(0, len(self.tokens) - self.seq_len - 1, count).astype(np.int64)
        return [self._to_global(chunk) for chunk in starts.reshape(num_batches, self.global_batch_size)]
