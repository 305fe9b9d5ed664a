"""A sweep's remaining time, estimated only from what this command has measured, and None until it has.

A point's time is its training steps plus an overhead (start-up, compilation, the final eval and save) that
tiny points are mostly made of. The first report of a point comes after its compilation, so the training rate
is measured between a point's reports (FLOPs trained / seconds), never from the command's start: once
counted from there, a compiling first point made a two-minute sweep read 'ETA 7:50:32'. The overhead per
point is what finished points took beyond their training at that rate (before one finishes: the running
point's start-up so far).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class SweepEta:
    """Feed it each point's start, reports and end; `remaining` is then the sweep's time left, or None."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._steady_seconds = 0.0  # finished points' time between their first and last report
        self._steady_flops = 0.0  # and the FLOPs trained in it
        self._overheads: list[float] = []  # finished points' time beyond their training
        self._started = None  # the running point's start
        self._first = None  # (time, FLOPs trained here) at its first report
        self._latest = None  # and at its latest

    def start_point(self) -> None:
        """A point starts (or resumes) in this command."""
        self._started, self._first, self._latest = self._clock(), None, None

    def report(self, flops_here: float) -> None:
        """A report of the running point: `flops_here` FLOPs of it trained by this command so far."""
        now = (self._clock(), flops_here)
        self._first = self._first or now
        self._latest = now

    def end_point(self) -> None:
        """The running point ended (done, or stopped)."""
        if self._started is None:
            return
        seconds, flops = self._steady()
        self._steady_seconds += seconds
        self._steady_flops += flops
        rate = self.rate()
        if rate is not None and self._latest is not None:
            trained = self._latest[1] / rate
            self._overheads.append(max(0.0, self._clock() - self._started - trained))
        self._started = None

    def _steady(self) -> tuple[float, float]:
        """The running point's (seconds, FLOPs) between its first and latest report."""
        if self._first is None or self._latest is None:
            return 0.0, 0.0
        return self._latest[0] - self._first[0], self._latest[1] - self._first[1]

    def rate(self) -> float | None:
        """FLOPs per second of training steps measured so far; None before any point's second report."""
        seconds, flops = self._steady()
        seconds += self._steady_seconds
        flops += self._steady_flops
        return flops / seconds if seconds > 0 and flops > 0 else None

    def overhead(self) -> float:
        """Seconds per point beyond its training: finished points' mean, else the running point's start-up."""
        if self._overheads:
            return sum(self._overheads) / len(self._overheads)
        rate = self.rate()
        if self._first is None or rate is None:
            return 0.0
        return max(0.0, self._first[0] - self._started - self._first[1] / rate)

    def remaining(self, flops_left: float, points_to_start: int) -> float | None:
        """Seconds until the sweep ends: `flops_left` to train (the running point's rest and the points not
        started) at the measured rate, plus an overhead for each of the `points_to_start`; None while no rate
        is measured yet."""
        rate = self.rate()
        if rate is None:
            return None
        return flops_left / rate + points_to_start * self.overhead()
