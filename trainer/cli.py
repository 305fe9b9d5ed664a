"""What the commands (generate, chat, evaluate, scaling) do alike: one-line errors, quiet JAX logs."""

from __future__ import annotations

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
    if not flags.FLAGS['verbosity'].present:
        logging.set_verbosity(logging.WARNING)
