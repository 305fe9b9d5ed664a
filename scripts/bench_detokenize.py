"""Detokenizing one reply as it streams: whole re-decoding every step (before) against incremental (after).

Usage:
  python scripts/bench_detokenize.py [--tokenizer tests/fixtures/tokenizers/mistral] [--tokens 4096]
      [--prompt_tokens 64] [--stop 'User:'] [--repeats 3]

Takes --prompt_tokens + --tokens tokens of the sample plays (with some CJK and emoji lines in them), and feeds the
last --tokens to each detokenizer one at a time, as the server's decode thread does for one row. Prints the time
per step (microseconds; each step's least over --repeats, as other work on the machine only adds time) near
several reply lengths and over the whole reply, for both; and
checks that both give the same text as decoding the prompt and reply whole (minus the prompt's text; the old way,
which decoded the reply alone, is checked against the reply decoded alone).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from trainer.data.tokenizers import make_tokenizer  # noqa: E402
from trainer.inference.streaming import TextStream, completion_text, cut_at_stop  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
MULTI_BYTE = 'The capital of France is Paris, 日本語の文章です。 😀🎉👍🏽 中文字符 한국어 ∑∫√\n'


class WholeTextStream:
    """streaming.TextStream as it was before 2026-12-05 (kept here to measure against): each step decodes
    the whole reply again, and searches all of it for the stop strings."""

    def __init__(self, decode, stops: list[str]):
        self._decode, self._stops = decode, stops
        self._ids: list[int] = []
        self._given = ''
        self.done = False

    def add(self, token: int) -> tuple[str, bool]:
        if self.done:
            return '', True
        self._ids.append(token)
        text, self.done = cut_at_stop(self._decode(self._ids), self._stops)
        if not self.done:
            text = text.rstrip('\ufffd')
            hold = max((len(s) - 1 for s in self._stops), default=0)
            text = text[: max(len(self._given), len(text) - hold)]
        return self._give(text), self.done

    def finish(self) -> str:
        return self._give(cut_at_stop(self._decode(self._ids), self._stops)[0])

    def _give(self, text: str) -> str:
        new = text[len(self._given) :]
        self._given = max(text, self._given, key=len)
        return new


def run(stream, reply: list[int]) -> tuple[str, list[float]]:
    """The text a stream gives for the reply's tokens, and the seconds each step took."""
    pieces, seconds = [], []
    for token in reply:
        start = time.perf_counter()
        pieces.append(stream.add(token)[0])
        seconds.append(time.perf_counter() - start)
    return ''.join(pieces) + stream.finish(), seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--tokenizer', default=str(REPO / 'tests' / 'fixtures' / 'tokenizers' / 'mistral'))
    parser.add_argument('--tokens', type=int, default=4096, help='tokens in the reply')
    parser.add_argument('--prompt_tokens', type=int, default=64)
    parser.add_argument('--stop', action='append', default=[], help='a stop string (one that never appears)')
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    tokenizer = make_tokenizer(args.tokenizer)
    plays = sorted((REPO / 'trainer' / 'sample_data' / 'train').glob('*.txt'))
    lines = plays[0].read_text(encoding='utf-8').splitlines(keepends=True)[:2000]
    text = ''.join(line + (MULTI_BYTE if i % 40 == 39 else '') for i, line in enumerate(lines))
    ids = tokenizer.encode(text).tolist()
    if len(ids) < args.prompt_tokens + args.tokens:
        sys.exit(f'error: the sample text is {len(ids)} tokens: ask for fewer --tokens.')
    prompt, reply = ids[: args.prompt_tokens], ids[args.prompt_tokens : args.prompt_tokens + args.tokens]
    if any(stop in completion_text(tokenizer.decode, prompt, reply) for stop in args.stop):
        sys.exit('error: a --stop string appears in the reply: pick one that does not, so that all of it streams.')
    whole = completion_text(tokenizer.decode, prompt, reply)
    best = {}
    for _ in range(args.repeats):
        before, before_s = run(WholeTextStream(tokenizer.decode, args.stop), reply)
        after, after_s = run(TextStream(tokenizer.decode, prompt, args.stop), reply)
        assert before == tokenizer.decode(reply), 'whole re-decoding did not give the reply decoded alone'
        assert after == whole, 'the incremental text is not decode(prompt + reply) minus decode(prompt)'
        for name, seconds in (('before', before_s), ('after', after_s)):
            best[name] = [min(pair) for pair in zip(best.get(name, seconds), seconds, strict=True)]
    print(f'{args.tokenizer}: a reply of {args.tokens} tokens after {args.prompt_tokens}, stops {args.stop}')
    print('microseconds per step | ' + ' | '.join(['at ~256', 'at ~1024', f'at ~{args.tokens}', 'mean', 'total s']))
    for name, label in (('before', 'whole re-decoding'), ('after', 'incremental')):
        seconds = best[name]
        near = [sum(seconds[max(n - 64, 0) : n]) / len(seconds[max(n - 64, 0) : n]) for n in (256, 1024, len(seconds))]
        cells = [f'{s * 1e6:.1f}' for s in [*near, sum(seconds) / len(seconds)]] + [f'{sum(seconds):.3f}']
        print(f'{label} | ' + ' | '.join(cells))
    return 0


if __name__ == '__main__':
    sys.exit(main())
