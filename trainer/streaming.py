"""Generated text shown as it comes, and cut where a stop string appears."""

from __future__ import annotations

import sys

import numpy as np


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text up to the first stop string (left out), and whether one was found."""
    cuts = [text.index(stop) for stop in stops if stop in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def ids_of(ids: list[int], completion: str, decode) -> list[int]:
    """The shortest prefix of `ids` that decodes to all of `completion` (it was cut at a stop string)."""
    for n in range(len(ids) + 1):
        if len(decode(ids[:n])) >= len(completion):
            return ids[:n]
    return ids


class TextStream:
    """One row's text as its tokens come: whole characters only, never what could still become a stop string."""

    def __init__(self, decode, stops: list[str]):
        self._decode, self._stops = decode, stops
        self._ids: list[int] = []
        self._given = ''
        self.done = False

    def add(self, token: int) -> tuple[str, bool]:
        """The new text that is sure now, and whether a stop string has appeared (the text ends before it)."""
        if self.done:
            return '', True
        self._ids.append(token)
        text, self.done = cut_at_stop(self._decode(self._ids), self._stops)
        if not self.done:
            text = text.rstrip('\ufffd')  # a character whose bytes have not all come yet
            # Hold back what could still become a stop string.
            hold = max((len(s) - 1 for s in self._stops), default=0)
            text = text[: max(len(self._given), len(text) - hold)]
        return self._give(text), self.done

    def finish(self) -> str:
        """What was held back, once the row has ended."""
        return self._give(cut_at_stop(self._decode(self._ids), self._stops)[0])

    def _give(self, text: str) -> str:
        new = text[len(self._given) :]
        self._given = max(text, self._given, key=len)
        return new


class Streamer:
    """Prints one row's text as its tokens come, whole characters only, up to a stop string."""

    def __init__(self, decode, stops: list[str]):
        self._text = TextStream(decode, stops)

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
