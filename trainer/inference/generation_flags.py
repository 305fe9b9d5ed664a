"""The flags that trainer.generate and trainer.chat share: the model (inference.text_model), tokens, sampling."""

from __future__ import annotations

from absl import flags

from trainer.errors import ConfigError
from trainer.inference import loading, text_model
from trainer.inference.sampling import Sampling

MAX_NEW = flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate at most, per prompt or reply.')
TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'Sampling temperature; 0 = greedy (the most likely token).')
TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens only; 0 = all.')
TOP_P = flags.DEFINE_float('top_p', 1.0, 'Sample among the most likely tokens that make up probability p; 1 = all.')
SEED = flags.DEFINE_integer('seed', 0, 'Seed of the sampling: the same seed gives the same text.')


def sampling() -> Sampling:
    """The sampling the flags ask for; a value out of range is a ConfigError."""
    chosen = Sampling(TEMPERATURE.value, TOP_K.value, TOP_P.value)
    chosen.check()
    return chosen


def load_model() -> loading.LoadedModel:
    """The model of --model (text_model.load), with room in its context for --max_new_tokens."""
    loaded = text_model.load()
    if not 0 < MAX_NEW.value < loaded.model_cfg.max_seq_len:
        raise ConfigError(
            f'--max_new_tokens={MAX_NEW.value} must be between 1 and the context length minus one '
            f'({loaded.model_cfg.max_seq_len - 1}).'
        )
    return loaded
