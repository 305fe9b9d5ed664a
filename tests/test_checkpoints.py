"""Killed or stopped runs resume from their last complete checkpoint with bit-identical losses."""

import json
import logging
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import TINY_RUN_OVERRIDES, logged_steps, losses_by_step, read_metrics
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

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
    # One record per step for every reader: what the killed run logged past its checkpoint is gone.
    logged = [line['step'] for line in read_metrics(tmp_path) if 'loss' in line]
    assert logged == list(range(1, STEPS + 1))
    events = EventAccumulator(str(tmp_path / 'tensorboard'))
    events.Reload()
    assert [event.step for event in events.Scalars('loss')] == list(range(1, STEPS + 1))


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


def garble_arrays(checkpoint: pathlib.Path) -> None:
    """Overwrites a checkpoint's array data (its metadata stays readable): reads fail deep inside TensorStore."""
    for path in checkpoint.glob('state/ocdbt.process_*/d/*'):
        path.write_bytes(b'garbage')


def test_an_unreadable_checkpoint_is_moved_aside_and_its_step_saved_anew(tmp_path, uninterrupted_run):
    shutil.copytree(uninterrupted_run, tmp_path, dirs_exist_ok=True)
    checkpoints = tmp_path / 'checkpoints'
    garble_arrays(checkpoints / str(STEPS))
    again = subprocess.run(command(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f'checkpoint {checkpoints / str(STEPS)} is unreadable (cannot read its array ' in again.stderr
    assert f'moved it to {checkpoints / f"corrupt-{STEPS}"}; resuming from step {STEPS - 10}' in again.stderr
    assert 'Traceback' not in again.stderr and 'TensorStore' not in again.stderr, again.stderr[-3000:]
    assert f'resumed from step {STEPS - 10} ' in again.stdout
    assert max(losses_by_step(tmp_path)) == STEPS  # the lost steps were trained again...
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as reader:  # ...and saved: the step reads back now
        reader.restore((checkpoints / str(STEPS) / 'state').absolute())
    assert (checkpoints / f'corrupt-{STEPS}').is_dir()


def test_another_model_shape_in_the_same_workdir_names_the_first_mismatched_parameter(tmp_path, ten_steps):
    shutil.copytree(ten_steps, tmp_path, dirs_exist_ok=True)
    wider = subprocess.run(
        command(tmp_path) + ['--config.model.d_ff=256'], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert wider.returncode == 2
    last = wider.stderr.strip().splitlines()[-1]
    assert 'holds another model: parameter blocks/mlp/w_down_FD is (2, 128, 64) there but (2, 256, 64)' in last
    assert 'Traceback' not in wider.stderr
    # A refused command leaves the workdir's config.json, which the message tells the user to compare with.
    assert json.loads((tmp_path / 'config.json').read_text())['model']['d_ff'] == 128


def test_another_optimizer_is_not_called_unreadable_and_no_op_runs_keep_the_config(tmp_path, ten_steps):
    shutil.copytree(ten_steps, tmp_path, dirs_exist_ok=True)
    unclipped = subprocess.run(
        command(tmp_path) + ['--config.train.grad_clip=0', '--config.train.steps=15'],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert unclipped.returncode == 2
    last = unclipped.stderr.strip().splitlines()[-1]
    checkpoint = tmp_path / 'checkpoints' / '10'
    assert last == (
        f"error: {checkpoint} holds an optimizer state of another structure than this config's "
        '(config.train.grad_clip is 1.0 there but 0.0 here): set the config back to match it, or start a new run '
        f'from its parameters alone with --config.checkpoint.restore_from={checkpoint} and another --workdir.'
    )
    assert 'unreadable' not in unclipped.stderr and 'Traceback' not in unclipped.stderr
    nothing = subprocess.run(
        command(tmp_path) + ['--config.train.steps=10', '--config.train.log_every=7'],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert nothing.returncode == 0 and 'nothing to train' in nothing.stdout
    kept = json.loads((tmp_path / 'config.json').read_text())['train']
    assert (kept['grad_clip'], kept['steps'], kept['log_every']) == (1.0, 10, 1)


def test_restores_onto_another_mesh_and_device_count(tmp_path, caplog):
    import jax
    import numpy as np
    from conftest import mesh_for, tiny_config

    from trainer.data import pipeline, tokenizers
    from trainer.errors import ConfigError
    from trainer.training import train
    from trainer.training.checkpoints import Checkpointer, rewind

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
        latest = Checkpointer(tmp_path, config.checkpoint, '{}').restore_latest(setup.sharded.abstract)
        rewind(data, latest.data_position, tmp_path)
        restored = latest.state
        assert 'state' not in vars(setup.sharded), 'a fresh state was initialized'
        assert latest.step == 1 and int(restored.step) == 1
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), saved_params)
        w_up = restored.params['blocks']['mlp']['w_up_DF']
        assert w_up.sharding == setup.sharded.shardings.params['blocks']['mlp']['w_up_DF']
        assert len(w_up.sharding.device_set) == 4
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(next(data)), following_batch)
        _, metrics = setup.compiled.train(restored, next(data))  # and it trains on
        assert np.isfinite(float(metrics['loss']))
        data.close()

        # Saved for the default 8 streams (gcd(batch 8, 8)), another count cannot continue it: refused in one
        # line, unless restart_order asks to start the order over.
        saved = data.num_streams
        config.data.num_streams = 2
        data = pipeline.train_batches(config, tokenizer, setup.batch_sharding)
        latest = Checkpointer(tmp_path, config.checkpoint, '{}').restore_latest(setup.sharded.abstract)
        with pytest.raises(
            ConfigError,
            match=f'is for {saved} data streams but this run cuts the batch into 2: set '
            f'config.data.num_streams={saved} to continue it exactly',
        ):
            rewind(data, latest.data_position, tmp_path)
        with caplog.at_level(logging.WARNING):
            rewind(data, latest.data_position, tmp_path, restart_order=True)
        assert 'the data order starts over, as config.data.restart_order=True asks' in caplog.text
        with pytest.raises(ConfigError, match='holds parameters alone, no data position to resume from'):
            rewind(data, {}, tmp_path, restart_order=True)  # what save_params writes
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
    if params_only:  # the parameters alone are read: another optimizer (no clipping state) is fine
        args.append('--config.train.grad_clip=0')
    second = subprocess.run(command(tuned) + args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    what = 'parameters' if params_only else 'whole state, step 10'
    assert f'started from {source / "checkpoints" / "10"} ({what})' in second.stdout
    source_losses, tuned_losses = losses_by_step(source), losses_by_step(tuned)
    first_step = min(tuned_losses)
    assert first_step == (1 if params_only else 11)
    assert tuned_losses[first_step] < source_losses[1] - 0.5, 'it starts from the trained model'


def test_restore_from_an_imported_model_of_another_shape_says_what_to_set_and_leaves_no_checkpoints(tmp_path):
    """An import from Hugging Face has no workdir: the message gives the checkpoint's model fields to set."""
    sys.path.insert(0, str(REPO / 'scripts'))
    import convert_hf

    imported = convert_hf.import_folder(str(REPO / 'tests' / 'fixtures' / 'hf' / 'llama_gqa'), tmp_path / 'imported')
    result = subprocess.run(
        command(tmp_path / 'run')
        + [f'--config.checkpoint.restore_from={imported}', '--config.checkpoint.restore_params_only=True'],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert f'error: {imported} holds another model: parameter ' in last
    assert 'set its model: --config.model.d_model=32 ' in last and '--config.model.vocab_size=99' in last
    assert 'workdir' not in last and 'Traceback' not in result.stderr
    assert not (tmp_path / 'run' / 'checkpoints').exists()  # a refused run leaves no empty folder


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
        assert 'read only' not in export.stderr  # orbax's notice for a manager opened to read
        assert f'exported the parameters of {ten_steps / "checkpoints" / "10"}' in export.stdout
        with ocp.StandardCheckpointer() as reader:
            params = reader.restore((out / 'params').absolute())
            full = reader.restore((ten_steps / 'checkpoints' / '10' / 'state').absolute())['params']
        assert set(params) == set(full) and json.loads((out / 'config.json').read_text())['train']['steps'] == 10
        for exported, trained in zip(jax.tree.leaves(params), jax.tree.leaves(full), strict=True):
            assert str(exported.dtype) == dtype
            tolerance = 0 if dtype == 'float32' else 1e-2  # bfloat16 keeps 8 bits of mantissa
            np.testing.assert_allclose(np.asarray(exported, np.float32), trained, rtol=tolerance)


@pytest.mark.slow  # 14 s: a model big enough for the write to take a while
def test_steps_taken_while_a_save_is_written_do_not_change_it(tmp_path):
    """The next steps donate (reuse) the saved state's buffers while orbax writes in the background."""
    import jax
    import numpy as np

    from configs import small_lm
    from trainer.data import pipeline, tokenizers
    from trainer.runtime import mesh as mesh_lib
    from trainer.training import train
    from trainer.training.checkpoints import Checkpointer

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
        restored = checkpointer.restore_latest(current)
        assert restored.step == 1
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.state), before)
        checkpointer.close()
        data.close()


def test_restoring_parameters_alone_holds_no_second_copy_of_them(tmp_path):
    """restore_params_only reads the params alone (the optimizer may differ) and builds the state around them."""
    import gc

    import jax
    from conftest import mesh_for, tiny_config

    from trainer.data import pipeline, tokenizers
    from trainer.errors import ConfigError
    from trainer.training import train
    from trainer.training.checkpoints import Checkpointer

    def live_bytes() -> int:
        gc.collect()
        return sum(array.nbytes for array in jax.live_arrays())

    config = tiny_config('llama', fsdp=4, tensor=2)
    config.model.vocab_size = 256  # the byte tokenizer's
    mesh = mesh_for(config)
    with jax.set_mesh(mesh):
        setup = train.build(config, mesh)
        data = pipeline.train_batches(config, tokenizers.make_tokenizer('byte'), setup.batch_sharding)
        source = Checkpointer(tmp_path / 'source', config.checkpoint, config.to_json_best_effort())
        source.save(1, setup.sharded.state, data)
        source.close()
        data.close()

        config.train.grad_clip = 0.0  # another optimizer state: the whole state cannot be restored...
        tuned = train.build(config, mesh)
        tuned_checkpointer = Checkpointer(tmp_path / 'tuned', config.checkpoint, config.to_json_best_effort())
        with pytest.raises(
            ConfigError,
            match=r'\(config.train.grad_clip is 1.0 there but 0.0 here\): set the config back '
            'to match it, or restore its parameters alone with --config.checkpoint.restore_params_only=True',
        ):
            tuned_checkpointer.restore_other_run(str(tmp_path / 'source'), tuned.sharded, params_only=False)
        before = live_bytes()  # ...but its parameters can
        state, _, _ = tuned_checkpointer.restore_other_run(str(tmp_path / 'source'), tuned.sharded, params_only=True)
        state_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tuned.sharded.abstract))
        assert live_bytes() - before == state_bytes  # the new state and nothing else
        assert 'state' not in vars(tuned.sharded), 'a fresh state was initialized'
        assert int(state.step) == 0
        tuned_checkpointer.close()
        jax.tree.map(
            np.testing.assert_array_equal, jax.device_get(state.params), jax.device_get(setup.sharded.state.params)
        )


def test_a_first_ctrl_c_asks_to_stop_and_leaves_the_second_to_the_kernel(capsys):
    """After the first SIGINT, the second gets the default action: the process ends even while Python waits."""
    from trainer.runtime.stop_signals import StopRequest

    stop = StopRequest()
    try:
        signal.raise_signal(signal.SIGINT)
        assert stop.reached(1) and stop.signal_name == 'SIGINT'
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
        assert 'SIGINT: saving after this step, then stopping (Ctrl-C again quits at once' in capsys.readouterr().err
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) == signal.default_int_handler


@pytest.mark.slow  # the same, end to end, on a model slow enough to be caught mid-step (10 s)
def test_ctrl_c_saves_and_stops_and_a_second_one_ends_the_run_at_once(tmp_path):
    slow = [
        '--config.model.d_model=512',
        '--config.model.d_ff=2048',
        '--config.data.seq_len=256',
        '--config.train.steps=1000',
    ]
    process = subprocess.Popen(
        command(tmp_path) + slow, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for line in process.stdout:  # compiled and running
        if line.startswith('step 1 compiled'):
            break
    process.send_signal(signal.SIGINT)
    for line in process.stderr:  # a step takes about 2 s: the second Ctrl-C comes while it runs
        if 'saving after this step, then stopping (Ctrl-C again quits at once, without saving)' in line:
            break
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGINT  # the default action: no save, no clean-up to wait for
