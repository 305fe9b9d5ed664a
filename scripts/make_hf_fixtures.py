"""Makes the tiny Hugging Face models, tokenizers and reference outputs the tests compare against.

Needs torch and transformers, which the project does not depend on; run it once, in a separate
environment, when a fixture is added or changed, and commit what it writes:

  python3.11 -m venv /tmp/hf && /tmp/hf/bin/pip install torch transformers tokenizers
  /tmp/hf/bin/python scripts/make_hf_fixtures.py --out tests/fixtures/hf

Each variant's folder is a Hugging Face model folder (config.json, model.safetensors, and for some a
tokenizer) plus reference.safetensors: `input_ids` (2 x 24), float32 `logits` computed by transformers,
and greedy continuations (`greedy_prompt`, `greedy_ids`) of its own `generate`. tokenizer.json folders
also get tokenizer_ids.json: texts and the ids transformers' tokenizer gives them.

--check DIR loads a folder that scripts/convert_hf.py exported with transformers and prints its logits'
largest relative difference from a variant's reference (the last check of an export; no test runs torch).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file, save_file

SEED = 0
TEXTS = ['When shall we three meet again', 'Fair is foul, and foul is fair:', 'Hover through the fog.']
CORPUS = [
    'When shall we three meet again In thunder, lightning, or in rain?',
    "When the hurlyburly's done, When the battle's lost and won.",
    'That will be ere the set of sun. Where the place? Upon the heath.',
    'Fair is foul, and foul is fair: Hover through the fog and filthy air.',
] * 20

# A Llama-2-style chat template written over several lines: block tags on lines of their own, as many hub
# templates are, so that trim_blocks and lstrip_blocks matter.
CHAT_TEMPLATE = """{% if messages[0]['role'] == 'system' %}
    {% set system = messages[0]['content'] %}
    {% set messages = messages[1:] %}
{% endif %}
{% for message in messages %}
    {% if message['role'] == 'user' %}
{{ bos_token }}[INST] {% if loop.first and system is defined %}<<SYS>>
{{ system }}
<</SYS>>

{% endif %}{{ message['content'] | trim }} [/INST]
    {% elif message['role'] == 'assistant' %}
 {{ message['content'] | trim }} {{ eos_token }}
    {% else %}
{{ raise_exception('roles must be system, user or assistant') }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
 {% endif %}"""
MESSAGES = [
    {'role': 'system', 'content': 'Answer in verse.'},
    {'role': 'user', 'content': '  When shall we three meet again? '},
    {'role': 'assistant', 'content': 'In thunder, lightning, or in rain.'},
    {'role': 'user', 'content': 'Where the place?'},
]

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=99)
VARIANTS = {
    # Llama with grouped-query attention, and a tokenizer whose post-processor adds BOS.
    'llama_gqa': (transformers.LlamaConfig, dict(SMALL, num_key_value_heads=2, max_position_embeddings=64)),
    # Llama 3.1-style RoPE scaling, tied embeddings (Llama 3.2), a head_dim other than hidden / heads.
    'llama3_tied': (
        transformers.LlamaConfig,
        dict(
            SMALL,
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=True,
            rope_theta=500_000.0,
            max_position_embeddings=64,
            rope_scaling=dict(
                rope_type='llama3',
                factor=4.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    'llama_linear_rope': (
        transformers.LlamaConfig,
        dict(
            SMALL, num_key_value_heads=4, max_position_embeddings=64, rope_scaling=dict(rope_type='linear', factor=2.0)
        ),
    ),
    # Mistral with a window shorter than the 24-token test sequence.
    'mistral_window': (
        transformers.MistralConfig,
        dict(SMALL, num_key_value_heads=2, sliding_window=6, max_position_embeddings=64),
    ),
    # Qwen2: query/key/value biases, tied embeddings, rope_theta 1e6.
    'qwen2_bias': (
        transformers.Qwen2Config,
        dict(
            SMALL, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1_000_000.0, max_position_embeddings=64
        ),
    ),
    # GPT-2 with a byte-level BPE tokenizer (no BOS); an odd vocabulary, as GPT-2's 50257.
    'gpt2': (
        transformers.GPT2Config,
        dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=301, bos_token_id=0, eos_token_id=0),
    ),
}


def bpe_with_bos(folder: pathlib.Path) -> None:
    """A small BPE tokenizer whose post-processor adds <s>, as Llama 2's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token='<unk>'))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=99, special_tokens=['<unk>', '<s>', '</s>'], show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single='<s> $A', pair='<s> $A <s> $B', special_tokens=[('<s>', 1)]
    )
    tokenizer.save(str(folder / 'tokenizer.json'))
    config = dict(
        tokenizer_class='PreTrainedTokenizerFast',
        bos_token='<s>',
        eos_token='</s>',
        unk_token='<unk>',
        chat_template=CHAT_TEMPLATE,
    )
    (folder / 'tokenizer_config.json').write_text(json.dumps(config, indent=2) + '\n')


def byte_level_bpe(folder: pathlib.Path) -> None:
    """A byte-level BPE tokenizer with <|endoftext|> and no BOS, as GPT-2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=301,
        special_tokens=['<|endoftext|>'],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer.save(str(folder / 'tokenizer.json'))
    config = dict(tokenizer_class='PreTrainedTokenizerFast', bos_token='<|endoftext|>', eos_token='<|endoftext|>')
    (folder / 'tokenizer_config.json').write_text(json.dumps(config, indent=2) + '\n')


def make(name: str, out: pathlib.Path) -> None:
    config_class, fields = VARIANTS[name]
    torch.manual_seed(SEED)
    config = config_class(**fields)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    with torch.no_grad():  # larger weights than the default init, so that every part of the model matters
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / 'generation_config.json').unlink(missing_ok=True)
    if name == 'llama_gqa':
        bpe_with_bos(folder)
    if name == 'gpt2':
        byte_level_bpe(folder)
    if (folder / 'tokenizer.json').exists():
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        ids = {text: tokenizer(text)['input_ids'] for text in TEXTS}
        (folder / 'tokenizer_ids.json').write_text(json.dumps(ids) + '\n')
        if tokenizer.chat_template:
            rendered = {
                'messages': MESSAGES,
                'with_generation_prompt': tokenizer.apply_chat_template(
                    MESSAGES, tokenize=False, add_generation_prompt=True
                ),
                'without': tokenizer.apply_chat_template(MESSAGES[:3], tokenize=False, add_generation_prompt=False),
            }
            (folder / 'chat_rendered.json').write_text(json.dumps(rendered, indent=1) + '\n')
    generator = torch.Generator().manual_seed(SEED)
    input_ids = torch.randint(0, config.vocab_size, (2, 24), generator=generator)
    with torch.no_grad():
        logits = model(input_ids).logits
        prompt = input_ids[:, :8]
        greedy = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False, pad_token_id=0
        )
    save_file(
        {
            'input_ids': input_ids.numpy().astype(np.int32),
            'logits': logits.numpy().astype(np.float32),
            'greedy_prompt': prompt.numpy().astype(np.int32),
            'greedy_ids': greedy[:, 8:].numpy().astype(np.int32),
        },
        str(folder / 'reference.safetensors'),
    )
    print(f'{name}: {sum(p.numel() for p in model.parameters()):,} parameters -> {folder}')


def check(folder: pathlib.Path, reference: pathlib.Path) -> float:
    """The largest relative difference between an exported folder's logits (by transformers) and a reference."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    expected = load_file(str(reference))
    with torch.no_grad():
        logits = model(torch.from_numpy(expected['input_ids']).long()).logits.numpy()
    return float(np.max(np.abs(logits - expected['logits'])) / np.max(np.abs(expected['logits'])))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', type=pathlib.Path, default=pathlib.Path('tests/fixtures/hf'))
    parser.add_argument('--only', nargs='*', choices=sorted(VARIANTS), help='variants to make (default: all)')
    parser.add_argument('--check', type=pathlib.Path, help='an exported folder to load with transformers')
    parser.add_argument('--reference', type=pathlib.Path, help='with --check: the reference.safetensors to compare')
    args = parser.parse_args()
    if args.check:
        print(f'{args.check}: largest relative logit difference {check(args.check, args.reference):.2e}')
        return 0
    for name in args.only or VARIANTS:
        make(name, args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
