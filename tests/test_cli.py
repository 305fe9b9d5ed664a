"""`python -m trainer` end to end: outputs on disk, a falling loss, one-line errors."""

import dataclasses
import json
import logging
import math
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import TINY_RUN_OVERRIDES, read_metrics
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = [
    *TINY_RUN_OVERRIDES,
    '--config.train.learning_rate=3e-3',
    '--config.train.eval_steps=2',
]


def run_trainer(*args: str) -> subprocess.CompletedProcess:
    """Runs the trainer on the 8 simulated devices that conftest put in the environment."""
    return subprocess.run(
        [sys.executable, '-m', 'trainer', *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope='module')
def short_run(tmp_path_factory) -> tuple[pathlib.Path, subprocess.CompletedProcess]:
    workdir = tmp_path_factory.mktemp('run')
    result = run_trainer(
        '--config',
        'configs/small_lm.py',
        '--workdir',
        str(workdir),
        *TINY,
        '--config.train.steps=60',
        '--config.train.log_every=10',
        '--config.train.eval_every=30',
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_run_writes_config_metrics_and_tensorboard(short_run):
    workdir, _ = short_run
    config = json.loads((workdir / 'config.json').read_text())
    assert config['train']['steps'] == 60 and config['model']['d_model'] == 64
    lines = read_metrics(workdir)
    train_lines = [line for line in lines if 'loss' in line]
    assert [line['step'] for line in train_lines] == [10, 20, 30, 40, 50, 60]
    for line in train_lines:
        for key in (
            'learning_rate',
            'grad_norm',
            'tokens_per_s',
            'tokens_per_s_per_device',
            'mfu',
            'step_time_s',
            'tokens_seen',
        ):
            assert line[key] > 0, (key, line)
        assert line['tokens_per_s_per_device'] == pytest.approx(line['tokens_per_s'] / 8)
    assert train_lines[-1]['tokens_seen'] == 60 * 16 * 64
    assert [line['step'] for line in lines if 'eval_loss' in line] == [30, 60]
    # Bytes: every counted target but EOS, so bits per byte is the loss in bits, a little more.
    for line in (line for line in lines if 'eval_loss' in line):
        assert line['eval_loss'] / math.log(2) <= line['eval_bits_per_byte'] < 1.1 * line['eval_loss'] / math.log(2)

    events = EventAccumulator(str(workdir / 'tensorboard'))
    events.Reload()
    assert {'loss', 'eval_loss', 'mfu', 'tokens_per_s_per_device'} <= set(events.Tags()['scalars'])
    assert [event.step for event in events.Scalars('loss')] == [10, 20, 30, 40, 50, 60]


def test_run_loss_falls(short_run):
    workdir, result = short_run
    lines = read_metrics(workdir)
    losses = [line['loss'] for line in lines if 'loss' in line]
    evals = [line['eval_loss'] for line in lines if 'eval_loss' in line]
    assert losses[-1] < losses[0] - 1.0, losses
    assert evals[-1] < evals[0], evals
    assert 'done: step 60' in result.stdout


def test_run_prints_devices_mesh_parameters_and_flops(short_run):
    _, result = short_run
    out = result.stdout
    assert 'devices: 8 x cpu' in out and 'mesh: data=1 fsdp=8 tensor=1 (8 devices)' in out
    assert 'parameters: ' in out and 'FLOPs per token: ' in out and 'MFU ' in out


def test_bad_override_is_one_line_and_exit_code_2(tmp_path):
    result = run_trainer('--config', 'configs/small_lm.py', '--workdir', str(tmp_path), '--config.model.num_heads=5')
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith('error: config.model.num_heads=5 does not divide')
    assert 'Traceback' not in result.stderr


def test_missing_data_file_is_one_line(tmp_path):
    result = run_trainer(
        '--config', 'configs/small_lm.py', '--workdir', str(tmp_path), '--config.data.train_files=/no/such/*.txt'
    )
    assert result.returncode == 2
    assert "error: config.data.train_files='/no/such/*.txt' matches no file" in result.stderr
    assert 'Traceback' not in result.stderr


def test_a_workdir_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / 'a_file').write_text('')
    result = run_trainer('--config', 'configs/small_lm.py', '--workdir', str(tmp_path / 'a_file' / 'run'))
    assert result.returncode == 2
    workdir = tmp_path / 'a_file' / 'run'
    last = result.stderr.strip().splitlines()[-1]
    assert last == f'error: cannot create --workdir {workdir}: Not a directory; give a folder you can write to.'
    assert 'Traceback' not in result.stderr


def test_unknown_config_key_is_rejected(tmp_path):
    result = run_trainer('--config', 'configs/small_lm.py', '--workdir', str(tmp_path), '--config.train.stpes=5')
    assert result.returncode != 0
    assert 'stpes' in result.stderr and 'Traceback' not in result.stderr


def test_nan_loss_stops_the_run_naming_the_step_and_is_never_saved(tmp_path):
    result = run_trainer(
        '--config',
        'configs/small_lm.py',
        '--workdir',
        str(tmp_path),
        *TINY,
        '--config.train.steps=8',
        '--config.train.log_every=4',  # the loss is fetched after the saves at steps 1, 2 and 3
        '--config.checkpoint.every_steps=1',
        '--config.train.learning_rate=1e30',
        '--config.train.warmup_steps=0',
        '--config.train.grad_clip=0',
        '--config.model.dtype=float32',
    )
    assert result.returncode == 3, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    found = re.match(
        r'error: the (loss|gradient norm) became (nan|inf|-inf) at step ([1-8]): lower config.train.', last
    )
    assert found, last
    saved = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
    assert all(step < int(found.group(3)) for step in saved), (saved, last)  # only steps before it
    with ocp.StandardCheckpointer() as reader:
        for step in saved:
            params = reader.restore((tmp_path / 'checkpoints' / str(step) / 'state').absolute())['params']
            assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params)), step


@pytest.mark.slow  # an overlap property of the loop, 31 s here
def test_the_host_runs_at_most_one_step_ahead_of_the_device(tmp_path, monkeypatch, caplog):
    """So that a stop, a save or a divergence waits for one step, not for all that the host could queue.

    Also a run shorter than its warmup (10 steps, default warmup 50) warms up over all its steps, saying so.
    """
    from configs import small_lm
    from trainer.training import train

    config = small_lm.get_config()
    config.model.update(num_layers=2, d_model=256, d_ff=1024, num_kv_heads=4)  # steps far slower than dispatch
    config.train.update(steps=10, log_every=100, eval_every=0)
    config.data.eval_files = ''
    config.checkpoint.every_steps = 0
    in_flight = []
    build = train.build

    def counting_build(config, mesh):
        setup = build(config, mesh)
        dispatched = []

        def train_step(state, batch):
            in_flight.append(sum(not metrics['loss'].is_ready() for metrics in dispatched))
            state, metrics = setup.compiled.train(state, batch)
            dispatched.append(metrics)
            return state, metrics

        return dataclasses.replace(setup, compiled=dataclasses.replace(setup.compiled, train=train_step))

    monkeypatch.setattr(train, 'build', counting_build)
    with caplog.at_level(logging.WARNING):
        train.train(config, tmp_path)
    assert len(in_flight) == 10 and max(in_flight) <= 1, in_flight
    warning = (
        'config.train.warmup_steps=50 is longer than the run (config.train.steps=10): warming up over all 10 steps'
    )
    assert warning in caplog.text
    (last,) = read_metrics(tmp_path)
    assert last['learning_rate'] == pytest.approx(0.9 * config.train.learning_rate)  # step 10 of a 10-step warmup


def test_data_that_cannot_be_read_as_asked_is_one_plain_line(tmp_path):
    """Plain text read as instruction data: one error, not a warning per line first. An empty file: a plain
    warning line when other files have data, the error alone when none has."""
    text = tmp_path / 'play.txt'
    text.write_text('\n\n'.join(f'Line {i} of a play, no JSON here.' for i in range(50)))
    (tmp_path / 'empty.txt').write_text('')
    common = ['--config', 'configs/small_lm.py', *TINY, '--config.train.steps=2', '--config.data.eval_files=']
    sft = run_trainer(
        *common, f'--workdir={tmp_path / "a"}', '--config.data.format=sft', f'--config.data.train_files={text}'
    )
    assert sft.returncode == 2 and sft.stderr.strip().splitlines() == [
        f'error: {text} is not JSON lines ({text}:1: not valid JSON; no JSON object in its first 5 lines), but '
        "config.data.format='sft' reads one JSON object per line: give .jsonl files (docs/finetune.md), or "
        "config.data.format='auto' for plain text."
    ], sft.stderr
    empty = run_trainer(*common, f'--workdir={tmp_path / "b"}', f'--config.data.train_files={tmp_path / "empty.txt"}')
    assert empty.returncode == 2 and empty.stderr.strip().splitlines() == [
        f"error: config.data.train_files matches the empty file '{tmp_path / 'empty.txt'}': give files with data "
        'in them.'
    ]
    both = run_trainer(
        *common, f'--workdir={tmp_path / "c"}', f'--config.data.train_files={tmp_path / "empty.txt"},{text}'
    )
    assert both.returncode == 0, both.stderr[-2000:]
    warnings = [line for line in both.stderr.splitlines() if 'empty' in line]
    assert warnings == [f'warning: data: skipping 1 empty file(s) of config.data.train_files: {tmp_path / "empty.txt"}']


def test_one_paragraph_files_train_and_evaluate_with_the_default_streams(tmp_path):
    """100 kB of prose in one paragraph, and sentences one per line (one paragraph too), with the default 8 streams:
    each stream reads its eighth of the text (they were refused: fewer documents than streams)."""
    rng = np.random.default_rng(0)
    words = 'the quick brown fox jumps over a lazy dog while seven wizards quietly hex jovial bakers'.split()
    prose, lines = tmp_path / 'prose.txt', tmp_path / 'lines.txt'
    prose.write_text(' '.join(rng.choice(words, 20_000)) + '\n')
    lines.write_text(''.join(' '.join(rng.choice(words, 10)) + '.\n' for _ in range(300)))
    assert prose.stat().st_size > 100_000
    result = run_trainer(
        '--config',
        'configs/small_lm.py',
        f'--workdir={tmp_path / "run"}',
        *TINY,
        '--config.train.steps=3',
        f'--config.data.train_files={prose}',
        f'--config.data.eval_files={lines}',
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'done: step 3' in result.stdout and 'eval loss' in result.stdout


def _tree(folder: pathlib.Path) -> dict[str, bytes | None]:
    """Every path under `folder` and the bytes of each file (None for folders)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob('*'))}


def test_a_refused_run_writes_nothing(tmp_path):
    """Exit 2 leaves a new workdir unmade and an existing one (a config.json, no checkpoint yet) as it was: for a
    file that is not JSON lines (named once, not a warning per stream), a bad config value, a missing file, and a
    data problem the first batch meets (after compiling)."""
    not_json = tmp_path / 'train.jsonl'
    not_json.write_text('\n'.join(f'Line {i} of a play, no JSON here.' for i in range(500)))
    blank = tmp_path / 'blank.txt'
    blank.write_text('word' + ' ' * 100_000)  # 7 of the 8 streams' eighths hold only spaces
    existing = tmp_path / 'existing'
    existing.mkdir()
    (existing / 'config.json').write_text('{"the": "last run"}\n')
    before = _tree(existing)
    common = ['--config', 'configs/small_lm.py', *TINY, '--config.train.steps=2']
    new = tmp_path / 'new' / 'run'
    refusals = [
        ('not JSON lines', existing, f'--config.data.train_files={not_json}'),
        ('not JSON lines', new, f'--config.data.train_files={not_json}'),
        ('config.model.num_heads=5 does not divide', existing, '--config.model.num_heads=5'),
        ('matches no file', new, '--config.data.train_files=/no/such/*.txt'),
        ('none of the 1 data files yields a document', new, f'--config.data.train_files={blank}'),
    ]
    for expected, workdir, flag in refusals:
        result = run_trainer(*common, f'--workdir={workdir}', flag)
        assert result.returncode == 2, (expected, result.stderr[-2000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
        assert len(errors) == 1 and expected in errors[0], (expected, result.stderr[-2000:])
        assert 'Traceback' not in result.stderr and 'skipped' not in result.stderr, expected
        assert _tree(existing) == before, expected
        assert not (tmp_path / 'new').exists(), expected
        if expected == 'not JSON lines':
            assert errors[0].startswith(f'error: {not_json} is not JSON lines ({not_json}:1: not JSON ('), errors
