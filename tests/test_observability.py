"""Seeing inside a run: a profiler trace of a window of steps, memory per device, and Weights & Biases."""

import os
import pathlib
import shutil
import subprocess
import sys

import jax
import pytest
from conftest import TINY_RUN_OVERRIDES, losses_by_step, read_metrics, run_trainer_in

from trainer.errors import ConfigError
from trainer.training import memory

ARGS = [
    '--config', 'configs/small_lm.py', *TINY_RUN_OVERRIDES, '--config.train.steps=6', '--config.train.log_every=1',
    '--config.train.eval_every=0', '--config.data.eval_files=', '--config.checkpoint.every_steps=3',
]  # fmt: skip


@pytest.fixture(scope='module')
def plain_result(tmp_path_factory) -> tuple[pathlib.Path, str]:
    workdir = tmp_path_factory.mktemp('plain')
    result = run_trainer_in(workdir, *ARGS)
    assert result.returncode == 0, result.stderr[-2000:]
    return workdir, result.stdout


@pytest.fixture(scope='module')
def plain_run(plain_result) -> pathlib.Path:
    return plain_result[0]


def test_a_profiled_window_writes_a_trace_and_changes_no_loss(tmp_path, plain_run):
    workdir = tmp_path / 'profiled'
    result = run_trainer_in(workdir, *ARGS, '--config.train.profile_start_step=3', '--config.train.profile_steps=2')
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'profile of steps 3-4 written to ' in result.stdout
    assert 'tensorboard --logdir' in result.stdout
    traces = list((workdir / 'tensorboard' / 'plugins' / 'profile').glob('*/*.xplane.pb'))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert list(traces[0].parent.glob('*.trace.json.gz'))  # what Perfetto opens
    assert losses_by_step(workdir) == losses_by_step(plain_run)


def test_the_compiled_steps_memory_is_shown_and_logged(plain_result):
    plain_run, stdout = plain_result
    assert 'memory per device: parameters ' in stdout and 'activations and temporaries' in stdout
    records = [r for r in read_metrics(plain_run) if 'memory_train_step_gib' in r]
    assert len(records) == 1 and records[0]['step'] == 0
    record = records[0]
    # 8 simulated devices, parameters split over fsdp=8: each holds about an eighth of the float32 parameters.
    params = int(stdout.split('parameters: ')[1].split()[0].replace(',', ''))
    assert record['memory_parameters_gib'] * memory.GIB == pytest.approx(params * 4 / 8, rel=0.05)
    assert record['memory_optimizer_state_gib'] > record['memory_parameters_gib']  # Adam's two moments
    assert record['memory_train_step_gib'] > record['memory_parameters_gib'] + record['memory_optimizer_state_gib']
    assert 'memory_peak_gib' not in read_metrics(plain_run)[-1]  # a CPU reports no peak


def test_a_step_that_cannot_fit_says_what_to_change():
    gib = memory.GIB
    fits = memory.StepMemory(parameters=gib, optimizer_state=2 * gib, temporaries=4 * gib, total=7 * gib, limit=8 * gib)
    memory.check_fits(fits)
    assert fits.line().endswith('train step 7 GiB of 8 GiB (88%)')
    too_big = memory.StepMemory(gib, 2 * gib, 40 * gib, 43 * gib, limit=40 * gib)
    with pytest.raises(ConfigError, match=r'needs 43 GiB per device but a device has 40 GiB') as error:
        memory.check_fits(too_big)
    for fix in ('config.model.remat', 'config.mesh.fsdp', 'config.train.global_batch_size'):
        assert fix in str(error.value)
    memory.check_fits(memory.StepMemory(gib, gib, gib, 3 * gib, limit=None))  # a CPU: nothing to compare


def test_shard_bytes_count_one_devices_share():
    mesh = jax.make_mesh((8,), ('fsdp',), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('fsdp', None))
    split = jax.ShapeDtypeStruct((16, 10), jax.numpy.float32, sharding=sharding)
    whole = jax.ShapeDtypeStruct((3,), jax.numpy.bfloat16)
    assert memory.shard_bytes({'a': split, 'b': whole}) == 2 * 10 * 4 + 3 * 2


def test_an_offline_wandb_run_is_resumed_into_the_same_id(tmp_path, monkeypatch):
    pytest.importorskip('wandb')
    monkeypatch.setenv('WANDB_MODE', 'offline')  # never the network
    monkeypatch.setenv('WANDB_SILENT', 'true')
    workdir = tmp_path / 'tracked'
    args = [*ARGS, '--config.logging.wandb_project=shardtrain-tests', '--config.logging.wandb_tags=a,b']
    first = run_trainer_in(workdir, *args[:-1], '--config.checkpoint.every_steps=3')
    assert first.returncode == 0, first.stderr[-2000:]
    run_id = (workdir / 'wandb_run_id').read_text().strip()
    # As if stopped after step 3: the same command resumes and logs into the same run.
    shutil.rmtree(workdir / 'checkpoints' / '6')
    again = run_trainer_in(workdir, *args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert 'resumed from step 3 ' in again.stdout
    assert (workdir / 'wandb_run_id').read_text().strip() == run_id
    runs = sorted((workdir / 'wandb').glob('offline-run-*'))
    assert len(runs) == 2 and all(run.name.endswith('-' + run_id) for run in runs)
    # The run's records (protobuf in W&B's own log format, which offline runs keep until `wandb sync`): the
    # config, the tags and TensorBoard's metric names against our step.
    records = next(runs[-1].glob('run-*.wandb')).read_bytes()
    names = (b'shardtrain-tests', b'd_model', b'global_batch_size', b'loss', b'grad_norm', b'tokens_per_s', b'step')
    for text in names:
        assert text in records, text


def test_wandb_without_the_package_is_one_line_and_writes_nothing(tmp_path):
    code = (
        'import sys; sys.modules["wandb"] = None; import runpy; '
        'sys.argv = ["trainer", "--workdir", sys.argv[1], *sys.argv[2:]]; '
        'runpy.run_module("trainer", run_name="__main__")'
    )
    workdir = tmp_path / 'refused'
    result = subprocess.run(
        [sys.executable, '-c', code, str(workdir), *ARGS, '--config.logging.wandb_project=p'],
        cwd=pathlib.Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, 'WANDB_MODE': 'offline'},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "pip install -e '.[wandb]'" in result.stderr
    assert 'Traceback' not in result.stderr
    assert not workdir.exists()
