"""Where metrics go: a console progress line, metrics.jsonl, TensorBoard scalars, and Weights & Biases."""

from __future__ import annotations

import json
import math
import pathlib
import secrets
import sys
import time

import tensorboardX
import tqdm
from ml_collections import config_dict


def keep_records_up_to(path: pathlib.Path, step: int) -> int:
    """Rewrites a metrics.jsonl without its records past `step` (atomically: a new file renamed over it);
    returns how many were dropped. A half-written last line (a kill mid-write) goes too."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding='utf-8').splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if record.get('step', 0) <= step:
            kept.append(line + '\n')
        else:
            dropped += 1
    if dropped:
        temporary = path.with_name(path.name + '.tmp')
        temporary.write_text(''.join(kept), encoding='utf-8')
        temporary.replace(path)
    return dropped


class MetricsWriter:
    """Appends one JSON object per line to metrics.jsonl and the same scalars to TensorBoard.

    A run that starts at `first_step` (resumed from a checkpoint, or 0) drops what an interrupted run logged
    past it, so that every reader sees each step once: metrics.jsonl is rewritten without those records, and
    TensorBoard is told to purge its events from the next step on (its `purge_step`, which TensorBoard applies
    when reading).
    """

    def __init__(self, workdir: pathlib.Path, first_step: int = 0, tracker: WandbRun | None = None):
        self.dropped = keep_records_up_to(workdir / 'metrics.jsonl', first_step)
        self._jsonl = open(workdir / 'metrics.jsonl', 'a', encoding='utf-8')
        # tensorboardX writes classic scalar events without needing TensorFlow.
        self._tensorboard = tensorboardX.SummaryWriter(str(workdir / 'tensorboard'), purge_step=first_step + 1)
        self._tracker = tracker

    def write(self, step: int, metrics: dict[str, float | int | None]) -> None:
        present = {name: value for name, value in metrics.items() if value is not None}
        self._jsonl.write(json.dumps({'step': step, **present}) + '\n')
        self._jsonl.flush()
        for name, value in present.items():
            self._tensorboard.add_scalar(name, value, step)
        self._tensorboard.flush()
        if self._tracker is not None:
            self._tracker.log(step, present)

    def close(self) -> None:
        self._jsonl.close()
        self._tensorboard.close()
        if self._tracker is not None:
            self._tracker.close()


class WandbRun:
    """A Weights & Biases run for a workdir: its id is kept in <workdir>/wandb_run_id, so a resumed run
    continues it; the run's config is the resolved config; metrics keep TensorBoard's names, against `step`."""

    ID_FILE = 'wandb_run_id'

    def __init__(self, workdir: pathlib.Path, config: config_dict.ConfigDict):
        import wandb  # an optional extra: checked by config_checks before anything is written

        settings = config.logging
        id_file = workdir / self.ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)  # W&B ids: [a-z0-9]
        tags = [tag.strip() for tag in settings.wandb_tags.split(',') if tag.strip()]
        self._run = wandb.init(
            project=settings.wandb_project,
            entity=settings.wandb_entity or None,
            name=settings.wandb_run_name or workdir.resolve().name,
            tags=tags or None,
            id=run_id,
            resume='allow',
            dir=str(workdir),
            config=json.loads(config.to_json_best_effort()),
        )
        id_file.write_text(run_id + '\n')
        # Our step is the x-axis: a resumed run logs steps again from its checkpoint on, which W&B's own
        # monotonic step would drop.
        self._run.define_metric('step')
        self._run.define_metric('*', step_metric='step')

    @property
    def id(self) -> str:
        return self._run.id

    def log(self, step: int, metrics: dict[str, float | int]) -> None:
        self._run.log({'step': step, **metrics})

    def close(self) -> None:
        self._run.finish()


def format_count(value: float) -> str:
    """12345678 -> '12.3M'."""
    for unit, scale in (('T', 1e12), ('G', 1e9), ('M', 1e6), ('k', 1e3)):
        if abs(value) >= scale:
            return f'{value / scale:.3g}{unit}'
    return f'{value:.3g}'


def format_duration(seconds: float) -> str:
    """3725 -> '1:02:05'."""
    if not math.isfinite(seconds):
        return '?'
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f'{hours}:{minutes:02d}:{secs:02d}' if hours else f'{minutes}:{secs:02d}'


class Progress:
    """A progress bar on a terminal; one plain line per update when output goes to a file.

    Disabled (silent) on every process but the first of a multi-process job.
    """

    def __init__(self, first_step: int, total_steps: int, enabled: bool = True, hosts: int = 1):
        self._total = total_steps
        self._enabled, self._hosts = enabled, hosts
        self._bar = None
        if enabled and sys.stderr.isatty():
            self._bar = tqdm.tqdm(
                total=total_steps,
                initial=first_step,
                unit='step',
                dynamic_ncols=True,
                bar_format='{l_bar}{bar}| {n}/{total} [{elapsed}<{remaining}{postfix}]',
            )

    def update(self, step: int, metrics: dict[str, float | None]) -> None:
        """Shows step, loss, tokens/s (per device) and MFU; ETA from the latest step time."""
        if not self._enabled:
            return
        summary = f'loss {metrics["loss"]:.4f}'
        if metrics['tokens_per_s'] is not None:
            summary += (
                f' | {format_count(metrics["tokens_per_s"])} tok/s '
                f'({format_count(metrics["tokens_per_s_per_device"])}/device)'
            )
        if metrics['mfu'] is not None:
            summary += f' | MFU {100 * metrics["mfu"]:.1f}%'
        if self._hosts > 1 and metrics['host_step_time_s_max'] is not None:
            spread = metrics['host_step_time_s_max'] / metrics['host_step_time_s_min'] - 1
            if spread > 0.01 or metrics['host_data_wait_fraction_max'] > 0.05:  # worth a look: name the host
                summary += (
                    f' | slowest host {metrics["slowest_host"]} +{100 * spread:.0f}%'
                    f' (data wait up to {100 * metrics["host_data_wait_fraction_max"]:.0f}%)'
                )
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(summary, refresh=True)
        else:
            step_time = metrics['step_time_s']
            eta = format_duration((self._total - step) * step_time) if step_time is not None else '?'
            print(f'step {step}/{self._total} | ETA {eta} | {summary}', flush=True)

    def message(self, text: str) -> None:
        """A line that does not disturb the bar."""
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class IntervalTimer:
    """Wall time between successive log points."""

    def __init__(self):
        self._last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        return elapsed
