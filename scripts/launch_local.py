"""Starts N processes of one job on this machine, splitting its GPUs (or CPU devices) between them.

Usage:
  python scripts/launch_local.py --num_processes 2 -- python -m trainer --config configs/small_lm.py

Each process gets JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port), JAX_NUM_PROCESSES and
JAX_PROCESS_ID, which the trainer reads, and its own devices: GPUs through CUDA_VISIBLE_DEVICES, or
on a machine without GPUs `--cpu_devices` simulated CPU devices split evenly. Process 0 writes to
this terminal; the others' lines are prefixed with [process N]; gloo's connection lines are dropped.
SIGINT/SIGTERM reach every process once, as SIGTERM (they agree on a step, save and exit; a second
Ctrl-C kills them). The exit code is that of the first process to fail (0 and 4, stopped by a signal,
are not failures), else 4 if any stopped, else 0.

torchrun, mpirun and srun do the same job on real clusters; this is the one-machine case without them.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from trainer.runtime.distributed import visible_gpus  # noqa: E402

EXIT_STOPPED = 4  # the trainer's code for "stopped by a signal after saving"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def process_env(index: int, count: int, port: int, gpus: list[str], cpu_devices: int) -> dict[str, str]:
    """The environment of process `index`: how to join the job, and which devices are its own."""
    env = dict(os.environ)
    env.update(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES=str(count), JAX_PROCESS_ID=str(index))
    env['PYTHONUNBUFFERED'] = '1'  # lines reach the launcher as they are printed, in order
    if gpus:
        share = len(gpus) // count
        env['CUDA_VISIBLE_DEVICES'] = ','.join(gpus[index * share : (index + 1) * share])
    else:
        env['JAX_PLATFORMS'] = 'cpu'
        env['JAX_NUM_CPU_DEVICES'] = str(cpu_devices // count)
        # An inherited device-count flag would give every process all the devices.
        flags = env.get('XLA_FLAGS', '').split()
        env['XLA_FLAGS'] = ' '.join(f for f in flags if not f.startswith('--xla_force_host_platform_device_count'))
    return env


def exit_code(returncode: int) -> int:
    """A child's code as a shell reports it (killed by signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def describe(returncode: int) -> str:
    if returncode < 0:
        return f'was killed by {signal.Signals(-returncode).name}'
    return f'exited with code {returncode}'


# gloo (inside jaxlib) prints a line per device and process group as it connects, with no switch to turn
# it off: 16 lines for 2 processes of 4 CPU devices, often garbled by its threads. They say nothing a user
# can act on.
_GLOO_PIECES = re.compile(
    r'\[Gloo\] Rank|is connected to|peer ranks\.|Expected number of connected peer ranks is :|\d+|\s+'
)


def _is_gloo_noise(line: str) -> bool:
    """A line made only of pieces of gloo's connection message (its threads interleave them)."""
    return ('Gloo' in line or 'peer ranks' in line) and not _GLOO_PIECES.sub('', line)


def _pump(stream, prefix: str) -> None:
    for line in stream:
        if not _is_gloo_noise(line):
            sys.stdout.write(prefix + line)
            sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--num_processes', type=int, required=True)
    parser.add_argument('--cpu_devices', type=int, default=8, help='simulated CPU devices in all (no GPUs)')
    parser.add_argument('--port', type=int, default=0, help='coordinator port (default: a free one)')
    parser.add_argument('--grace_s', type=float, default=90, help='after a failure, wait this long for the others')
    parser.add_argument('command', nargs=argparse.REMAINDER, help='-- then the command every process runs')
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ['--'] else args.command
    if not command:
        parser.error('give the command after --, e.g. -- python -m trainer --config configs/small_lm.py')
    count = args.num_processes
    if count < 1:
        parser.error('--num_processes must be at least 1')
    gpus = visible_gpus()
    if gpus and len(gpus) % count:
        parser.error(f'{len(gpus)} GPUs cannot be split evenly between {count} processes')
    if not gpus and args.cpu_devices % count:
        parser.error(f'--cpu_devices={args.cpu_devices} cannot be split evenly between {count} processes')
    port = args.port or free_port()

    children: list[subprocess.Popen] = []
    pumps = []
    for index in range(count):
        # Own sessions: a terminal's Ctrl-C reaches the launcher alone, which passes it on exactly once.
        # Every process's output passes through the launcher (process 0's stderr, with its progress bar, does not).
        child = subprocess.Popen(
            command,
            env=process_env(index, count, port, gpus, args.cpu_devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if index else None,
            text=True,
            start_new_session=True,
        )
        prefix = f'[process {index}] ' if index else ''
        pumps.append(threading.Thread(target=_pump, args=(child.stdout, prefix), daemon=True))
        pumps[-1].start()
        children.append(child)

    signals_seen = 0

    def forward(number: int, frame) -> None:
        nonlocal signals_seen
        signals_seen += 1
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM if signals_seen == 1 else signal.SIGKILL)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)

    ended: dict[int, int] = {}  # process -> returncode, in the order they ended
    failed_at = None
    while len(ended) < count:
        for index, child in enumerate(children):
            if index not in ended and child.poll() is not None:
                ended[index] = child.returncode
                if child.returncode not in (0, EXIT_STOPPED) and failed_at is None:
                    failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > args.grace_s:
            for child in children:
                if child.poll() is None:
                    child.kill()
        time.sleep(0.2)

    for pump in pumps:  # the last lines of every process, before the verdict
        pump.join(timeout=5)
    failures = [(index, code) for index, code in ended.items() if code not in (0, EXIT_STOPPED)]
    if failures:
        first, code = failures[0]
        print(f'launch_local: process {first} {describe(code)} first', file=sys.stderr)
        return exit_code(code)
    return EXIT_STOPPED if EXIT_STOPPED in ended.values() else 0


if __name__ == '__main__':
    sys.exit(main())
