"""Multiple-choice tasks: JSON lines {"context": str, "choices": [str, ...], "gold": int} scored by the
log-likelihood of each choice given the context, with lm-evaluation-harness's `acc` and `acc_norm`.

A choice is scored as written, right after the context (put the space in the choice: " Paris"); this is
the harness's `multiple_choice` output type with `target_delimiter: ""`. As in the harness, `acc_norm`
divides each choice's log-likelihood by its length in characters and `acc_bytes` by its UTF-8 bytes (the
same for ASCII text); the standard errors are the harness's `mean_stderr` (sample standard deviation over
sqrt(n)).
"""

from __future__ import annotations

import dataclasses
import json
import math

import fsspec
import numpy as np

from trainer.data import json_lines, sources
from trainer.data.tokenizers import Tokenizer
from trainer.errors import ConfigError
from trainer.evaluation.loglikelihood import Scorer, encode_pair

_NOT_AN_OBJECT = 'not a JSON object'


@dataclasses.dataclass(frozen=True)
class Question:
    context: str
    choices: tuple[str, ...]
    gold: int


def _question(record: object) -> Question | str:
    """The record as a Question, or what is wrong with it."""
    if not isinstance(record, dict):
        return _NOT_AN_OBJECT
    context, choices, gold = record.get('context'), record.get('choices'), record.get('gold')
    if not isinstance(context, str):
        return '"context" is not a string'
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        return '"choices" is not a list of at least two non-empty strings'
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        return f'"gold" is not the index of one of its {len(choices)} choices'
    return Question(context, tuple(choices), gold)


def read_questions(patterns: str, field: str = '--files') -> list[Question]:
    """Every valid question of the JSON-lines files `patterns`; a bad record is skipped with its file:line (the first
    few named, the rest counted), a file that is not JSON lines refused."""
    questions = []
    for path in sources.resolve_files(patterns, field):
        bad = json_lines.BadLines(
            path,
            '--task multiple_choice reads one question per line, {"context": "...", "choices": ["...", "..."], '
            '"gold": 0}: give such JSON lines (docs/generate.md).',
            warning='%s:%d skipped: %s',
        )
        with fsspec.open(path, 'rt', encoding='utf-8') as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    found = _question(json.loads(line))
                except json.JSONDecodeError as error:
                    bad.skip(number, f'not JSON ({error.msg})', not_json=True)
                    continue
                if isinstance(found, str):
                    bad.skip(number, found, not_json=found == _NOT_AN_OBJECT)
                    continue
                bad.used()
                questions.append(found)
        bad.report()
    if not questions:
        raise ConfigError(
            f'{field}={patterns} holds no valid question: each line must be {{"context": "...", "choices": '
            '["...", "..."], "gold": 0}.'
        )
    return questions


@dataclasses.dataclass(frozen=True)
class Accuracies:
    """acc, acc_norm and acc_bytes over a task's questions, with their standard errors."""

    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
    acc_bytes: float
    acc_bytes_stderr: float
    questions: int
    chance: float  # the expected acc of guessing: the mean of 1 / choices


def mean_stderr(values: np.ndarray) -> float:
    """lm-evaluation-harness's standard error of a mean: the sample standard deviation over sqrt(n)."""
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float('nan')


def choice_logprobs(scorer: Scorer, tokenizer: Tokenizer, questions: list[Question], progress: bool = False):
    """Each question's choices' log-likelihoods, as one array per question."""
    pairs = [encode_pair(tokenizer, q.context, choice) for q in questions for choice in q.choices]
    found = iter(scorer.loglikelihoods(pairs, progress=progress))
    return [np.array([next(found).logprob for _ in q.choices]) for q in questions]


def accuracies(questions: list[Question], logprobs: list[np.ndarray]) -> Accuracies:
    """Whether the most likely choice is the gold one: as is (acc), per character (acc_norm), per byte."""

    def right(length) -> np.ndarray:
        return np.array(
            [
                float(np.argmax(lls / np.array([length(c) for c in q.choices], float)) == q.gold)
                for q, lls in zip(questions, logprobs, strict=True)
            ]
        )

    plain, norm, per_byte = right(lambda c: 1), right(len), right(lambda c: len(c.encode()))
    return Accuracies(
        acc=float(plain.mean()),
        acc_stderr=mean_stderr(plain),
        acc_norm=float(norm.mean()),
        acc_norm_stderr=mean_stderr(norm),
        acc_bytes=float(per_byte.mean()),
        acc_bytes_stderr=mean_stderr(per_byte),
        questions=len(questions),
        chance=float(np.mean([1 / len(q.choices) for q in questions])),
    )


def score(scorer: Scorer, tokenizer: Tokenizer, files: str, progress: bool = False) -> Accuracies:
    """acc and acc_norm of the model behind `scorer` on the questions in `files`."""
    questions = read_questions(files)
    return accuracies(questions, choice_logprobs(scorer, tokenizer, questions, progress))
