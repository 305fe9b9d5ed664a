"""A grid of training runs for scaling laws: model sizes by a width/depth rule, token or FLOP budgets,
learning rates and seeds; planned, run one after another (resumable), or handed to a cluster.

A sweep lives in one folder: sweep.json (the plan) and runs/<point>/ per point, each a trainer workdir
(config.json, metrics.jsonl, checkpoints) plus point.json (the overrides and the command), and, once run
here, train.log (the trainer's output) and status.json ('done', 'failed' with the error, or 'stopped'). A
sweep stopped by Ctrl-C or SIGTERM (the running point saves first) or killed, run again, skips finished
points and resumes the interrupted one from its checkpoint, as the trainer always does.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import tqdm
from ml_collections import config_dict

from trainer.errors import ConfigError
from trainer.modeling import counts
from trainer.modeling.model_setup import model_config
from trainer.scaling.eta import SweepEta
from trainer.training import reporting


@dataclasses.dataclass(frozen=True)
class Shape:
    """How a width becomes a model: depth = width / aspect, heads of head_dim, d_ff = ff_ratio x width."""

    aspect: int = 32
    head_dim: int = 32
    ff_ratio: float = 3.0
    kv_ratio: int = 1  # query heads per key/value head
    depth: int = 0  # a fixed depth for every width instead of width / aspect (muP's width transfer)

    def overrides(self, width: int) -> dict[str, Any]:
        heads = max(1, width // self.head_dim)
        if width % heads or heads % self.kv_ratio:
            raise ConfigError(f'width {width} does not split into heads of {self.head_dim}: use a multiple of it.')
        return {
            'model.d_model': width,
            'model.num_layers': self.depth or max(1, round(width / self.aspect)),
            'model.num_heads': heads,
            'model.num_kv_heads': heads // self.kv_ratio,
            'model.head_dim': 0,
            'model.d_ff': int(8 * round(self.ff_ratio * width / 8)),
        }


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of the sweep."""

    name: str
    overrides: dict[str, Any]
    width: int
    depth: int
    params: int
    tokens: int  # planned: steps x global batch x seq_len
    flops: float  # planned training FLOPs
    budget: float  # the token or FLOP budget it belongs to (for IsoFLOP grouping)
    learning_rate: float
    seed: int


def plan(
    base: config_dict.ConfigDict,
    widths: Sequence[int],
    shape: Shape,
    token_budgets: Sequence[float] = (),
    flop_budgets: Sequence[float] = (),
    learning_rates: Sequence[float] = (),
    seeds: Sequence[int] = (0,),
    warmup_fraction: float = 0.05,
) -> list[Point]:
    """Every combination of width, budget, learning rate and seed, with its steps and schedule."""
    if bool(token_budgets) == bool(flop_budgets):
        raise ConfigError('give token budgets (--tokens) or FLOP budgets (--flops), one of the two.')
    tokens_per_step = base.train.global_batch_size * base.data.seq_len
    points = []
    for width in widths:
        sizes = shape.overrides(width)
        config = base.copy_and_resolve_references()
        for key, value in sizes.items():
            section, name = key.split('.')
            config[section][name] = value
        found = counts.count(model_config(config), config.data.seq_len)
        for budget, lr, seed in itertools.product(token_budgets or flop_budgets, learning_rates or [None], seeds):
            tokens = budget if token_budgets else budget / found.train_flops_per_token
            steps = max(1, math.ceil(tokens / tokens_per_step))
            lr = lr if lr is not None else base.train.learning_rate
            overrides = dict(
                sizes,
                **{
                    'train.steps': steps,
                    'train.warmup_steps': max(1, round(warmup_fraction * steps)),
                    'train.learning_rate': lr,
                    'train.eval_every': 0,
                    'checkpoint.every_steps': 0,
                    'checkpoint.every_minutes': 2.0,  # a killed sweep loses at most two minutes of a run
                    'seed': seed,
                },
            )
            label = f'{"t" if token_budgets else "c"}{budget:.0e}'.replace('+', '')
            points.append(
                Point(
                    name=f'w{width}_l{sizes["model.num_layers"]}_{label}_lr{lr:g}_s{seed}',
                    overrides=overrides,
                    width=width,
                    depth=sizes['model.num_layers'],
                    params=found.params,
                    tokens=steps * tokens_per_step,
                    flops=steps * tokens_per_step * found.train_flops_per_token,
                    budget=float(budget),
                    learning_rate=lr,
                    seed=seed,
                )
            )
    return points


def command(config_file: str, workdir: pathlib.Path, overrides: dict[str, Any], extra: Sequence[str]) -> list[str]:
    """The trainer command of one point."""
    flags = [f'--config.{key}={value}' for key, value in overrides.items()]
    return [sys.executable, '-m', 'trainer', '--config', config_file, '--workdir', str(workdir), *extra, *flags]


def write(folder: pathlib.Path, config_file: str, points: list[Point], extra: Sequence[str]) -> list[list[str]]:
    """sweep.json and each point's point.json; returns the commands in point order."""
    folder.mkdir(parents=True, exist_ok=True)
    commands = []
    for point in points:
        workdir = folder / 'runs' / point.name
        workdir.mkdir(parents=True, exist_ok=True)
        argv = command(config_file, workdir, point.overrides, extra)
        commands.append(argv)
        record = dataclasses.asdict(point) | {'command': shlex.join(argv)}
        (workdir / 'point.json').write_text(json.dumps(record, indent=2) + '\n')
    plan_record = {'config': config_file, 'extra': list(extra), 'points': [p.name for p in points]}
    (folder / 'sweep.json').write_text(json.dumps(plan_record, indent=2) + '\n')
    return commands


def emit(folder: pathlib.Path, commands: list[list[str]], how: str) -> pathlib.Path:
    """commands.txt (one command a line), and for 'slurm' a job array script that runs line i as task i."""
    lines = folder / 'commands.txt'
    lines.write_text(''.join(shlex.join(argv) + '\n' for argv in commands))
    if how == 'commands':
        return lines
    script = folder / 'sweep.sbatch'
    script.write_text(
        '#!/bin/bash\n'
        f'#SBATCH --job-name=sweep-{folder.name}\n'
        f'#SBATCH --array=0-{len(commands) - 1}\n'
        '#SBATCH --ntasks-per-node=1\n'
        '#SBATCH --signal=TERM@120  # time to save before the kill\n'
        f'#SBATCH --output={folder}/runs/slurm-%A_%a.out\n'
        f'cd {pathlib.Path.cwd()}\n'
        f'eval "$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {lines})"\n'
    )
    return script


EXIT_STOPPED = 4  # the trainer's: stopped by a signal after saving; the same command resumes
_STEP_LINE = re.compile(r'^step (\d+)/(\d+) \| ETA (\S+) \| loss ([0-9.naif]+)')


class _SweepProgress:
    """The running point's step, loss and ETA, and the sweep's points, share of FLOPs and ETA: a bar on a
    terminal, a plain line per trainer report otherwise."""

    def __init__(self, points: list[Point], finished: set[str], echo: Callable[[str], None]):
        self._flops = {p.name: p.flops for p in points}
        self._total = sum(self._flops.values())
        self._finished = sum(self._flops[name] for name in finished)
        self._points, self._done = len(points), len(finished)
        self._to_start = len(points) - len(finished)  # points this command has still to start
        self._echo = echo
        self._eta = SweepEta()
        self._bar = None
        if echo is print and sys.stderr.isatty():
            self._bar = tqdm.tqdm(
                total=self._total, initial=self._finished, unit='FLOP', unit_scale=True, dynamic_ncols=True,
                bar_format='{percentage:3.0f}% of FLOPs |{bar}| {postfix}',
            )  # fmt: skip

    def start(self) -> None:
        """A point starts (or resumes)."""
        self._to_start -= 1
        self._eta.start_point()

    def step(self, index: int, point: Point, step: int, steps: int, eta: str, loss: str, first_step: int) -> None:
        """A trainer report of the running point, which this command started (or resumed) at `first_step`."""
        current = self._flops[point.name] * step / max(steps, 1)
        share = (self._finished + current) / self._total
        # What this command trained of the point, not what a resumed point had done before.
        self._eta.report(self._flops[point.name] * (step - first_step) / max(steps, 1))
        left = self._eta.remaining(self._total - self._finished - current, self._to_start)
        sweep_eta = reporting.format_duration(left) if left is not None else '? (measured from the next report)'
        text = (
            f'point {index}/{self._points} {point.name} | step {step}/{steps} | loss {loss} | ETA {eta} | sweep: '
            f'{self._done}/{self._points} points, {share:.0%} of FLOPs, ETA {sweep_eta}'
        )
        if self._bar is not None:
            self._bar.n = self._finished + current
            self._bar.set_postfix_str(text, refresh=True)
        else:
            self._echo(text)

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            self._echo(text)

    def ended(self, point: Point, done: bool) -> None:
        """The running point ended: done, or stopped or failed."""
        self._eta.end_point()
        if done:
            self._finished += self._flops[point.name]
            self._done += 1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _Signals:
    """While a point runs: the first SIGINT or SIGTERM is passed on to it (the trainer saves and stops); a
    second SIGINT quits at once, the point with it (the kernel's default action, as in the trainer)."""

    def __init__(self, message: Callable[[str], None]):
        self.received: str | None = None
        self._message = message
        self._child: subprocess.Popen | None = None
        self._previous = {number: signal.signal(number, self._handle) for number in (signal.SIGINT, signal.SIGTERM)}

    def watch(self, child: subprocess.Popen | None) -> None:
        self._child = child

    def _handle(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        if self.received is not None and number == signal.SIGINT:
            if self._child is not None and self._child.poll() is None:
                self._child.send_signal(signal.SIGINT)  # its second: it quits at once
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.raise_signal(signal.SIGINT)
            return
        self.received = name
        self._message(f'{name}: the running point saves and stops (Ctrl-C again quits at once, without saving)')
        if self._child is not None and self._child.poll() is None:
            self._child.send_signal(number)

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def _run_point(argv: list[str], workdir: pathlib.Path, index: int, point: Point, progress, signals) -> tuple:
    """Runs one point, its output appended to workdir/train.log and its reports shown; returns (exit code, last
    line)."""
    # A session of its own: a Ctrl-C at the terminal reaches the sweep alone, which passes it on once.
    child = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, bufsize=1
    )
    signals.watch(child)
    lines, first_step, step, steps = [], None, 0, 0
    with open(workdir / 'train.log', 'a', encoding='utf-8', buffering=1) as log:  # lines, as they come
        for line in child.stdout:
            log.write(line)
            line = line.rstrip('\n')
            lines.append(line)
            if line.startswith('resumed from step '):
                first_step = int(line.split()[3])
                progress.message(f'  {line}')
            elif found := _STEP_LINE.match(line):
                step, steps = int(found[1]), int(found[2])
                first_step = 0 if first_step is None else first_step  # no 'resumed from': a fresh start
                progress.step(index, point, step, steps, found[3], found[4], first_step)
    code = child.wait()
    signals.watch(None)
    meaningful = [line for line in lines if line.strip()]
    return code, meaningful[-1] if meaningful else ''


def done_line(here: float, earlier: float, last: str) -> str:
    """A finished point's line: how long this command ran it and, for a resumed one, its time in all."""
    if not earlier:
        return f'done in {here:.0f}s: {last}'
    return f'done in {here:.0f}s this run, {here + earlier:.0f}s in all with its earlier runs: {last}'


SCORES_FILE = 'multiple_choice.json'  # a point's acc and acc_norm on the sweep's --mc_files, which collect reads


def score_point(workdir: pathlib.Path, mc_files: str) -> str:
    """Scores a finished point on multiple-choice files (python -m trainer.evaluate, in its own process, as a
    user would), writing workdir/multiple_choice.json; returns a line for the log."""
    argv = [sys.executable, '-m', 'trainer.evaluate', '--model', str(workdir), '--task', 'multiple_choice']
    result = subprocess.run([*argv, '--files', mc_files, '--json'], capture_output=True, text=True)
    with open(workdir / 'train.log', 'a', encoding='utf-8') as log:
        log.write(result.stderr)
    if result.returncode:  # the training is kept; the same command scores it again
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        return f'not scored on --mc_files: {lines[-1] if lines else f"exit {result.returncode}"}'
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    (workdir / SCORES_FILE).write_text(json.dumps(scores, indent=2) + '\n')
    return f'acc {scores["acc"]:.4f}, acc_norm {scores["acc_norm"]:.4f} on {scores["questions"]} questions'


def run(
    folder: pathlib.Path, commands: list[list[str]], points: list[Point], echo=print, mc_files: str = ''
) -> tuple[int, int, bool]:
    """Runs the points one after another, skipping finished ones; returns (done, failed, stopped).

    A SIGINT or SIGTERM lets the running point save (the trainer's own stop) and ends the sweep; the same
    command then resumes that point from its checkpoint. With `mc_files`, each finished point is scored on
    those multiple-choice files (points finished before, and not scored yet, too).
    """
    statuses = {}
    for point in points:
        status_file = folder / 'runs' / point.name / 'status.json'
        statuses[point.name] = json.loads(status_file.read_text()) if status_file.exists() else {}
    finished = {name for name, status in statuses.items() if status.get('state') == 'done'}
    progress = _SweepProgress(points, finished, echo)
    signals = _Signals(progress.message)
    done, failed = len(finished), 0
    try:
        for i, (argv, point) in enumerate(zip(commands, points, strict=True)):
            if point.name in finished:
                if mc_files and not (folder / 'runs' / point.name / SCORES_FILE).exists() and not signals.received:
                    progress.message(f'  {point.name}: {score_point(folder / "runs" / point.name, mc_files)}')
                continue
            if signals.received:
                break
            workdir = folder / 'runs' / point.name
            status = statuses[point.name]
            progress.message(f'point {i + 1}/{len(points)}: {point.name} ({point.params:,} parameters, '
                             f'{point.tokens:,} tokens)')  # fmt: skip
            start = time.monotonic()
            progress.start()
            code, last = _run_point(argv, workdir, i + 1, point, progress, signals)
            progress.ended(point, code == 0)
            here, earlier = time.monotonic() - start, status.get('wall_s', 0.0)
            seconds = here + earlier  # a resumed point's wall_s adds its earlier runs' time
            if code == 0:
                record = {'state': 'done', 'wall_s': seconds}
                done += 1
                progress.message(f'  {done_line(here, earlier, last)}')
                if mc_files:
                    progress.message(f'  {score_point(workdir, mc_files)}')
            elif code == EXIT_STOPPED or signals.received:
                record = {'state': 'stopped', 'wall_s': seconds, 'exit_code': code, 'message': last}
                progress.message(f'  {last}')
            else:
                record = {'state': 'failed', 'wall_s': seconds, 'exit_code': code, 'error': last}
                failed += 1
                progress.message(f'  failed (exit {code}): {last}')
            (workdir / 'status.json').write_text(json.dumps(record, indent=2) + '\n')
    finally:
        signals.restore()
        progress.close()
    return done, failed, signals.received is not None
