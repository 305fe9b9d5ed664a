"""python -m trainer.generate --model PATH --prompt TEXT [--prompt ...] [--max_new_tokens N] [--temperature T] ...

PATH is a run's workdir (its newest checkpoint), a checkpoint folder, or a Hugging Face model folder; the
tokenizer comes with it. Several prompts decode as one batch. With one prompt and no --json the text
streams to the terminal as it is produced; --json prints one object per prompt:
{"prompt", "completion", "completion_ids", "tokens_per_s"}.
"""

from __future__ import annotations

import json
import sys
from typing import NoReturn

import numpy as np
from absl import app, flags, logging

from trainer import loading
from trainer.decoding import Generator
from trainer.errors import ConfigError
from trainer.sampling import Sampling

_MODEL = flags.DEFINE_string('model', None, "A run's workdir, a checkpoint folder or a Hugging Face model folder.")
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'A prompt; repeat the flag for several (decoded as one batch).')
_PROMPTS_FILE = flags.DEFINE_string('prompts_file', None, 'A file of prompts, one per line.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate after each prompt, at most.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'Sampling temperature; 0 = greedy (the most likely token).')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens only; 0 = all.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Sample among the most likely tokens that make up probability p; 1 = all.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the sampling: the same seed gives the same text.')
_STOP = flags.DEFINE_multi_string('stop', [], 'Stop a completion where this text appears (left out); repeatable.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object per prompt instead of text.')
_TENSOR = flags.DEFINE_integer('tensor_parallel', 1, 'Devices to split the heads over (mesh.tensor).')
_DTYPE = flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'], "Compute dtype; default: the model's config.")
flags.mark_flags_as_required(['model'])

EXIT_BAD_INPUT = 2


def _fail(message: str) -> NoReturn:
    print(f'error: {message}', file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text up to the first stop string (left out), and whether one was found."""
    cuts = [text.index(stop) for stop in stops if stop in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def ids_of(ids: list[int], completion: str, decode) -> list[int]:
    """The shortest prefix of `ids` that decodes to all of `completion` (it was cut at a stop string)."""
    for n in range(len(ids) + 1):
        if len(decode(ids[:n])) >= len(completion):
            return ids[:n]
    return ids


class _Streamer:
    """Prints one row's text as its tokens come, whole characters only, up to a stop string."""

    def __init__(self, decode, stops: list[str]):
        self._decode, self._stops = decode, stops
        self._ids: list[int] = []
        self._printed = ''
        self.done = False

    def __call__(self, new_tokens: np.ndarray) -> None:
        if self.done:
            return
        self._ids.append(int(new_tokens[0]))
        text, self.done = cut_at_stop(self._decode(self._ids), self._stops)
        if not self.done:
            text = text.rstrip('\ufffd')  # a character whose bytes have not all come yet
            # Hold back what could still become a stop string.
            hold = max((len(s) - 1 for s in self._stops), default=0)
            text = text[: max(len(self._printed), len(text) - hold)]
        self._show(text)

    def finish(self) -> None:
        """Prints what was held back, once the row has ended."""
        self._show(cut_at_stop(self._decode(self._ids), self._stops)[0])
        print(flush=True)

    def _show(self, text: str) -> None:
        sys.stdout.write(text[len(self._printed) :])
        sys.stdout.flush()
        self._printed = max(text, self._printed, key=len)


def prompts_from_flags() -> list[str]:
    prompts = list(_PROMPT.value)
    if _PROMPTS_FILE.value:
        try:
            with open(_PROMPTS_FILE.value, encoding='utf-8') as f:
                prompts += [line.rstrip('\n') for line in f if line.strip()]
        except OSError as error:
            _fail(f'cannot read --prompts_file={_PROMPTS_FILE.value}: {error.strerror}.')
    if not prompts:
        _fail('give a prompt: --prompt TEXT (repeatable) or --prompts_file FILE.')
    if any(not prompt for prompt in prompts):
        _fail('a prompt is empty: give some text to continue.')
    return prompts


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        _fail(f'unexpected arguments: {" ".join(argv[1:])} (put a prompt in --prompt "...")')
    if not flags.FLAGS['verbosity'].present:
        logging.set_verbosity(logging.WARNING)
    prompts = prompts_from_flags()
    sampling = Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    try:
        sampling.check()
        loaded = loading.load(_MODEL.value, {'data': 1, 'fsdp': 1, 'tensor': _TENSOR.value}, _DTYPE.value)
    except ConfigError as error:
        _fail(str(error))
    if loaded.tokenizer is None:
        _fail(f'{_MODEL.value} has no tokenizer.json: text cannot be turned into its ids.')
    generator = Generator(loaded.graphdef, loaded.params, loaded.model_cfg, loaded.mesh)
    if not 0 < _MAX_NEW.value < loaded.model_cfg.max_seq_len:
        _fail(
            f'--max_new_tokens={_MAX_NEW.value} must be between 1 and the context length minus one '
            f'({loaded.model_cfg.max_seq_len - 1}).'
        )
    tokenizer, room = loaded.tokenizer, generator.max_prompt_tokens(_MAX_NEW.value)
    encoded = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt).tolist()
        if len(ids) > room:
            print(
                f'note: a prompt of {len(ids)} tokens is cut to its last {room}, to leave room for '
                f'--max_new_tokens={_MAX_NEW.value} in the context of {loaded.model_cfg.max_seq_len}.',
                file=sys.stderr,
            )
            ids = ids[-room:]
        encoded.append(ids)
    stops = list(_STOP.value)

    def stop_when(generated: np.ndarray) -> np.ndarray:
        return np.array([cut_at_stop(tokenizer.decode(row), stops)[1] for row in generated])

    streaming = len(prompts) == 1 and not _JSON.value
    streamer = _Streamer(tokenizer.decode, stops) if streaming else None
    if streaming:
        sys.stdout.write(prompts[0])
    results, timing = generator.generate(
        encoded,
        _MAX_NEW.value,
        sampling,
        _SEED.value,
        stop_ids=[tokenizer.eos_id],
        on_tokens=streamer,
        stop_when=stop_when if stops else None,
    )
    for prompt, result in zip(prompts, results, strict=True):
        completion, _ = cut_at_stop(tokenizer.decode(result.ids), stops)
        rate = len(result.ids) / timing.decode_s if timing.decode_s else 0.0
        if _JSON.value:
            ids = ids_of(result.ids, completion, tokenizer.decode)
            record = {'prompt': prompt, 'completion': completion, 'completion_ids': ids, 'tokens_per_s': rate}
            print(json.dumps(record, ensure_ascii=False))
        elif not streaming:
            print(f'{prompt}{completion}\n')
    if streamer is not None:
        streamer.finish()
    sys.stdout.flush()
    print(
        f'{timing.new_tokens} tokens in {timing.decode_s:.2f}s ({timing.new_tokens / max(timing.decode_s, 1e-9):.0f} '
        f'tokens/s); prompt{"s" if len(prompts) > 1 else ""} read in {timing.prefill_s:.2f}s; compiled in '
        f'{timing.compile_s:.1f}s; model {loaded.source}',
        file=sys.stderr,
    )
    return 0


if __name__ == '__main__':
    app.run(main)
