"""Generated text shown as it comes, and cut where a stop string appears.

A reply's text is what its tokens add to the prompt's: decode(prompt + new) minus decode(prompt), as vLLM,
OpenAI and transformers' pipelines give it. Decoding the new tokens alone is not the same: SentencePiece and
Metaspace decoders drop the leading space of the first piece they decode, so 'The capital of France is' would
continue 'Paris' instead of ' Paris'.
"""

from __future__ import annotations

import bisect
import sys
from collections.abc import Callable, Sequence

import numpy as np

Decode = Callable[[Sequence[int]], str]

# Tokens before the first new one that are decoded with it: vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET.
_WINDOW = 5
_PARTIAL = '\ufffd'  # what a decoder shows for a character whose bytes have not all come


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text up to the first stop string (left out), and whether one was found."""
    cuts = [text.index(stop) for stop in stops if stop in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def completion_text(decode: Decode, prompt_ids: Sequence[int], ids: Sequence[int]) -> str:
    """What `ids` add to the text of `prompt_ids`, by decoding both whole (IncrementalText gives the same, faster)."""
    prompt_ids, ids = [int(i) for i in prompt_ids], [int(i) for i in ids]
    return decode(prompt_ids + ids)[len(decode(prompt_ids)) :]


def ids_of(prompt_ids: Sequence[int], ids: list[int], completion: str, decode: Decode) -> list[int]:
    """The shortest prefix of `ids` whose text after the prompt holds all of `completion` (cut at a stop string);
    found by bisection, as the text only grows with the tokens."""
    n = bisect.bisect_left(
        range(len(ids)), len(completion), key=lambda n: len(completion_text(decode, prompt_ids, ids[:n]))
    )
    return ids[:n]


class IncrementalText:
    """The text each new token adds after a prompt, decoding a few tokens per step instead of the whole sequence.

    vLLM's incremental detokenizer: each step decodes the tokens from `_prefix` (a few before those not yet
    shown) to the end and gives what that adds to the text of `_prefix` to `_read`. Text that ends in U+FFFD
    (a character whose bytes have not all come) is held until it is whole. The pieces add up to
    completion_text(prompt, tokens) exactly wherever decoding more tokens only appends to the text (every
    decoder of real tokenizers on valid text; tested on SentencePiece, Metaspace and byte-level BPE).
    """

    def __init__(self, decode: Decode, prompt_ids: Sequence[int]):
        self._decode = decode
        self._ids = [int(i) for i in prompt_ids]
        self._read = len(self._ids)  # tokens whose text has been given
        self._prefix = max(self._read - _WINDOW, 0)  # where the decoded window starts
        self._prefix_text: str | None = None  # decode(ids[prefix:read]), once computed

    def add(self, token: int) -> str:
        """The text that is whole now, after one more token ('' while a character is incomplete)."""
        self._ids.append(int(token))
        return self._advance(final=False)

    def flush(self) -> str:
        """What was held back (an incomplete character, shown as U+FFFD as a whole decode shows it) at the end."""
        return self._advance(final=True) if self._read < len(self._ids) else ''

    def _window_start(self) -> str:
        if self._prefix_text is None:
            text = self._decode(self._ids[self._prefix : self._read])
            # A window that decodes to nothing (special tokens, a lone '▁') would let a decoder strip the next
            # piece's leading space as the first of a text; one that starts with U+FFFD began inside a character
            # (and a byte-fallback run then decodes as all U+FFFD). Reach further back for context.
            while (not text or text.startswith(_PARTIAL)) and self._prefix > 0:
                self._prefix = max(self._prefix - _WINDOW, 0)
                text = self._decode(self._ids[self._prefix : self._read])
            self._prefix_text = text
        return self._prefix_text

    def _advance(self, final: bool) -> str:
        before = self._window_start()
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(before) or (text.endswith(_PARTIAL) and not final):
            return ''  # nothing new, or a character still coming: the window grows until it is whole
        self._prefix, self._read, self._prefix_text = self._read, len(self._ids), None
        return text[len(before) :]


class TextStream:
    """One reply's text as its tokens come: whole characters only, never what could still become a stop string."""

    def __init__(self, decode: Decode, prompt_ids: Sequence[int], stops: Sequence[str]):
        self._text = IncrementalText(decode, prompt_ids)
        self._stops = list(stops)
        # A stop string can only begin in the last len(stop) - 1 characters received: those are held back.
        self._hold = max((len(stop) - 1 for stop in self._stops), default=0)
        self._held = ''  # text received and not given yet; a stop string can only begin here
        self.done = False

    def add(self, token: int) -> tuple[str, bool]:
        """The new text that is sure now, and whether a stop string has appeared (the text ends before it)."""
        if self.done:
            return '', True
        return self._take(self._text.add(token), final=False), self.done

    def finish(self) -> str:
        """What was held back, once the row has ended."""
        return '' if self.done else self._take(self._text.flush(), final=True)

    def _take(self, new: str, final: bool) -> str:
        pending, self.done = cut_at_stop(self._held + new, self._stops)
        keep = 0 if self.done or final else min(self._hold, len(pending))
        self._held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep]


class StopStrings:
    """Generator.generate's `stop_when` for stop strings: each row's text after its prompt, read incrementally."""

    def __init__(self, decode: Decode, prompts: Sequence[Sequence[int]], stops: Sequence[str]):
        self._rows = [TextStream(decode, prompt, stops) for prompt in prompts]
        self._seen = 0  # steps already read

    def __call__(self, generated: np.ndarray) -> np.ndarray:
        for row, ids in zip(self._rows, generated, strict=True):
            for token in ids[self._seen :]:
                row.add(int(token))
        self._seen = generated.shape[1]
        return np.array([row.done for row in self._rows])


class Streamer:
    """Prints one row's text after its prompt as its tokens come, whole characters only, up to a stop string."""

    def __init__(self, decode: Decode, prompt_ids: Sequence[int], stops: Sequence[str]):
        self._text = TextStream(decode, prompt_ids, stops)

    def __call__(self, new_tokens: np.ndarray) -> None:
        self._show(self._text.add(int(new_tokens[0]))[0])

    def finish(self) -> None:
        """Prints what was held back, once the row has ended."""
        self._show(self._text.finish())
        print(flush=True)

    @staticmethod
    def _show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
