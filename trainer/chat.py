"""python -m trainer.chat --model PATH [--system TEXT] [--max_new_tokens N] [--temperature T] ...

A conversation in the terminal. Each turn, the whole conversation is rendered with the model's chat
template (tokenizer_config.json's, rendered as transformers renders it; a plain 'User: / Assistant:'
one for models without) and the reply streams as it is generated. /reset starts over, /exit (or
Ctrl-D) leaves. When the conversation outgrows the model's context, its oldest turns are left out,
with a notice.
"""

from __future__ import annotations

import sys

from absl import app, flags

from trainer import cli
from trainer.data import chat_template
from trainer.data.tokenizers import Tokenizer
from trainer.errors import ConfigError
from trainer.inference import generation_flags
from trainer.inference.decoding import Generator
from trainer.inference.streaming import StopStrings, Streamer, completion_text, cut_at_stop

_SYSTEM = flags.DEFINE_string('system', None, 'A system message that opens (and survives trimming of) the chat.')


def conversation_ids(
    template: chat_template.ChatTemplate, tokenizer: Tokenizer, messages: list[dict[str, str]], room: int
) -> tuple[list[int], int]:
    """The conversation's ids, ready for the next reply, within `room` tokens; and how many messages were left out.

    The oldest messages go first (a system message stays); a last message too long alone keeps its end.
    """
    system = messages[:1] if messages and messages[0]['role'] == 'system' else []
    rest, dropped = messages[len(system) :], 0
    while True:
        text = template.render(system + rest, add_generation_prompt=True)
        # A template writes its special tokens (BOS) itself; the plain one has none to add.
        ids = tokenizer.encode(text, add_special_tokens=not template.own).tolist()
        if len(ids) <= room or len(rest) <= 1:
            return ids[-room:], dropped
        rest, dropped = rest[1:], dropped + 1


def main(argv: list[str]) -> int:
    cli.start(argv)
    try:
        sampling = generation_flags.sampling()
        loaded = generation_flags.load_model()
        template = chat_template.for_tokenizer(loaded.config.data.tokenizer)
    except ConfigError as error:
        cli.fail(str(error))
    tokenizer = loaded.tokenizer
    generator = Generator(loaded.graphdef, loaded.params, loaded.model_cfg, loaded.mesh)
    max_new = generation_flags.MAX_NEW.value
    room = generator.max_prompt_tokens(max_new)
    stops = [] if template.own else [chat_template.PLAIN_STOP]
    opening = [{'role': 'system', 'content': _SYSTEM.value}] if _SYSTEM.value else []
    messages = list(opening)
    how = "the model's chat template" if template.own else 'a plain User/Assistant template (the model has none)'
    print(f'chatting with {loaded.source}, with {how}; /reset starts over, /exit leaves.', file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input('you> ')
        except EOFError:
            print()
            return 0
        command = line.strip()
        if command == '/exit':
            return 0
        if command == '/reset':
            messages = list(opening)
            print('(the conversation starts over)')
            continue
        if not command:
            continue
        messages.append({'role': 'user', 'content': line})
        ids, dropped = conversation_ids(template, tokenizer, messages, room)
        if dropped:
            print(
                f'(the {dropped} oldest messages no longer fit the context of {loaded.model_cfg.max_seq_len} '
                'tokens and are left out)',
                file=sys.stderr,
            )
        sys.stdout.write('model> ')
        streamer = Streamer(tokenizer.decode, ids, stops)
        results, _ = generator.generate(
            [ids],
            max_new,
            sampling,
            generation_flags.SEED.value + turn,
            stop_ids=tokenizer.stop_ids,
            on_tokens=streamer,
            stop_when=StopStrings(tokenizer.decode, [ids], stops) if stops else None,
        )
        streamer.finish()
        reply, _ = cut_at_stop(completion_text(tokenizer.decode, ids, results[0].ids), stops)
        messages.append({'role': 'assistant', 'content': reply.strip()})
        turn += 1


if __name__ == '__main__':
    app.run(main)
