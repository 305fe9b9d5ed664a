"""The figures of a scaling-law fit, as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

import math
import pathlib

import matplotlib

matplotlib.use('Agg')  # files only: no screen on a cluster node or in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402

from trainer.scaling.fit import Approach2, Approach3  # noqa: E402

MAX_TICKS = 6  # labelled ticks per log axis, so that short labels never crowd


def log_ticks(low: float, high: float) -> list[float]:
    """Round values to label a base-10 log axis spanning [low, high]: 1, 2 and 5 times powers of ten, fewer
    (1 and 3, then powers of ten, then every k-th) over many decades, more (1 to 9) within a decade; fewer than
    2 when the span is too narrow for any (the caller widens it)."""
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)

    def inside(subs) -> list[float]:
        return [float(s * 10.0**d) for d in decades for s in subs if low <= s * 10.0**d <= high]

    ticks = inside((1, 2, 5))
    if len(ticks) < 2:
        finer = inside(range(1, 10))
        return finer if 2 <= len(finer) <= MAX_TICKS else ticks
    for subs in ((1, 3), (1,)):
        if len(ticks) <= MAX_TICKS:
            return ticks
        ticks = inside(subs)
    return ticks[:: math.ceil(len(ticks) / MAX_TICKS)]


def readable(figure, warning: str = '') -> None:
    """Base-10 log axes labelled at a few round values in short form ('20k', '5M'), for any spread: never at
    every minor tick (a span under a decade once labelled '2x10^3x10^4x10^...' on top of each other), never in
    long digits (runs at nearly equal FLOPs once read '1.0003T 1.00031T 1.00032T'): an axis too narrow for two
    round values is widened to a decade about its middle. A weak fit's warning across the bottom. Call after
    tight_layout."""
    for axes in figure.axes:
        for axis, set_limits in ((axes.xaxis, axes.set_xlim), (axes.yaxis, axes.set_ylim)):
            if axis.get_scale() != 'log' or getattr(axis.get_transform(), 'base', 10) != 10:
                continue
            low, high = sorted(axis.get_view_interval())
            ticks = log_ticks(low, high)
            if len(ticks) < 2:  # a decade always holds 1, 2 or 5 times a power of ten twice or more
                middle = math.sqrt(low * high)
                low, high = middle / math.sqrt(10), middle * math.sqrt(10)
                set_limits(low, high)
                ticks = log_ticks(low, high)
            axis.set_major_locator(ticker.FixedLocator(ticks))
            axis.set_major_formatter(ticker.EngFormatter(sep=''))
            axis.set_minor_formatter(ticker.NullFormatter())
    if warning:
        figure.text(0.5, 0.005, warning, ha='center', va='bottom', color='firebrick', fontsize=7, wrap=True)
        figure.subplots_adjust(bottom=max(figure.subplotpars.bottom, 0.2))


def _save(figure, path, warning: str = '') -> None:
    figure.tight_layout()
    readable(figure, warning)
    figure.savefig(path, dpi=120)
    plt.close(figure)


# What the fitted column is, for the axes: a loss, or a multiple-choice error rate (1 - acc) from collect.
QUANTITIES = {
    'loss': 'loss (nats per token)',
    'eval_loss': 'eval loss (nats per token)',
    'acc_error': 'multiple-choice error (1 - acc)',
    'acc_norm_error': 'multiple-choice error (1 - acc_norm)',
}


def loss_against_flops(
    path, params, flops, loss, fit3: Approach3 | None, k: float, quantity: str = QUANTITIES['loss']
) -> None:
    """Each run's loss (or error) against its FLOPs, colored by size, with the law's compute-optimal frontier."""
    figure, axes = plt.subplots(figsize=(6, 4.5))
    scatter = axes.scatter(flops, loss, c=np.log10(params), cmap='viridis', s=25)
    figure.colorbar(scatter, label='log10 parameters')
    if fit3 is not None:
        budgets = np.geomspace(flops.min(), flops.max() * 10, 100)
        frontier = [fit3.law.loss(*fit3.law.optimal(c, k)) for c in budgets]
        axes.plot(budgets, frontier, 'k--', label='fitted compute-optimal frontier')
        axes.legend()
    title = f'{quantity.split(" (")[0].capitalize()} against compute'
    axes.set(xscale='log', xlabel='training FLOPs', ylabel=quantity, title=title)
    _save(figure, path, fit3.warning if fit3 is not None else '')


def isoflop_curves(path, fit2: Approach2) -> None:
    """Loss against parameters per budget, the fitted parabolas and their minima."""
    figure, axes = plt.subplots(figsize=(6, 4.5))
    colors = plt.cm.plasma(np.linspace(0, 0.85, len(fit2.curves)))
    for curve, color in zip(fit2.curves, colors, strict=True):
        params = np.array(curve.params)
        axes.scatter(params, curve.losses, color=color, label=f'{curve.flops:.1e} FLOPs')
        grid = np.geomspace(params.min() / 1.5, params.max() * 1.5, 100)
        axes.plot(grid, np.polyval(curve.parabola, np.log(grid)), color=color)
        axes.axvline(curve.optimal_params, color=color, linestyle=':')
    axes.set(xscale='log', xlabel='parameters', ylabel='loss (nats per token)', title='IsoFLOP curves')
    axes.legend(fontsize=8)
    _save(figure, path)


def optimal_allocation(path, fit2: Approach2 | None, fit3: Approach3 | None, flops_range, k: float) -> None:
    """N*(C) and D*(C): approach 2's minima and power laws, approach 3's prediction."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    budgets = np.geomspace(flops_range[0], flops_range[1] * 10, 50)
    if fit2 is not None:
        points = np.array([c.flops for c in fit2.curves])
        optimal = np.array([c.optimal_params for c in fit2.curves])
        left.scatter(points, optimal, color='C0', label='IsoFLOP minima')
        right.scatter(points, points / (k * optimal), color='C0')
        left.plot(budgets, fit2.params_coefficient * budgets**fit2.params_exponent, 'C0', label='approach 2')
        right.plot(budgets, fit2.tokens_coefficient * budgets**fit2.tokens_exponent, 'C0')
    if fit3 is not None:
        n, d = zip(*(fit3.law.optimal(c, k) for c in budgets), strict=True)
        left.plot(budgets, n, 'C1--', label='approach 3')
        right.plot(budgets, d, 'C1--')
    left.set(xscale='log', yscale='log', xlabel='FLOPs', ylabel='optimal parameters N*')
    right.set(xscale='log', yscale='log', xlabel='FLOPs', ylabel='optimal tokens D*')
    left.legend()
    _save(figure, path, fit3.warning if fit3 is not None else '')


def residuals(path, params, tokens, loss, fit3: Approach3) -> None:
    """log(loss) - log(fitted loss) per run, against parameters and tokens."""
    residual = np.log(loss) - np.log(fit3.law.loss(params, tokens))
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    left.scatter(params, residual)
    right.scatter(tokens, residual)
    for axes, label in ((left, 'parameters'), (right, 'tokens')):
        axes.axhline(0, color='k', linewidth=0.8)
        axes.set(xscale='log', xlabel=label)
    left.set(ylabel='log loss - log fitted loss')
    _save(figure, path, fit3.warning)


def all_figures(
    out: pathlib.Path, params, tokens, flops, loss, fit3, fit2, k: float, column: str = 'loss'
) -> list[pathlib.Path]:
    """Writes the figures the data allows (of `column`, a loss or an error rate); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if flops is not None:
        name = 'loss_vs_flops.png' if column in ('loss', 'eval_loss') else f'{column}_vs_flops.png'
        loss_against_flops(out / name, params, flops, loss, fit3, k, QUANTITIES.get(column, column))
        written.append(out / name)
    if fit2 is not None:
        isoflop_curves(out / 'isoflop.png', fit2)
        written.append(out / 'isoflop.png')
    if fit2 is not None or fit3 is not None:
        reach = (
            (flops.min(), flops.max())
            if flops is not None
            else (6 * (params * tokens).min(), 6 * (params * tokens).max())
        )
        optimal_allocation(out / 'optimal_allocation.png', fit2, fit3, reach, k)
        written.append(out / 'optimal_allocation.png')
    if fit3 is not None:
        residuals(out / 'residuals.png', params, tokens, loss, fit3)
        written.append(out / 'residuals.png')
    return written
