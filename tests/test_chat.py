"""Chat: templates rendered as transformers renders them, conversations trimmed to the context, the loop."""

import json
import pathlib
import subprocess
import sys

from trainer.chat import conversation_ids
from trainer.data import chat_template, tokenizers

REPO = pathlib.Path(__file__).resolve().parents[1]
MODEL = REPO / 'tests' / 'fixtures' / 'hf' / 'llama_gqa'


def test_a_model_template_renders_as_transformers_renders_it():
    expected = json.loads((MODEL / 'chat_rendered.json').read_text())
    template = chat_template.for_tokenizer(str(MODEL))
    assert template.own
    assert template.render(expected['messages'], add_generation_prompt=True) == expected['with_generation_prompt']
    assert template.render(expected['messages'][:3], add_generation_prompt=False) == expected['without']


def test_a_model_without_a_template_gets_the_plain_one():
    template = chat_template.for_tokenizer('byte')
    assert not template.own
    text = template.render([{'role': 'user', 'content': 'Hello'}])
    assert text == 'User: Hello\n\nAssistant:'


def test_the_oldest_messages_are_left_out_when_the_conversation_outgrows_the_context():
    template, tokenizer = chat_template.for_tokenizer(str(MODEL)), tokenizers.make_tokenizer(str(MODEL))
    messages = [{'role': 'system', 'content': 'Answer in verse.'}]
    for i in range(6):
        messages += [{'role': 'user', 'content': f'question {i}'}, {'role': 'assistant', 'content': f'answer {i}'}]
    messages.append({'role': 'user', 'content': 'the last question'})
    whole, dropped = conversation_ids(template, tokenizer, messages, room=10_000)
    assert dropped == 0 and whole[0] == tokenizer.bos_id and whole.count(tokenizer.bos_id) == 7  # BOS per turn, once
    trimmed, dropped = conversation_ids(template, tokenizer, messages, room=len(whole) // 2)
    assert 0 < dropped < 12 and len(trimmed) <= len(whole) // 2
    kept = template.render(messages[:1] + messages[1 + dropped :])
    assert trimmed == tokenizer.encode(kept, add_special_tokens=False).tolist()  # the system message stays


def test_the_loop_answers_resets_and_exits():
    result = subprocess.run(
        [sys.executable, '-m', 'trainer.chat', f'--model={MODEL}', '--max_new_tokens=5', '--temperature=0'],
        input='When shall we meet?\n/reset\nFair is foul\n/exit\n',
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count('model> ') == 2 and '(the conversation starts over)' in result.stdout
    assert "with the model's chat template" in result.stderr
