"""The model that generate, chat and serve write text with: --model on the first --tensor_parallel devices."""

from absl import flags

from trainer.errors import ConfigError
from trainer.inference import loading
from trainer.inference.model_flag import DTYPE, MODEL

TENSOR = flags.DEFINE_integer('tensor_parallel', 1, 'Devices to split the heads over (mesh.tensor).')


def load() -> loading.LoadedModel:
    """The language model of --model; one without a tokenizer, or a classifier, is a ConfigError."""
    loaded = loading.load(MODEL.value, {'data': 1, 'fsdp': 1, 'tensor': TENSOR.value}, DTYPE.value)
    if loaded.tokenizer is None:
        raise ConfigError(f'{MODEL.value} has no tokenizer.json: text cannot be turned into its ids.')
    if loaded.model_cfg.head != 'lm':
        raise ConfigError(
            f'{MODEL.value} is a classifier, which writes no text: score it with python -m trainer.evaluate '
            f'--model {MODEL.value} --files LABELED.jsonl.'
        )
    return loaded
