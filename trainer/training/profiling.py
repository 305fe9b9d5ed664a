"""A jax.profiler trace of a window of train steps, where TensorBoard's profile plugin and Perfetto find it."""

from __future__ import annotations

import pathlib

import jax


class StepProfiler:
    """Traces steps [start, start + count) (1-based step numbers) into `log_dir`/plugins/profile/<time>/.

    Only the process that creates it with `enabled` traces; the steps it covers run as any other.
    """

    def __init__(self, log_dir: pathlib.Path, start: int, count: int, enabled: bool = True):
        self._log_dir, self._start, self._end = log_dir, start, start + count - 1
        self._enabled = enabled and count > 0
        self._running = False

    def before(self, step: int) -> None:
        """Called before step `step` (1-based) is dispatched: starts the trace at the first profiled step."""
        if self._enabled and step == self._start and not self._running:
            # create_perfetto_trace: a .trace.json.gz beside the .xplane.pb, which ui.perfetto.dev opens as is.
            jax.profiler.start_trace(str(self._log_dir), create_perfetto_trace=True)
            self._running = True

    def after(self, step: int, outputs) -> str | None:
        """Called after step `step` is dispatched: at the last profiled step waits for it, stops the trace and
        says where it went."""
        if not (self._running and step >= self._end):
            return None
        jax.block_until_ready(outputs)
        return self.stop()

    def stop(self) -> str | None:
        """Ends a running trace (also when the run stops early); says where it is."""
        if not self._running:
            return None
        jax.profiler.stop_trace()
        self._running = False
        runs = sorted((self._log_dir / 'plugins' / 'profile').glob('*'))
        where = runs[-1] if runs else self._log_dir
        return (
            f'profile of steps {self._start}-{self._end} written to {where}: open it with `tensorboard --logdir '
            f'{self._log_dir}` (Profile tab; pip install tensorboard-plugin-profile) or load its .trace.json.gz '
            'in ui.perfetto.dev'
        )
