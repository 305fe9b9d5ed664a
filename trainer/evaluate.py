"""python -m trainer.evaluate --model PATH --files PATTERN [--seq_len N] [--batch_size B] [--json]

Scores a model on whole files (every document, read once, not a sample): loss per token, perplexity, and
bits per byte (comparable between tokenizers). PATH is a run's workdir, a checkpoint folder or a Hugging
Face model folder; the files are read with the model's data settings and tokenizer, packed into rows as
in training, and the batches are sharded over the model config's mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import app, flags

from trainer import cli, loading, steps
from trainer import mesh as mesh_lib
from trainer.data import pipeline
from trainer.errors import ConfigError
from trainer.model_flag import MODEL
from trainer.train import token_bytes

_FILES = flags.DEFINE_string('files', None, 'Comma-separated paths, globs or URLs of the text to score.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', None, "Tokens per row; default: the model's training seq_len.")
_BATCH = flags.DEFINE_integer('batch_size', None, "Rows per batch; default: the model's global_batch_size.")
_JSON = flags.DEFINE_bool('json', False, 'Print the scores as one JSON object.')
flags.mark_flags_as_required(['files'])


@dataclasses.dataclass(frozen=True)
class Scores:
    """A model's scores on some text."""

    loss: float  # nats per counted token
    perplexity: float
    bits_per_byte: float
    tokens: int  # counted (predicted) tokens
    bytes: int  # UTF-8 bytes of text those tokens stand for


def score(loaded: loading.LoadedModel, files: str, seq_len: int, batch_size: int, progress: bool = False) -> Scores:
    """Scores `loaded` on every document of `files`, read once."""
    data_cfg = loaded.config.data
    data_cfg.update(eval_files=files, seq_len=seq_len)
    if seq_len > loaded.model_cfg.max_seq_len:
        raise ConfigError(f"--seq_len={seq_len} exceeds the model's context of {loaded.model_cfg.max_seq_len}.")
    source = pipeline.eval_source(data_cfg, '--files')
    pipeline.check_sources([source], data_cfg, loaded.model_cfg.vocab_size)
    rows = pipeline.make_dataset([source], data_cfg, loaded.tokenizer, 0, batch_size, shuffle=False, repeat=False)
    sharding = mesh_lib.batch_sharding(loaded.mesh, loaded.model_cfg.sharding_rules)
    byte_lengths = jnp.asarray(token_bytes(loaded.tokenizer, loaded.model_cfg), jnp.float32)
    evaluate = jax.jit(functools.partial(steps.eval_step, graphdef=loaded.graphdef, byte_lengths=byte_lengths))
    totals = np.zeros(3)
    with jax.set_mesh(loaded.mesh):
        for batch in tqdm.tqdm(rows, unit='batch', desc='scoring', disable=not progress or None):
            missing = batch_size - len(batch['inputs'])  # the last batch: rows of padding, which count nothing
            batch = {name: np.pad(array, [(0, missing), (0, 0)]) for name, array in batch.items()}
            placed = {name: jax.device_put(array, sharding) for name, array in batch.items()}
            totals += np.asarray(jax.device_get(evaluate(loaded.params, placed)), np.float64)
    loss_sum, tokens, text_bytes = totals
    if not tokens:
        raise ConfigError(f'--files={files} holds no text to score.')
    loss = loss_sum / tokens
    return Scores(loss, math.exp(loss), loss_sum / math.log(2) / max(text_bytes, 1.0), int(tokens), int(text_bytes))


def main(argv: list[str]) -> int:
    cli.start(argv)
    try:
        loaded = loading.load(MODEL.value)
        if loaded.tokenizer is None:
            raise ConfigError(f'{MODEL.value} has no tokenizer.json: text cannot be turned into its ids.')
        seq_len = _SEQ_LEN.value or loaded.config.data.seq_len
        batch_size = _BATCH.value or loaded.config.train.global_batch_size
        split = pipeline.batch_shards(
            mesh_lib.batch_sharding(loaded.mesh, loaded.model_cfg.sharding_rules), (batch_size, seq_len)
        )
        if batch_size % split:
            raise ConfigError(f'--batch_size={batch_size} must be a multiple of the {split} batch shards of the mesh.')
        scores = score(loaded, _FILES.value, seq_len, batch_size, progress=not _JSON.value)
    except ConfigError as error:
        cli.fail(str(error))
    if _JSON.value:
        print(json.dumps(dataclasses.asdict(scores) | {'model': loaded.source, 'files': _FILES.value}))
    else:
        print(
            f'loss {scores.loss:.4f} nats/token | perplexity {scores.perplexity:.2f} | '
            f'{scores.bits_per_byte:.4f} bits per byte | {scores.tokens:,} tokens, {scores.bytes:,} bytes | '
            f'model {loaded.source}'
        )
    return 0


if __name__ == '__main__':
    app.run(main)
