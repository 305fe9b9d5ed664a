"""The learning-rate transfer tests: loss against learning rate at several widths (SP beside muP) or depths
(plain residuals beside CompleteP).

`python -m trainer.scaling lr_transfer` runs two sweeps (folder/sp and folder/mup, resumable like any
sweep: the same command again skips finished runs) of every width x learning rate on one token budget;
this module reads them back, finds each width's best rate and draws the curves.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np

from trainer.scaling import collect as sweep_collect


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
