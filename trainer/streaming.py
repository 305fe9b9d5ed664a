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


class Streamer:
    """Prints one row's text as its tokens come, whole characters only, up to a stop string."""

    def __init__(self, decode, stops: list[str]):
        self._decode, self._stops = decode, stops
        self._ids: list[int] = []
        self._printed = ''
        self.done = False

    def __call__(self, new_tokens: np.ndarray) -> None:
        if self.done:
            return
        self._ids.append(int(new_tokens[0]))
        text, self.done = cut_at_stop(self._decode(self._ids), self._stops)
        if not self.done:
            text = text.rstrip('\ufffd')  # a character whose bytes have not all come yet
            # Hold back what could still become a stop string.
            hold = max((len(s) - 1 for s in self._stops), default=0)
            text = text[: max(len(self._printed), len(text) - hold)]
        self._show(text)

    def finish(self) -> None:
        """Prints what was held back, once the row has ended."""
        self._show(cut_at_stop(self._decode(self._ids), self._stops)[0])
        print(flush=True)

    def _show(self, text: str) -> None:
        sys.stdout.write(text[len(self._printed) :])
        sys.stdout.flush()
        self._printed = max(text, self._printed, key=len)
