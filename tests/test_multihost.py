"""Multi-process jobs: 2 processes x 4 CPU devices (gloo on 127.0.0.1) against 1 device and 1 process x 8 devices.

The reference run has one device: a run and its resumes on 8 devices or 2 processes see its batches, so
their float32 losses are its losses (the data order is the config's alone, docs/data.md).
"""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import TINY_RUN_OVERRIDES, logged_steps, losses_by_step, read_metrics

from trainer.errors import ConfigError
from trainer.runtime import distributed

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'scripts'))
import launch_local  # noqa: E402

STEPS = 30
ARGS = [
    '--config',
    'configs/small_lm.py',
    *TINY_RUN_OVERRIDES,
    '--config.model.dtype=float32',  # exact losses across process counts
    f'--config.train.steps={STEPS}',
    '--config.train.log_every=1',
    '--config.train.eval_every=0',
    '--config.data.eval_files=',
    '--config.checkpoint.every_steps=10',
]


def trainer(workdir: pathlib.Path, *extra: str) -> list[str]:
    return [sys.executable, '-m', 'trainer', '--workdir', str(workdir), *ARGS, *extra]


def run_one_process(workdir: pathlib.Path, devices: int = 8) -> subprocess.CompletedProcess:
    """One process with `devices` CPU devices (the test session's 8 by default)."""
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    result = subprocess.run(trainer(workdir), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_two_processes(workdir: pathlib.Path) -> subprocess.CompletedProcess:
    command = [sys.executable, 'scripts/launch_local.py', '--num_processes', '2', '--', *trainer(workdir)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return result


def spawn_two_processes(workdir: pathlib.Path, *extra: str) -> list[subprocess.Popen]:
    """Two processes started directly (no launcher), so that a test can signal or kill one of them."""
    port = launch_local.free_port()
    return [
        subprocess.Popen(
            trainer(workdir, *extra),
            cwd=REPO,
            env=launch_local.process_env(index, 2, port, [], 8),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]


def wait_for_step(workdir: pathlib.Path, step: int, processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 300
    while logged_steps(workdir) < step:
        for process in processes:
            assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f'the run did not reach step {step}'
        time.sleep(0.05)


def assert_close(losses: dict[int, float], reference: dict[int, float], steps: range) -> None:
    """Equal to float32 tolerance: one device sums in another order than eight, and 30 steps of training grow
    that to 3e-5 relative; another batch moves a loss by 1e-3 and more."""
    for step in steps:
        assert losses[step] == pytest.approx(reference[step], rel=1e-4), step


def keep_only_checkpoint(source: pathlib.Path, destination: pathlib.Path, step: int) -> None:
    """A workdir holding just checkpoint `step` of another run, as if that run had stopped there."""
    (destination / 'checkpoints').mkdir(parents=True)
    shutil.copytree(source / 'checkpoints' / str(step), destination / 'checkpoints' / str(step))


@pytest.fixture(scope='module')
def one_device(tmp_path_factory) -> pathlib.Path:
    """The uninterrupted reference run: one process, one CPU device."""
    workdir = tmp_path_factory.mktemp('one_device')
    result = run_one_process(workdir, devices=1)
    assert 'devices: 1 x cpu' in result.stdout
    return workdir


def assert_resumed_exactly(result: subprocess.CompletedProcess, step: int) -> None:
    """Resumed at `step` with no word of the data order starting over."""
    assert f'resumed from step {step} ' in result.stdout
    assert 'starts over' not in result.stdout + result.stderr


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory) -> tuple[pathlib.Path, subprocess.CompletedProcess]:
    workdir = tmp_path_factory.mktemp('two_processes')
    return workdir, run_two_processes(workdir)


def test_two_processes_train_like_one_device(one_device, two_processes):
    workdir, result = two_processes
    reference = losses_by_step(one_device)
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert_close(losses_by_step(workdir), reference, range(1, STEPS + 1))
    assert 'devices: 8 x cpu (2 process(es), 4 device(s) each)' in result.stdout
    assert 'Gloo' not in result.stdout and 'peer ranks' not in result.stdout  # gloo's connection lines
    assert result.stdout.count(f'done: step {STEPS}') == 1  # process 0 alone reports
    last = read_metrics(workdir)[-1]
    assert last['host_step_time_s_min'] * 0.999 <= last['step_time_s'] <= last['host_step_time_s_max'] * 1.001
    assert last['slowest_host'] in (0, 1) and last['host_data_wait_fraction_max'] >= last['data_wait_fraction']


def test_a_one_device_checkpoint_resumes_on_eight_devices(tmp_path, one_device):
    keep_only_checkpoint(one_device, tmp_path, 20)
    result = run_one_process(tmp_path, devices=8)
    assert 'devices: 8 x cpu' in result.stdout
    assert_resumed_exactly(result, 20)
    assert_close(losses_by_step(tmp_path), losses_by_step(one_device), range(21, STEPS + 1))


def test_a_one_device_checkpoint_resumes_in_two_processes(tmp_path, one_device):
    keep_only_checkpoint(one_device, tmp_path, 20)
    result = run_two_processes(tmp_path)
    assert_resumed_exactly(result, 20)
    assert_close(losses_by_step(tmp_path), losses_by_step(one_device), range(21, STEPS + 1))


@pytest.mark.slow  # the way back; the tests above cover both directions of the data position
def test_a_two_process_checkpoint_resumes_on_one_device(tmp_path, one_device, two_processes):
    keep_only_checkpoint(two_processes[0], tmp_path, 20)
    result = run_one_process(tmp_path, devices=1)
    assert_resumed_exactly(result, 20)
    assert_close(losses_by_step(tmp_path), losses_by_step(one_device), range(21, STEPS + 1))


@pytest.mark.slow  # 25 s: two processes run, stop, and run again
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path, one_device):
    # Saves every 0.6 s as well: the processes must agree on those steps too, or the saves would hang.
    processes = spawn_two_processes(tmp_path, '--config.checkpoint.every_minutes=0.01')
    wait_for_step(tmp_path, 12, processes)
    processes[1].send_signal(signal.SIGTERM)  # a preemption notice that reaches one host only
    stderrs = [process.communicate(timeout=120)[1] for process in processes]
    assert [process.returncode for process in processes] == [4, 4], [e[-2000:] for e in stderrs]
    saved = {int(e.split('saved step ')[1].split()[0]) for e in stderrs}
    assert len(saved) == 1, saved  # the processes agreed on the step
    (step,) = saved
    assert 12 < step < STEPS and (tmp_path / 'checkpoints' / str(step)).is_dir()
    kept = [int(folder.name) for folder in (tmp_path / 'checkpoints').iterdir() if folder.name.isdigit()]
    assert any(s % 10 and s != step for s in kept), kept  # a timed save, taken by both processes
    result = run_two_processes(tmp_path)
    assert f'resumed from step {step} ' in result.stdout
    assert_close(losses_by_step(tmp_path), losses_by_step(one_device), range(1, STEPS + 1))


@pytest.mark.parametrize(
    'victim, message',
    [
        (1, 'error: process 1 of 2 stopped answering for 5 s'),  # our peer watch, with the fix
        # The coordinator's host: JAX itself aborts the others at once.
        pytest.param(0, 'the leader task was preempted/died', marks=pytest.mark.slow),
    ],
)
def test_a_killed_process_ends_the_other_with_a_clear_error(tmp_path, victim, message):
    processes = spawn_two_processes(tmp_path, '--peer_timeout_s=5', f'--config.train.steps={100 * STEPS}')
    wait_for_step(tmp_path, 3, processes)
    processes[victim].kill()
    start = time.monotonic()
    survivor = processes[1 - victim]
    _, stderr = survivor.communicate(timeout=90)
    assert time.monotonic() - start < 60
    assert survivor.returncode != 0 and message in stderr, stderr[-3000:]
    if victim == 1:
        assert survivor.returncode == distributed.EXIT_PEER_LOST and 'Traceback' not in stderr
        assert 'Rerun the job: it resumes from the latest checkpoint.' in stderr


# A fake coordinator key-value store where process 1 keeps beating or has gone silent; then, as after a
# collective that failed, process 0 asks its watch whether a peer is lost.
WATCH_AFTER_A_FAILED_COLLECTIVE = """
import sys, time
from trainer.runtime import distributed

class Store:
    def __init__(self, peer_beats):
        self.values, self.peer_beats, self.reads = {}, peer_beats, 0
    def key_value_set(self, key, value, allow_overwrite):
        self.values[key] = value
    def key_value_dir_get(self, prefix):
        self.reads += 1
        return [*self.values.items(), (prefix + '1', str(self.reads) if self.peer_beats else '1')]

watch = distributed.PeerWatch(Store(sys.argv[1] == 'beating'), 0, 2, timeout_s=1.0)
start = time.monotonic()
watch.wait_for_lost_peer()
print(f'no peer lost; waited {time.monotonic() - start:.1f} s')
"""


@pytest.mark.parametrize('peer', ['beating', 'silent'])
def test_after_a_failed_collective_the_watch_names_a_dead_peer(peer):
    result = subprocess.run(
        [sys.executable, '-c', WATCH_AFTER_A_FAILED_COLLECTIVE, peer],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if peer == 'silent':  # one line and exit 5, not the collective's traceback
        assert result.returncode == distributed.EXIT_PEER_LOST, result.stderr[-2000:]
        assert result.stderr.strip().startswith('error: process 1 of 2 stopped answering for 1 s')
    else:  # the failure was something else: the caller shows it
        assert result.returncode == 0 and 'no peer lost' in result.stdout, result.stderr[-2000:]


def test_a_process_whose_peers_never_come_fails_in_bounded_time(tmp_path):
    env = launch_local.process_env(1, 2, launch_local.free_port(), [], 8)
    start = time.monotonic()
    result = subprocess.run(
        trainer(tmp_path, '--join_timeout_s=3'), cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert time.monotonic() - start < 45
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith('error: nothing answered at the coordinator address')
    env = launch_local.process_env(0, 2, launch_local.free_port(), [], 8)  # the coordinator, waiting for process 1
    result = subprocess.run(
        trainer(tmp_path, '--join_timeout_s=3'), cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert time.monotonic() - start < 90
    assert result.returncode == distributed.EXIT_PEER_LOST
    assert 'error: not all 2 processes joined within 3 s' in result.stderr


def test_find_job_from_flags_environment_and_schedulers():
    assert distributed.find_job(None, None, None, {}) is None
    assert distributed.find_job(None, 1, 0, {}) is None
    job = distributed.find_job('10.0.0.1:1234', 4, 3, {})
    assert job == distributed.Job(4, 3, '10.0.0.1:1234', 'flags')
    env = {'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '1'}
    assert distributed.find_job(None, None, None, env).detected == 'environment'
    assert distributed.find_job(None, None, 0, env).process_id == 0  # a flag beats the environment
    slurm = dict(SLURM_JOB_ID='7', SLURM_STEP_NODELIST='n[1-2]', SLURM_NTASKS='2', SLURM_PROCID='1', SLURM_LOCALID='0')
    assert distributed.find_job(None, None, None, slurm).detected == 'slurm'
    # One task on its node drives all the GPUs it sees, and so does a task SLURM bound to its own GPUs;
    # tasks that each see all the node's GPUs are left to JAX, which gives task i GPU i.
    eight = [str(i) for i in range(8)]
    one_per_node = distributed.find_job(None, None, None, {**slurm, 'SLURM_STEP_TASKS_PER_NODE': '1(x2)'})
    assert distributed.local_gpu_ids(one_per_node, eight) == list(range(8))
    many = {**slurm, 'SLURM_STEP_TASKS_PER_NODE': '8(x2),1', 'SLURM_NODEID': '1'}
    assert distributed.find_job(None, None, None, many).tasks_on_node == 8
    assert distributed.local_gpu_ids(distributed.find_job(None, None, None, many), eight) is None
    assert distributed.local_gpu_ids(distributed.find_job(None, None, None, many), ['3']) == [0]
    assert distributed.find_job(None, None, None, {**many, 'SLURM_NODEID': '2'}).tasks_on_node == 1
    assert distributed.local_gpu_ids(distributed.find_job('h:1', 2, 0, {}), eight) is None
    assert distributed.visible_gpus({'CUDA_VISIBLE_DEVICES': '4,5'}) == ['4', '5']
    assert distributed.visible_gpus({'JAX_PLATFORMS': 'cpu', 'CUDA_VISIBLE_DEVICES': '4,5'}) == []
    assert distributed.find_job(None, None, None, {**slurm, 'SLURM_NTASKS': '1'}) is None
    ompi = {'OMPI_COMM_WORLD_SIZE': '8', 'OMPI_COMM_WORLD_RANK': '5'}
    assert distributed.find_job(None, None, None, ompi).process_id == 5
    with pytest.raises(ConfigError, match='missing: coordinator_address'):
        distributed.find_job(None, 2, 0, {})
    with pytest.raises(ConfigError, match='process_id=2 must be in 0..1'):
        distributed.find_job('h:1', 2, 2, {})
    with pytest.raises(ConfigError, match='must be HOST:PORT'):
        distributed.find_job('h', 2, 0, {})
    with pytest.raises(ConfigError, match='JAX_NUM_PROCESSES=.x. must be a whole number'):
        distributed.find_job(None, None, None, {'JAX_NUM_PROCESSES': 'x'})


def test_launcher_splits_devices_and_reports_the_first_failure(monkeypatch):
    cpu = launch_local.process_env(1, 2, 999, [], 8)
    assert (cpu['JAX_PROCESS_ID'], cpu['JAX_NUM_CPU_DEVICES'], cpu['JAX_PLATFORMS']) == ('1', '4', 'cpu')
    assert 'xla_force_host_platform_device_count' not in cpu['XLA_FLAGS']  # set by conftest, not passed on
    gpu = launch_local.process_env(1, 2, 999, ['0', '1', '2', '3'], 8)
    assert gpu['CUDA_VISIBLE_DEVICES'] == '2,3' and gpu['JAX_COORDINATOR_ADDRESS'] == '127.0.0.1:999'
    command = [
        sys.executable,
        'scripts/launch_local.py',
        '--num_processes',
        '3',
        '--cpu_devices',
        '3',
        '--',
        sys.executable,
        '-c',
        'import os, sys, time; i = int(os.environ["JAX_PROCESS_ID"]); time.sleep(i); sys.exit([0, 4, 3][i])',
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert result.returncode == 3 and 'process 2 exited with code 3 first' in result.stderr


def test_launcher_passes_a_signal_on_once_as_sigterm():
    child = (
        'import os, signal, sys, time\n'
        'signal.signal(signal.SIGTERM, lambda *_: sys.exit(4))\n'  # like the trainer: save, then exit 4
        'print("ready", flush=True)\n'
        'time.sleep(60)\n'
        'sys.exit(1)\n'
    )
    command = [sys.executable, 'scripts/launch_local.py', '--num_processes', '2', '--', sys.executable, '-c', child]
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    lines = {launcher.stdout.readline().strip() for _ in range(2)}
    assert lines == {'ready', '[process 1] ready'}  # process 1's lines are prefixed
    launcher.send_signal(signal.SIGINT)  # Ctrl-C
    assert launcher.wait(timeout=30) == 4
