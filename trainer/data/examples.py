"""Fine-tuning examples from JSON lines: instruction pairs, chats (loss on the answers only), labeled texts.

`config.data.format='sft'`: each line is {"prompt": ..., "completion": ...} or {"messages": [{"role",
"content"}, ...]} (rendered with the tokenizer's chat template, the same text `python -m trainer.chat`
gives the model). Every token carries a loss mask: 1 for the completion or the assistant's turns (and the
EOS that ends them), 0 for what the model only reads. Examples are packed into rows whole (grain's
first-fit packing; a row never holds part of one); an example longer than a row is cut to it.

`config.data.format='classify'`: each line is {"text": ..., "label": ...}, the label a class index or one
of config.data.class_names; one example per row, its label in `targets`, its tokens weighted 1.

The files are read and tokenized once at start-up, which also counts bad lines (skipped with a warning
naming the file and line), cut examples, and fails in one line when nothing usable is left. The examples
are then held in memory (about 5 bytes per token), shuffled anew every epoch, and resume exactly (a
grain MapDataset's position is an index).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from typing import Any

import fsspec
import grain
import numpy as np
import tqdm
from ml_collections import config_dict

from trainer import chat_template
from trainer.data.tokenizers import Tokenizer
from trainer.errors import ConfigError

FORMATS = ('sft', 'classify')
_WARNED_LINES = 5  # bad lines named per file; the rest are counted
_PACKING_ROWS = 8  # rows filled at once by first-fit packing, at least


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized example: its ids, which of them the loss counts, and (classify) its label."""

    tokens: np.ndarray  # int32
    mask: np.ndarray  # uint8: 1 where the token is one the model learns to write
    label: int = -1


@dataclasses.dataclass(frozen=True)
class Examples:
    """The usable examples of some files, and what reading them found."""

    examples: tuple[Example, ...]
    skipped: int
    cut: int  # longer than a row, cut to it

    def summary(self, field: str, row_tokens: int) -> str:
        return (
            f'{field}: {len(self.examples):,} examples ({self.cut:,} cut to {row_tokens} tokens, '
            f'{self.skipped:,} bad lines skipped)'
        )


class _BadRecord(ValueError):
    """A JSON line that cannot be an example; its message says why."""


def _text(record: dict, field: str) -> str:
    value = record.get(field)
    if not isinstance(value, str):
        raise _BadRecord(f'no text field {field!r}' if value is None else f'{field!r} is not a string')
    return value


def _prompt_completion(record: dict, data_cfg: config_dict.ConfigDict, tokenizer: Tokenizer) -> Example:
    prompt, completion = _text(record, data_cfg.prompt_field), _text(record, data_cfg.completion_field)
    if not completion.strip():
        raise _BadRecord(f'the {data_cfg.completion_field!r} is empty')
    prompt_ids = tokenizer.encode(prompt)
    answer_ids = np.concatenate([tokenizer.encode(completion, add_special_tokens=False), [tokenizer.eos_id]])
    return Example(
        tokens=np.concatenate([prompt_ids, answer_ids]).astype(np.int32),
        mask=np.concatenate([np.zeros(len(prompt_ids), np.uint8), np.ones(len(answer_ids), np.uint8)]),
    )


def _chat(
    record: dict, data_cfg: config_dict.ConfigDict, tokenizer: Tokenizer, template: chat_template.ChatTemplate
) -> Example:
    """The rendered chat cut where each assistant turn starts and ends; only those turns are learned."""
    messages = record.get(data_cfg.messages_field)
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get('role'), str) and isinstance(m.get('content'), str) for m in messages
    ):
        raise _BadRecord(f'{data_cfg.messages_field!r} is not a list of {{"role", "content"}} messages')
    if not any(m['role'] == 'assistant' and m['content'].strip() for m in messages):
        raise _BadRecord('the chat has no assistant turn to learn')
    pieces: list[tuple[str, int]] = []  # (text, learned)
    done = ''
    for i, message in enumerate(messages):
        if message['role'] == 'assistant':
            before = template.render(messages[:i], add_generation_prompt=True)
            pieces.append((before[len(done) :], 0))
            done = before
        after = template.render(messages[: i + 1], add_generation_prompt=False)
        if not after.startswith(done):
            raise _BadRecord("the chat template's rendering of a turn changes the turns before it")
        pieces.append((after[len(done) :], int(message['role'] == 'assistant')))
        done = after
    ids, mask = [], []
    for i, (text, learned) in enumerate(pieces):
        # The first piece gets the tokenizer's BOS unless the model's own template writes it.
        piece = tokenizer.encode(text, add_special_tokens=i == 0 and not template.own)
        ids.append(piece)
        mask.append(np.full(len(piece), learned, np.uint8))
    ids.append(np.array([tokenizer.eos_id]))
    mask.append(np.array([int(messages[-1]['role'] == 'assistant')], np.uint8))
    return Example(tokens=np.concatenate(ids).astype(np.int32), mask=np.concatenate(mask))


def _labeled(record: dict, data_cfg: config_dict.ConfigDict, tokenizer: Tokenizer, num_classes: int) -> Example:
    text = _text(record, data_cfg.text_field)
    if not text.strip():
        raise _BadRecord(f'the {data_cfg.text_field!r} is empty')
    label = record.get(data_cfg.label_field)
    names = class_names(data_cfg)
    if isinstance(label, str) and label in names:
        label = names.index(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_classes:
        known = f'one of {names}' if names else f'an index below config.model.num_classes={num_classes}'
        raise _BadRecord(f'label {label!r} is not {known}')
    tokens = np.concatenate([tokenizer.encode(text), [tokenizer.eos_id]]).astype(np.int32)
    return Example(tokens=tokens, mask=np.ones(len(tokens), np.uint8), label=label)


def class_names(data_cfg: config_dict.ConfigDict) -> list[str]:
    """config.data.class_names as a list ([] when the labels are indices)."""
    return [name.strip() for name in data_cfg.class_names.split(',') if name.strip()]


def _lines(path: str):
    with fsspec.open(path, 'rb') as f:
        yield from enumerate(f, start=1)


# Examples already read, by (files, data config, tokenizer, row length, classes): the config checks, the
# streams and the announcement read a run's train and eval files once each.
_READ: dict[tuple, Examples] = {}
_KEPT = 4  # file sets held at once: a run's train and eval files, with room to spare


def _read_files(
    files: tuple[str, ...], data_cfg: config_dict.ConfigDict, tokenizer: Tokenizer, row_tokens: int, num_classes: int
) -> Examples:
    template = chat_template.for_tokenizer(data_cfg.tokenizer) if data_cfg.format == 'sft' else None
    examples, skipped, cut = [], 0, 0
    for path in files:
        bad: list[str] = []
        lines = _lines(path)
        for number, line in tqdm.tqdm(lines, desc=f'reading {path}', unit=' lines', leave=False, disable=None):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise _BadRecord('the line is not a JSON object')
                if data_cfg.format == 'classify':
                    example = _labeled(record, data_cfg, tokenizer, num_classes)
                elif data_cfg.messages_field in record:
                    example = _chat(record, data_cfg, tokenizer, template)
                else:
                    example = _prompt_completion(record, data_cfg, tokenizer)
            except (json.JSONDecodeError, UnicodeDecodeError):
                bad.append(f'{path}:{number}: not valid JSON')
                continue
            except _BadRecord as why:
                bad.append(f'{path}:{number}: {why}')
                continue
            if len(example.tokens) > row_tokens:
                cut += 1
                example = Example(example.tokens[:row_tokens], example.mask[:row_tokens], example.label)
            examples.append(example)
        for message in bad[:_WARNED_LINES]:
            logging.warning('data: skipping %s', message)
        if len(bad) > _WARNED_LINES:
            logging.warning('data: skipping %d more bad lines in %s', len(bad) - _WARNED_LINES, path)
        skipped += len(bad)
    return Examples(tuple(examples), skipped, cut)


def read(
    files: tuple[str, ...], data_cfg: config_dict.ConfigDict, tokenizer: Tokenizer, num_classes: int, field: str
) -> Examples:
    """The usable examples of `files`, tokenized and cut to a row (read once per process, then cached)."""
    row_tokens = data_cfg.seq_len + (1 if data_cfg.format == 'sft' else 0)  # sft rows hold the last target too
    key = (tuple(files), data_cfg.to_json(), tokenizer.name, row_tokens, num_classes)
    if key not in _READ:
        if len(_READ) >= _KEPT:
            del _READ[next(iter(_READ))]  # the oldest
        _READ[key] = _read_files(tuple(files), data_cfg, tokenizer, row_tokens, num_classes)
    found = _READ[key]
    if not found.examples:
        raise ConfigError(
            f'{field} holds no usable {data_cfg.format!r} example ({found.skipped} bad lines, named in the warnings '
            'above): see docs/finetune.md for the record formats.'
        )
    if data_cfg.format == 'sft' and not any(e.mask.any() for e in found.examples):
        raise ConfigError(f'{field}: every example was cut before its answer: raise config.data.seq_len.')
    return found


def _sft_features(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A packed row of seq_len + 1 tokens -> inputs, next-token targets, and weights on the learned tokens."""
    tokens, segments, positions = row['tokens'], row['tokens_segment_ids'], row['tokens_positions']
    same_example = (segments[1:] == segments[:-1]) & (segments[1:] != 0)
    return {
        'inputs': tokens[:-1].astype(np.int32),
        'targets': tokens[1:].astype(np.int32),
        'segment_ids': segments[:-1].astype(np.int32),
        'positions': positions[:-1].astype(np.int32),
        'weights': (same_example & (row['mask'][1:] > 0)).astype(np.float32),
    }


def empty_batch(seq_len: int) -> dict[str, np.ndarray]:
    """A batch of no rows, to be padded with rows that count nothing."""
    ids = np.zeros((0, seq_len), np.int32)
    return {'inputs': ids, 'targets': ids, 'segment_ids': ids, 'positions': ids, 'weights': ids.astype(np.float32)}


def _classify_features(example: Example, seq_len: int) -> dict[str, np.ndarray]:
    """One example in a row of its own, padded; its label repeated in `targets`."""
    n = len(example.tokens)
    real = np.arange(seq_len) < n
    return {
        'inputs': np.pad(example.tokens, (0, seq_len - n)),
        'targets': np.where(real, example.label, 0).astype(np.int32),
        'segment_ids': real.astype(np.int32),
        'positions': np.where(real, np.arange(seq_len), 0).astype(np.int32),
        'weights': real.astype(np.float32),
    }


def make_dataset(
    found: Examples,
    data_cfg: config_dict.ConfigDict,
    seed: int,
    local_batch: int,
    shuffle: bool,
    stream: int = 0,
    num_streams: int = 1,
    repeat: bool = True,
) -> grain.IterDataset:
    """One data stream's batches of `local_batch` rows: its share of the examples, shuffled every epoch."""
    dataset: Any = grain.MapDataset.source(list(found.examples))[stream::num_streams]
    dataset = dataset.shuffle(seed) if shuffle else dataset
    dataset = dataset.repeat(None) if repeat else dataset
    if data_cfg.format == 'classify':
        rows = dataset.map(functools.partial(_classify_features, seq_len=data_cfg.seq_len)).to_iter_dataset()
    else:
        pieces = dataset.map(lambda e: {'tokens': e.tokens, 'mask': e.mask}).to_iter_dataset()
        length = data_cfg.seq_len + 1
        rows = grain.experimental.FirstFitPackIterDataset(
            pieces,
            length_struct={'tokens': length, 'mask': length},
            num_packing_bins=max(local_batch, _PACKING_ROWS),
            seed=seed + 1009 * stream,
            shuffle_bins=shuffle,
        ).map(_sft_features)
    return rows.batch(local_batch, drop_remainder=repeat)
