"""Scoring whole files: the same loss as the training eval on the same text; bits per byte; the command."""

import json
import logging
import math
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import mesh_for, tiny_config

from trainer import evaluate
from trainer.data import pipeline, tokenizers
from trainer.errors import ConfigError
from trainer.evaluation import multiple_choice
from trainer.inference import loading
from trainer.training import train

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / 'tests' / 'fixtures' / 'hf'


def test_scoring_a_file_gives_the_training_eval_loss(tmp_path):
    # 8 paragraphs of 11 bytes: with their EOS, 12 tokens each, exactly one row of seq_len + 1 = 12 each.
    paragraphs = [f'line {i:02d} abc' for i in range(8)]
    (tmp_path / 'text.txt').write_text('\n\n'.join(paragraphs))
    config = tiny_config('llama', fsdp=8)
    config.model.vocab_size = 256
    config.data.update(seq_len=11, eval_files=str(tmp_path / 'text.txt'))
    config.train.update(global_batch_size=8, eval_steps=1)
    mesh = mesh_for(config)
    tokenizer = tokenizers.make_tokenizer('byte')
    with jax.set_mesh(mesh):
        setup = train.build(config, mesh)
        params = setup.sharded.state.params
        (batch,) = pipeline.eval_batches(config, tokenizer, setup.batch_sharding)
        sums = jax.device_get(setup.compiled.eval(params, batch))
        loss_sum, count, text_bytes = sums['loss'], sums['count'], sums['bytes']
    loaded = loading.LoadedModel(config, setup.model_cfg, setup.sharded.graphdef, params, tokenizer, mesh, 'test')
    scores = evaluate.score(loaded, str(tmp_path / 'text.txt'), seq_len=11, batch_size=8)
    assert scores.loss == pytest.approx(loss_sum / count, rel=1e-6)
    assert (scores.tokens, scores.bytes) == (8 * 11, 8 * 10)  # every byte but the first predicted; EOS has none
    assert scores.bits_per_byte == pytest.approx(loss_sum / math.log(2) / text_bytes, rel=1e-6)
    assert text_bytes == 80


def test_the_command_scores_files_with_a_hugging_face_model(tmp_path):
    (tmp_path / 'a.txt').write_text('When shall we three meet again\n\nFair is foul, and foul is fair')
    command = [
        sys.executable,
        '-m',
        'trainer.evaluate',
        f'--model={FIXTURES / "gpt2"}',
        '--batch_size=8',
        '--seq_len=16',
    ]
    result = subprocess.run(
        [*command, f'--files={tmp_path / "a.txt"}', '--json'], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads(result.stdout)
    assert scores['perplexity'] == pytest.approx(math.exp(scores['loss']))
    # The bytes of the predicted tokens: all the text but what the first token of each row stands for.
    assert 40 < scores['bytes'] < 60
    bits = scores['loss'] * scores['tokens'] / math.log(2) / scores['bytes']
    assert scores['bits_per_byte'] == pytest.approx(bits) and np.isfinite(bits)
    half = subprocess.run(
        [*command, f'--files={tmp_path / "a.txt"}', '--json', '--dtype=bfloat16'],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert half.returncode == 0, half.stderr[-2000:]
    rounded = json.loads(half.stdout)['loss']  # the folder's float32 by default; bfloat16 when asked
    assert rounded != scores['loss'] and rounded == pytest.approx(scores['loss'], rel=0.05)
    missing = subprocess.run(
        [*command, '--files=/no/such/*.txt'], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert missing.returncode == 2
    assert (
        missing.stderr.strip().splitlines()[-1]
        == "error: --files='/no/such/*.txt' matches no file: give an existing path or a glob that matches one."
    )


def test_multiple_choice_on_plain_text_is_one_error_not_a_warning_per_line(tmp_path, caplog):
    """A plain-text file given to --task multiple_choice: one line naming the file, no warning for each line."""
    text = tmp_path / 'play.txt'
    text.write_text('\n'.join(f'Line {i} of a play, no JSON here.' for i in range(3000)))
    with caplog.at_level(logging.WARNING), pytest.raises(ConfigError) as refused:
        multiple_choice.read_questions(str(text))
    assert f'{text} is not JSON lines ({text}:1: not JSON (' in str(refused.value)
    assert '--task multiple_choice reads one question per line' in str(refused.value)
    assert caplog.records == []


def test_multiple_choice_names_the_first_bad_lines_and_counts_the_rest(tmp_path, caplog):
    good = json.dumps({'context': 'x', 'choices': [' a', ' b'], 'gold': 1})
    questions = tmp_path / 'questions.jsonl'
    questions.write_text('\n'.join([good] + [f'bad line {i}' for i in range(40)] + [good]))
    with caplog.at_level(logging.WARNING):
        found = multiple_choice.read_questions(str(questions))
    assert len(found) == 2
    messages = [record.getMessage() for record in caplog.records]
    assert messages[:5] == [f'{questions}:{line} skipped: not JSON (Expecting value)' for line in range(2, 7)]
    assert messages[5:] == [f'data: skipping 35 more bad lines in {questions}']


def test_the_command_refuses_plain_text_for_multiple_choice_in_one_line(tmp_path):
    text = tmp_path / 'play.txt'
    text.write_text('\n'.join(f'Line {i} of a play, no JSON here.' for i in range(3000)))
    command = [sys.executable, '-m', 'trainer.evaluate', f'--model={FIXTURES / "gpt2"}', '--batch_size=8']
    result = subprocess.run(
        [*command, '--task=multiple_choice', f'--files={text}'], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2 and 'skipped' not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if str(text) in line]
    assert line.startswith(f'error: {text} is not JSON lines ({text}:1: not JSON (Expecting value)')
