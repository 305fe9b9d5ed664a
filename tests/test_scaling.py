"""Scaling laws: the fits recover known laws, IsoFLOP minima, bad input; a tiny sweep runs, resumes, collects, plots."""

import csv
import dataclasses
import itertools
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import read_metrics

from trainer.errors import ConfigError
from trainer.scaling import fit

REPO = pathlib.Path(__file__).resolve().parents[1]
# Hoffmann et al. 2022's fitted law (approach 3), the shape of real LLM losses.
CHINCHILLA = fit.Law(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def synthetic(law: fit.Law, seed: int, noise: float = 0.005) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Losses of the law on a grid of 8 sizes x 6 token counts, with multiplicative noise."""
    rng = np.random.default_rng(seed)
    params = np.repeat(np.geomspace(1e7, 1e10, 8), 6)
    tokens = np.tile(np.geomspace(1e8, 1e11, 6), 8)
    return params, tokens, law.loss(params, tokens) * np.exp(rng.normal(0, noise, len(params)))


@pytest.fixture(scope='module')
def chinchilla_fits() -> list[fit.Approach3]:
    return [fit.approach3(*synthetic(CHINCHILLA, seed), bootstraps=100) for seed in (1, 0)]


def test_the_fit_recovers_a_known_law_within_its_standard_errors(chinchilla_fits):
    # One fixed noise draw. Over draws 0-6, E, alpha and beta fell within 3 standard errors in 6 of 7 (draw 0:
    # E 4.9 standard errors off, at a lower Huber loss than the true law's: the data, not the optimizer).
    found = chinchilla_fits[0]
    for name in ('E', 'alpha', 'beta'):
        error = abs(getattr(found.law, name) - getattr(CHINCHILLA, name))
        assert error < 3 * found.standard_errors[name], (name, getattr(found.law, name), found.standard_errors)
        assert found.standard_errors[name] > 0


def test_the_fit_is_stable_across_noise_seeds(chinchilla_fits):
    first, second = (f.law for f in chinchilla_fits)
    assert abs(first.alpha - second.alpha) < 0.05 and abs(first.beta - second.beta) < 0.05
    assert abs(first.E - second.E) < 0.1
    # The compute-optimal allocation they imply for 1e24 FLOPs agrees within a factor 2.
    assert 0.5 < first.optimal(1e24)[0] / second.optimal(1e24)[0] < 2


def test_the_compute_optimal_allocation_spends_the_budget_and_minimizes_the_loss():
    n, d = CHINCHILLA.optimal(1e22)
    assert 6 * n * d == pytest.approx(1e22)
    for factor in (0.8, 1.25):  # any other split of the same budget does worse
        assert CHINCHILLA.loss(n * factor, d / factor) > CHINCHILLA.loss(n, d)


def test_isoflop_minima_on_a_synthetic_parabola():
    params = np.geomspace(1e6, 1e8, 7)
    losses = 0.05 * (np.log(params) - np.log(2e7)) ** 2 + 2.0
    parabola, optimal = fit.isoflop_minimum(params, losses)
    assert optimal == pytest.approx(2e7, rel=1e-6) and parabola[0] == pytest.approx(0.05)
    with pytest.raises(ConfigError, match='opens downwards'):
        fit.isoflop_minimum(params, -losses)


def test_approach_2_recovers_the_optimal_size_exponent():
    rows = []
    for budget in (1e18, 1e19, 1e20):
        optimal = 0.1 * budget**0.5  # N*(C) = 0.1 C^0.5
        for params in optimal * np.array([0.25, 0.5, 1, 2, 4]):
            rows.append((params, budget, 0.03 * np.log(params / optimal) ** 2 + 3.0))
    params, flops, loss = map(np.array, zip(*rows, strict=True))
    found = fit.approach2(params, flops, loss, k=6.0)
    assert found.params_exponent == pytest.approx(0.5, abs=1e-6) and found.tokens_exponent == pytest.approx(0.5)
    assert found.params_coefficient == pytest.approx(0.1, rel=1e-4)


def test_bad_points_are_one_line_errors():
    params, tokens, loss = synthetic(CHINCHILLA, 0)
    with pytest.raises(ConfigError, match='loss must be positive, but row 3 has -1.0'):
        fit.approach3(params, tokens, np.where(np.arange(len(loss)) == 2, -1.0, loss))
    with pytest.raises(ConfigError, match='5 points cannot fit 5 parameters: give at least 6'):
        fit.approach3(params[:5], tokens[:5], loss[:5])


def scaling(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-m', 'trainer.scaling', *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


def test_a_csv_without_the_needed_columns_is_a_one_line_error(tmp_path):
    (tmp_path / 'runs.csv').write_text('params,tokens\n1e6,1e9\n')
    result = scaling('fit', f'--csv={tmp_path / "runs.csv"}', f'--out={tmp_path / "fit.json"}')
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f'error: --csv={tmp_path / "runs.csv"} lacks the column(s) loss: it needs params, tokens and loss.'
    )


SWEEP = [
    '--config=configs/small_lm.py',
    '--widths=32,64',
    '--flops=3e9,6e9',
    '--set=train.global_batch_size=16',
    '--set=data.seq_len=64',
    '--set=data.eval_files=',
    '--set=model.dtype=float32',
]


def test_a_tiny_sweep_runs_resumes_after_a_kill_collects_and_plots(tmp_path):
    sweep = tmp_path / 'sweep'
    process = subprocess.Popen(
        [sys.executable, '-m', 'trainer.scaling', 'sweep', f'--out={sweep}', *SWEEP],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the sweep and the run it started are killed together
    )
    deadline = time.monotonic() + 300
    while not list(sweep.glob('runs/*/status.json')):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-2000:]
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    first_done = [p.parent.name for p in sweep.glob('runs/*/status.json')]
    # Resumed with multiple-choice scoring: the points to come at their end, the one done before the kill too.
    questions = tmp_path / 'questions.jsonl'
    demo = (REPO / 'trainer' / 'sample_data' / 'eval' / 'tempest_next_line.jsonl').read_text().splitlines()
    questions.write_text('\n'.join(demo[:20]) + '\n')
    again = scaling('sweep', f'--out={sweep}', *SWEEP, f'--mc_files={questions}')
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert '4 done, 0 failed' in again.stdout
    assert not any(f': {name} (' in again.stdout for name in first_done), 'a finished point ran again'
    assert again.stdout.count('on 20 questions') == 4, again.stdout[-3000:]
    points = json.loads((sweep / 'sweep.json').read_text())['points']
    assert len(points) == 4 and all((sweep / 'runs' / p / 'metrics.jsonl').exists() for p in points)

    table = tmp_path / 'runs.csv'
    assert scaling('collect', f'--sweep={sweep}', f'--out={table}').returncode == 0
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 4 and {r['state'] for r in rows} == {'done'}
    assert all(float(r['flops']) > 0 and float(r['loss']) > 0 for r in rows)
    for row in rows:
        scores = json.loads((sweep / 'runs' / row['name'] / 'multiple_choice.json').read_text())
        assert float(row['acc_norm']) == scores['acc_norm'] and scores['questions'] == 20
        assert float(row['acc_error']) == pytest.approx(1 - scores['acc']) and float(row['acc_stderr']) > 0
    drawn = scaling('plot', f'--csv={table}', f'--out={tmp_path / "plots"}', '--loss_column=acc_norm_error')
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    assert (tmp_path / 'plots' / 'acc_norm_error_vs_flops.png').stat().st_size > 10_000
    fitted = scaling('fit', f'--csv={table}', f'--out={tmp_path / "fit.json"}')
    assert fitted.returncode == 2  # four runs cannot fit the law's five parameters, said in one line
    assert fitted.stderr.strip() == 'error: 4 points cannot fit 5 parameters: give at least 6.'
    plotted = scaling('plot', f'--csv={table}', f'--out={tmp_path / "plots"}')
    assert plotted.returncode == 0, plotted.stderr[-2000:]
    assert (tmp_path / 'plots' / 'loss_vs_flops.png').stat().st_size > 10_000


def test_fit_and_plot_a_csv_of_isoflop_runs(tmp_path):
    """What a user does with published numbers: a CSV in, the law, the allocation and the figures out."""
    rng = np.random.default_rng(0)
    with open(tmp_path / 'published.csv', 'w') as f:
        f.write('params,tokens,flops,loss\n')
        for flops in (1e18, 1e19, 1e20):
            for params in np.geomspace(2e7, 2e9, 6) * (flops / 1e19) ** 0.5:
                tokens = flops / (6 * params)
                loss = CHINCHILLA.loss(params, tokens) * np.exp(rng.normal(0, 0.003))
                f.write(f'{params},{tokens},{flops},{loss}\n')
    fitted = scaling('fit', f'--csv={tmp_path / "published.csv"}', f'--out={tmp_path / "fit.json"}', '--budget=1e20')
    assert fitted.returncode == 0, fitted.stderr[-2000:]
    result = json.loads((tmp_path / 'fit.json').read_text())
    assert abs(result['approach3']['alpha'] - CHINCHILLA.alpha) < 0.1 and 'approach2' in result
    assert len(result['approach2']['curves']) == 3
    expected_n = CHINCHILLA.optimal(1e20)[0]
    assert 0.5 < result['budget']['params'] / expected_n < 2, (result['budget'], expected_n)
    plotted = scaling(
        'plot', f'--csv={tmp_path / "published.csv"}', f'--fit={tmp_path / "fit.json"}', f'--out={tmp_path}'
    )
    assert plotted.returncode == 0, plotted.stderr[-2000:]
    figures = {p.name for p in tmp_path.glob('*.png')}
    assert figures == {'loss_vs_flops.png', 'isoflop.png', 'optimal_allocation.png', 'residuals.png'}


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path):
    failing = [arg for arg in SWEEP if 'widths' not in arg] + ['--widths=32', '--set=train.global_batch_size=7']
    result = scaling('sweep', f'--out={tmp_path}', *failing)
    assert result.returncode == 1 and '0 done, 2 failed' in result.stdout, result.stdout[-2000:]
    statuses = [json.loads(p.read_text()) for p in tmp_path.glob('runs/*/status.json')]
    assert len(statuses) == 2 and all(s['state'] == 'failed' and s['exit_code'] == 2 for s in statuses)
    assert all('global_batch_size=7' in s['error'] for s in statuses)


def test_a_sweep_emits_commands_and_a_slurm_array(tmp_path):
    result = scaling('sweep', f'--out={tmp_path}', *SWEEP, '--emit=slurm')
    assert result.returncode == 0, result.stderr[-2000:]
    lines = (tmp_path / 'commands.txt').read_text().splitlines()
    assert len(lines) == 4 and all(' -m trainer --config configs/small_lm.py --workdir ' in line for line in lines)
    script = (tmp_path / 'sweep.sbatch').read_text()
    assert '#SBATCH --array=0-3' in script and 'SLURM_ARRAY_TASK_ID' in script
    assert not list(tmp_path.glob('runs/*/metrics.jsonl')), 'emitting runs nothing'


def start_sweep(folder: pathlib.Path, *args: str) -> subprocess.Popen:
    """A sweep in a process group of its own, as a terminal's foreground job."""
    return subprocess.Popen(
        [sys.executable, '-m', 'trainer.scaling', 'sweep', f'--out={folder}', *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_step(folder: pathlib.Path, process: subprocess.Popen, step: int) -> str:
    """Waits until the sweep's first point has logged `step`; returns the point's name."""
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-2000:]
        if (folder / 'sweep.json').exists():
            point = json.loads((folder / 'sweep.json').read_text())['points'][0]
            log = folder / 'runs' / point / 'train.log'
            if log.exists() and f'step {step}/' in log.read_text():
                return point
        time.sleep(0.05)


def test_ctrl_c_stops_a_sweep_after_its_point_saves_and_the_same_command_resumes_it(tmp_path):
    """Ctrl-C (SIGINT to the sweep's process group, as a terminal sends it) reaches the running point once: it
    saves, the sweep exits 4 with one line on how to go on; run again, the point resumes from its save."""
    args = [arg for arg in SWEEP if not arg.startswith(('--widths', '--flops'))] + ['--widths=64', '--flops=2e11']
    sweep = tmp_path / 'sweep'
    process = start_sweep(sweep, *args)
    point = wait_for_step(sweep, process, 25)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 4, stderr[-3000:]
    assert 'Traceback' not in stderr + stdout
    assert stderr.strip().splitlines()[-1] == (
        'stopped: 0 of 1 points done, the running one saved; run the same command to resume (finished points are '
        'skipped, the stopped one resumes from its checkpoint).'
    )
    status = json.loads((sweep / 'runs' / point / 'status.json').read_text())
    saved = int(status['message'].split('saved step ')[1].split()[0])
    assert status['state'] == 'stopped' and (sweep / 'runs' / point / 'checkpoints' / str(saved)).is_dir()
    assert 'point 1/1 ' in stdout and '| sweep: 0/1 points, ' in stdout and '% of FLOPs, ETA ' in stdout

    again = scaling('sweep', f'--out={sweep}', *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f'resumed from step {saved} ' in again.stdout and '1 done, 0 failed' in again.stdout
    steps = [line['step'] for line in read_metrics(sweep / 'runs' / point) if 'loss' in line]
    assert steps == sorted(set(steps)), 'a step logged twice'

    # A second Ctrl-C quits at once, the point with it.
    quick = start_sweep(tmp_path / 'quick', *args)
    wait_for_step(tmp_path / 'quick', quick, 25)
    os.killpg(quick.pid, signal.SIGINT)
    time.sleep(0.2)
    os.killpg(quick.pid, signal.SIGINT)
    quick.communicate(timeout=30)
    assert quick.returncode == -signal.SIGINT
    deadline = time.monotonic() + 10  # the point got its second SIGINT too: the kernel ends it
    while subprocess.run(['pgrep', '-f', '--', f'--workdir {tmp_path / "quick"}'], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, 'the point outlived a second Ctrl-C'
        time.sleep(0.1)


def test_a_fit_its_errors_do_not_support_is_refused_for_any_loss_column(tmp_path):
    """Six tiny CPU runs (docs/scaling/runs.csv's first) once gave standard errors of 1e99 and a confident
    compute-optimal size. Now: one line saying what would pin the law down, whichever loss column is fitted."""
    lines = (REPO / 'docs' / 'scaling' / 'runs.csv').read_text().splitlines()
    (tmp_path / 'six.csv').write_text('\n'.join(lines[:7]) + '\n')
    for csv_file, column in ((tmp_path / 'six.csv', 'loss'), (tmp_path / 'six.csv', 'eval_loss'), (None, 'loss')):
        csv_file = csv_file or REPO / 'docs' / 'scaling' / 'runs.csv'  # all 18 runs' training loss too
        result = scaling(
            'fit', f'--csv={csv_file}', f'--out={tmp_path / "fit.json"}', f'--loss_column={column}', '--budget=1e15'
        )
        assert result.returncode == 2, result.stdout[-2000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith('error: the fit ') and 'add model sizes' in last and 'budgets' in last, last
        assert 'the runs span ' in last and 'compute-optimal' not in result.stdout
        assert not (tmp_path / 'fit.json').exists()


def test_a_weak_fit_is_warned_and_implausible_exponents_refused():
    params, tokens = np.array([1e6, 1e7]), np.array([1e8, 1e9])
    law = CHINCHILLA
    sound = {'E': 0.05, 'alpha': 0.02, 'beta': 0.02, 'A': 1e9, 'B': 1e9}  # A and B are not judged alone
    assert fit.judge(law, sound, params, tokens) == ''
    weak = fit.judge(law, sound | {'beta': 0.2}, params, tokens)
    assert weak.startswith('weak fit: standard errors above half the estimate for beta')
    with pytest.raises(ConfigError, match=r'the fit does not pin the law down: the standard errors of alpha exceed'):
        fit.judge(law, sound | {'alpha': 0.5}, params, tokens)
    with pytest.raises(ConfigError, match=r'the fit is no law: alpha outside \[0.05, 1.0\]'):
        fit.judge(dataclasses.replace(law, alpha=3.0), sound, params, tokens)
    with pytest.raises(ConfigError, match='exceed'):
        fit.judge(law, sound | {'E': float('nan')}, params, tokens)


def test_every_figure_has_readable_ticks_and_a_weak_fit_says_so(tmp_path, monkeypatch):
    """Tokens within one decade once labelled every minor tick of residuals.png, on top of each other."""
    from matplotlib import pyplot

    from trainer.scaling import plot

    figures = []
    monkeypatch.setattr(pyplot, 'close', figures.append)
    params = np.repeat(np.geomspace(2e5, 3e6, 6), 3)
    tokens = np.tile([2.1e6, 3.5e6, 7.9e6], 6)
    loss = CHINCHILLA.loss(params, tokens)
    weak = fit.Approach3(CHINCHILLA, {}, 0.0, len(loss), 0, 'weak fit: standard errors above half the estimate')
    plot.all_figures(tmp_path, params, tokens, 6 * params * tokens, loss, weak, None, 6.0)
    assert len(figures) == 3
    for figure in figures:
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        for axes in figure.axes:
            for axis in (axes.xaxis, axes.yaxis):
                boxes = [
                    label.get_window_extent(renderer)
                    for label in axis.get_ticklabels(which='both')
                    if label.get_visible() and label.get_text()
                ]
                overlapping = [(a, b) for a, b in itertools.combinations(boxes, 2) if a.overlaps(b)]
                assert not overlapping, [label.get_text() for label in axis.get_ticklabels(which='both')]
        assert any('weak fit' in text.get_text() for text in figure.texts)


@pytest.mark.parametrize(
    'low, high, labels',
    [
        (1.0003e12, 1.00035e12, ['500G', '1T', '2T']),  # a 2-point sweep at one budget: once '1.0003T 1.00031T ...'
        (1.8e11, 3.2e11, ['200G', '300G']),  # within a decade
        (3e12, 2e13, ['5T', '10T', '20T']),
        (3e-4, 1e-1, ['300µ', '1m', '3m', '10m', '30m', '100m']),  # learning rates
        (1e9, 1e16, ['1G', '100G', '10T', '1P']),  # seven decades: once no label at all
    ],
)
def test_a_log_axis_reads_a_few_short_round_values_for_any_spread(low, high, labels):
    from matplotlib import pyplot

    from trainer.scaling import plot

    figure, axes = pyplot.subplots()
    axes.scatter(np.geomspace(low, high, 4), [1, 2, 3, 4])
    axes.set_xscale('log')
    figure.tight_layout()
    plot.readable(figure)
    figure.canvas.draw()
    view_low, view_high = axes.get_xlim()
    shown = [t.get_text() for t in axes.xaxis.get_majorticklabels() if view_low <= t.get_position()[0] <= view_high]
    pyplot.close(figure)
    assert shown == labels
    assert view_low <= low and high <= view_high  # every point stays in view


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_sweep_eta_is_unknown_until_measured_then_counts_training_and_each_points_overhead():
    """Two points of 1e12 FLOPs, trained at 1e10 FLOP/s after 20 s of start-up and compilation each: 2 x 120 s."""
    from trainer.scaling.eta import SweepEta

    clock = FakeClock()
    eta = SweepEta(clock)
    eta.start_point()
    clock.now += 20 + 5  # start-up, then the first report after 5 s of steps (5e10 FLOPs)
    eta.report(5e10)
    # One report measures no rate: unknown, not hours (the first point's compilation once read 'ETA 7:50:32').
    assert eta.remaining(2e12 - 5e10, points_to_start=1) is None
    clock.now += 10
    eta.report(15e10)
    assert eta.rate() == pytest.approx(1e10)
    assert eta.overhead() == pytest.approx(20)  # the running point's start-up, before any point finished
    assert eta.remaining(2e12 - 15e10, points_to_start=1) == pytest.approx(185 + 20)
    clock.now += 85  # its last steps
    eta.report(1e12)
    clock.now += 3  # its final eval and save
    eta.end_point()
    assert eta.overhead() == pytest.approx(23)  # what the finished point took beyond its training
    eta.start_point()  # the second point: the rate and overhead measured so far stand for it
    assert eta.remaining(1e12, points_to_start=0) == pytest.approx(100)
    assert SweepEta(clock).remaining(1e12, points_to_start=2) is None


def test_a_resumed_points_time_says_which_is_this_runs_and_which_is_in_all():
    from trainer.scaling import sweep

    assert sweep.done_line(33.4, 0.0, 'done: step 9') == 'done in 33s: done: step 9'
    line = sweep.done_line(35.2, 14.1, 'done: step 292')
    assert line == 'done in 35s this run, 49s in all with its earlier runs: done: step 292'
