"""The learning-rate transfer tests: loss against learning rate at several widths (SP beside muP) or depths
(plain residuals beside CompleteP).

`python -m trainer.scaling lr_transfer` runs two sweeps (folder/sp and folder/mup, resumable like any
sweep: the same command again skips finished runs) of every width x learning rate on one token budget;
this module runs those sweeps (`run_variants`), reads them back, finds each width's best rate, draws the curves
and writes the table (`report`); lr_transfer and depth_transfer share all of it.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Callable

import numpy as np
from ml_collections import config_dict

from trainer.scaling import collect as sweep_collect
from trainer.scaling import sweep


class Stopped(Exception):
    """A transfer sweep was stopped by a signal (its running point saved)."""


def run_variants(
    folder: pathlib.Path,
    variants: dict[str, tuple[str, list[str], list[float]]],
    load_config: Callable[[str, list[str]], config_dict.ConfigDict],
    widths: list[int],
    shape: sweep.Shape,
    lrs: list[float],
    tokens: list[float],
    warmup_fraction: float,
    echo: Callable[[str], None] = print,
) -> int:
    """Runs a sweep per variant ({name: (config file, settings, learning rates or [] for `lrs`)}) in
    folder/<name>; returns the failed runs; raises Stopped when a signal stopped one."""
    failed = 0
    for name, (config_file, settings, rates) in variants.items():
        points = sweep.plan(
            load_config(config_file, settings),
            widths,
            shape,
            token_budgets=tokens,
            learning_rates=rates or lrs,
            warmup_fraction=warmup_fraction,
        )
        commands = sweep.write(folder / name, config_file, points, [f'--config.{s}' for s in settings])
        echo(f'{name}: {len(points)} runs in {folder / name}')
        _, failed_here, stopped = sweep.run(folder / name, commands, points)
        if stopped:
            raise Stopped()
        failed += failed_here
    return failed


def report(table: dict[str, dict[int, dict]], folder: pathlib.Path, name: str, by: str) -> None:
    """The figure and table of a transfer test (folder/<name>.png, .json) and each variant's best rates."""
    plot(table, str(folder / f'{name}.png'), by=by)
    (folder / f'{name}.json').write_text(json.dumps(table, indent=2) + '\n')
    for variant, by_size in table.items():
        best = ', '.join(f'{w}: {row["best_lr"]:.2g} (loss {min(row["losses"]):.4f})' for w, row in by_size.items())
        print(f'{variant}: best learning rate by {by}: {best}')
    print(f'wrote {folder / f"{name}.json"}, {folder / f"{name}.png"}')


def best_rate(rates: list[float], losses: list[float]) -> float:
    """The rate of least loss, refined by a parabola in log rate through it and its neighbours (in the grid)."""
    i = int(np.argmin(losses))
    if 0 < i < len(rates) - 1:
        x = np.log([rates[i - 1], rates[i], rates[i + 1]])
        a, b, _ = np.polyfit(x, losses[i - 1 : i + 2], 2)
        if a > 0:
            return float(np.exp(np.clip(-b / (2 * a), x[0], x[-1])))
    return rates[i]


def collect(
    folder: pathlib.Path, variants: tuple[str, ...] = ('sp', 'mup'), by: str = 'width'
) -> dict[str, dict[int, dict]]:
    """{variant: {width (or depth): {'lrs', 'losses' (final eval loss, else training loss), 'best_lr'}}}."""
    table: dict[str, dict[int, dict]] = {}
    for variant in variants:
        if not (folder / variant / 'sweep.json').is_file():
            continue
        by_size: dict[int, list[tuple[float, float]]] = {}
        for row in sweep_collect.rows(folder / variant):
            if row['state'] != 'done':
                continue
            loss = row['eval_loss'] if row.get('eval_loss') not in ('', None) else row['loss']
            loss = float(loss)
            by_size.setdefault(int(row[by]), []).append((float(row['learning_rate']), loss))
        table[variant] = {}
        for size, pairs in sorted(by_size.items()):
            pairs.sort()
            rates, losses = [p[0] for p in pairs], [p[1] if math.isfinite(p[1]) else 1e9 for p in pairs]
            table[variant][size] = {'lrs': rates, 'losses': losses, 'best_lr': best_rate(rates, losses)}
    return table


TITLES = {'sp': 'SP', 'mup': 'muP', 'none': 'plain residuals', 'completep': 'CompleteP'}


def plot(table: dict[str, dict[int, dict]], out_png: str, by: str = 'width') -> None:
    """Loss against learning rate, a curve per width (or depth), a panel per variant, the best rates marked; and a
    last panel: each variant's least loss against the width (or depth)."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from trainer.scaling.plot import readable

    fig, axes = plt.subplots(1, len(table) + 1, figsize=(5.2 * (len(table) + 1), 4), squeeze=False)
    for ax, (parametrization, by_width) in zip(axes[0], table.items(), strict=False):
        colors = plt.cm.plasma(np.linspace(0, 0.85, len(by_width)))
        finite = [loss for row in by_width.values() for loss in row['losses'] if loss < 1e9]
        for (size, row), color in zip(by_width.items(), colors, strict=True):
            ax.plot(row['lrs'], row['losses'], 'o-', color=color, label=f'{by} {size}', ms=4)
            ax.axvline(row['best_lr'], color=color, ls=':', lw=1)
        ax.set_xscale('log')
        if finite:
            ax.set_ylim(min(finite) - 0.05, min(max(finite), min(finite) + 1.5) + 0.05)
        ax.set_title(f'{TITLES.get(parametrization, parametrization)}: loss against learning rate')
        ax.set_xlabel('learning rate (base)')
        ax.set_ylabel('eval loss')
        ax.legend(fontsize=8)
    ax = axes[0][-1]
    for parametrization, by_width in table.items():
        sizes = list(by_width)
        ax.plot(sizes, [min(by_width[s]['losses']) for s in sizes], 'o-', label=TITLES.get(parametrization))
    ax.set_xscale('log', base=2)
    ax.set_xticks(sorted({s for by_width in table.values() for s in by_width}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_title(f'least loss over the rates against {by}')
    ax.set_xlabel(by)
    ax.set_ylabel('eval loss')
    ax.legend(fontsize=8)
    fig.tight_layout()
    readable(fig)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
