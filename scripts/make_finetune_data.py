"""Builds the bundled fine-tuning demo sets (trainer/sample_data/finetune/) from the bundled Shakespeare plays.

Usage: python scripts/make_finetune_data.py

- instruct_{train,eval}.jsonl (config.data.format='sft'): "Who speaks these lines?" -> the speaker, and
  "Continue:" -> the next line, as {prompt, completion} records, a fifth of them as {messages} chats.
- play_{train,eval}.jsonl (config.data.format='classify'): passages of consecutive speeches as printed
  (speakers' names included), 120 to 250 characters, {text, label}, the label the play's name.

Every eighth speech (and passage) of each play is held out for the eval files. The choice is seeded and
fixed, so the bundled files can be reproduced byte for byte.
"""

from __future__ import annotations

import json
import pathlib
import random
import re

ROOT = pathlib.Path(__file__).resolve().parents[1] / 'trainer' / 'sample_data'
OUT = ROOT / 'finetune'
PLAYS = tuple(sorted(path.stem for path in (ROOT / 'train').glob('*.txt')))
# 'FIRST WITCH.', 'Ham.', 'Alb. and Corn.', or capitals without a period ('THESEUS').
_SPEAKER = re.compile(r"^(?:([A-Z][A-Za-z'.]*(?: [A-Za-z'.]+){0,3}?)\.|([A-Z][A-Z' ]*[A-Z]))$")
_HELD_OUT = 8  # every 8th speech goes to the eval files
_PER_PLAY = {'instruct_train': 320, 'instruct_eval': 40, 'play_train': 300, 'play_eval': 40}


def speeches(play: str, folder: pathlib.Path = ROOT / 'train') -> list[tuple[str, list[str]]]:
    """(speaker, lines) of each speech: a paragraph whose first line is a speaker's name."""
    text = (folder / f'{play}.txt').read_text(encoding='utf-8')
    found = []
    for paragraph in text.split('\n\n'):
        lines = [line.strip() for line in paragraph.strip().splitlines()]
        match = _SPEAKER.match(lines[0]) if lines else None
        spoken = [line for line in lines[1:] if line and not line.startswith('[')]
        if match and spoken:
            found.append((match.group(1) or match.group(2), spoken))
    return found


def instructions(speech: tuple[str, list[str]], rng: random.Random) -> list[dict]:
    """The instruction records one speech gives."""
    speaker, lines = speech
    records = []
    shown = lines[:4]
    records.append({'prompt': 'Who speaks these lines?\n' + '\n'.join(shown) + '\nSpeaker: ', 'completion': speaker})
    if len(lines) >= 2:
        i = rng.randrange(len(lines) - 1)
        records.append({'prompt': f'Continue:\n{lines[i]}\n', 'completion': lines[i + 1]})
    for record in records:
        if rng.random() < 0.2:  # the same task as a chat, for the other record format
            record.clear()
            question = 'Continue:\n' + lines[0] if len(lines) >= 2 else 'Who speaks this line?\n' + lines[0]
            answer = lines[1] if len(lines) >= 2 else speaker
            record['messages'] = [{'role': 'user', 'content': question}, {'role': 'assistant', 'content': answer}]
    return records


def passages(play_speeches: list[tuple[str, list[str]]], rng: random.Random) -> list[str]:
    """Passages of the play as printed, speakers' names included: consecutive speeches, 120 to 250 characters."""
    found, current = [], []
    for speaker, lines in play_speeches:
        current += [f'{speaker}.', *lines]
        text = '\n'.join(current)
        if len(text) >= 120:
            while len(text) > 250 and len(current) > 2:  # cut at a line end
                current.pop()
                text = '\n'.join(current)
            found.append(text[:250])
            current = []
    return found


def main() -> None:
    rng = random.Random(0)
    out: dict[str, list[dict]] = {name: [] for name in _PER_PLAY}
    for play in PLAYS:
        per_play: dict[str, list[dict]] = {name: [] for name in _PER_PLAY}
        play_speeches = speeches(play)
        for i, speech in enumerate(play_speeches):
            split = 'eval' if i % _HELD_OUT == 0 else 'train'
            per_play[f'instruct_{split}'] += instructions(speech, rng)
        for i, text in enumerate(passages(play_speeches, rng)):
            split = 'eval' if i % _HELD_OUT == 0 else 'train'
            per_play[f'play_{split}'].append({'text': text, 'label': play})
        for name, records in per_play.items():
            rng.shuffle(records)
            out[name] += records[: _PER_PLAY[name]]
    OUT.mkdir(exist_ok=True)
    for name, records in out.items():
        rng.shuffle(records)
        path = OUT / f'{name}.jsonl'
        path.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records), encoding='utf-8')
        print(f'{path}: {len(records)} records, {path.stat().st_size:,} bytes')
    print('class names:', ','.join(PLAYS))


if __name__ == '__main__':
    main()
