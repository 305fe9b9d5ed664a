"""What the commands (generate, chat, evaluate, scaling) do alike: one-line errors, quiet JAX logs."""

from __future__ import annotations

import logging as std_logging
import sys
from typing import NoReturn

from absl import flags, logging

EXIT_BAD_INPUT = 2


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr and exit code 2, never a traceback."""
    print(f'error: {message}', file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def start(argv: list[str], hint: str = '') -> None:
    """Refuses stray arguments; keeps JAX's start-up logging (INFO) quiet unless --verbosity asks for it."""
    if len(argv) > 1:
        fail(f'unexpected arguments: {" ".join(argv[1:])}{hint}')
    quiet_logs()


class _PlainFormatter(std_logging.Formatter):
    """'warning: message', like the one-line errors, instead of absl's 'W1130 02:27:38.563780 1397 file.py:79]'."""

    def format(self, record: std_logging.LogRecord) -> str:
        return f'{record.levelname.lower()}: {record.getMessage()}'


def quiet_logs() -> None:
    """Warnings and errors only (JAX logs its start-up at INFO), as plain lines; --verbosity keeps absl's way."""
    if not flags.FLAGS['verbosity'].present:
        logging.set_verbosity(logging.WARNING)
        logging.get_absl_handler().setFormatter(_PlainFormatter())
