"""python -m trainer.generate --model PATH --prompt TEXT [--prompt ...] [--max_new_tokens N] [--temperature T] ...

PATH is a run's workdir (its newest checkpoint), a checkpoint folder, or a Hugging Face model folder; the
tokenizer comes with it. Several prompts decode as one batch. With one prompt and no --json the text
streams to the terminal as it is produced; --json prints one object per prompt:
{"prompt", "completion", "completion_ids", "tokens_per_s"}.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from trainer import cli
from trainer.errors import ConfigError
from trainer.inference import generation_flags
from trainer.inference.decoding import Generator
from trainer.inference.streaming import StopStrings, Streamer, completion_text, cut_at_stop, ids_of

_PROMPT = flags.DEFINE_multi_string('prompt', [], 'A prompt; repeat the flag for several (decoded as one batch).')
_PROMPTS_FILE = flags.DEFINE_string('prompts_file', None, 'A file of prompts, one per line.')
_STOP = flags.DEFINE_multi_string('stop', [], 'Stop a completion where this text appears (left out); repeatable.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object per prompt instead of text.')


def prompts_from_flags() -> list[str]:
    prompts = list(_PROMPT.value)
    if _PROMPTS_FILE.value:
        try:
            with open(_PROMPTS_FILE.value, encoding='utf-8') as f:
                prompts += [line.rstrip('\n') for line in f if line.strip()]
        except OSError as error:
            cli.fail(f'cannot read --prompts_file={_PROMPTS_FILE.value}: {error.strerror}.')
    if not prompts:
        cli.fail('give a prompt: --prompt TEXT (repeatable) or --prompts_file FILE.')
    if any(not prompt for prompt in prompts):
        cli.fail('a prompt is empty: give some text to continue.')
    return prompts


def main(argv: list[str]) -> int:
    cli.start(argv, ' (put a prompt in --prompt "...")')
    prompts = prompts_from_flags()
    try:
        sampling = generation_flags.sampling()
        loaded = generation_flags.load_model()
    except ConfigError as error:
        cli.fail(str(error))
    generator = Generator(loaded.graphdef, loaded.params, loaded.model_cfg, loaded.mesh)
    max_new = generation_flags.MAX_NEW.value
    tokenizer, room = loaded.tokenizer, generator.max_prompt_tokens(max_new)
    encoded = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt).tolist()
        if len(ids) > room:
            print(
                f'note: a prompt of {len(ids)} tokens is cut to its last {room}, to leave room for '
                f'--max_new_tokens={max_new} in the context of {loaded.model_cfg.max_seq_len}.',
                file=sys.stderr,
            )
            ids = ids[-room:]
        encoded.append(ids)
    stops = list(_STOP.value)
    streaming = len(prompts) == 1 and not _JSON.value
    streamer = Streamer(tokenizer.decode, encoded[0], stops) if streaming else None
    if streaming:
        sys.stdout.write(prompts[0])
    results, timing = generator.generate(
        encoded,
        max_new,
        sampling,
        generation_flags.SEED.value,
        stop_ids=tokenizer.stop_ids,
        on_tokens=streamer,
        stop_when=StopStrings(tokenizer.decode, encoded, stops) if stops else None,
    )
    for prompt, prompt_ids, result in zip(prompts, encoded, results, strict=True):
        # The text the new tokens add to the prompt's, as trainer.serve and transformers give it.
        completion, _ = cut_at_stop(completion_text(tokenizer.decode, prompt_ids, result.ids), stops)
        rate = len(result.ids) / timing.decode_s if timing.decode_s else 0.0
        if _JSON.value:
            ids = ids_of(prompt_ids, result.ids, completion, tokenizer.decode)
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
