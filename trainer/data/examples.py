"""Fine-tuning examples from JSON lines: instruction pairs, chats (loss on the answers only), labeled texts.

`config.data.format='sft'`: each line is {"prompt": ..., "completion": ...} or {"messages": [{"role",
"content"}, ...]} (rendered with the tokenizer's chat template, the same text `python -m trainer.chat`
gives the model). The whole text is tokenized at once, as transformers' `apply_chat_template(tokenize=True)`
does (pieces tokenized alone get other ids: SentencePiece puts a '▁' before each), and every token carries
a loss mask by where its text ends: 1 inside the completion or an assistant's turn, 0 in what the model only
reads. An EOS is added after the last answer unless the text already ends it with a stop token (a template's
own end of turn), so a model never learns an EOS after an EOS. Examples are packed into rows whole (grain's
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
from typing import Any

import fsspec
import grain
import jinja2
import numpy as np
import tqdm
from ml_collections import config_dict

from trainer.data import chat_template, json_lines, sources
from trainer.data.tokenizers import Tokenizer, token_bytes
from trainer.errors import ConfigError

FORMATS = ('sft', 'classify')
_PACKING_ROWS = 8  # rows filled at once by first-fit packing, at least


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized example: its ids, which of them the loss counts, and (classify) its label."""

    tokens: np.ndarray  # int32
    mask: np.ndarray  # uint8: 1 where the token is one the model learns to write
    label: int = -1
    text_bytes: np.ndarray | None = None  # int32: UTF-8 bytes of text each token stands for (sft), for bits per byte

    def cut(self, length: int) -> Example:
        """The first `length` tokens."""
        text_bytes = None if self.text_bytes is None else self.text_bytes[:length]
        return Example(self.tokens[:length], self.mask[:length], self.label, text_bytes)


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


def _learned_tokens(
    text: str, spans: list[tuple[int, int]], tokenizer: Tokenizer, add_special_tokens: bool, answers_last: bool
) -> Example:
    """`text` tokenized whole; a token is learned when its text ends inside one of `spans` (character ranges).

    A token that starts before an answer and ends in it (SentencePiece's '▁' + the answer's first word) is the
    answer's first token: the one the model writes after reading the prompt. With `answers_last`, an EOS
    follows, learned, unless the last answer's tokens already hold a stop token.
    """
    ids, ends = tokenizer.encode_with_ends(text, add_special_tokens=add_special_tokens)
    offsets = [len(text[:i].encode()) for span in spans for i in span]
    mask = np.zeros(len(ids), np.uint8)
    last = np.zeros(len(ids), bool)
    for start, stop in zip(offsets[::2], offsets[1::2], strict=True):
        last = (ends > start) & (ends <= stop)
        mask[last] = 1
    text_bytes = token_bytes(ends, len(text.encode()))
    if answers_last and not np.isin(ids[last], tokenizer.stop_ids).any():
        ids, mask, text_bytes = np.append(ids, tokenizer.eos_id), np.append(mask, 1), np.append(text_bytes, 0)
    return Example(tokens=ids.astype(np.int32), mask=mask, text_bytes=text_bytes.astype(np.int32))


def _prompt_completion(record: dict, data_cfg: config_dict.ConfigDict, tokenizer: Tokenizer) -> Example:
    prompt, completion = _text(record, data_cfg.prompt_field), _text(record, data_cfg.completion_field)
    if not completion.strip():
        raise _BadRecord(f'the {data_cfg.completion_field!r} is empty')
    text = prompt + completion
    return _learned_tokens(text, [(len(prompt), len(text))], tokenizer, True, answers_last=True)


def _chat(
    record: dict, data_cfg: config_dict.ConfigDict, tokenizer: Tokenizer, template: chat_template.ChatTemplate
) -> Example:
    """The rendered chat, tokenized whole; only the assistant's turns (as the template writes them) are learned."""
    messages = record.get(data_cfg.messages_field)
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get('role'), str) and isinstance(m.get('content'), str) for m in messages
    ):
        raise _BadRecord(f'{data_cfg.messages_field!r} is not a list of {{"role", "content"}} messages')
    if not any(m['role'] == 'assistant' and m['content'].strip() for m in messages):
        raise _BadRecord('the chat has no assistant turn to learn')
    spans: list[tuple[int, int]] = []  # where each assistant turn's text starts and ends
    try:
        text = template.render(messages, add_generation_prompt=False)
        for i, message in enumerate(messages):
            if message['role'] == 'assistant':
                # The turn is what the whole conversation adds to the prompt that asks for it.
                prompt = template.render(messages[:i], add_generation_prompt=True)
                turn = template.render(messages[: i + 1], add_generation_prompt=False)
                if not (text.startswith(turn) and turn.startswith(prompt)):
                    raise _BadRecord("the chat template's rendering of a turn changes the turns before it")
                spans.append((len(prompt), len(turn)))
    except jinja2.exceptions.TemplateError as error:  # the template's raise_exception: roles it does not take
        raise _BadRecord(f'the chat template refuses it: {error}') from None
    # The model's own template writes its special tokens (BOS) itself; the plain one has none to add.
    return _learned_tokens(text, spans, tokenizer, not template.own, answers_last=messages[-1]['role'] == 'assistant')


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
        bad = json_lines.BadLines(
            path,
            f'config.data.format={data_cfg.format!r} reads one JSON object per line: give .jsonl files '
            "(docs/finetune.md), or config.data.format='auto' for plain text.",
        )
        for number, line in tqdm.tqdm(_lines(path), desc=f'reading {path}', unit=' lines', leave=False, disable=None):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    bad.skip(number, 'the line is not a JSON object', not_json=True)
                    continue
                if data_cfg.format == 'classify':
                    example = _labeled(record, data_cfg, tokenizer, num_classes)
                elif data_cfg.messages_field in record:
                    example = _chat(record, data_cfg, tokenizer, template)
                else:
                    example = _prompt_completion(record, data_cfg, tokenizer)
            except (json.JSONDecodeError, UnicodeDecodeError):
                bad.skip(number, 'not valid JSON', not_json=True)
                continue
            except _BadRecord as why:
                bad.skip(number, str(why), not_json=False)
                continue
            bad.used()
            if len(example.tokens) > row_tokens:
                cut += 1
                example = example.cut(row_tokens)
            examples.append(example)
        skipped += bad.report()
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
    """A packed row of seq_len + 1 tokens -> inputs, next-token targets, and weights on the learned tokens
    (and, for an eval, the bytes of text each target stands for)."""
    tokens, segments, positions = row['tokens'], row['tokens_segment_ids'], row['tokens_positions']
    same_example = (segments[1:] == segments[:-1]) & (segments[1:] != 0)
    features = {
        'inputs': tokens[:-1].astype(np.int32),
        'targets': tokens[1:].astype(np.int32),
        'segment_ids': segments[:-1].astype(np.int32),
        'positions': positions[:-1].astype(np.int32),
        'weights': (same_example & (row['mask'][1:] > 0)).astype(np.float32),
    }
    return features | ({'target_bytes': row['text_bytes'][1:].astype(np.int32)} if 'text_bytes' in row else {})


def empty_batch(seq_len: int, with_bytes: bool = False) -> dict[str, np.ndarray]:
    """A batch of no rows, to be padded with rows that count nothing."""
    ids = np.zeros((0, seq_len), np.int32)
    batch = {'inputs': ids, 'targets': ids, 'segment_ids': ids, 'positions': ids, 'weights': ids.astype(np.float32)}
    return batch | ({'target_bytes': ids} if with_bytes else {})


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
    with_bytes: bool = False,
) -> grain.IterDataset:
    """One data stream's batches of `local_batch` rows: its share of the examples, shuffled every epoch; with
    `with_bytes` (an eval of instruction data), the bytes of text each target stands for."""
    dataset: Any = grain.MapDataset.source(list(found.examples))[stream::num_streams]
    # Each stream its own order (stream 0 keeps `seed`): one permutation for all would fill each global batch
    # with runs of neighbouring examples (stream j's i-th is example perm[i] * n + j), a few places of the file.
    dataset = dataset.shuffle(seed + 1009 * stream) if shuffle else dataset
    dataset = dataset.repeat(None) if repeat else dataset
    if data_cfg.format == 'classify':
        rows = dataset.map(functools.partial(_classify_features, seq_len=data_cfg.seq_len))
        rows = rows.to_iter_dataset(sources.read_options(num_streams))
    else:
        fields = ('tokens', 'mask', 'text_bytes') if with_bytes else ('tokens', 'mask')
        pieces = dataset.map(lambda e: {name: getattr(e, name) for name in fields})
        pieces = pieces.to_iter_dataset(sources.read_options(num_streams))
        length = data_cfg.seq_len + 1
        rows = grain.experimental.FirstFitPackIterDataset(
            pieces,
            length_struct=dict.fromkeys(fields, length),
            num_packing_bins=max(local_batch, _PACKING_ROWS),
            seed=seed + 1009 * stream,
            shuffle_bins=shuffle,
        ).map(_sft_features)
    return rows.batch(local_batch, drop_remainder=repeat)
