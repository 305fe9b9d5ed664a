"""SIGTERM and SIGINT (preemption notices, SLURM's warning signal, Ctrl-C) become a request to stop cleanly."""

from __future__ import annotations

import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils


class StopRequest:
    """Records the first SIGTERM/SIGINT; the loop then saves and exits. A second SIGINT ends the process at once.

    With several processes, all must stop after the same step. JAX's preemption service catches
    SIGTERM itself (in C++) and agrees on that step with the others; SIGINT is passed on to it as a
    SIGTERM. A signal that reaches any one process therefore stops them all at one step.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._multi_process = jax.process_count() > 1
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to it alone
            numbers = (signal.SIGINT,) if self._multi_process else (signal.SIGTERM, signal.SIGINT)
            for number in numbers:
                self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number: int, frame) -> None:
        self.signal_name = signal.Signals(number).name
        # A second Ctrl-C gets the default action: the kernel ends the process at once, even while Python
        # waits on the device or a save. A half-written checkpoint never counts, so only unsaved steps are lost.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        print(
            f'{self.signal_name}: saving after this step, then stopping (Ctrl-C again quits at once, without saving)',
            file=sys.stderr,
            flush=True,
        )
        if self._multi_process:
            signal.raise_signal(signal.SIGTERM)  # to JAX's preemption notifier

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step`; call once for every step, in order, on every process."""
        if not self._multi_process:
            return self.signal_name is not None
        if multihost_utils.reached_preemption_sync_point(step):
            self.signal_name = self.signal_name or 'SIGTERM'
            return True
        return False

    def restore(self) -> None:
        """Puts back the handlers that were there before."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)
