"""Log-likelihoods of continuations given contexts, batched and sharded: what multiple-choice scoring and
lm-evaluation-harness's `loglikelihood` ask of a model.

Token boundaries follow lm-evaluation-harness (0.4.x, `TemplateLM._encode_pair`): spaces ending the context
move to the continuation, the pair is tokenized together and the continuation is what the whole adds to the
context's own tokens, so that a tokenizer merging across the boundary scores what it would really produce.
Text is encoded as its `HFLM.tok_encode` encodes it: with the tokenizer's special tokens (Llama's BOS) unless
it already begins with the prefix token's text (`has_bos_prefix`), which would otherwise come twice.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from trainer.data import pipeline
from trainer.data.tokenizers import Tokenizer, prefix_id
from trainer.inference import loading
from trainer.runtime import mesh as mesh_lib

_WIDTH_MULTIPLE = 64  # rows are padded to a multiple of this many tokens: few shapes, few compilations


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of `text` as the harness's tok_encode gives them: special tokens added unless the text begins with the
    prefix token's text (a few-shot context or a chat template that writes its own '<s>' gets one BOS, not two)."""
    prefix = tokenizer.token_text(prefix_id(tokenizer))
    return tokenizer.encode(text, add_special_tokens=not (prefix and text.startswith(prefix))).tolist()


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Ids of `context` and of what `continuation` adds to it, as lm-evaluation-harness splits them."""
    if not context:  # the harness conditions on the prefix token alone
        ids = tokenizer.encode(continuation, add_special_tokens=False).tolist()
        prefix = prefix_id(tokenizer)
        return ([prefix], ids) if ids[:1] != [prefix] else (ids[:1], ids[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


@dataclasses.dataclass(frozen=True)
class Likelihood:
    """A continuation's summed log-probability (nats), and whether greedy decoding would have produced it."""

    logprob: float
    is_greedy: bool


def _target_logprobs(params: Any, tokens_BT: jax.Array, segments_BT: jax.Array, graphdef: Any) -> tuple[jax.Array, ...]:
    """Each position's log-probability of the next token, and whether it is the most likely one."""
    model = nnx.merge(graphdef, params)
    positions_BT = jnp.maximum(jnp.cumsum(segments_BT, axis=1) - 1, 0)
    logits_BTV = model(tokens_BT[:, :-1], positions_BT[:, :-1], segments_BT[:, :-1]).astype(jnp.float32)
    targets_BT = tokens_BT[:, 1:]
    logprobs_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    picked_BT = jnp.take_along_axis(logprobs_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return picked_BT, jnp.argmax(logits_BTV, axis=-1) == targets_BT


class Scorer:
    """Scores (context ids, continuation ids) pairs with one loaded model, `batch_size` rows at a time."""

    def __init__(self, loaded: loading.LoadedModel, batch_size: int):
        self.loaded = loaded
        self.max_length = loaded.model_cfg.max_seq_len  # tokens the model sees; a longer pair loses its left end
        self._sharding = mesh_lib.batch_sharding(loaded.mesh, loaded.model_cfg.sharding_rules)
        shards = pipeline.batch_shards(self._sharding, (batch_size, self.max_length))
        self.batch_size = -(-batch_size // shards) * shards  # rows split evenly over the mesh's batch shards
        self._score = jax.jit(functools.partial(_target_logprobs, graphdef=loaded.graphdef))

    def loglikelihoods(
        self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], progress: bool = False
    ) -> list[Likelihood]:
        """Each pair's continuation's log-likelihood given its context (longest rows first, like the harness)."""
        if any(not continuation for _, continuation in pairs):
            raise ValueError('a continuation of no tokens cannot be scored')
        rows = [(list(context) + list(continuation))[-(self.max_length + 1) :] for context, continuation in pairs]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        results: list[Likelihood | None] = [None] * len(rows)
        batches = range(0, len(order), self.batch_size)
        with jax.set_mesh(self.loaded.mesh):
            for start in tqdm.tqdm(batches, unit='batch', desc='scoring', disable=not progress or None):
                chosen = order[start : start + self.batch_size]
                inputs = -(-(len(rows[chosen[0]]) - 1) // _WIDTH_MULTIPLE) * _WIDTH_MULTIPLE
                width = min(inputs, self.max_length) + 1
                tokens = np.zeros((self.batch_size, width), np.int32)
                segments = np.zeros((self.batch_size, width), np.int32)
                for row, index in enumerate(chosen):
                    tokens[row, : len(rows[index])] = rows[index]
                    segments[row, : len(rows[index])] = 1
                placed = [jax.device_put(array, self._sharding) for array in (tokens, segments)]
                logprobs, greedy = jax.device_get(self._score(self.loaded.params, *placed))
                for row, index in enumerate(chosen):
                    length = len(rows[index])
                    count = min(len(pairs[index][1]), length - 1)
                    span = slice(length - 1 - count, length - 1)  # the positions predicting the continuation
                    results[index] = Likelihood(float(logprobs[row, span].sum()), bool(greedy[row, span].all()))
        return results  # type: ignore[return-value]
