"""python -m trainer.evaluate --model PATH --files PATTERN [--task multiple_choice] [--seq_len N] [--batch_size B]
[--format sft] [--dtype D] [--json]

Scores a model on whole files (every document, read once, not a sample): loss per token, perplexity, and
bits per byte (comparable between tokenizers). PATH is a run's workdir, a checkpoint folder or a Hugging
Face model folder; the files are read with the model's data settings and tokenizer, packed into rows as
in training, and the batches are sharded over the model config's mesh. For a model fine-tuned on
instructions (data.format 'sft', or --format sft for any model) the loss is over the answers only. A
classifier (model.head 'classify') gets its accuracy and confusion matrix on labeled JSON lines instead.
`--task multiple_choice` scores JSON lines {"context", "choices", "gold"} by each choice's log-likelihood:
acc, acc_norm and acc_bytes as lm-evaluation-harness defines them (trainer/evaluation/multiple_choice.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import app, flags
from flax import nnx

from trainer import cli
from trainer.data import examples, pipeline, sources
from trainer.errors import ConfigError
from trainer.evaluation import multiple_choice
from trainer.evaluation.loglikelihood import Scorer
from trainer.inference import loading
from trainer.inference.model_flag import DTYPE, MODEL
from trainer.runtime import mesh as mesh_lib
from trainer.training import steps

_FILES = flags.DEFINE_string('files', None, 'Comma-separated paths, globs or URLs of the text to score.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', None, "Tokens per row; default: the model's training seq_len.")
_BATCH = flags.DEFINE_integer('batch_size', None, "Rows per batch; default: the model's global_batch_size.")
_JSON = flags.DEFINE_bool('json', False, 'Print the scores as one JSON object.')
_FORMAT = flags.DEFINE_string(
    'format', None, "The files' config.data.format, if not the model's: 'sft' scores the answers of instruction data."
)
_TASK = flags.DEFINE_enum(
    'task',
    'loss',
    ['loss', 'multiple_choice'],
    "'loss': loss and bits per byte of the text; 'multiple_choice': acc of JSON lines {context, choices, gold}.",
)
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
    rows = pipeline.make_dataset(
        [source], data_cfg, loaded.tokenizer, 0, batch_size, shuffle=False, repeat=False, with_bytes=True
    )
    sharding = mesh_lib.batch_sharding(loaded.mesh, loaded.model_cfg.sharding_rules)
    evaluate = jax.jit(functools.partial(steps.eval_step, graphdef=loaded.graphdef, model_cfg=loaded.model_cfg))
    totals = np.zeros(3)
    with jax.set_mesh(loaded.mesh):
        for batch in tqdm.tqdm(rows, unit='batch', desc='scoring', disable=not progress or None):
            missing = batch_size - len(batch['inputs'])  # the last batch: rows of padding, which count nothing
            batch = {name: np.pad(array, [(0, missing), (0, 0)]) for name, array in batch.items()}
            placed = {name: jax.device_put(array, sharding) for name, array in batch.items()}
            sums = jax.device_get(evaluate(loaded.params, placed))
            totals += np.array([sums['loss'], sums['count'], sums['bytes']], np.float64)
    loss_sum, tokens, text_bytes = totals
    if not tokens:
        raise ConfigError(f'--files={files} holds no text to score.')
    loss = loss_sum / tokens
    return Scores(loss, math.exp(loss), loss_sum / math.log(2) / max(text_bytes, 1.0), int(tokens), int(text_bytes))


@dataclasses.dataclass(frozen=True)
class Accuracy:
    """A classifier's scores on labeled examples."""

    loss: float  # nats per example
    accuracy: float
    examples: int
    confusion: list[list[int]]  # [true class][predicted class]
    class_names: list[str]


def _predict(params: Any, batch: steps.Batch, graphdef: Any, pool: str) -> tuple[jax.Array, jax.Array]:
    model = nnx.merge(graphdef, params)
    logits_BTC = model(batch['inputs'], batch['positions'], batch['segment_ids'])
    logits_BC = steps.pooled_logits(logits_BTC, batch['weights'], pool)
    losses_B = optax.softmax_cross_entropy_with_integer_labels(logits_BC, batch['targets'][:, 0])
    return jnp.argmax(logits_BC, -1), losses_B


def classify(loaded: loading.LoadedModel, files: str, batch_size: int, progress: bool = False) -> Accuracy:
    """A classifier's accuracy and confusion matrix on every example of `files`, read once."""
    data_cfg, cfg = loaded.config.data, loaded.model_cfg
    data_cfg.update(eval_files=files)
    source = pipeline.eval_source(data_cfg, '--files')
    found = examples.read(source.files, data_cfg, loaded.tokenizer, cfg.num_classes, '--files')
    rows = examples.make_dataset(found, data_cfg, 0, batch_size, shuffle=False, repeat=False)
    sharding = mesh_lib.batch_sharding(loaded.mesh, cfg.sharding_rules)
    predict = jax.jit(functools.partial(_predict, graphdef=loaded.graphdef, pool=cfg.pool))
    confusion = np.zeros((cfg.num_classes, cfg.num_classes), np.int64)
    loss_sum = 0.0
    with jax.set_mesh(loaded.mesh):
        for batch in tqdm.tqdm(rows, unit='batch', desc='classifying', disable=not progress or None):
            real = len(batch['inputs'])
            batch = {name: np.pad(array, [(0, batch_size - real), (0, 0)]) for name, array in batch.items()}
            placed = {name: jax.device_put(array, sharding) for name, array in batch.items()}
            predicted, losses = jax.device_get(predict(loaded.params, placed))
            np.add.at(confusion, (batch['targets'][:real, 0], predicted[:real]), 1)
            loss_sum += float(losses[:real].sum())
    total = int(confusion.sum())
    names = examples.class_names(data_cfg) or [str(i) for i in range(cfg.num_classes)]
    return Accuracy(loss_sum / total, float(np.trace(confusion)) / total, total, confusion.tolist(), names)


def confusion_table(scores: Accuracy) -> str:
    """The confusion matrix as text: a row per true class, a column per predicted class (by number)."""
    width = max(4, len(str(max(max(row) for row in scores.confusion))) + 1)
    label = max(len(name) for name in scores.class_names) + 4
    lines = ['true \\ predicted'.ljust(label) + ''.join(f'{i:>{width}}' for i in range(len(scores.class_names)))]
    for i, (name, row) in enumerate(zip(scores.class_names, scores.confusion, strict=True)):
        lines.append(f'{i:>2} {name}'.ljust(label) + ''.join(f'{count:>{width}}' for count in row))
    return '\n'.join(lines)


def print_choices(scores: multiple_choice.Accuracies, source: str) -> None:
    if _JSON.value:
        print(json.dumps(dataclasses.asdict(scores) | {'model': source, 'files': _FILES.value}))
        return
    print(
        f'acc {scores.acc:.4f} ± {scores.acc_stderr:.4f} | acc_norm {scores.acc_norm:.4f} ± '
        f'{scores.acc_norm_stderr:.4f} | acc_bytes {scores.acc_bytes:.4f} ± {scores.acc_bytes_stderr:.4f} | '
        f'{scores.questions:,} questions, chance {scores.chance:.4f} | model {source}'
    )


def main(argv: list[str]) -> int:
    cli.start(argv)
    try:
        loaded = loading.load(MODEL.value, dtype=DTYPE.value)
        if loaded.tokenizer is None:
            raise ConfigError(f'{MODEL.value} has no tokenizer.json: text cannot be turned into its ids.')
        if _FORMAT.value:
            if _FORMAT.value not in sources.FORMATS or _FORMAT.value == 'classify':
                raise ConfigError(f'--format={_FORMAT.value!r} is not a format a language model reads.')
            loaded.config.data.format = _FORMAT.value
        seq_len = _SEQ_LEN.value or loaded.config.data.seq_len
        batch_size = _BATCH.value or loaded.config.train.global_batch_size
        split = pipeline.batch_shards(
            mesh_lib.batch_sharding(loaded.mesh, loaded.model_cfg.sharding_rules), (batch_size, seq_len)
        )
        if batch_size % split:
            raise ConfigError(f'--batch_size={batch_size} must be a multiple of the {split} batch shards of the mesh.')
        if _TASK.value == 'multiple_choice':
            if loaded.model_cfg.head == 'classify':
                raise ConfigError(f'{MODEL.value} is a classifier: --task=multiple_choice scores language models.')
            scorer = Scorer(loaded, batch_size)
            choices = multiple_choice.score(scorer, loaded.tokenizer, _FILES.value, progress=not _JSON.value)
        elif loaded.model_cfg.head == 'classify':
            accuracy = classify(loaded, _FILES.value, batch_size, progress=not _JSON.value)
        else:
            scores = score(loaded, _FILES.value, seq_len, batch_size, progress=not _JSON.value)
    except ConfigError as error:
        cli.fail(str(error))
    if _TASK.value == 'multiple_choice':
        print_choices(choices, loaded.source)
        return 0
    if loaded.model_cfg.head == 'classify':
        if _JSON.value:
            print(json.dumps(dataclasses.asdict(accuracy) | {'model': loaded.source, 'files': _FILES.value}))
        else:
            chance = 1 / len(accuracy.class_names)
            print(
                f'accuracy {accuracy.accuracy:.3f} ({accuracy.examples:,} examples; chance {chance:.3f}) | '
                f'loss {accuracy.loss:.4f} nats/example | model {loaded.source}'
            )
            print(confusion_table(accuracy))
        return 0
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
