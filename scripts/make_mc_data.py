"""Builds the bundled multiple-choice demo task (trainer/sample_data/eval/tempest_next_line.jsonl).

Usage: python scripts/make_mc_data.py

"Which line comes next": from The Tempest, held out of the training plays, each question's context is a
speaker's name and up to three lines of one of their speeches; its four choices are the line that follows
and three shuffles of its words, in a seeded random order. Chance is 0.25. (Lines of other speeches as the
wrong choices were tried first: the default run scored chance on them, 0.26 acc_norm, and so would every
model small enough to train here. Shuffled words ask for English word order, which small models learn.) Records
are {"context", "choices", "gold"}, scored by `python -m trainer.evaluate --task multiple_choice`. Seeded and
fixed, so the bundled file can be reproduced byte for byte.
"""

from __future__ import annotations

import json
import random

from make_finetune_data import ROOT, speeches

OUT = ROOT / 'eval' / 'tempest_next_line.jsonl'
QUESTIONS = 400
CHOICES = 4
_CONTEXT_LINES = 3


def _shuffles(line: str, rng: random.Random) -> list[str]:
    """CHOICES - 1 distinct orders of the line's words, none the line itself."""
    words, found = line.split(), set()
    while len(found) < CHOICES - 1:
        rng.shuffle(words)
        if ' '.join(words) != line:
            found.add(' '.join(words))
    return sorted(found)


def questions(seed: int = 0) -> list[dict]:
    """QUESTIONS questions, each on another line of the play (one of 5 or more words that follows another)."""
    rng = random.Random(seed)
    spoken = speeches('tempest', ROOT / 'eval')
    lines = [(s, i) for s, (_, said) in enumerate(spoken) for i in range(1, len(said)) if len(said[i].split()) >= 5]
    found = []
    for s, i in rng.sample(lines, QUESTIONS):
        speaker, said = spoken[s]
        context = f'{speaker}.\n' + ''.join(line + '\n' for line in said[max(0, i - _CONTEXT_LINES) : i])
        choices = [said[i], *_shuffles(said[i], rng)]
        rng.shuffle(choices)
        found.append({'context': context, 'choices': choices, 'gold': choices.index(said[i])})
    return found


def main() -> None:
    with open(OUT, 'w', encoding='utf-8') as out:
        for question in questions():
            out.write(json.dumps(question) + '\n')
    print(f'wrote {QUESTIONS} questions to {OUT}')


if __name__ == '__main__':
    main()
