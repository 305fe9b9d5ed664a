"""Joining a multi-process job through `jax.distributed`, with bounded waits and a watch on the other processes.

A process is one of several when the flags or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID say so, or when JAX can read the job from SLURM (srun), Open MPI (mpirun) or a
multi-host Cloud TPU. A single process does nothing here.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from trainer.errors import ConfigError

EXIT_PEER_LOST = 5  # another process of the job died or stopped answering; rerun the job to resume


@dataclasses.dataclass(frozen=True)
class Job:
    """How this process joins its job; None fields are left to JAX's cluster detection."""

    num_processes: int | None
    process_id: int | None
    coordinator_address: str | None
    detected: str  # 'flags', 'environment', 'slurm', 'openmpi' or 'tpu'
    tasks_on_node: int | None = None  # SLURM: this step's tasks on this node

    def describe(self) -> str:
        who = f'process {self.process_id} of {self.num_processes}' if self.num_processes else 'a process'
        where = f' through {self.coordinator_address}' if self.coordinator_address else ''
        return f'{who} ({self.detected}){where}'


def _int(value: str | int | None, name: str) -> int | None:
    if value is None or value == '':
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f'{name}={value!r} must be a whole number.') from None


def find_job(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None, environ: Mapping[str, str]
) -> Job | None:
    """The job this process belongs to, or None when it runs alone."""
    address = coordinator_address or environ.get('JAX_COORDINATOR_ADDRESS') or None
    count = num_processes if num_processes is not None else _int(environ.get('JAX_NUM_PROCESSES'), 'JAX_NUM_PROCESSES')
    index = process_id if process_id is not None else _int(environ.get('JAX_PROCESS_ID'), 'JAX_PROCESS_ID')
    explicit = {'coordinator_address': address, 'num_processes': count, 'process_id': index}
    if any(value is not None for value in explicit.values()):
        from_flags = any(value is not None for value in (coordinator_address, num_processes, process_id))
        source = 'flags' if from_flags else 'environment'
        if count == 1 and address is None:
            return None
        missing = [name for name, value in explicit.items() if value is None]
        if missing:
            raise ConfigError(
                f'a multi-process run needs --coordinator_address, --num_processes and --process_id (or '
                f'JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); missing: {", ".join(missing)}.'
            )
        if count < 1 or not 0 <= index < count:
            raise ConfigError(f'process_id={index} must be in 0..{count - 1} for num_processes={count}.')
        if ':' not in address:
            raise ConfigError(f'coordinator_address={address!r} must be HOST:PORT, e.g. 10.0.0.1:12345.')
        return None if count == 1 else Job(count, index, address, source)
    slurm = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID')
    if all(name in environ for name in slurm) and int(environ['SLURM_NTASKS']) > 1:
        tasks_here = _slurm_tasks_on_this_node(environ)
        return Job(int(environ['SLURM_NTASKS']), int(environ['SLURM_PROCID']), None, 'slurm', tasks_here)
    if int(environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
        return Job(int(environ['OMPI_COMM_WORLD_SIZE']), int(environ['OMPI_COMM_WORLD_RANK']), None, 'openmpi')
    if ',' in environ.get('TPU_WORKER_HOSTNAMES', ''):
        return Job(None, None, None, 'tpu')
    return None


def _slurm_tasks_on_this_node(environ: Mapping[str, str]) -> int | None:
    """Tasks of this step on this node, from SLURM's '2(x3),1'-style list and SLURM_NODEID."""
    counts: list[int] = []
    spec = environ.get('SLURM_STEP_TASKS_PER_NODE') or environ.get('SLURM_TASKS_PER_NODE', '')
    for part in spec.split(','):
        if match := re.fullmatch(r'(\d+)(?:\(x(\d+)\))?', part.strip()):
            counts += [int(match[1])] * int(match[2] or 1)
    node = int(environ.get('SLURM_NODEID', '0'))
    return counts[node] if node < len(counts) else None


def visible_gpus(environ: Mapping[str, str] = os.environ) -> list[str]:
    """This machine's NVIDIA GPUs as CUDA sees them (CUDA_VISIBLE_DEVICES first); none if JAX_PLATFORMS is cpu."""
    if environ.get('JAX_PLATFORMS', '').lower() == 'cpu':
        return []
    if environ.get('CUDA_VISIBLE_DEVICES') is not None:
        return [gpu for gpu in environ['CUDA_VISIBLE_DEVICES'].split(',') if gpu]
    if not shutil.which('nvidia-smi'):
        return []
    listing = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, check=False).stdout
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith('GPU ')]


def local_gpu_ids(job: Job, gpus: list[str]) -> list[int] | None:
    """Which of the GPUs this process sees it drives; None leaves it to JAX.

    Under SLURM, JAX gives task i of a node GPU i alone. Right when each task sees all the node's
    GPUs and there is one task per GPU; wrong for one task per node (it would use 1 GPU of 8) and
    when SLURM binds GPUs to tasks (task 3 sees one GPU, numbered 0): then the process takes all it sees.
    """
    if job.detected != 'slurm' or not gpus or job.tasks_on_node is None:
        return None
    if job.tasks_on_node == 1 or len(gpus) < job.tasks_on_node:
        return list(range(len(gpus)))
    return None


def _wait_for_coordinator(address: str, deadline: float) -> None:
    """Waits until something listens at the coordinator's address, so that a wrong one gets a clear error."""
    host, port = address.rsplit(':', 1)
    while True:
        try:
            socket.create_connection((host.strip('[]'), int(port)), timeout=5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f'nothing answered at the coordinator address {address} within the join timeout: start process 0 '
                    '(it hosts the coordinator), check --coordinator_address, or raise --join_timeout_s.'
                ) from None
            time.sleep(1)


def _fatal(message: str) -> None:
    """Ends the process at once from any thread: its peers are gone, so nothing can finish cleanly."""
    print(f'error: {message}', file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_PEER_LOST)


class PeerWatch:
    """Each process beats in the coordinator's key-value store; a peer whose beat stops ends this process.

    JAX's own heartbeat also ends a job whose process died, but with a C++ abort and a stack trace;
    this watch notices first and says in one line what happened.
    """

    _PREFIX = 'shardtrain/beat/'

    def __init__(self, client, process_id: int, num_processes: int, timeout_s: float):
        self._client, self._id, self._count, self._timeout = client, process_id, num_processes, timeout_s
        self._interval = min(1.0, timeout_s / 5)  # between beats: several fit in one timeout
        self._stop = threading.Event()
        self._beat = 0
        self._thread = threading.Thread(target=self._run, name='peer-watch', daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last_seen: dict[str, tuple[str, float]] = {}
        while not self._stop.wait(self._interval):
            try:
                self._beat += 1
                self._client.key_value_set(f'{self._PREFIX}{self._id}', str(self._beat), allow_overwrite=True)
                beats = dict(self._client.key_value_dir_get(self._PREFIX))
            except Exception as error:  # the coordinator (process 0) is gone
                if self._stop.is_set():
                    return
                _fatal(
                    f'lost contact with the coordinator (process 0): {str(error).strip().splitlines()[0][:200]}; '
                    'this process stops too. Rerun the job: it resumes from the latest checkpoint.'
                )
            now = time.monotonic()
            for peer in range(self._count):
                key = f'{self._PREFIX}{peer}'
                value = beats.get(key, '')
                if value == 'done':
                    continue
                if key not in last_seen or last_seen[key][0] != value:
                    last_seen[key] = (value, now)
                elif now - last_seen[key][1] > self._timeout and not self._stop.is_set():
                    _fatal(
                        f'process {peer} of {self._count} stopped answering for {self._timeout:g} s (it died, hung or '
                        'lost its network; see its log); this process stops too. Rerun the job: it resumes from '
                        'the latest checkpoint.'
                    )

    def wait_for_lost_peer(self) -> None:
        """Gives the watch time to name a dead peer, after a collective failed; returns if none is lost.

        A peer that dies mid-collective makes this process's collective fail at once (gloo: "Connection
        closed by peer"), often before its beat is overdue; the watch then ends the process in one line.
        """
        self._thread.join(timeout=self._timeout + 2 * self._interval + 1)

    def finish(self) -> None:
        """This process ends normally: its peers must not take its silence for a failure."""
        self._stop.set()
        self._thread.join()
        try:
            self._client.key_value_set(f'{self._PREFIX}{self._id}', 'done', allow_overwrite=True)
        except Exception:  # the others are finishing too; nothing is lost
            pass


def join(job: Job, join_timeout_s: float, peer_timeout_s: float) -> PeerWatch | None:
    """Initializes jax.distributed for `job`, failing in one line within `join_timeout_s` if peers are missing."""
    deadline = time.monotonic() + join_timeout_s
    print(f'joining the job as {job.describe()}', flush=True)
    if job.coordinator_address and job.process_id:
        _wait_for_coordinator(job.coordinator_address, deadline)

    # JAX aborts with a misleading "another task died" when the join times out; this timer fires
    # first with the likely cause. Blocking in the join releases the GIL, so the timer runs.
    def too_late() -> None:
        _fatal(
            f'not all {job.num_processes or "the"} processes joined within {join_timeout_s:g} s: start every process '
            'with the same --coordinator_address and --num_processes and distinct --process_id, or raise '
            '--join_timeout_s.'
        )

    timer = threading.Timer(max(deadline - time.monotonic(), 1.0), too_late)
    timer.daemon = True
    timer.start()
    try:
        jax.distributed.initialize(
            coordinator_address=job.coordinator_address,
            num_processes=job.num_processes,
            process_id=job.process_id,
            local_device_ids=local_gpu_ids(job, visible_gpus()),
            initialization_timeout=int(join_timeout_s) + 30,
            # JAX's own watch, a backstop behind PeerWatch.
            heartbeat_timeout_seconds=int(2 * peer_timeout_s) + 10,
        )
    finally:
        timer.cancel()
    # The coordination client is not public API; without it, JAX's heartbeat alone watches the peers.
    from jax._src import distributed as jax_distributed

    client = getattr(jax_distributed.global_state, 'client', None)
    if client is None or not hasattr(client, 'key_value_dir_get'):
        return None
    return PeerWatch(client, jax.process_index(), jax.process_count(), peer_timeout_s)


def every_process(values: list[float]) -> np.ndarray:
    """Each process's `values`, one row per process in process order (a collective: call on all processes)."""
    local = np.asarray(values, np.float32)  # float64 needs jax_enable_x64
    if jax.process_count() == 1:
        return local[None]
    return np.asarray(multihost_utils.process_allgather(local)).reshape(jax.process_count(), -1)
