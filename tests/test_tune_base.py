"""tune_base: the search space, the draws, successive halving's rungs, the tuned config file, a real search."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

from trainer.errors import ConfigError
from trainer.scaling import sweep, tune_base
from trainer.scaling.inputs import load_config

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / 'configs' / 'small_lm.py')


def test_the_search_space_is_parsed_and_bad_entries_are_one_line_errors():
    base = load_config(CONFIG, [])
    knobs = tune_base.parse_space(['train.learning_rate=1e-3:3e-2', 'train.weight_decay=0|0.1'], base)
    assert knobs == [
        tune_base.Knob('train.learning_rate', 1e-3, 3e-2),
        tune_base.Knob('train.weight_decay', choices=(0.0, 0.1)),
    ]
    for entry, message in [
        ('train.lr=1e-3:1e-2', 'give a config field and its range'),
        ('train.learning_rate', 'give a config field and its range'),
        ('model.family=1|2', 'model.family is not a number'),
        ('train.learning_rate=1e-2:1e-3', 'a range lo:hi needs 0 < lo < hi'),
        ('train.learning_rate=a:b', "'a:b' is not lo:hi or a|b|c of numbers"),
    ]:
        with pytest.raises(ConfigError, match=message.replace('|', r'\|')):
            tune_base.parse_space([entry], base)
    with pytest.raises(ConfigError, match='names a field twice'):
        tune_base.parse_space(['train.learning_rate=1e-3:1e-2', 'train.learning_rate=1e-3:1e-2'], base)


def test_the_draws_are_seeded_and_inside_the_space():
    knobs = [tune_base.Knob('train.learning_rate', 1e-3, 3e-2), tune_base.Knob('train.weight_decay', choices=(0, 0.1))]
    drawn = tune_base.draw(knobs, 200, seed=3)
    assert drawn == tune_base.draw(knobs, 200, seed=3) and drawn != tune_base.draw(knobs, 200, seed=4)
    rates = [d['train.learning_rate'] for d in drawn]
    assert 1e-3 <= min(rates) < 2e-3 and 1.5e-2 < max(rates) <= 3e-2  # log-uniform: both ends reached
    assert sum(r < math.sqrt(3e-5) for r in rates) == pytest.approx(100, abs=25)  # half below the geometric mean
    assert {d['train.weight_decay'] for d in drawn} == {0.0, 0.1}


def test_a_winner_at_a_ranges_edge_is_warned_and_the_default_ranges_hold_the_first_searchs_winner():
    knobs = [tune_base.Knob('model.init_std', 0.005, 0.08), tune_base.Knob('train.weight_decay', choices=(0, 0.1))]
    (top,) = tune_base.edge_warnings(knobs, {'model.init_std': 0.0794, 'train.weight_decay': 0.1})
    assert top.startswith("warning: the winner's model.init_std=0.0794 lies at the top of its range 0.005:0.08")
    assert '--search_space model.init_std=LO:HI' in top
    (bottom,) = tune_base.edge_warnings(knobs, {'model.init_std': 0.0055, 'train.weight_decay': 0.0})
    assert 'at the bottom of its range' in bottom
    # 5% of the range's log width from either end is the edge; the middle and the choices are not warned
    assert tune_base.edge_warnings(knobs, {'model.init_std': 0.02, 'train.weight_decay': 0.0}) == []
    assert tune_base.edge_warnings(knobs, {'model.init_std': 0.005 * 16**0.94, 'train.weight_decay': 0.0}) == []
    assert len(tune_base.edge_warnings(knobs, {'model.init_std': 0.005 * 16**0.96, 'train.weight_decay': 0.0})) == 1
    # The first search (docs/scaling.md) found init_std 0.0794 at the top of 0.005:0.08: the default reaches beyond.
    default = tune_base.parse_space(tune_base.DEFAULT_SPACE, load_config(CONFIG, []))
    first_winner = {
        'train.learning_rate': 0.00904,
        'model.mup_output_multiplier': 2.11,
        'model.mup_input_multiplier': 1.89,
        'model.init_std': 0.0794,
        'train.weight_decay': 0.1,
    }
    assert tune_base.edge_warnings(default, first_winner) == []
    assert all(k.high / k.low >= 50 for k in default if k.is_log)


def test_successive_halving_keeps_a_third_on_three_times_the_tokens():
    assert tune_base.rung_plan(27, 'halving', 3, 3, 9e4) == [(27, 1e4), (9, 3e4), (3, 9e4)]
    assert tune_base.rung_plan(10, 'halving', 3, 2, 3e4) == [(10, 1e4), (4, 3e4)]
    assert tune_base.rung_plan(10, 'random', 3, 3, 3e4) == [(10, 3e4)]


def test_a_search_keeps_the_best_of_each_rung_and_writes_a_config_that_loads(tmp_path, monkeypatch):
    """The runs are faked (a loss that is least at lr 5e-3 and falls with tokens); the rungs' logic is real."""
    trained: dict[str, float] = {}

    def fake_run(folder, commands, points, echo=print, mc_files=''):
        for point in points:
            lr, tokens = point.overrides['train.learning_rate'], point.tokens
            trained[f'{folder.name}/{point.name}'] = math.log(lr / 5e-3) ** 2 + 1e4 / tokens
        return len(points), 0, False

    def fake_rows(folder, per_eval=False):
        names = json.loads((folder / 'sweep.json').read_text())['points']
        return [{'name': n, 'state': 'done', 'eval_loss': trained[f'{folder.name}/{n}']} for n in names]

    monkeypatch.setattr(tune_base.sweep, 'run', fake_run)
    monkeypatch.setattr(tune_base.sweep_collect, 'rows', fake_rows)
    settings = ['data.seq_len=64', 'train.global_batch_size=16', 'model.parametrization=mup', 'model.base_width=64']
    base = load_config(CONFIG, settings)
    knobs = tune_base.parse_space(['train.learning_rate=1e-4:1e-1', 'model.mup_output_multiplier=0.5:4'], base)
    found, stopped, failed = tune_base.search(
        tmp_path, CONFIG, base, [], knobs, width=64, shape=sweep.Shape(depth=2), trials=9, method='halving',
        eta=3, rungs=2, tokens=3 * 1024 * 10, seed=0, echo=lambda _: None,
    )  # fmt: skip
    assert not stopped and not failed
    first = sorted(found, key=lambda t: t.losses[0])
    assert [t.losses[1] is not None for t in first] == [True] * 3 + [False] * 6  # the best third goes on
    winner = tune_base.best(found)
    assert winner == min(first[:3], key=lambda t: t.losses[1])
    assert winner.losses[1] < winner.losses[0]  # more tokens, less loss
    # every rung is a sweep whose points carry the trial's settings
    point = json.loads((tmp_path / 'rung1' / 'runs' / f'{winner.name}_t30720' / 'point.json').read_text())
    assert point['overrides']['model.mup_output_multiplier'] == winner.setting['model.mup_output_multiplier']
    assert point['overrides']['model.d_model'] == 64 and point['overrides']['model.num_layers'] == 2

    chosen = {'model.scan_layers': False, 'model.base_width': 64, **winner.setting}
    out = tmp_path / 'elsewhere'
    out.mkdir()
    (out / 'tuned.py').write_text(tune_base.tuned_config_text(CONFIG, out, chosen, 'a test'))
    tuned = load_config(str(out / 'tuned.py'), [])
    assert tuned.model.scan_layers is False and tuned.model.base_width == 64
    assert tuned.train.learning_rate == winner.setting['train.learning_rate']


def test_a_stopped_rung_ends_the_search_for_the_same_command_to_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(tune_base.sweep, 'run', lambda folder, commands, points, echo=print: (0, 0, True))
    base = load_config(CONFIG, ['data.seq_len=64', 'train.global_batch_size=16'])
    knobs = tune_base.parse_space(['train.learning_rate=1e-4:1e-1'], base)
    found, stopped, _ = tune_base.search(
        tmp_path, CONFIG, base, [], knobs, width=64, shape=sweep.Shape(depth=2), trials=3, method='halving',
        eta=3, rungs=2, tokens=3 * 1024 * 10, seed=0, echo=lambda _: None,
    )  # fmt: skip
    assert stopped and all(t.losses == [None, None] for t in found)
    assert (tmp_path / 'rung0' / 'sweep.json').exists() and not (tmp_path / 'rung1').exists()


@pytest.mark.slow  # 50 s here: four real trainer runs; the rungs' logic is tested above without them
def test_a_real_tiny_search_runs_and_its_tuned_config_trains(tmp_path):
    result = subprocess.run(
        [
            sys.executable, '-m', 'trainer.scaling', 'tune_base', f'--config={CONFIG}', f'--out={tmp_path / "tune"}',
            '--width=32', '--depth=1', '--trials=3', '--rungs=2', '--tokens=2e4', '--set=data.seq_len=64',
            '--set=train.global_batch_size=16', '--set=train.eval_steps=2', '--set=model.dtype=float32',
        ],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / 'tune' / 'best.json').read_text())
    assert [r['trials'] for r in record['rungs']] == [3, 1]
    assert record['settings']['model.parametrization'] == 'mup' and record['settings']['model.base_width'] == 32
    assert (tmp_path / 'tune' / 'tune_base.png').stat().st_size > 10_000
    tuned = load_config(str(tmp_path / 'tune' / 'tuned.py'), [])
    assert tuned.train.learning_rate == record['best']['settings']['train.learning_rate']
    assert tuned.data.seq_len == 64 and tuned.model.d_model == 32
