"""python -m trainer --config configs/small_lm.py [--workdir DIR] [--config.section.key=value ...]

One of several processes: add --coordinator_address, --num_processes and --process_id (or set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or start it with srun or mpirun.
"""

import os
import pathlib
import re
import sys
import traceback
from typing import NoReturn

import jax
from absl import app, flags
from ml_collections import config_flags

from trainer import cli
from trainer.errors import ConfigError, StoppedBySignal, TrainingDivergedError
from trainer.runtime import distributed, xla_flags
from trainer.training.train import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/small_lm.py.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for everything the run writes (default runs/<config name>).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0 in a multi-process job (or JAX_COORDINATOR_ADDRESS).'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job (or JAX_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0 to num_processes - 1 (or JAX_PROCESS_ID).')
_JOIN_TIMEOUT = flags.DEFINE_float('join_timeout_s', 300, 'Seconds to wait for every process of the job to join.')
_PEER_TIMEOUT = flags.DEFINE_float(
    'peer_timeout_s', 30, 'A process of the job silent this long ends the others with an error.'
)
flags.mark_flags_as_required(['config'])

EXIT_BAD_INPUT = 2  # a config or data problem, reported in one line
EXIT_DIVERGED = 3  # the loss became NaN or Inf
EXIT_STOPPED = 4  # SIGTERM/SIGINT: the state was saved; the same command resumes
EXIT_PEER_LOST = distributed.EXIT_PEER_LOST  # 5: another process of the job died; rerun the job to resume
EXIT_INTERRUPTED = 130  # Ctrl-C before the first step or after the last (the shell's 128 + SIGINT)


def _fail(message: str) -> NoReturn:
    print(f'error: {message}', file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with config-file and override mistakes reported in one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:  # a malformed value, e.g. --config.train.steps=abc
        text = str(error)
        if 'Error whilst parsing config file' in text:  # get_config raised: the traceback's last line says why
            _fail(f'cannot load --config: {text.strip().splitlines()[-1].split(": ", 1)[-1]}')
        _fail(text)
    except SyntaxError as error:  # in the config file
        _fail(f'the config file does not parse: {error.filename}:{error.lineno}: {error.msg}.')
    except (KeyError, AttributeError) as error:  # an override of a field the config does not declare
        text = str(error).replace('\\n', ' ').replace("\\'", "'")  # ml_collections nests the KeyError's repr
        field = re.search(r"'(\w+)'", text)
        hint = re.search(r'Did you mean "(\w+)"', text)
        name = field.group(1) if field else '?'
        flag = next((a.split('=')[0] for a in argv if f'.{name}' in a.split('=')[0]), name)
        _fail(
            f'{flag} names no field of the config'
            + (f' (did you mean {hint.group(1)!r}?)' if hint else '')
            + ': every field is declared in the config file.'
        )


def main(argv: list[str]) -> int:
    """Joins the job if this process is one of several, trains, and returns the exit code."""
    cli.quiet_logs()  # jax logs its backend probing and joining at INFO
    set_xla_flags()
    try:
        job = distributed.find_job(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, os.environ)
        watch = distributed.join(job, _JOIN_TIMEOUT.value, _PEER_TIMEOUT.value) if job else None
    except ConfigError as error:
        _fail(str(error))
    if job is None:
        return run(argv)
    try:
        code = run(argv)
    except SystemExit as exit_request:  # a one-line error from _fail
        code = exit_request.code if isinstance(exit_request.code, int) else 1
    except Exception as error:  # a bug, or a collective broken by a dead peer: show it, then leave
        if isinstance(error, jax.errors.JaxRuntimeError) and watch is not None:
            watch.wait_for_lost_peer()  # exits with the watch's one-line error if a peer is gone
        traceback.print_exc()
        code = 1
    if code in (0, EXIT_STOPPED):  # every process ends here together; JAX's exit waits for all
        if watch is not None:
            watch.finish()
        return code
    # This process failed on its own: leave now, skipping JAX's exit barrier (which would wait for the
    # others, themselves waiting for this process); they notice it is gone and stop too.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def set_xla_flags() -> None:
    """Adds the config's XLA GPU flags to XLA_FLAGS, before anything starts a backend (XLA reads them once)."""
    try:
        wanted = _CONFIG.value.train.xla_gpu_flags
    except (OSError, AttributeError):  # a config that does not load, or lacks the field: `run` tells what is wrong
        return
    xla_flags.apply(wanted)


def run(argv: list[str]) -> int:
    """Trains the config given by the flags; returns the exit code."""
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    # Random bits that do not depend on how arrays are sharded: the same init on every mesh.
    jax.config.update('jax_threefry_partitionable', True)
    config_name = pathlib.Path(config_flags.get_config_filename(flags.FLAGS['config'])).stem
    workdir = pathlib.Path(_WORKDIR.value or pathlib.Path('runs') / config_name)
    try:
        config = _CONFIG.value
        config.keys()  # a config file that failed to load raises on first attribute access
    except OSError as error:
        _fail(f'cannot load --config: {str(error).strip().splitlines()[-1].strip()}')
    try:
        result = train(config, workdir)
    except ConfigError as error:
        print(f'error: {error}', file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingDivergedError as error:
        print(f'error: {error}', file=sys.stderr)
        return EXIT_DIVERGED
    except StoppedBySignal as message:
        print(f'stopped: {message}', file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:  # Ctrl-C while starting up or finishing, outside the loop's save-and-stop
        print(
            f'stopped: interrupted; nothing more was saved (the newest checkpoint in {workdir} stands).',
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    loss_text = f', loss {result.last_loss:.4f}' if result.last_loss is not None else ''
    eval_text = f', eval loss {result.eval_loss:.4f}' if result.eval_loss is not None else ''
    if jax.process_index() == 0:
        print(f'done: step {result.final_step}{loss_text}{eval_text}; outputs in {workdir}')
    return 0


if __name__ == '__main__':
    app.run(main, flags_parser=parse_flags)
