"""Fitting scaling laws to (parameters, tokens, loss) points: Chinchilla's approaches 3 and 2.

Approach 3 (Hoffmann et al. 2022, as refitted by Besiroglu et al. 2024): L(N, D) = E + A / N^alpha +
B / D^beta, fitted on log loss, log L_hat = LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b,
E = e^e, minimizing the Huber loss (delta 1e-3) of the residuals with L-BFGS from a grid of 4,500 starts.
The starts run at once (jax.vmap over optax's L-BFGS), so a fit takes seconds on a CPU; standard errors
come from refitting bootstrap resamples of the points, also at once.

Approach 2: for each compute budget, a parabola of loss against log N through the runs of that budget
(an IsoFLOP curve); its minimum is N*(C); then the power laws N*(C) and D*(C) = C / (k N*) through the
minima. k = 6 by the convention C = 6 N D, or the data's own FLOPs / (N D) when they come with FLOPs.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from trainer.errors import ConfigError

HUBER_DELTA = 1e-3
# Hoffmann et al.'s grid: 5 x 5 x 5 x 6 x 6 = 4,500 starts over (alpha, beta, e, a, b).
_STARTS = np.array(
    list(
        itertools.product(
            [0.0, 0.5, 1.0, 1.5, 2.0], [0.0, 0.5, 1.0, 1.5, 2.0], [-1.0, -0.5, 0.0, 0.5, 1.0], *[range(0, 30, 5)] * 2
        )
    ),
    dtype=np.float64,
)[:, [3, 4, 2, 0, 1]]  # as (a, b, e, alpha, beta)
_ITERATIONS = 100  # from every start: enough to reach the optimum on Chinchilla-shaped data (checked against scipy)
_NAMES = ('A', 'B', 'E', 'alpha', 'beta')


@dataclasses.dataclass(frozen=True)
class Law:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, params: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        return self.E + self.A / params**self.alpha + self.B / tokens**self.beta

    def optimal(self, flops: float, k: float = 6.0) -> tuple[float, float]:
        """The (N, D) of least loss under the budget flops = k N D."""
        # In logs: A and B can be far from 1 (e^30 is a start of the grid); a degenerate law gives 0 or inf.
        with np.errstate(divide='ignore', over='ignore', invalid='ignore'):
            log_g = (np.log(self.alpha * self.A) - np.log(self.beta * self.B)) / (self.alpha + self.beta)
            log_n = log_g + self.beta / (self.alpha + self.beta) * np.log(flops / k)
            return float(np.exp(log_n)), float(np.exp(np.log(flops / k) - log_n))


# Exponents outside this range are no language-model law (Chinchilla's and its replications' fits give 0.28 to
# 0.37, none near 1): a fit that lands there has followed noise, whatever its objective.
PLAUSIBLE_EXPONENTS = (0.05, 1.0)
# A standard error above this share of its estimate makes a fit weak (warned); above the estimate, refused.
WEAK_SHARE = 0.5
_CHECKED = ('E', 'alpha', 'beta')  # A and B span orders of magnitude along with the exponents: not judged alone


@dataclasses.dataclass(frozen=True)
class Approach3:
    law: Law
    standard_errors: dict[str, float]  # bootstrap standard errors of A, B, E, alpha, beta
    objective: float  # the Huber loss at the optimum
    points: int
    bootstraps: int
    warning: str = ''  # what makes the fit weak, for the console and the figures; '' for a sound one


def _spans(params: np.ndarray, tokens: np.ndarray) -> str:
    return (
        f'the runs span {params.max() / params.min():.1f}x in parameters ({len(np.unique(params))} sizes) and '
        f'{tokens.max() / tokens.min():.1f}x in tokens'
    )


def judge(law: Law, errors: dict[str, float], params: np.ndarray, tokens: np.ndarray) -> str:
    """Refuses (a ConfigError) a fit whose standard errors exceed its estimates or whose exponents leave
    PLAUSIBLE_EXPONENTS; returns a warning for a weak one ('' for a sound one)."""
    low, high = PLAUSIBLE_EXPONENTS
    shown = ', '.join(f'{name} {getattr(law, name):.3g} ± {errors[name]:.2g}' for name in _CHECKED)
    fix = 'add model sizes (a wider range of parameters) and budgets (more tokens per size), then fit again'
    outside = [name for name in ('alpha', 'beta') if not low <= getattr(law, name) <= high]
    if outside:
        raise ConfigError(
            f'the fit is no law: {" and ".join(outside)} outside [{low}, {high}] ({shown}); {_spans(params, tokens)}: '
            f'{fix}.'
        )
    loose = [name for name in _CHECKED if not errors[name] <= abs(getattr(law, name))]  # NaN is loose too
    if loose:
        raise ConfigError(
            f'the fit does not pin the law down: the standard errors of {", ".join(loose)} exceed the estimates '
            f'({shown}); {_spans(params, tokens)}: {fix}.'
        )
    weak = [name for name in _CHECKED if errors[name] > WEAK_SHARE * abs(getattr(law, name))]
    if weak:
        return f'weak fit: standard errors above half the estimate for {", ".join(weak)} ({shown})'
    return ''


def _objective(theta: jax.Array, log_n: jax.Array, log_d: jax.Array, log_l: jax.Array, weight: jax.Array):
    a, b, e, alpha, beta = theta
    predicted = jax.nn.logsumexp(jnp.stack([a - alpha * log_n, b - beta * log_d, jnp.broadcast_to(e, log_n.shape)]), 0)
    return jnp.sum(weight * optax.losses.huber_loss(predicted, log_l, delta=HUBER_DELTA))


def _minimize(theta: jax.Array, *data) -> tuple[jax.Array, jax.Array]:
    """L-BFGS from one start, a fixed number of iterations (so that starts can be vmapped)."""
    # A backtracking line search: under vmap every start waits for the slowest, and zoom's longer searches
    # made the 4,500 starts three times slower for the same optimum.
    solver = optax.lbfgs(linesearch=optax.scale_by_backtracking_linesearch(max_backtracking_steps=15, store_grad=True))
    value_and_grad = optax.value_and_grad_from_state(lambda t: _objective(t, *data))

    def step(carry, _):
        theta, state = carry
        value, grad = value_and_grad(theta, state=state)
        updates, state = solver.update(
            grad, state, theta, value=value, grad=grad, value_fn=lambda t: _objective(t, *data)
        )
        return (optax.apply_updates(theta, updates), state), None

    (theta, _), _ = jax.lax.scan(step, (theta, solver.init(theta)), None, length=_ITERATIONS)
    return theta, _objective(theta, *data)


@jax.jit
def _fit_from_starts(starts, log_n, log_d, log_l, weight):
    return jax.vmap(_minimize, in_axes=(0, None, None, None, None))(starts, log_n, log_d, log_l, weight)


@jax.jit
def _refit(theta, log_n, log_d, log_l, weights):
    """Refits from one start under many weightings of the points (bootstrap resamples)."""
    return jax.vmap(_minimize, in_axes=(None, None, None, None, 0))(theta, log_n, log_d, log_l, weights)[0]


def _law(theta: np.ndarray) -> Law:
    with np.errstate(over='ignore'):  # a resample that ran away gives inf, which the callers leave out
        a, b, e = np.exp(np.asarray(theta[:3], np.float64))
    return Law(E=float(e), A=float(a), B=float(b), alpha=float(theta[3]), beta=float(theta[4]))


def check_points(params: np.ndarray, tokens: np.ndarray, loss: np.ndarray, minimum: int) -> None:
    """Positive, finite values, and enough of them."""
    for name, values in (('params', params), ('tokens', tokens), ('loss', loss)):
        bad = np.flatnonzero(~np.isfinite(values) | (values <= 0))
        if len(bad):
            raise ConfigError(f'{name} must be positive, but row {bad[0] + 1} has {values[bad[0]]}.')
    if len(loss) < minimum:
        raise ConfigError(f'{len(loss)} points cannot fit {minimum - 1} parameters: give at least {minimum}.')


def approach3(
    params: np.ndarray, tokens: np.ndarray, loss: np.ndarray, bootstraps: int = 200, seed: int = 0, judged=True
) -> Approach3:
    """Fits L(N, D) with the Huber loss from every start; standard errors from `bootstraps` resamples.

    `judged`: a fit its standard errors or exponents do not support is refused, a weak one warned (`judge`).
    """
    params, tokens, loss = (np.asarray(x, np.float64) for x in (params, tokens, loss))
    check_points(params, tokens, loss, minimum=6)
    with jax.enable_x64(True):
        data = (jnp.log(params), jnp.log(tokens), jnp.log(loss))
        weight = jnp.ones(len(loss))
        thetas, values = _fit_from_starts(jnp.asarray(_STARTS), *data, weight)
        thetas, values = np.asarray(thetas), np.asarray(values)
        finite = np.isfinite(values) & np.all(np.isfinite(thetas), axis=1)
        if not finite.any():
            raise ConfigError('the fit did not converge from any start: check the points (are losses in nats?).')
        best = int(np.argmin(np.where(finite, values, np.inf)))
        law = _law(thetas[best])
        typical = float(np.median(params * tokens)) * 6
        settled = law.alpha > 0 and law.beta > 0 and np.all(np.isfinite(dataclasses.astuple(law)))
        if not (settled and 0 < law.optimal(typical)[0] < np.inf and 0 < law.optimal(typical)[1] < np.inf):
            raise ConfigError(
                f'the fit does not pin the law down (alpha={law.alpha:.3g}, beta={law.beta:.3g}): the runs span too '
                'little of model sizes and token counts; add sizes or budgets.'
            )
        rng = np.random.default_rng(seed)
        counts = np.stack(
            [np.bincount(rng.integers(0, len(loss), len(loss)), minlength=len(loss)) for _ in range(bootstraps)]
        )
        resampled = np.asarray(_refit(jnp.asarray(thetas[best]), *data, jnp.asarray(counts, jnp.float64)))
    laws = [law_ for law_ in map(_law, resampled) if np.all(np.isfinite(dataclasses.astuple(law_)))]
    errors = {name: float(np.std([getattr(law_, name) for law_ in laws], ddof=1)) for name in _NAMES}
    warning = judge(law, errors, params, tokens) if judged else ''
    return Approach3(
        law=law,
        standard_errors=errors,
        objective=float(values[best]),
        points=len(loss),
        bootstraps=len(laws),
        warning=warning,
    )


@dataclasses.dataclass(frozen=True)
class IsoFlop:
    """One compute budget's runs and the minimum of the parabola through them."""

    flops: float
    params: list[float]
    losses: list[float]
    parabola: tuple[float, float, float]  # loss = p0 (log N)^2 + p1 log N + p2
    optimal_params: float


@dataclasses.dataclass(frozen=True)
class Approach2:
    curves: list[IsoFlop]
    params_exponent: float  # N*(C) = params_coefficient * C^params_exponent
    params_coefficient: float
    tokens_exponent: float  # D*(C) = C / (k N*(C))
    tokens_coefficient: float


def isoflop_minimum(params: np.ndarray, losses: np.ndarray) -> tuple[tuple[float, float, float], float]:
    """The parabola of loss against log N through the points, and the N at its minimum."""
    p = np.polyfit(np.log(params), losses, 2)
    if p[0] <= 0:
        raise ConfigError('an IsoFLOP curve opens downwards: its runs do not bracket a minimum; add sizes.')
    return (float(p[0]), float(p[1]), float(p[2])), float(np.exp(-p[1] / (2 * p[0])))


def group_budgets(flops: np.ndarray) -> np.ndarray:
    """A budget label per run: FLOPs within 10% of each other share one (their geometric mean)."""
    order = np.argsort(flops)
    labels = np.empty(len(flops))
    start = 0
    for i in range(1, len(order) + 1):
        if i == len(order) or flops[order[i]] > 1.1 * flops[order[start]]:
            members = order[start:i]
            labels[members] = np.exp(np.mean(np.log(flops[members])))
            start = i
    return labels


def approach2(params: np.ndarray, flops: np.ndarray, loss: np.ndarray, k: float, budgets=None) -> Approach2:
    """IsoFLOP parabolas per budget (runs grouped by `budgets`, else by FLOPs within 10%), then N*(C), D*(C)."""
    labels = np.asarray(budgets, np.float64) if budgets is not None else group_budgets(np.asarray(flops, np.float64))
    curves = []
    for budget in sorted(set(labels)):
        members = labels == budget
        if len(set(params[members])) < 3:
            continue
        parabola, optimal = isoflop_minimum(params[members], loss[members])
        curves.append(IsoFlop(float(budget), params[members].tolist(), loss[members].tolist(), parabola, optimal))
    if len(curves) < 2:
        raise ConfigError('IsoFLOP fits need at least 2 budgets with 3 or more model sizes each.')
    log_c = np.log([c.flops for c in curves])
    slope, intercept = np.polyfit(log_c, np.log([c.optimal_params for c in curves]), 1)
    return Approach2(
        curves=curves,
        params_exponent=float(slope),
        params_coefficient=float(np.exp(intercept)),
        tokens_exponent=float(1 - slope),
        tokens_coefficient=float(1 / (k * np.exp(intercept))),
    )


def fit_and_report(
    columns: dict[str, np.ndarray], k: float, bootstraps: int, budget: float | None, echo=print
) -> dict[str, Any]:
    """The `fit` verb: approach 3 (and 2 where the runs have FLOP budgets), the compute-optimal allocation and,
    for `budget`, the size and tokens to train; said with `echo`, returned as fit.json's content."""
    fit3 = approach3(columns['params'], columns['tokens'], columns['loss'], bootstraps=bootstraps)
    law = fit3.law
    result = {
        'approach3': dataclasses.asdict(law) | {'standard_errors': fit3.standard_errors, 'objective': fit3.objective},
        'warning': fit3.warning,
        'points': fit3.points,
        'flops_per_param_token': k,
        'compute_optimal': {  # N*(C) = params_coefficient * C^params_exponent, D*(C) = C / (k N*(C))
            'params_exponent': law.beta / (law.alpha + law.beta),
            'tokens_exponent': law.alpha / (law.alpha + law.beta),
            'params_coefficient': law.optimal(1.0, k)[0],
            'tokens_coefficient': law.optimal(1.0, k)[1],
        },
    }
    echo(
        f'L(N, D) = {law.E:.3f} + {law.A:.4g} / N^{law.alpha:.3f} + {law.B:.4g} / D^{law.beta:.3f}  '
        f'(standard errors: alpha {fit3.standard_errors["alpha"]:.3f}, beta {fit3.standard_errors["beta"]:.3f}, '
        f'E {fit3.standard_errors["E"]:.3f}; {fit3.points} points)'
    )
    if fit3.warning:
        echo(f'warning: {fit3.warning}; its predictions are loose (fit.json and the figures say so too).')
    echo(
        f'compute-optimal: N* ~ C^{result["compute_optimal"]["params_exponent"]:.3f}, '
        f'D* ~ C^{result["compute_optimal"]["tokens_exponent"]:.3f} (C = {k:.2f} N D)'
    )
    if 'flops' in columns:
        try:
            fit2 = approach2(columns['params'], columns['flops'], columns['loss'], k, columns.get('budget'))
            result['approach2'] = dataclasses.asdict(fit2)
            echo(f'IsoFLOP (approach 2): N* ~ C^{fit2.params_exponent:.3f} over {len(fit2.curves)} budgets')
        except ConfigError as error:
            echo(f'IsoFLOP (approach 2) left out: {error}')
    if budget:
        n, d = law.optimal(budget, k)
        result['budget'] = {'flops': budget, 'params': n, 'tokens': d, 'loss': float(law.loss(n, d))}
        echo(f'for {budget:.2e} FLOPs: train {n:,.0f} parameters on {d:,.0f} tokens (loss {law.loss(n, d):.3f})')
    return result


def read_fit(path: str) -> tuple[Approach3, Approach2 | None]:
    """fit.json's fits, as `plot` draws them."""
    saved = json.loads(pathlib.Path(path).read_text())
    law = Law(**{name: saved['approach3'][name] for name in ('E', 'A', 'B', 'alpha', 'beta')})
    fit3 = Approach3(
        law,
        saved['approach3']['standard_errors'],
        saved['approach3']['objective'],
        saved['points'],
        0,
        saved.get('warning', ''),
    )
    fit2 = None
    if 'approach2' in saved:
        curves = [IsoFlop(**{**c, 'parabola': tuple(c['parabola'])}) for c in saved['approach2']['curves']]
        fit2 = Approach2(**{**saved['approach2'], 'curves': curves})
    return fit3, fit2
