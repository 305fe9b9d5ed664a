"""A conversation as the text a model was fine-tuned on: the model's own chat template, or a plain one.

A Hugging Face model folder's chat_template.jinja (transformers 5) or tokenizer_config.json (older folders) may
hold a Jinja chat template; it is rendered the
way transformers' apply_chat_template renders it (a sandboxed environment that trims blocks, the same
helpers, the special tokens as variables), so that the same messages give the same text, and the text
is then tokenized without adding special tokens again. Models without one get PLAIN.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from trainer.data.tokenizers import special_tokens
from trainer.errors import ConfigError

# For models without a template of their own (the default byte-level model, for one).
PLAIN = (
    '{% for message in messages %}{{ message.role | capitalize }}: {{ message.content }}\n\n{% endfor %}'
    '{% if add_generation_prompt %}Assistant:{% endif %}'
)
PLAIN_STOP = '\n\nUser:'  # where a plain-template reply ends, for models that do not stop by themselves


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # transformers replaces Jinja's tojson, which escapes HTML characters, with this one.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """Renders conversations; `own` tells whether the model brought its template."""

    def __init__(self, source: str, special_tokens: dict[str, str], own: bool):
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=['jinja2.ext.loopcontrols']
        )
        environment.filters['tojson'] = _tojson
        environment.globals.update(
            raise_exception=_raise, strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt)
        )
        try:
            self._template = environment.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as error:
            raise ConfigError(f'the chat template does not parse: {error.message} (line {error.lineno}).') from None
        self._special_tokens, self.own = special_tokens, own

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as text; with add_generation_prompt, ready for the assistant's next reply."""
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self._special_tokens
        )


def for_tokenizer(spec: str) -> ChatTemplate:
    """The chat template beside a tokenizer, else the plain one: the folder's chat_template.jinja (where
    transformers 5 saves it), else tokenizer_config.json's `chat_template`, as transformers reads them."""
    folder = spec if os.path.isdir(spec) else os.path.dirname(spec)
    if not folder or spec == 'byte':
        return ChatTemplate(PLAIN, {}, own=False)
    template = None
    if os.path.isfile(os.path.join(folder, 'chat_template.jinja')):
        with open(os.path.join(folder, 'chat_template.jinja'), encoding='utf-8') as f:
            template = f.read()
    else:
        settings_file = os.path.join(folder, 'tokenizer_config.json')
        if os.path.isfile(settings_file):
            with open(settings_file, encoding='utf-8') as f:
                template = json.load(f).get('chat_template')
        if isinstance(template, list):  # several named templates: the default one
            template = next((t['template'] for t in template if t.get('name') == 'default'), None)
    return ChatTemplate(template or PLAIN, special_tokens(folder), own=bool(template))
