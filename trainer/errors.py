"""Errors that reach the user as one sentence, never as a traceback."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and what would be valid."""


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or Inf; the message names the step."""
