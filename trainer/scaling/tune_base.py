"""Tuning muP's base model: a random or successive-halving search over its constants at the base width.

muP's promise is that the base's tuned hyperparameters transfer to wider models; `python -m trainer.scaling
tune_base` tunes them, small. A search space is a list of config fields, each a log-uniform range (`lo:hi`)
or a set of choices (`a|b|c`). Random search trains every trial on the full budget; successive halving
(Jamieson and Talwalkar 2016) trains them all on budget / eta^(rungs - 1) tokens, keeps the best 1 / eta,
trains those on eta times more, and so on to the full budget. Each rung is a sweep (trainer.scaling.sweep)
in its own folder, so a stopped search run again resumes where it was, and the trials are drawn from a
seeded generator, so the same command draws the same ones.

The result: best.json (the winning settings and every trial's losses), tuned.py (a config file: the base
config with the winner's settings, muP based at this width; the sweep and training take it as --config)
and tune_base.png (loss against each constant, a colour per rung).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from ml_collections import config_dict

from trainer.errors import ConfigError
from trainer.scaling import collect as sweep_collect
from trainer.scaling import inputs, sweep

# Tensor Programs V's tunable constants for Adam (its Table 3, the mup package's MuReadout output_mult and the
# input multiplier), with the learning rate and weight decay; ranges around SP's values for a small model. Each
# range spans 50x or more: the first search's winner sat at the top of init_std=0.005:0.08 (0.0794) and at
# the largest weight decay (0.1), so both reach further now.
DEFAULT_SPACE = (
    'train.learning_rate=1e-3:5e-2',
    'model.mup_output_multiplier=0.2:16',
    'model.mup_input_multiplier=0.25:16',
    'model.init_std=0.005:0.5',
    'train.weight_decay=0|0.03|0.1|0.3',
)
# A winner this close to a range's end (a share of the range's log width) may have wanted a value beyond it.
EDGE_SHARE = 0.05


@dataclasses.dataclass(frozen=True)
class Knob:
    """One searched config field: a log-uniform range (low, high) or a list of choices."""

    field: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple[float, ...] = ()

    @property
    def is_log(self) -> bool:
        return not self.choices


def parse_space(entries: Sequence[str], base: config_dict.ConfigDict) -> list[Knob]:
    """'section.field=lo:hi' (log-uniform) or 'section.field=a|b|c' entries as Knobs, checked against the config."""
    knobs = []
    for entry in entries:
        field, sep, spec = entry.partition('=')
        section, _, name = field.rpartition('.')
        holder = base.get(section) if section else base
        if not sep or not isinstance(holder, config_dict.ConfigDict) or name not in holder:
            raise ConfigError(
                f'--search_space entry {entry!r}: give a config field and its range, as train.learning_rate=1e-3:3e-2 '
                'or train.weight_decay=0|0.1.'
            )
        if isinstance(holder[name], bool) or not isinstance(holder[name], (int, float)):
            raise ConfigError(f'--search_space entry {entry!r}: {field} is not a number.')
        try:
            if '|' in spec or ':' not in spec:
                knobs.append(Knob(field, choices=tuple(float(v) for v in spec.split('|'))))
                continue
            low, high = (float(v) for v in spec.split(':'))
        except ValueError:
            raise ConfigError(f'--search_space entry {entry!r}: {spec!r} is not lo:hi or a|b|c of numbers.') from None
        if not 0 < low < high:
            raise ConfigError(f'--search_space entry {entry!r}: a range lo:hi needs 0 < lo < hi (it is log-uniform).')
        knobs.append(Knob(field, low, high))
    if len({k.field for k in knobs}) != len(knobs):
        raise ConfigError('--search_space names a field twice: give each field once.')
    return knobs


def draw(knobs: Sequence[Knob], trials: int, seed: int) -> list[dict[str, float]]:
    """`trials` settings drawn from the space; the same seed draws the same ones."""
    rng = np.random.default_rng(seed)
    drawn = []
    for _ in range(trials):
        setting = {}
        for knob in knobs:
            if knob.is_log:
                value = math.exp(rng.uniform(math.log(knob.low), math.log(knob.high)))
                setting[knob.field] = float(f'{value:.3g}')  # readable names and configs; 3 digits are plenty
            else:
                setting[knob.field] = float(knob.choices[rng.integers(len(knob.choices))])
        drawn.append(setting)
    return drawn


def edge_warnings(knobs: Sequence[Knob], setting: dict[str, float]) -> list[str]:
    """A line for each log-uniform range whose end the winning `setting` lies within EDGE_SHARE of (log scale)."""
    lines = []
    for knob in knobs:
        if not knob.is_log:
            continue
        share = math.log(setting[knob.field] / knob.low) / math.log(knob.high / knob.low)
        if EDGE_SHARE < share < 1 - EDGE_SHARE:
            continue
        end, bound = ('bottom', knob.low) if share <= EDGE_SHARE else ('top', knob.high)
        lines.append(
            f"warning: the winner's {knob.field}={setting[knob.field]:g} lies at the {end} of its range "
            f'{knob.low:g}:{knob.high:g} (within {EDGE_SHARE:.0%} of it, log scale): the best may lie beyond '
            f'{bound:g}; widen the range (--search_space {knob.field}=LO:HI) and search again.'
        )
    return lines


def rung_plan(trials: int, search: str, eta: int, rungs: int, tokens: float) -> list[tuple[int, float]]:
    """(trials, tokens) per rung: one rung for random search; for halving, trials / eta^k on tokens / eta^(R-1-k)."""
    if search == 'random':
        return [(trials, tokens)]
    plan = []
    for k in range(rungs):
        plan.append((max(1, math.ceil(trials / eta**k)), tokens / eta ** (rungs - 1 - k)))
    return plan


@dataclasses.dataclass
class Trial:
    """One drawn setting and its losses per rung (None where it was not trained there)."""

    index: int
    setting: dict[str, float]
    losses: list[float | None]

    @property
    def name(self) -> str:
        return f'trial{self.index:03d}'


def _loss(row: dict[str, Any]) -> float:
    """A finished run's final eval loss (its training loss without an eval set); inf for a diverged one."""
    value = row['eval_loss'] if row.get('eval_loss') not in ('', None) else row['loss']
    value = float(value) if value not in ('', None) else math.inf
    return value if math.isfinite(value) else math.inf


def _points(base, trials: list[Trial], shape: sweep.Shape, width: int, tokens: float, warmup: float):
    """The rung's sweep points: each trial at the base width on `tokens`, its settings over the sweep's."""
    points = []
    for trial in trials:
        (point,) = sweep.plan(
            base,
            [width],
            shape,
            token_budgets=[tokens],
            learning_rates=[trial.setting.get('train.learning_rate', base.train.learning_rate)],
            warmup_fraction=warmup,
        )
        overrides = dict(point.overrides, **trial.setting)
        points.append(dataclasses.replace(point, name=f'{trial.name}_t{point.tokens}', overrides=overrides))
    return points


def search(
    folder: pathlib.Path,
    config_file: str,
    base: config_dict.ConfigDict,
    extra: Sequence[str],
    knobs: Sequence[Knob],
    *,
    width: int,
    shape: sweep.Shape,
    trials: int,
    method: str,
    eta: int,
    rungs: int,
    tokens: float,
    seed: int,
    warmup_fraction: float = 0.05,
    echo=print,
) -> tuple[list[Trial], bool, int]:
    """Runs the search's rungs (resumable); returns (the trials, whether a signal stopped it, failed runs)."""
    plan = rung_plan(trials, method, eta, rungs, tokens)
    found = [Trial(i, s, [None] * len(plan)) for i, s in enumerate(draw(knobs, trials, seed))]
    alive, failed = found, 0
    for k, (keep, rung_tokens) in enumerate(plan):
        alive = sorted(alive, key=lambda t: (t.losses[k - 1] if k else 0.0, t.index))[:keep]
        points = _points(base, alive, shape, width, rung_tokens, warmup_fraction)
        rung_folder = folder / f'rung{k}'
        echo(f'rung {k + 1}/{len(plan)}: {len(points)} trial(s) on {points[0].tokens:,} tokens each ({rung_folder})')
        commands = sweep.write(rung_folder, config_file, points, extra)
        _, rung_failed, stopped = sweep.run(rung_folder, commands, points, echo=echo)
        failed += rung_failed
        if stopped:
            return found, True, failed
        by_name = {row['name']: row for row in sweep_collect.rows(rung_folder)}
        for trial, point in zip(alive, points, strict=True):
            row = by_name[point.name]
            trial.losses[k] = _loss(row) if row['state'] == 'done' else math.inf
    return found, False, failed


def best(found: Sequence[Trial]) -> Trial:
    """The trial with the least loss on the last rung it reached, the deepest rung first."""

    def key(trial: Trial):
        reached = [i for i, loss in enumerate(trial.losses) if loss is not None]
        return (-reached[-1], trial.losses[reached[-1]], trial.index)

    return min(found, key=key)


def tuned_config_text(config_file: str, out_dir: pathlib.Path, settings: dict[str, Any], summary: str) -> str:
    """A config file: the base config (found relative to this file) with `settings` applied."""
    path, _, argument = config_file.partition(':')
    relative = os.path.relpath(pathlib.Path(path).resolve(), out_dir.resolve())
    lines = ', '.join(f'{key!r}: {value!r}' for key, value in settings.items())
    return f'''"""{summary}

Written by `python -m trainer.scaling tune_base`: the base config with the tuned settings; muP is based at
this model's width, so set model.d_model (and heads, d_ff) wider and the constants transfer.
"""

import importlib.util
import pathlib

BASE_CONFIG = pathlib.Path(__file__).resolve().parent / {relative!r}
BASE_ARGUMENT = {argument!r}
SETTINGS = {{{lines}}}


def get_config():
    spec = importlib.util.spec_from_file_location('tuned_base_config', BASE_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(BASE_ARGUMENT) if BASE_ARGUMENT else module.get_config()
    for key, value in SETTINGS.items():
        section, name = key.rsplit('.', 1)
        config[section][name] = type(config[section][name])(value)
    return config
'''


def plot(found: Sequence[Trial], knobs: Sequence[Knob], winner: Trial, out_png: str) -> None:
    """Loss against each searched constant, a colour per rung, the winner starred."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from trainer.scaling.plot import readable

    rungs = len(found[0].losses)
    columns = min(3, len(knobs))
    rows = -(-len(knobs) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows), squeeze=False)
    colors = plt.cm.viridis(np.linspace(0, 0.85, rungs))
    finite = [loss for t in found for loss in t.losses if loss is not None and math.isfinite(loss)]
    for ax, knob in zip(axes.flat, knobs, strict=False):
        for k in range(rungs):
            points = [(t.setting[knob.field], t.losses[k]) for t in found if t.losses[k] is not None]
            points = [(x, y) for x, y in points if math.isfinite(y)]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.scatter(xs, ys, s=18, color=colors[k], label=f'rung {k + 1}' if rungs > 1 else 'trials')
        last = max(i for i, loss in enumerate(winner.losses) if loss is not None)
        ax.scatter([winner.setting[knob.field]], [winner.losses[last]], marker='*', s=160, color='red', label='best')
        if knob.is_log:
            ax.set_xscale('log')
        ax.set_xlabel(knob.field)
        ax.set_ylabel('eval loss')
        if finite:
            ax.set_ylim(min(finite) - 0.05, min(max(finite), min(finite) + 1.5) + 0.05)
    for ax in list(axes.flat)[len(knobs) :]:
        ax.axis('off')
    axes.flat[0].legend(fontsize=8)
    fig.suptitle('tune_base: loss against each constant at the base width')
    fig.tight_layout()
    readable(fig)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


@dataclasses.dataclass(frozen=True)
class Search:
    """How tune_base searches: trials drawn, 'random' or 'halving', halving's eta and rungs, the draw's seed."""

    trials: int
    method: str
    eta: int
    rungs: int
    seed: int


def tune(
    folder: pathlib.Path,
    config_file: str,
    set_fields: Sequence[str],
    space: Sequence[str],
    how: Search,
    *,
    width: int,
    shape: sweep.Shape,
    tokens: float,
    warmup_fraction: float,
) -> int:
    """The whole tune_base verb: muP based at `width`, the search, then tuned.py, best.json and the figure in
    `folder`; returns the exit code (sweep.EXIT_STOPPED when a signal stopped it)."""
    fixed = {'model.parametrization': 'mup', 'model.base_width': width, 'model.base_head_dim': shape.head_dim}
    probe = inputs.load_config(config_file, list(set_fields))
    if probe.model.depth_scaling == 'completep':
        fixed['model.base_depth'] = shape.depth
    settings = [*set_fields, *(f'{k}={v}' for k, v in fixed.items())]
    base = inputs.load_config(config_file, settings)
    knobs = parse_space(space, base)
    plan = rung_plan(how.trials, how.method, how.eta, how.rungs, tokens)
    print(
        f'tune_base: {how.trials} trials at width {width} ({how.method}: '
        + ', '.join(f'{n} on {t:.3g} tokens' for n, t in plan)
        + f'); searching {", ".join(k.field for k in knobs)}'
    )
    found, stopped, failed = search(
        folder,
        config_file,
        base,
        [f'--config.{s}' for s in settings],
        knobs,
        width=width,
        shape=shape,
        trials=how.trials,
        method=how.method,
        eta=how.eta,
        rungs=how.rungs,
        tokens=tokens,
        seed=how.seed,
        warmup_fraction=warmup_fraction,
    )
    if stopped:
        return sweep.EXIT_STOPPED
    winner = best(found)
    last_loss = [loss for loss in winner.losses if loss is not None][-1]
    if not np.isfinite(last_loss):
        raise ConfigError(f'every trial of the last rung failed or diverged: see {folder}/rung*/runs/*/train.log.')
    # The tuned config: the sweep's --set fields, muP based here, the shape of the base model, the winner.
    shaped = shape.overrides(width)
    typed = {}  # the --set fields as the config typed them
    for setting in set_fields:
        key = setting.partition('=')[0]
        section, _, name = key.rpartition('.')
        typed[key] = (base[section] if section else base)[name]
    chosen = {**typed, **fixed, **shaped, **winner.setting}
    chosen = {k: v for k, v in chosen.items() if k != 'model.head_dim'}
    summary = (
        f'muP base at width {width}, {how.method} search of {how.trials} trials (seed {how.seed}): '
        f'eval loss {last_loss:.4f} on {tokens:.3g} tokens.'
    )
    (folder / 'tuned.py').write_text(tuned_config_text(config_file, folder, chosen, summary))
    record = {
        'best': {'trial': winner.index, 'settings': winner.setting, 'loss': last_loss},
        'settings': chosen,
        'rungs': [{'trials': n, 'tokens': t} for n, t in plan],
        'trials': [dataclasses.asdict(t) for t in found],
        'search_space': list(space),
        'warnings': edge_warnings(knobs, winner.setting),
    }
    (folder / 'best.json').write_text(json.dumps(record, indent=2) + '\n')
    plot(found, knobs, winner, str(folder / 'tune_base.png'))
    print('best: ' + ', '.join(f'{k}={v:g}' for k, v in winner.setting.items()) + f' (eval loss {last_loss:.4f})')
    for line in record['warnings']:
        print(line)
    print(f'wrote {folder / "tuned.py"} (train or sweep with --config {folder / "tuned.py"}), best.json, tune_base.png')
    return 1 if failed else 0
