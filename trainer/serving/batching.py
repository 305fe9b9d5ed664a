"""Continuous batching: requests join and leave one running decode batch between its steps.

The batch has a fixed number of rows (slots), each holding one request's sequence in its own row of one KV
cache from slot 0, with its own write index (models.transformer.write_slots), its own sampling settings and
its own random key: what a request gets does not depend on who else is in the batch. Between two decode
steps, waiting requests are prefilled into free rows (a prompt is right-padded to one of prompt_buckets' few
lengths, so that few prompt lengths compile); a finished or cancelled request frees its row at once. The decode
step always runs every row (an empty row computes nothing anyone reads), so it compiles once.

One thread owns the device (`Engine.start`); other threads `submit` requests and get their text through each
request's `on_update`, called from that thread. A prompt length whose prefill cannot compile or run (out of
memory) fails that request alone; anything else that fails in the decode loop ends every request in hand
with 'error' and leaves the engine failed for good: it refuses every request and `failure` says why, so that
its owner can stop (trainer.serve exits for its supervisor to restart it).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.transformer import KVCache, ModelConfig
from trainer.inference.decoding import cache_shardings, compile_once
from trainer.inference.sampling import GREEDY, Sampling, next_tokens_per_row
from trainer.inference.streaming import TextStream

_SMALLEST_BUCKET = 64  # tokens: prompts up to this long share one prefill


@dataclasses.dataclass(frozen=True)
class Update:
    """What a request produced since its last update: new text, and once it ended, why."""

    text: str
    completion_tokens: int  # so far
    # 'stop' (a stop token or string), 'length', 'cancelled', 'error' (see `error`), or None: more to come
    finish_reason: str | None = None
    error: str = ''  # with 'error': what failed, in a sentence or two for the client


@dataclasses.dataclass(eq=False)
class Request:
    """One prompt to continue; `on_update` is called from the engine's thread."""

    prompt_ids: Sequence[int]
    max_tokens: int
    on_update: Callable[[Update], None]
    sampling: Sampling = GREEDY
    seed: int = 0
    stop_ids: Sequence[int] = ()
    stops: Sequence[str] = ()  # stop strings: the text ends before the first one (left out)
    cancelled: bool = False  # set by any thread; the engine frees the request's row at its next step


@functools.cache
def prompt_buckets(max_seq_len: int) -> tuple[int, ...]:
    """The lengths prompts are padded to, each compiled once: 64, 96, 128, 192, 256, 384, ... up to max_seq_len.

    They grow geometrically (x1.5 then x4/3), so a 32k context has 19 of them instead of 512 multiples of 64,
    and padding is under a third of a prefill's tokens; all are multiples of 32, as accelerators tile them.
    """
    sizes, size = {max_seq_len}, _SMALLEST_BUCKET
    while size < max_seq_len:
        sizes |= {size, size * 3 // 2}
        size *= 2
    return tuple(sorted(s for s in sizes if s <= max_seq_len))


def prompt_bucket(length: int, max_seq_len: int) -> int:
    """The padded length of a prompt of `length` tokens (at most max_seq_len)."""
    return next(size for size in prompt_buckets(max_seq_len) if size >= length)


@dataclasses.dataclass(eq=False)
class _Row:
    """A request being decoded in one row of the batch."""

    request: Request
    text: TextStream
    position: int  # where its next token goes (== its write index: the row's sequence starts at slot 0)
    generated: int = 0


def _admit(graphdef, slots, params, tokens_1T, length, row, cache, logits_BV):
    """Prefills one right-padded prompt into row `row` of the cache (that row started afresh) and puts the logits
    of its last token into that row of `logits_BV`."""
    model = nnx.merge(graphdef, params)
    width = tokens_1T.shape[1]
    real_1T = jnp.arange(width)[None] < length
    positions_1T = jnp.where(real_1T, jnp.arange(width)[None], -1)
    fresh = KVCache.empty(model.cfg, 1, slots)
    logits_1TV, filled = model.extend(tokens_1T, positions_1T, real_1T.astype(jnp.int32), fresh)
    put = functools.partial(jax.lax.dynamic_update_slice_in_dim, start_index=row)
    cache = KVCache(
        k_LBSKH=put(cache.k_LBSKH, filled.k_LBSKH, axis=1),
        v_LBSKH=put(cache.v_LBSKH, filled.v_LBSKH, axis=1),
        positions_BS=put(cache.positions_BS, filled.positions_BS, axis=0),
        segment_ids_BS=put(cache.segment_ids_BS, filled.segment_ids_BS, axis=0),
        index_B=cache.index_B,
    )
    last_1V = jax.lax.dynamic_index_in_dim(logits_1TV[0], length - 1, axis=0)
    return cache, put(logits_BV, last_1V.astype(logits_BV.dtype), axis=0)


def _step(
    graphdef, params, logits_BV, positions_B, active_B, seeds_B, counts_B, temperature_B, top_k_B, top_p_B, cache
):
    """Samples every row's next token from its logits and runs it at the row's own position: the tokens, the next
    logits and the cache. An inactive row writes nothing anyone attends to (segment 0)."""
    keys_B = jax.vmap(lambda seed, count: jax.random.fold_in(jax.random.key(seed), count))(seeds_B, counts_B)
    tokens_B = next_tokens_per_row(logits_BV, keys_B, temperature_B, top_k_B, top_p_B)
    model = nnx.merge(graphdef, params)
    index_B = jnp.maximum(positions_B, 0)
    cache = cache.replace(index_B=index_B)
    logits_B1V, cache = model.extend(tokens_B[:, None], positions_B[:, None], active_B[:, None], cache)
    return tokens_B, logits_B1V[:, 0], cache


def _one_line(error: Exception) -> str:
    """An exception as 'Type: first line of its message' (XLA's run to pages)."""
    lines = str(error).strip().splitlines()
    return f'{type(error).__name__}: {lines[0]}' if lines else type(error).__name__


def _prefill_failed(length: int, width: int, error: str) -> str:
    return (
        f'the prefill of a {length}-token prompt (padded to {width} tokens) failed ({error}): send a shorter '
        'prompt, or serve with a smaller --max_seq_len or --max_batch.'
    )


class Engine:
    """Decodes many requests at once with one model's params on one mesh, `max_batch` rows of `max_seq_len` slots;
    besides the requests in rows, at most `max_queue` wait for one (submit says False past that)."""

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        params: Any,
        cfg: ModelConfig,
        mesh: Mesh,
        decode: Callable[[list[int]], str],
        max_batch: int,
        max_seq_len: int,
        max_queue: int,
    ):
        self.cfg, self.max_batch, self.max_seq_len, self.max_queue = cfg, max_batch, max_seq_len, max_queue
        self._graphdef, self._params, self._mesh, self._decode = graphdef, params, mesh, decode
        self.failure: str | None = None  # why the decode loop failed; the engine then refuses every request
        self._refused_widths: dict[int, str] = {}  # prompt buckets whose prefill failed to compile: the error
        self._waiting: collections.deque[Request] = collections.deque()
        self._rows: list[_Row | None] = [None] * max_batch
        self._wake = threading.Condition()
        self._closing = False
        self._in_hand = 0  # requests submitted and not yet ended: in a row, waiting, or between the two
        self._thread: threading.Thread | None = None
        self._admitting: list[Request] = []
        self._compiled: dict[tuple, Callable] = {}
        self.steps = 0  # decode steps run, for tests and logs
        self.finished: collections.Counter[str] = collections.Counter()  # requests ended, by finish reason
        self.busiest = 0  # the most rows ever decoded in one step

    # -- what other threads call --------------------------------------------------------------------------------

    def submit(self, request: Request) -> bool:
        """Queues a request (its prompt at most max_prompt_tokens, max_tokens at least 1); False when the queue is
        full, the engine is closing, or it has failed (`failure` says why)."""
        assert 0 < len(request.prompt_ids) < self.max_seq_len and request.max_tokens > 0
        with self._wake:
            if self._closing or self._in_hand >= self.max_batch + self.max_queue:
                return False
            self._in_hand += 1
            self._waiting.append(request)
            self._wake.notify()
        return True

    def cancel(self, request: Request) -> None:
        """Frees the request's row (or its place in the queue) at the next step; its last update says 'cancelled'."""
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    def load(self) -> tuple[int, int]:
        """Rows in use and requests waiting (read without a lock: a snapshot for logs and tests)."""
        return sum(row is not None for row in self._rows), len(self._waiting)

    def start(self) -> None:
        """Compiles the decode step, then decodes in a thread of its own until close()."""
        self._compile_step()
        self._thread = threading.Thread(target=self._run, name='decode', daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Takes no more requests; waits up to `timeout` seconds for those in hand to finish, then cancels the rest."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._wake:
                for request in [row.request for row in self._rows if row] + list(self._waiting):
                    request.cancelled = True
                self._wake.notify()
            self._thread.join()

    # -- the decode thread ----------------------------------------------------------------------------------------

    def _compile(self, key: tuple, function: Callable, donate: tuple[int, ...], out_shardings, *args) -> Callable:
        """decoding.compile_once, with `out_shardings` keeping the donated cache and logits in the layout they came
        in (left to itself, XLA may return the logits split over `tensor`, as the vocabulary is)."""
        compiled, seconds = compile_once(self._compiled, key, function, donate, *args, out_shardings=out_shardings)
        if seconds:
            logging.info('compiled %s in %.1f s', key, seconds)
        return compiled

    def _compile_step(self) -> None:
        rows, replicated = self.max_batch, NamedSharding(self._mesh, PartitionSpec())
        with jax.set_mesh(self._mesh):
            self._cache_shardings = cache_shardings(self.cfg, self._mesh)
            self._replicated = replicated
            self._cache = jax.device_put(
                KVCache.empty(self.cfg, rows, self.max_seq_len),
                self._cache_shardings,
            )
            self._logits = jax.device_put(jnp.zeros((rows, self.cfg.padded_vocab), jnp.float32), replicated)
            self._step = self._compile(
                ('step', rows, self.max_seq_len),
                functools.partial(_step, self._graphdef),
                (1, 9),  # the logits and the cache are updated in place
                (replicated, replicated, self._cache_shardings),
                self._params,
                self._logits,
                *self._step_inputs(),
                self._cache,
            )

    def _step_inputs(self) -> list[np.ndarray]:
        """The per-row arrays of the next step: positions, active, seeds, counts, temperature, top_k, top_p."""
        rows = self._rows
        sampling = [row.request.sampling if row else GREEDY for row in rows]
        return [
            np.array([row.position if row else -1 for row in rows], np.int32),
            np.array([row is not None for row in rows], np.int32),
            np.array([row.request.seed % 2**32 if row else 0 for row in rows], np.uint32),
            np.array([row.generated if row else 0 for row in rows], np.int32),
            np.array([s.temperature for s in sampling], np.float32),
            np.array([s.top_k for s in sampling], np.int32),
            np.array([s.top_p for s in sampling], np.float32),
        ]

    def _run(self) -> None:
        try:
            self._serve_until_closed()
        except Exception as error:  # a bug, or the device failing: every request in hand hears of it, none hangs
            logging.exception('the decode loop failed')
            failure = f'the decode loop failed ({_one_line(error)}): see the server log.'
            with self._wake:
                self._closing, self.failure = True, failure  # before the requests hear of it: no newcomer slips in
                requests = [row.request for row in self._rows if row] + self._admitting + list(self._waiting)
                self._rows, self._waiting, self._admitting = [None] * self.max_batch, collections.deque(), []
            for request in requests:
                self._end(request, Update('', 0, 'error', failure))

    def _serve_until_closed(self) -> None:
        while True:
            with self._wake:
                while not self._closing and not self._waiting and not any(self._rows):
                    self._wake.wait()
                if self._closing and not self._waiting and not any(self._rows):
                    return
                newcomers = []
                for i, row in enumerate(self._rows):
                    if row is None and self._waiting:
                        newcomers.append((i, self._waiting.popleft()))
                cancelled_waiting = [r for r in self._waiting if r.cancelled]
                for request in cancelled_waiting:
                    self._waiting.remove(request)
            for request in cancelled_waiting:
                self._end(request, Update('', 0, 'cancelled'))
            self._admitting = [request for _, request in newcomers]  # in neither the queue nor a row
            for i, request in newcomers:
                if request.cancelled:
                    self._end(request, Update('', 0, 'cancelled'))
                else:
                    self._admit(i, request)
                self._admitting.remove(request)
            for i, row in enumerate(self._rows):
                if row is not None and row.request.cancelled:
                    self._finish(i, 'cancelled')
            if any(self._rows):
                self._decode_one_step()

    def _admit(self, i: int, request: Request) -> None:
        length = len(request.prompt_ids)
        width = prompt_bucket(length, self.max_seq_len)
        if width in self._refused_widths:
            self._end(request, Update('', 0, 'error', _prefill_failed(length, width, self._refused_widths[width])))
            return
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :length] = request.prompt_ids
        args = (self._params, tokens, np.int32(length), np.int32(i))
        with jax.set_mesh(self._mesh):
            try:
                admit = self._compile(
                    ('admit', width, self.max_batch, self.max_seq_len),
                    functools.partial(_admit, self._graphdef, self.max_seq_len),
                    (4, 5),  # the cache and the logits are updated in place
                    (self._cache_shardings, self._replicated),
                    *args,
                    self._cache,
                    self._logits,
                )
            except Exception as error:  # out of memory for this width: it would fail again, so it is refused from now
                logging.exception('compiling the prefill of %d-token prompts failed', width)
                self._refused_widths[width] = _one_line(error)
                self._end(request, Update('', 0, 'error', _prefill_failed(length, width, self._refused_widths[width])))
                return
            try:
                self._cache, self._logits = admit(*args, self._cache, self._logits)
            except Exception as error:
                if any(a.is_deleted() for a in jax.tree.leaves((self._cache, self._logits))):
                    raise  # the donated cache is gone with it: no row can go on
                logging.exception('the prefill of a %d-token prompt failed', length)  # the cache is intact: rows go on
                self._end(request, Update('', 0, 'error', _prefill_failed(length, width, _one_line(error))))
                return
        self._rows[i] = _Row(request, TextStream(self._decode, request.prompt_ids, request.stops), position=length)

    def _decode_one_step(self) -> None:
        with jax.set_mesh(self._mesh):
            tokens, self._logits, self._cache = self._step(
                self._params, self._logits, *self._step_inputs(), self._cache
            )
            tokens = np.asarray(tokens)
        self.steps += 1
        self.busiest = max(self.busiest, sum(row is not None for row in self._rows))
        for i, row in enumerate(self._rows):
            if row is None:
                continue
            token = int(tokens[i])
            row.generated += 1
            row.position += 1
            if token in row.request.stop_ids:
                self._finish(i, 'stop')
                continue
            new_text, stopped = row.text.add(token)
            if stopped:
                self._finish(i, 'stop', new_text)
            elif row.generated >= row.request.max_tokens or row.position >= self.max_seq_len:
                self._finish(i, 'length', new_text)
            elif new_text:
                row.request.on_update(Update(new_text, row.generated))

    def _finish(self, i: int, reason: str, new_text: str = '') -> None:
        """Frees row i, telling its request the text not yet given and why it ended."""
        row, self._rows[i] = self._rows[i], None
        self._end(row.request, Update(new_text + row.text.finish(), row.generated, reason))

    def _end(self, request: Request, last: Update) -> None:
        """Gives a request its last update; it no longer counts against the queue."""
        with self._wake:
            self._in_hand -= 1
            self.finished[last.finish_reason] += 1
        request.on_update(last)
