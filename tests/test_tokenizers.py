"""Real tokenizers as users bring them: Mistral's SentencePiece model and its tokenizer.json, GPT-2's byte-level
BPE, bytes. Byte counts for bits per byte, ids and chat templates as transformers gives them, stop tokens."""

import json
import math
import pathlib

import jax
import numpy as np
import pytest
from conftest import mesh_for, tiny_config
from tokenizer_fixtures import LLAMA3_TEMPLATE, MISTRAL, TEXTS, llama3_folder, mistral_folder

from trainer import evaluate
from trainer.data import chat_template, examples, tokenizers
from trainer.inference import loading
from trainer.training import train

FIXTURES = pathlib.Path(__file__).resolve().parent / 'fixtures'
REFERENCE = json.loads((MISTRAL / 'reference.json').read_text())
TOKENIZERS = {
    'byte': 'byte',
    'gpt2_byte_level_bpe': str(FIXTURES / 'hf' / 'gpt2' / 'tokenizer.json'),
    'mistral_sentencepiece_model': str(MISTRAL / 'tokenizer.model'),
    'mistral_tokenizer_json': str(MISTRAL / 'tokenizer.json'),
}


@pytest.mark.parametrize('name', TOKENIZERS)
@pytest.mark.parametrize('text', TEXTS, ids=range(len(TEXTS)))
def test_the_bytes_tokens_stand_for_add_up_to_the_texts(name, text):
    """Leading and double spaces, newlines, tabs, digits and non-ASCII: exactly len(text.encode()), each token
    counting what it adds (SentencePiece's '▁Hello' is the 6 bytes of ' Hello', not the 5 of 'Hello')."""
    tokenizer = tokenizers.make_tokenizer(TOKENIZERS[name])
    ids, ends = tokenizer.encode_with_ends(text)
    np.testing.assert_array_equal(ids, tokenizer.encode(text))
    counts = tokenizers.token_bytes(ends, len(text.encode()))
    assert len(counts) == len(ids) and (counts >= 0).all()
    assert counts.sum() == len(text.encode())


def test_sentencepiece_words_count_their_spaces():
    tokenizer = tokenizers.make_tokenizer(TOKENIZERS['mistral_tokenizer_json'])
    ids, ends = tokenizer.encode_with_ends(' Hello world')
    pieces = [tokenizer.decode(ids[i : i + 1]) for i in range(len(ids))]
    assert pieces == ['', 'Hello', 'world']  # BOS decodes to nothing; each word alone loses its space
    assert tokenizers.token_bytes(ends, 12).tolist() == [0, 6, 6]  # BOS, ' Hello', ' world'


@pytest.mark.parametrize('name', TOKENIZERS)
def test_token_text_writes_special_tokens_out_as_transformers_decode_does(name):
    """What lm-eval's has_bos_prefix compares a context with: tokenizer.decode(prefix id), specials kept."""
    tokenizer = tokenizers.make_tokenizer(TOKENIZERS[name])
    bos, eos = {'byte': (None, '\x00'), 'gpt2_byte_level_bpe': ('<|endoftext|>',) * 2}.get(name, ('<s>', '</s>'))
    assert tokenizer.token_text(tokenizer.eos_id) == eos
    assert tokenizer.token_text(tokenizer.bos_id if tokenizer.bos_id is not None else 1) == (bos or '\x01')
    word = tokenizer.encode('Hello', add_special_tokens=False)
    assert ''.join(tokenizer.token_text(i) for i in word).strip() == 'Hello'


def test_the_tokenizer_json_gives_transformers_ids():
    tokenizer = tokenizers.make_tokenizer(str(MISTRAL))
    assert (tokenizer.bos_id, tokenizer.eos_id) == (REFERENCE['mistral']['bos_token_id'], 2)
    for case in REFERENCE['mistral']['texts']:
        assert tokenizer.encode(case['text']).tolist() == case['ids']
        assert tokenizer.encode(case['text'], add_special_tokens=False).tolist() == case['ids_without_special']


def test_bits_per_byte_of_a_sentencepiece_model_counts_every_byte_once(tmp_path):
    """Scored with Mistral's tokenizer (BOS first, no byte in it), the predicted tokens stand for all the text."""
    texts = [t for t in TEXTS if t.strip()]
    (tmp_path / 'text.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts))
    config = tiny_config('llama')
    config.model.update(vocab_size=32000, max_seq_len=512)
    config.data.update(seq_len=400, tokenizer=str(MISTRAL / 'tokenizer.json'))
    mesh = mesh_for(config)
    tokenizer = tokenizers.make_tokenizer(config.data.tokenizer)
    with jax.set_mesh(mesh):
        setup = train.build(config, mesh)
    loaded = loading.LoadedModel(
        config, setup.model_cfg, setup.sharded.graphdef, setup.sharded.state.params, tokenizer, mesh, 'test'
    )
    scores = evaluate.score(loaded, str(tmp_path / 'text.jsonl'), seq_len=400, batch_size=8)
    assert scores.bytes == sum(len(t.encode()) for t in texts)
    assert scores.bits_per_byte == pytest.approx(scores.loss * scores.tokens / math.log(2) / scores.bytes)


def chat_example(folder: pathlib.Path, messages: list, tmp_path: pathlib.Path) -> examples.Example:
    config = tiny_config('llama')
    (tmp_path / 'chat.jsonl').write_text(json.dumps({'messages': messages}) + '\n')
    config.model.vocab_size = 32005
    config.data.update(format='sft', tokenizer=str(folder), seq_len=400, train_files=str(tmp_path / 'chat.jsonl'))
    tokenizer = tokenizers.make_tokenizer(str(folder))
    return examples.read((str(tmp_path / 'chat.jsonl'),), config.data, tokenizer, 0, 'test').examples[0]


@pytest.mark.parametrize('template', ['mistral', 'llama3'])
@pytest.mark.parametrize('chat', [0, 1])
def test_chat_fine_tuning_tokenizes_as_apply_chat_template_and_learns_the_answers(template, chat, tmp_path):
    """The ids of transformers' apply_chat_template(tokenize=True) with a real SentencePiece tokenizer and two real
    templates; the learned tokens are the assistant's words and the template's end of turn, with no EOS after it."""
    folder = (mistral_folder if template == 'mistral' else llama3_folder)(tmp_path / 'model')
    reference = REFERENCE[template]['chats'][chat]
    tokenizer = tokenizers.make_tokenizer(str(folder))
    example = chat_example(folder, reference['messages'], tmp_path)
    assert example.tokens.tolist() == reference['ids']  # nothing added: both templates end with an end of turn
    end_of_turn = '</s>' if template == 'mistral' else '<|eot_id|>'
    # Learned: each answer and its end of turn (Mistral's template adds a space after </s>, which the next
    # token, '▁[', carries into the next user turn: not learned).
    runs = np.split(example.tokens, np.flatnonzero(np.diff(example.mask.astype(int)) != 0) + 1)
    masks = np.split(example.mask, np.flatnonzero(np.diff(example.mask.astype(int)) != 0) + 1)
    learned = [tokenizer.decode(run) for run, mask in zip(runs, masks, strict=True) if mask[0]]
    answers = [m['content'] for m in reference['messages'] if m['role'] == 'assistant']
    assert [text.strip() for text in learned] == [a.strip() for a in answers]
    ends_turn = [np.isin(run, tokenizer.stop_ids).sum() for run, m in zip(runs, masks, strict=True) if m[0]]
    assert ends_turn == [1] * len(answers), end_of_turn
    assert example.text_bytes.sum() == len(reference['text'].encode())


def test_a_chat_without_an_end_of_turn_gets_one_eos(tmp_path):
    """The plain template writes no EOS: one is added after the last answer, learned."""
    folder = mistral_folder(tmp_path / 'model')
    (folder / 'chat_template.jinja').unlink()
    messages = [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]
    example = chat_example(folder, messages, tmp_path)
    assert example.tokens[-1] == 2 and example.mask[-1] == 1 and (example.tokens == 2).sum() == 1


def test_llama3_folders_stop_at_every_end_of_turn_and_take_special_tokens_map_s_eos(tmp_path):
    folder = llama3_folder(tmp_path / 'model')
    tokenizer = tokenizers.make_tokenizer(str(folder))
    assert tokenizer.eos_id == REFERENCE['llama3']['eos_token_id'] == 32004  # <|eot_id|>, not <|end_of_text|>
    assert tokenizer.bos_id == REFERENCE['llama3']['bos_token_id']
    assert set(tokenizer.stop_ids) == {32001, 32004}  # generation_config.json's list
    (folder / 'config.json').write_text(json.dumps({'eos_token_id': 32003}))
    assert set(tokenizers.make_tokenizer(str(folder)).stop_ids) == {32001, 32003, 32004}


def test_a_tokenizer_config_with_added_tokens_decoder_keeps_its_eos_over_special_tokens_map_s(tmp_path):
    """As Meta-Llama-3-8B-Instruct's folder is today: tokenizer_config.json lists `added_tokens_decoder` and names
    <|eot_id|>, special_tokens_map.json names <|end_of_text|>; transformers 5 reads the map only for folders without
    that field, so its EOS is <|eot_id|> (reference.json), and the chat template gets the same tokens."""
    folder = llama3_folder(tmp_path / 'model', added_tokens_decoder=True)
    reference = REFERENCE['llama3_added_tokens_decoder']
    tokenizer = tokenizers.make_tokenizer(str(folder))
    assert (tokenizer.bos_id, tokenizer.eos_id) == (reference['bos_token_id'], reference['eos_token_id'])
    assert tokenizer.eos_id == 32004 and set(tokenizer.stop_ids) == {32001, 32004}  # <|eot_id|>; with the list's
    assert tokenizers.special_tokens(str(folder))['eos_token'] == '<|eot_id|>'
    template = chat_template.for_tokenizer(str(folder))
    for chat in reference['chats']:
        assert template.render(chat['messages'], add_generation_prompt=False) == chat['text']
        assert tokenizer.encode(chat['text'], add_special_tokens=False).tolist() == chat['ids']


def test_the_chat_template_file_comes_before_tokenizer_config_s_field(tmp_path):
    folder = mistral_folder(tmp_path / 'model')
    settings = json.loads((folder / 'tokenizer_config.json').read_text())
    (folder / 'tokenizer_config.json').write_text(json.dumps(settings | {'chat_template': 'OLD {{ messages }}'}))
    template = chat_template.for_tokenizer(str(folder))
    assert template.own and template.render([{'role': 'user', 'content': 'Hi'}]).startswith('<s>[INST] Hi [/INST]')
    (folder / 'chat_template.jinja').write_text(LLAMA3_TEMPLATE)
    assert '<|start_header_id|>' in chat_template.for_tokenizer(str(folder)).render([{'role': 'user', 'content': 'x'}])
    (folder / 'chat_template.jinja').unlink()
    assert chat_template.for_tokenizer(str(folder)).render([]) == 'OLD []'
