"""Makes tests/fixtures/tokenizers/: Mistral's real SentencePiece tokenizer, its tokenizer.json, and what
transformers makes of them and of two real chat templates (reference.json).

Needs transformers and mistral-common, which the project does not depend on; run it once in a separate
environment and commit what it writes:

  python3.11 -m venv /tmp/hf && /tmp/hf/bin/pip install transformers tokenizers sentencepiece protobuf mistral-common
  /tmp/hf/bin/python scripts/make_tokenizer_fixtures.py

(torch is not needed; without protobuf, transformers 5.24 cannot convert the .model and tries tiktoken.)

mistral/: tokenizer.model (mistral-common's tokenizer.model.v1, the Mistral-7B v0.1 tokenizer), the
tokenizer.json transformers converts it to (written without indentation: 1.4 MB instead of 3.5), and
Mistral-7B-Instruct-v0.1's chat template in chat_template.jinja. reference.json holds, for
tests/tokenizer_fixtures.py's TEXTS and CHATS, the ids transformers' tokenizer gives (with and without special
tokens), and for both templates (the Mistral folder's and the Llama-3-style folder tokenizer_fixtures builds)
`apply_chat_template(tokenize=True)`'s ids and text, its BOS and EOS ids; the same for the Llama-3 folder as
it is today (tokenizer_config.json with `added_tokens_decoder`, whose EOS transformers 5 takes over
special_tokens_map.json's).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
import tempfile

import mistral_common
import transformers

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tests'))
from tokenizer_fixtures import CHATS, MISTRAL, TEXTS, llama3_folder  # noqa: E402

# mistralai/Mistral-7B-Instruct-v0.1's tokenizer_config.json chat_template, as published.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def convert_mistral(out: pathlib.Path) -> None:
    """Mistral's .model as a Hugging Face folder holds it, converted by transformers to tokenizer.json."""
    source = pathlib.Path(mistral_common.__file__).parent / 'data' / 'tokenizer.model.v1'
    with tempfile.TemporaryDirectory() as folder:
        shutil.copyfile(source, f'{folder}/tokenizer.model')
        settings = {'tokenizer_class': 'LlamaTokenizer', 'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>'}
        settings['add_bos_token'] = True  # as Mistral's folders say: its tokenizer.json puts <s> first
        pathlib.Path(folder, 'tokenizer_config.json').write_text(json.dumps(settings))
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        tokenizer.chat_template = MISTRAL_TEMPLATE
        tokenizer.save_pretrained(out)
    shutil.copyfile(source, out / 'tokenizer.model')
    compact = json.loads((out / 'tokenizer.json').read_text())
    (out / 'tokenizer.json').write_text(json.dumps(compact, ensure_ascii=False, separators=(',', ':')))


def reference(folder: pathlib.Path) -> dict:
    """What transformers' tokenizer makes of the texts and chats."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    return {
        'transformers': transformers.__version__,
        'bos_token_id': tokenizer.bos_token_id,
        'eos_token_id': tokenizer.eos_token_id,
        'texts': [
            {
                'text': text,
                'ids': tokenizer(text, add_special_tokens=True)['input_ids'],
                'ids_without_special': tokenizer(text, add_special_tokens=False)['input_ids'],
            }
            for text in TEXTS
        ],
        'chats': [
            {
                'messages': messages,
                'text': tokenizer.apply_chat_template(messages, tokenize=False),
                'ids': list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)['input_ids']),
            }
            for messages in CHATS
        ],
    }


def main() -> int:
    shutil.rmtree(MISTRAL, ignore_errors=True)
    MISTRAL.mkdir(parents=True)
    convert_mistral(MISTRAL)
    result = {'mistral': reference(MISTRAL)}
    with tempfile.TemporaryDirectory() as folder:
        result['llama3'] = reference(llama3_folder(pathlib.Path(folder)))
    with tempfile.TemporaryDirectory() as folder:  # today's Llama-3 Instruct folder: added_tokens_decoder
        result['llama3_added_tokens_decoder'] = reference(llama3_folder(pathlib.Path(folder), True))
    (MISTRAL / 'reference.json').write_text(json.dumps(result, ensure_ascii=False, indent=1) + '\n')
    print(sorted(p.name for p in MISTRAL.iterdir()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
