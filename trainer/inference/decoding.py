"""Generating text: every prompt prefilled in one call, then one token per step against a fixed-size KV cache.

Prompts of different lengths form one batch, left-padded: padding has segment 0 and position -1, so
no real token attends to it, and each row's positions count its own tokens. Prompt lengths and cache
sizes are rounded up to multiples of _BUCKET, so that a new prompt seldom compiles anything, and a
step never does.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.transformer import KVCache, ModelConfig
from trainer.inference.sampling import GREEDY, Sampling, next_tokens
from trainer.runtime.mesh import logical_sharding

_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class Generated:
    """One prompt's continuation."""

    ids: list[int]  # the new tokens, up to and without the stop token
    stopped: bool  # ended at a stop token (else at max_new_tokens)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Where a generate call's time went; compile_s is 0 when its shapes had been compiled before."""

    compile_s: float
    prefill_s: float
    decode_s: float
    new_tokens: int  # over all rows, the padding steps of finished rows left out


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def cache_shardings(cfg: ModelConfig, mesh: Mesh) -> KVCache:
    """A KV cache laid out by the model's rules: key/value heads over `tensor`, rows over the batch axes."""
    rules = cfg.sharding_rules
    kv = logical_sharding(('layers', 'activation_batch', 'activation_length', 'activation_heads', None), mesh, rules)
    slots = logical_sharding(('activation_batch', 'activation_length'), mesh, rules)
    return KVCache(kv, kv, slots, slots, NamedSharding(mesh, PartitionSpec()))


def compile_once(
    compiled: dict[tuple, Callable], key: tuple, function: Callable, donate: tuple[int, ...], *args, out_shardings=None
) -> tuple[Callable, float]:
    """`function` jitted and compiled for these arguments' shapes once (kept in `compiled` under `key`), the
    arguments `donate` (the KV cache) donated so that they are updated in place; and the seconds that took (0 when
    compiled before). `out_shardings`, if given, fixes the outputs' layout."""
    if key in compiled:
        return compiled[key], 0.0
    start = time.perf_counter()
    layout = {} if out_shardings is None else {'out_shardings': out_shardings}
    compiled[key] = jax.jit(function, donate_argnums=donate, **layout).lower(*args).compile()
    return compiled[key], time.perf_counter() - start


def _prefill(graphdef, params, tokens_BT, positions_BT, segments_BT, cache):
    model = nnx.merge(graphdef, params)
    logits_BTV, cache = model.extend(tokens_BT, positions_BT, segments_BT, cache)
    return logits_BTV[:, -1], cache


def _step(graphdef, sampling, params, logits_BV, positions_B, cache, rng):
    """Samples each row's next token from its logits, then runs it: the next logits and the cache."""
    tokens_B = next_tokens(logits_BV, rng, sampling)
    model = nnx.merge(graphdef, params)
    ones = jnp.ones_like(tokens_B)[:, None]
    logits_B1V, cache = model.extend(tokens_B[:, None], positions_B[:, None], ones, cache)
    return tokens_B, logits_B1V[:, 0], cache


class Generator:
    """Decodes with one model's params on one mesh; the jitted functions are kept between calls."""

    def __init__(self, graphdef: nnx.GraphDef, params: Any, cfg: ModelConfig, mesh: Mesh):
        self._graphdef, self._params, self.cfg, self._mesh = graphdef, params, cfg, mesh
        self._compiled: dict[tuple, Callable] = {}  # compiled ahead of time, by function and shapes

    def max_prompt_tokens(self, max_new_tokens: int) -> int:
        """The longest prompt that leaves room for max_new_tokens in the model's context."""
        return self.cfg.max_seq_len - max_new_tokens

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: Sampling = GREEDY,
        seed: int = 0,
        stop_ids: Sequence[int] = (),
        on_tokens: Callable[[np.ndarray], None] | None = None,
        stop_when: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> tuple[list[Generated], Timing]:
        """Continues each prompt (token ids, none empty, each at most max_prompt_tokens) by up to max_new_tokens.

        A row ends at a token of `stop_ids` (left out of its ids) or when `stop_when(ids so far, rows x steps)`
        says so for it (its ids kept; the caller cuts them). `on_tokens` gets every step's new token per
        row as they come, for streaming to a terminal.
        """
        assert 0 < max(len(p) for p in prompts) <= self.max_prompt_tokens(max_new_tokens)
        rows, longest = len(prompts), max(len(p) for p in prompts)
        width = min(round_up(longest, _BUCKET), self.cfg.max_seq_len - max_new_tokens)
        slots = width + max_new_tokens
        tokens = np.zeros((rows, width), np.int32)
        positions = np.full((rows, width), -1, np.int32)
        segments = np.zeros((rows, width), np.int32)
        for row, prompt in enumerate(prompts):
            tokens[row, width - len(prompt) :] = prompt
            positions[row, width - len(prompt) :] = np.arange(len(prompt))
            segments[row, width - len(prompt) :] = 1
        with jax.set_mesh(self._mesh):
            batch = NamedSharding(self._mesh, PartitionSpec())
            inputs = [jax.device_put(a, batch) for a in (tokens, positions, segments)]
            cache = jax.device_put(KVCache.empty(self.cfg, rows, slots), cache_shardings(self.cfg, self._mesh))
            prefill, compile_s = compile_once(
                self._compiled,
                ('prefill', rows, width, slots),
                functools.partial(_prefill, self._graphdef),
                (4,),  # (params, tokens, positions, segments, cache)
                self._params,
                *inputs,
                cache,
            )
            start = time.perf_counter()
            logits, cache = prefill(self._params, *inputs, cache)
            jax.block_until_ready(logits)
            prefill_s = time.perf_counter() - start
            next_positions = jnp.asarray([len(p) for p in prompts], jnp.int32)
            rng = jax.random.key(seed)
            step, step_compile_s = compile_once(
                self._compiled,
                ('step', rows, slots, sampling),
                functools.partial(_step, self._graphdef, sampling),
                (3,),  # (params, logits, positions, cache, rng)
                self._params,
                logits,
                next_positions,
                cache,
                rng,
            )
            generated = np.zeros((rows, 0), np.int32)
            finished = np.zeros(rows, bool)
            start = time.perf_counter()
            for i in range(max_new_tokens):
                new, logits, cache = step(self._params, logits, next_positions, cache, jax.random.fold_in(rng, i))
                new = np.asarray(new)
                generated = np.concatenate([generated, new[:, None]], axis=1)
                if on_tokens is not None:
                    on_tokens(new)
                finished |= np.isin(new, stop_ids)
                if stop_when is not None:
                    finished |= stop_when(generated)
                if finished.all():
                    break
                next_positions = next_positions + 1
            decode_s = time.perf_counter() - start
        results = []
        for row in generated:
            stops = np.flatnonzero(np.isin(row, stop_ids))
            end = int(stops[0]) if len(stops) else len(row)
            results.append(Generated(ids=row[:end].tolist(), stopped=bool(len(stops))))
        new_tokens = sum(len(r.ids) + r.stopped for r in results)
        timing = Timing(compile_s + step_compile_s, prefill_s=prefill_s, decode_s=decode_s, new_tokens=new_tokens)
        return results, timing
