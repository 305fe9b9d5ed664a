"""Killed or stopped runs resume from their last complete checkpoint with bit-identical losses."""

import json
import logging
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import TINY_RUN_OVERRIDES, logged_steps, losses_by_step

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 40
ARGS = [
    '--config',
    'configs/small_lm.py',
    *TINY_RUN_OVERRIDES,
    f'--config.train.steps={STEPS}',
    '--config.train.log_every=1',
    '--config.train.eval_every=0',
    '--config.data.eval_files=',
    '--config.checkpoint.every_steps=10',
]


def command(workdir: pathlib.Path) -> list[str]:
    return [sys.executable, '-m', 'trainer', '--workdir', str(workdir), *ARGS]


@pytest.fixture(scope='module')
def uninterrupted_run(tmp_path_factory) -> pathlib.Path:
    """A finished 40-step run with checkpoints 20, 30 and 40; copy it before changing it."""
    workdir = tmp_path_factory.mktemp('uninterrupted')
    result = subprocess.run(command(workdir), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.fixture(scope='module')
def uninterrupted(uninterrupted_run) -> dict[int, float]:
    losses = losses_by_step(uninterrupted_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


@pytest.fixture(scope='module')
def ten_steps(tmp_path_factory) -> pathlib.Path:
    """A finished 10-step run with its checkpoint 10; copy it before changing it."""
    workdir = tmp_path_factory.mktemp('ten_steps')
    result = subprocess.run(
        command(workdir) + ['--config.train.steps=10'], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def interrupt(workdir: pathlib.Path, sig: int) -> subprocess.Popen:
    """Starts a run and sends `sig` a few steps after its step-20 checkpoint is complete."""
    process = subprocess.Popen(command(workdir), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ((workdir / 'checkpoints' / '20').is_dir() and logged_steps(workdir) >= 23):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, 'the run did not reach step 23'
        time.sleep(0.05)
    process.send_signal(sig)
    process.wait(timeout=120)
    return process


def test_sigkill_costs_only_the_steps_since_the_checkpoint_and_resumes_bit_exactly(tmp_path, uninterrupted):
    killed = interrupt(tmp_path, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert logged_steps(tmp_path) < STEPS
    restarted = subprocess.run(command(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    resumed = int(restarted.stdout.split('resumed from step ')[1].split()[0])
    assert resumed in (20, 30)  # the newest complete checkpoint at the kill
    losses = losses_by_step(tmp_path)
    for step in range(resumed + 1, STEPS + 1):
        assert losses[step] == uninterrupted[step], step  # bit for bit: data order, rng and state


def test_sigterm_saves_at_the_current_step_and_resumes_bit_exactly(tmp_path, uninterrupted):
    stopped = interrupt(tmp_path, signal.SIGTERM)
    stderr = stopped.stderr.read()
    assert stopped.returncode == 4, stderr[-3000:]
    assert 'stopped: SIGTERM received: saved step ' in stderr and 'run the same command to resume' in stderr
    saved = int(stderr.split('saved step ')[1].split()[0])
    assert saved > 20 and (tmp_path / 'checkpoints' / str(saved)).is_dir()
    restarted = subprocess.run(command(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert f'resumed from step {saved} ' in restarted.stdout
    losses = losses_by_step(tmp_path)
    assert [losses[s] for s in range(1, STEPS + 1)] == [uninterrupted[s] for s in range(1, STEPS + 1)]


def test_an_unreadable_checkpoint_is_named_and_the_one_before_is_used(tmp_path, uninterrupted_run):
    shutil.copytree(uninterrupted_run, tmp_path, dirs_exist_ok=True)
    for path in (tmp_path / 'checkpoints' / str(STEPS) / 'state').rglob('*'):  # garble the newest
        if path.is_file():
            path.write_bytes(b'garbage')
    again = subprocess.run(command(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f'checkpoint {tmp_path / "checkpoints" / str(STEPS)}' in again.stderr and 'is unreadable' in again.stderr
    assert f'resumed from step {STEPS - 10} ' in again.stdout
    assert max(losses_by_step(tmp_path)) == STEPS  # the lost steps were trained again


def test_a_workdir_whose_checkpoints_are_all_unreadable_is_an_error_not_a_fresh_start(tmp_path, ten_steps):
    shutil.copytree(ten_steps, tmp_path, dirs_exist_ok=True)
    for path in (tmp_path / 'checkpoints').rglob('*'):
        if path.is_file() and 'state' in path.parts:
            path.unlink()
    again = subprocess.run(command(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2
    last = again.stderr.strip().splitlines()[-1]
    assert (
        last.startswith(f'error: no checkpoint in {tmp_path / "checkpoints"} can be read')
        and 'Traceback' not in again.stderr
    )


def test_another_model_shape_in_the_same_workdir_names_the_first_mismatched_parameter(tmp_path, ten_steps):
    shutil.copytree(ten_steps, tmp_path, dirs_exist_ok=True)
    wider = subprocess.run(
        command(tmp_path) + ['--config.model.d_ff=256'], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert wider.returncode == 2
    last = wider.stderr.strip().splitlines()[-1]
    assert 'holds another model: parameter blocks/mlp/w_down_FD is (2, 128, 64) there but (2, 256, 64)' in last
    assert 'Traceback' not in wider.stderr


def test_restores_onto_another_mesh_and_device_count(tmp_path, caplog):
    import jax
    import numpy as np
    from conftest import mesh_for, tiny_config

    from trainer import train
    from trainer.checkpoints import Checkpointer
    from trainer.data import pipeline, tokenizers

    def setup_for(**mesh_sizes):
        config = tiny_config('llama', **mesh_sizes)
        config.model.vocab_size = 256  # the byte tokenizer's
        mesh = mesh_for(config)
        return config, mesh

    tokenizer = tokenizers.make_tokenizer('byte')
    config, mesh = setup_for(fsdp=4, tensor=2)  # 8 devices
    with jax.set_mesh(mesh):
        setup = train.build(config, mesh)
        data = pipeline.train_batches(config, tokenizer, setup.batch_sharding)
        state, _ = setup.compiled.train(setup.sharded.state, next(data))
        checkpointer = Checkpointer(tmp_path, config.checkpoint, '{}')
        checkpointer.save(1, state, data)
        checkpointer.close()
        saved_params = jax.device_get(state.params)
        following_batch = jax.device_get(next(data))
        data.close()

    config, mesh = setup_for(data=2, fsdp=2)  # 4 devices
    with jax.set_mesh(mesh):
        setup = train.build(config, mesh)
        data = pipeline.train_batches(config, tokenizer, setup.batch_sharding)
        # Into the abstract state: a resume never initializes a state only to overwrite it.
        restored, step = Checkpointer(tmp_path, config.checkpoint, '{}').restore_latest(setup.sharded.abstract, data)
        assert 'state' not in vars(setup.sharded), 'a fresh state was initialized'
        assert step == 1 and int(restored.step) == 1
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), saved_params)
        w_up = restored.params['blocks']['mlp']['w_up_DF']
        assert w_up.sharding == setup.sharded.shardings.params['blocks']['mlp']['w_up_DF']
        assert len(w_up.sharding.device_set) == 4
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(next(data)), following_batch)
        _, metrics = setup.compiled.train(restored, next(data))  # and it trains on
        assert np.isfinite(float(metrics['loss']))
        data.close()

        # A data position saved for 1 stream cannot continue 2 streams: the data order starts over, said loudly.
        config.data.num_streams = 2
        data = pipeline.train_batches(config, tokenizer, setup.batch_sharding)
        with caplog.at_level(logging.WARNING):
            Checkpointer(tmp_path, config.checkpoint, '{}').restore_latest(setup.sharded.abstract, data)
        assert 'is for 1 data streams but this run has 2: the data order starts over' in caplog.text
        data.close()


@pytest.mark.parametrize('params_only', [True, pytest.param(False, marks=pytest.mark.slow)])
def test_a_new_run_starts_from_another_runs_checkpoint(tmp_path, ten_steps, params_only):
    source = ten_steps  # read only
    tuned = tmp_path / 'tuned'
    args = [
        f'--config.checkpoint.restore_from={source / "checkpoints"}',
        f'--config.checkpoint.restore_params_only={params_only}',
        '--config.train.steps=15',
    ]
    second = subprocess.run(command(tuned) + args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    what = 'parameters' if params_only else 'whole state, step 10'
    assert f'started from {source / "checkpoints" / "10"} ({what})' in second.stdout
    source_losses, tuned_losses = losses_by_step(source), losses_by_step(tuned)
    first_step = min(tuned_losses)
    assert first_step == (1 if params_only else 11)
    assert tuned_losses[first_step] < source_losses[1] - 0.5, 'it starts from the trained model'


def test_restore_from_a_folder_without_checkpoints_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        command(tmp_path / 'run') + [f'--config.checkpoint.restore_from={tmp_path}'],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2
    assert f"config.checkpoint.restore_from='{tmp_path}' holds no checkpoint" in result.stderr.strip().splitlines()[-1]
    assert 'Traceback' not in result.stderr  # orbax's startup clean-up thread once printed one at exit


def test_export_params_writes_the_parameters_alone_optionally_in_bfloat16(tmp_path, ten_steps):
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    for dtype in ('float32', 'bfloat16'):
        out = tmp_path / f'export_{dtype}'
        export = subprocess.run(
            [
                sys.executable,
                str(REPO / 'scripts' / 'export_params.py'),
                '--checkpoint',
                str(ten_steps / 'checkpoints'),
                '--output',
                str(out),
                '--dtype',
                dtype,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert export.returncode == 0, export.stderr[-3000:]
        assert f'exported the parameters of {ten_steps / "checkpoints" / "10"}' in export.stdout
        with ocp.StandardCheckpointer() as reader:
            params = reader.restore((out / 'params').absolute())
            full = reader.restore((ten_steps / 'checkpoints' / '10' / 'state').absolute())['params']
        assert set(params) == set(full) and json.loads((out / 'config.json').read_text())['train']['steps'] == 10
        for exported, trained in zip(jax.tree.leaves(params), jax.tree.leaves(full), strict=True):
            assert str(exported.dtype) == dtype
            tolerance = 0 if dtype == 'float32' else 1e-2  # bfloat16 keeps 8 bits of mantissa
            np.testing.assert_allclose(np.asarray(exported, np.float32), trained, rtol=tolerance)


def test_steps_taken_while_a_save_is_written_do_not_change_it(tmp_path):
    """The next steps donate (reuse) the saved state's buffers while orbax writes in the background."""
    import jax
    import numpy as np

    from configs import small_lm
    from trainer import mesh as mesh_lib
    from trainer import train
    from trainer.checkpoints import Checkpointer
    from trainer.data import pipeline, tokenizers

    config = small_lm.get_config()  # a bigger model than the others here, so the write takes a while
    config.model.update(num_layers=8, d_model=512, num_heads=8, num_kv_heads=8, d_ff=1536, dtype='float32')
    config.train.global_batch_size = 8
    mesh = mesh_lib.make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1})
    with jax.set_mesh(mesh):
        setup = train.build(config, mesh)
        data = pipeline.train_batches(config, tokenizers.make_tokenizer('byte'), setup.batch_sharding)
        current, _ = setup.compiled.train(setup.sharded.state, next(data))
        before = jax.device_get(current)
        checkpointer = Checkpointer(tmp_path, config.checkpoint, '{}')
        checkpointer.save(1, current, data)
        for _ in range(3):
            current, metrics = setup.compiled.train(current, next(data))
        jax.block_until_ready(metrics)
        checkpointer.wait()
        restored, step = checkpointer.restore_latest(current, data)
        assert step == 1
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), before)
        checkpointer.close()
        data.close()
