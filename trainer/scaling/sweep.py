"""A grid of training runs for scaling laws: model sizes by a width/depth rule, token or FLOP budgets,
learning rates and seeds; planned, run one after another (resumable), or handed to a cluster.

A sweep lives in one folder: sweep.json (the plan) and runs/<point>/ per point, each a trainer workdir
(config.json, metrics.jsonl, checkpoints) plus point.json (the overrides and the command) and, once run
here, status.json ('done' or 'failed' with the error). A killed sweep run again skips finished points
and resumes the interrupted one from its checkpoint, as the trainer always does.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import pathlib
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from ml_collections import config_dict

from trainer import counts
from trainer.errors import ConfigError
from trainer.train import model_config


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


def run(folder: pathlib.Path, commands: list[list[str]], points: list[Point], echo=print) -> tuple[int, int]:
    """Runs the points one after another, skipping finished ones; returns (done, failed)."""
    done = failed = 0
    for i, (argv, point) in enumerate(zip(commands, points, strict=True)):
        workdir = folder / 'runs' / point.name
        status_file = workdir / 'status.json'
        status = json.loads(status_file.read_text()) if status_file.exists() else {}
        if status.get('state') == 'done':
            done += 1
            continue
        echo(f'point {i + 1}/{len(points)}: {point.name} ({point.params:,} parameters, {point.tokens:,} tokens)')
        start = time.monotonic()
        result = subprocess.run(argv, capture_output=True, text=True)
        seconds = time.monotonic() - start + status.get('wall_s', 0.0)  # a resumed point adds its earlier time
        if result.returncode == 0:
            record = {'state': 'done', 'wall_s': seconds}
            done += 1
            echo(f'  done in {seconds:.0f}s: {result.stdout.strip().splitlines()[-1]}')
        else:
            lines = (result.stderr or result.stdout).strip().splitlines()
            record = {
                'state': 'failed',
                'wall_s': seconds,
                'exit_code': result.returncode,
                'error': lines[-1] if lines else '',
            }
            failed += 1
            echo(f'  failed (exit {result.returncode}): {record["error"]}')
        status_file.write_text(json.dumps(record, indent=2) + '\n')
    return done, failed
