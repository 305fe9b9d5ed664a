"""AdamW against Muon on one config: each at its best learning rate of a small grid, equal steps.

Usage:
  python scripts/compare_optimizers.py --workdir runs/optimizers [--steps 300] [--lrs 1.5e-3,3e-3,6e-3]
      [--optimizers adamw,muon] [--eval_every 25] [-- --config.data.train_files=... (any trainer override)]

Each (optimizer, rate) trains with `python -m trainer` in WORKDIR/<optimizer>_lr<rate> (a finished run is read
back, an interrupted one resumes), evaluating every --eval_every steps. Prints, and writes to
WORKDIR/summary.json and WORKDIR/loss_vs_step.png:
- each run's final eval loss, and each optimizer's best rate;
- the steps the other optimizer's best run needs to reach the first's final eval loss (linear interpolation
  between evals), as a fraction of the steps the first used;
- both best runs' eval and train loss against step.
Step time is not compared here (runs one after another on a shared machine); scripts/bench.py's
--variant 'muon:train.optimizer=muon' measures it side by side.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]

_WORKDIR = flags.DEFINE_string('workdir', 'runs/optimizers', 'Where the runs and the summary go.')
_CONFIG = flags.DEFINE_string('config', 'configs/small_lm.py', 'The config both optimizers train.')
_STEPS = flags.DEFINE_integer('steps', 300, 'Optimizer steps of every run.')
_LRS = flags.DEFINE_list('lrs', ['1.5e-3', '3e-3', '6e-3', '1.2e-2'], 'Peak learning rates tried for each.')
_OPTIMIZERS = flags.DEFINE_list(
    'optimizers', ['adamw', 'muon'], 'config.train.optimizer values; the first is the baseline.'
)
_EVAL_EVERY = flags.DEFINE_integer('eval_every', 25, 'Steps between evals (the curve the step counts are read from).')


def run(optimizer: str, lr: str, overrides: list[str]) -> list[dict]:
    """One training run's metrics (trained now unless a finished run is there)."""
    workdir = pathlib.Path(_WORKDIR.value) / f'{optimizer}_lr{lr}'
    metrics = workdir / 'metrics.jsonl'
    done = metrics.exists() and any(
        json.loads(line).get('step') == _STEPS.value and 'eval_loss' in line
        for line in metrics.read_text().splitlines()
    )
    if not done:
        command = [
            sys.executable, '-m', 'trainer', '--config', _CONFIG.value, '--workdir', str(workdir),
            f'--config.train.optimizer={optimizer}', f'--config.train.learning_rate={lr}',
            f'--config.train.steps={_STEPS.value}', f'--config.train.eval_every={_EVAL_EVERY.value}',
            '--config.train.log_every=5', *overrides,
        ]  # fmt: skip
        print(' '.join(command), flush=True)
        subprocess.run(command, cwd=ROOT, check=True)
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def curve(metrics: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of one metric, the later line winning for a step logged twice (a resume)."""
    return sorted({m['step']: m[key] for m in metrics if key in m}.items())


def steps_to_reach(points: list[tuple[int, float]], target: float) -> float | None:
    """The first step where the curve is at or below `target`, interpolated between its points; None if never."""
    previous = None
    for step, value in points:
        if value <= target:
            if previous is None:
                return float(step)
            (s0, v0) = previous
            return s0 + (step - s0) * (v0 - target) / (v0 - value)
        previous = (step, value)
    return None


def main(argv: list[str]) -> None:
    overrides = argv[1:]
    finals: dict[str, dict[str, float]] = {}
    curves: dict[tuple[str, str], list[dict]] = {}
    for optimizer in _OPTIMIZERS.value:
        for lr in _LRS.value:
            metrics = run(optimizer, lr, overrides)
            curves[(optimizer, lr)] = metrics
            finals.setdefault(optimizer, {})[lr] = curve(metrics, 'eval_loss')[-1][1]
    best = {optimizer: min(by_lr, key=by_lr.get) for optimizer, by_lr in finals.items()}
    baseline, *others = _OPTIMIZERS.value
    target = finals[baseline][best[baseline]]
    summary = {'steps': _STEPS.value, 'final_eval_loss': finals, 'best_lr': best, 'overrides': overrides}
    print(f'{"optimizer":<10} ' + ' '.join(f'{lr:>9}' for lr in _LRS.value))
    for optimizer, by_lr in finals.items():
        print(f'{optimizer:<10} ' + ' '.join(f'{by_lr[lr]:9.4f}' for lr in _LRS.value) + f'   best {best[optimizer]}')
    for other in others:
        reached = steps_to_reach(curve(curves[(other, best[other])], 'eval_loss'), target)
        summary[f'{other}_steps_to_{baseline}_final'] = reached
        fraction = 'never' if reached is None else f'{reached:.0f} steps ({reached / _STEPS.value:.0%})'
        print(f"{other} at its best rate reaches {baseline}'s final eval loss {target:.4f} in {fraction}")
    workdir = pathlib.Path(_WORKDIR.value)
    (workdir / 'summary.json').write_text(json.dumps(summary, indent=1) + '\n')
    plot(curves, best, workdir / 'loss_vs_step.png')
    print(f'wrote {workdir / "summary.json"} and {workdir / "loss_vs_step.png"}')


def plot(curves: dict[tuple[str, str], list[dict]], best: dict[str, str], path: pathlib.Path) -> None:
    """Eval and train loss against step of each optimizer's best run."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for (optimizer, lr), color in zip(best.items(), ('C0', 'C1', 'C2', 'C3'), strict=False):
        metrics = curves[(optimizer, lr)]
        steps, losses = zip(*curve(metrics, 'loss'), strict=True)
        axis.plot(steps, losses, color=color, alpha=0.35, linewidth=1)
        steps, losses = zip(*curve(metrics, 'eval_loss'), strict=True)
        axis.plot(steps, losses, color=color, marker='o', markersize=3, label=f'{optimizer} lr {lr}: eval')
    axis.set_xlabel('step')
    axis.set_ylabel('loss (nats/token; faint: train)')
    axis.set_ylim(top=min(3.5, axis.get_ylim()[1]))
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == '__main__':
    app.run(main)
