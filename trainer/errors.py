"""Errors that reach the user as one sentence, never as a traceback."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and what would be valid."""


class StoppedBySignal(RuntimeError):
    """SIGTERM or SIGINT arrived; the state was saved at the step the message names."""


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or Inf; the message names the step."""
