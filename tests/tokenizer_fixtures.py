"""Real tokenizers and chat templates for the tests, and the folders built from them (no torch needed).

tests/fixtures/tokenizers/mistral/ holds Mistral's real SentencePiece model (tokenizer.model, from the
`mistral-common` package) and the tokenizer.json transformers converts it to, with Mistral-7B-Instruct-v0.1's
chat template in chat_template.jinja, where transformers 5 saves it. `llama3_folder` adds Llama-3's special
tokens to that tokenizer and gives it Llama-3-8B-Instruct's template, stop ids and special_tokens_map.json, as
a Llama-3 Instruct folder has them (that of the first release, or today's, with `added_tokens_decoder`).
scripts/make_tokenizer_fixtures.py writes the folder and the ids transformers gives (reference.json); the tests
read both with `tokenizers` and json alone.
"""

from __future__ import annotations

import json
import pathlib
import shutil

MISTRAL = pathlib.Path(__file__).resolve().parent / 'fixtures' / 'tokenizers' / 'mistral'

# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template, as published.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    '{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}'
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIAL = ['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>']

# Text that trips byte counts: leading and repeated spaces, newlines, tabs, digits, non-ASCII, a trailing space.
TEXTS = [
    ' Hello  world\n\n12345 ünïcödé 日本語 \tend ',
    'When shall we three meet again\nIn thunder, lightning, or in rain?',
    '   three leading spaces, 2 digits: 42\n',
    'naïve café — “quoted” 😀 emoji\r\nand CRLF',
    '\n\nstarts with newlines',
]

CHATS = [
    [
        {'role': 'user', 'content': 'What is 12 + 30?'},
        {'role': 'assistant', 'content': 'It is 42.'},
    ],
    [
        {'role': 'user', 'content': ' Bonjour, ça va ?'},
        {'role': 'assistant', 'content': 'Très bien, merci !\nEt vous ?'},
        {'role': 'user', 'content': 'Name three plays.'},
        {'role': 'assistant', 'content': ' Hamlet, Macbeth and\tOthello.'},
    ],
]


def llama3_folder(out: pathlib.Path, added_tokens_decoder: bool = False) -> pathlib.Path:
    """Mistral's tokenizer with Llama-3's special tokens, template and stop ids, as a Llama-3 Instruct folder.

    By default as the first Llama-3 Instruct release: tokenizer_config.json names <|end_of_text|>,
    special_tokens_map.json <|eot_id|>, the template is in chat_template.jinja. With `added_tokens_decoder`, as
    Meta-Llama-3-8B-Instruct's folder is today: tokenizer_config.json lists its added tokens under
    `added_tokens_decoder`, names <|eot_id|> and holds the template, special_tokens_map.json still names
    <|end_of_text|>. Which EOS transformers takes from each is in reference.json.
    """
    import tokenizers

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizers.Tokenizer.from_file(str(MISTRAL / 'tokenizer.json'))
    tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL])
    # Llama-3's post-processor puts <|begin_of_text|> first, as its tokenizer.json does.
    bos = tokenizer.token_to_id('<|begin_of_text|>')
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single='<|begin_of_text|> $A',
        pair='<|begin_of_text|> $A <|begin_of_text|> $B',
        special_tokens=[('<|begin_of_text|>', bos)],
    )
    tokenizer.save(str(out / 'tokenizer.json'))
    settings = {'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': '<|begin_of_text|>'}
    special = {'bos_token': '<|begin_of_text|>'}
    if added_tokens_decoder:
        flags = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
        decoder = {str(tokenizer.token_to_id(t)): {'content': t, **flags} for t in LLAMA3_SPECIAL}
        settings = {'added_tokens_decoder': decoder, **settings, 'chat_template': LLAMA3_TEMPLATE}
        settings |= {'clean_up_tokenization_spaces': True, 'eos_token': '<|eot_id|>'}
        settings['model_input_names'] = ['input_ids', 'attention_mask']
        special['eos_token'] = '<|end_of_text|>'
    else:
        settings['eos_token'] = '<|end_of_text|>'
        special['eos_token'] = '<|eot_id|>'
        (out / 'chat_template.jinja').write_text(LLAMA3_TEMPLATE)
    (out / 'tokenizer_config.json').write_text(json.dumps(settings, indent=2))
    (out / 'special_tokens_map.json').write_text(json.dumps(special, indent=2))
    stops = [tokenizer.token_to_id('<|end_of_text|>'), tokenizer.token_to_id('<|eot_id|>')]
    generation = {'bos_token_id': bos, 'eos_token_id': stops}
    if added_tokens_decoder:  # Meta-Llama-3-8B-Instruct's sampling defaults
        generation |= {'do_sample': True, 'temperature': 0.6, 'top_p': 0.9}
    (out / 'generation_config.json').write_text(json.dumps(generation, indent=2))
    return out


def mistral_folder(out: pathlib.Path) -> pathlib.Path:
    """A copy of the Mistral fixture (tests write beside it)."""
    shutil.copytree(MISTRAL, out, ignore=shutil.ignore_patterns('reference.json'))
    return out
