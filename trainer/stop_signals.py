"""SIGTERM and SIGINT (preemption notices, SLURM's warning signal, Ctrl-C) become a request to stop cleanly."""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """Records the first SIGTERM/SIGINT; the loop then saves and exits. A second SIGINT kills at once."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to it alone
            for number in (signal.SIGTERM, signal.SIGINT):
                self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number: int, frame) -> None:
        self.signal_name = signal.Signals(number).name
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C is not ignored

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def restore(self) -> None:
        """Puts back the handlers that were there before."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)
