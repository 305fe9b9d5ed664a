"""Multiple-choice scoring and our lm-evaluation-harness model, against the harness's own `hf` model.

tests/fixtures/lm_eval/reference.json holds what lm-eval 0.4.13's `hf` model (transformers, torch) scored on
the tiny Hugging Face fixtures for three local tasks; scripts/make_lm_eval_fixtures.py made it. No torch here.
"""

import configparser
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from trainer.evaluation import multiple_choice
from trainer.evaluation.loglikelihood import Scorer, encode_pair
from trainer.inference import loading

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'scripts'))
import make_lm_eval_fixtures  # noqa: E402  (scripts/: the task YAMLs; torch is imported only by its main)

FIXTURES = REPO / 'tests' / 'fixtures'
REFERENCE = json.loads((FIXTURES / 'lm_eval' / 'reference.json').read_text())['models']
MC_FILE = FIXTURES / 'lm_eval' / 'tiny_mc.jsonl'


def reference_logprobs(model: str) -> list[list[float]]:
    return [[ll for ll, _ in doc] for doc in REFERENCE[model]['shardtrain_tiny_mc']['responses']]


@pytest.fixture(scope='module', params=make_lm_eval_fixtures.MODELS)
def model(request) -> tuple[str, loading.LoadedModel]:
    return request.param, loading.load(str(FIXTURES / 'hf' / request.param))


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch) -> pathlib.Path:
    """The harness reads the local tasks' JSON lines through `datasets`: offline, cached in tmp_path."""
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_DATASETS_CACHE', str(tmp_path / 'datasets'))
    make_lm_eval_fixtures.write_tasks(tmp_path / 'tasks')
    return tmp_path / 'tasks'


def test_the_token_boundaries_are_the_harness_s(model):
    name, loaded = model
    tokenizer = loaded.tokenizer
    # The space that ends a context moves to the continuation; the pair is tokenized together.
    context, continuation = encode_pair(tokenizer, 'a big red ', 'ball')
    assert context == tokenizer.encode('a big red').tolist()
    assert context + continuation == tokenizer.encode('a big red ball').tolist()
    # No context: the BOS (else EOS) token alone conditions the continuation.
    context, continuation = encode_pair(tokenizer, '', 'good bye')
    assert context == [tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id]
    assert continuation == tokenizer.encode('good bye', add_special_tokens=False).tolist()
    adds_bos = tokenizer.encode('x').tolist()[0] == tokenizer.bos_id
    assert adds_bos == (name == 'llama_gqa')  # both kinds of tokenizer are covered


def test_a_context_that_begins_with_the_bos_text_gets_no_second_bos(model):
    """lm-eval's tok_encode adds no special tokens to text that begins with the prefix token's text
    (`has_bos_prefix`): a few-shot context or a template that writes '<s>' gets one BOS, not two."""
    name, loaded = model
    tokenizer = loaded.tokenizer
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    written = tokenizer.token_text(prefix)
    assert written == ('<s>' if name == 'llama_gqa' else '<|endoftext|>')
    context, continuation = encode_pair(tokenizer, f'{written}a big red ', 'ball')
    assert context == tokenizer.encode(f'{written}a big red', add_special_tokens=False).tolist()
    assert context.count(prefix) == 1 and context[0] == prefix
    assert continuation == encode_pair(tokenizer, 'a big red ', 'ball')[1]
    if name == 'llama_gqa':  # the text's '<s>' is the BOS the tokenizer would have added
        assert context == tokenizer.encode('a big red').tolist()


def test_native_multiple_choice_scores_are_the_harness_hf_model_s(model):
    name, loaded = model
    questions = multiple_choice.read_questions(str(MC_FILE))
    logprobs = multiple_choice.choice_logprobs(Scorer(loaded, 4), loaded.tokenizer, questions)
    expected = reference_logprobs(name)
    np.testing.assert_allclose(np.concatenate(logprobs), np.concatenate(expected), rtol=1e-4, atol=1e-4)
    scores = multiple_choice.accuracies(questions, logprobs)
    metrics = REFERENCE[name]['shardtrain_tiny_mc']['metrics']
    assert scores.acc == metrics['acc,none'] and scores.acc_norm == metrics['acc_norm,none']
    assert scores.acc_stderr == pytest.approx(metrics['acc_stderr,none'], rel=1e-9)
    assert scores.acc_norm_stderr == pytest.approx(metrics['acc_norm_stderr,none'], rel=1e-9)
    assert scores.questions == 12 and scores.chance == pytest.approx(np.mean([1 / len(q.choices) for q in questions]))


def test_the_harness_scores_our_model_as_it_scores_its_hf_model(model, offline_datasets):
    """Multiple choice, rolling log-likelihood and greedy generation through lm_eval.simple_evaluate."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from trainer.harness import ShardtrainLM

    name, _ = model
    out = lm_eval.simple_evaluate(
        model=ShardtrainLM(path=str(FIXTURES / 'hf' / name), batch_size=4),
        tasks=list(make_lm_eval_fixtures.TASKS),
        task_manager=TaskManager(include_path=str(offline_datasets)),
        log_samples=True,
    )
    found = {task: make_lm_eval_fixtures.responses(out['samples'][task]) for task in make_lm_eval_fixtures.TASKS}
    expected = REFERENCE[name]
    mc = [ll for doc in found['shardtrain_tiny_mc'] for ll, _ in doc]
    np.testing.assert_allclose(mc, np.concatenate(reference_logprobs(name)), rtol=1e-4, atol=1e-4)
    for metric in ('acc,none', 'acc_norm,none'):
        assert out['results']['shardtrain_tiny_mc'][metric] == expected['shardtrain_tiny_mc']['metrics'][metric]
    rolling = [doc[0] for doc in found['shardtrain_tiny_rolling']]
    np.testing.assert_allclose(rolling, [d[0] for d in expected['shardtrain_tiny_rolling']['responses']], rtol=1e-4)
    bits = out['results']['shardtrain_tiny_rolling']['bits_per_byte,none']
    assert bits == pytest.approx(expected['shardtrain_tiny_rolling']['metrics']['bits_per_byte,none'], rel=1e-4)
    # Greedy text, character for character. The question with no context is left out: the harness hands hf's
    # generate a prompt of zero tokens there (with the GPT-2 tokenizer, which adds no BOS), whose result transformers
    # does not define; we start from the BOS (else EOS) token, as the harness's log-likelihoods do.
    empty = [i for i, line in enumerate(MC_FILE.read_text().splitlines()) if not json.loads(line)['context']]
    assert empty == [3]
    generated, reference = found['shardtrain_tiny_generate'], expected['shardtrain_tiny_generate']['responses']
    assert [g for i, g in enumerate(generated) if i not in empty] == [
        r for i, r in enumerate(reference) if i not in empty
    ]


def test_the_evaluate_command_scores_multiple_choice_and_skips_bad_records(tmp_path):
    questions = tmp_path / 'questions.jsonl'
    bad = ['{"context": "x", "choices": ["a"], "gold": 0}', 'not json', '{"context": "x", "choices": ["a", "b"]}']
    questions.write_text(MC_FILE.read_text() + '\n'.join(bad) + '\n')
    base = [sys.executable, '-m', 'trainer.evaluate', '--model', str(FIXTURES / 'hf' / 'llama_gqa')]
    command = [*base, '--task', 'multiple_choice', '--files', str(questions), '--batch_size', '8']
    result = subprocess.run([*command, '--json'], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    metrics = REFERENCE['llama_gqa']['shardtrain_tiny_mc']['metrics']
    assert scores['acc'] == metrics['acc,none'] and scores['questions'] == 12
    for line, why in ((13, 'at least two'), (14, 'not JSON'), (15, '"gold" is not the index')):
        assert f'{questions}:{line} skipped: ' in result.stderr and why in result.stderr
    text = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert text.returncode == 0 and text.stdout.startswith(f'acc {metrics["acc,none"]:.4f} ± ')
    assert '12 questions, chance 0.3611 | model ' in text.stdout
    empty = tmp_path / 'empty.jsonl'
    empty.write_text('\n'.join(bad) + '\n')
    failed = subprocess.run(
        [*base, '--task', 'multiple_choice', '--files', str(empty)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert failed.returncode == 2 and failed.stderr.strip().splitlines()[-1].startswith('error: --files=')
    assert 'holds no valid question' in failed.stderr and 'Traceback' not in failed.stderr
    # A batch the 8 devices cannot split: one line (it was jax's IndivisibleError, for every --task).
    uneven = subprocess.run([*command[:-1], '4'], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert uneven.returncode == 2 and 'Traceback' not in uneven.stderr, uneven.stderr[-2000:]
    assert uneven.stderr.strip().endswith('--batch_size=4 must be a multiple of the 8 batch shards of the mesh.')


def test_model_args_may_hold_the_batch_size_the_harness_also_passes():
    """lm-eval's command hands every model batch_size (1 by default), max_batch_size and device besides
    --model_args: `--model_args path=...,batch_size=16` was a TypeError; --model_args wins, in both forms the
    harness builds models from (a dict from its command line, a string from simple_evaluate)."""
    from trainer.harness import ShardtrainLM

    path = FIXTURES / 'hf' / 'gpt2'
    harness_flags = {'batch_size': 1, 'max_batch_size': None, 'device': 'cuda:0'}
    from_dict = ShardtrainLM.create_from_arg_obj({'path': str(path), 'batch_size': 16}, harness_flags)
    from_string = ShardtrainLM.create_from_arg_string(f'path={path},batch_size=16,dtype=float32', harness_flags)
    assert from_dict._batch_size == from_string._batch_size == 16
    flag_only = ShardtrainLM.create_from_arg_obj({'path': str(path)}, dict(harness_flags, batch_size=24))
    assert flag_only._batch_size == 24  # --batch_size alone still counts


@pytest.mark.slow  # two start-ups of lm-eval's command (58 s here); the default suite uses lm_eval.simple_evaluate
def test_the_harness_command_runs_lm_eval_with_our_model(offline_datasets):
    env = dict(os.environ, HF_DATASETS_OFFLINE='1', HF_HUB_OFFLINE='1')
    command = [sys.executable, '-m', 'trainer.harness', '--model', 'shardtrain', '--tasks', 'shardtrain_tiny_mc']
    command += ['--include_path', str(offline_datasets)]
    path = FIXTURES / 'hf' / 'gpt2'
    # The documented form: the batch size in --model_args (it was a TypeError beside the command's own batch_size).
    result = subprocess.run(
        [*command, '--model_args', f'path={path},batch_size=16'],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    acc = REFERENCE['gpt2']['shardtrain_tiny_mc']['metrics']['acc,none']
    assert 'shardtrain_tiny_mc' in result.stdout and f'{acc:.4f}' in result.stdout, result.stdout[-2000:]
    missing = subprocess.run(
        [*command, '--batch_size', '4', '--model_args', 'path=/no/such/run'],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 2 and 'Traceback' not in missing.stderr, missing.stderr[-2000:]
    assert missing.stderr.strip().splitlines()[-1].startswith('error: path=/no/such/run is not a folder')


def test_the_bundled_demo_task_is_what_its_script_makes_and_every_record_is_valid():
    import make_mc_data

    bundled = make_mc_data.OUT.read_text().splitlines()
    assert bundled == [json.dumps(q) for q in make_mc_data.questions()]
    questions = multiple_choice.read_questions(str(make_mc_data.OUT))
    assert len(questions) == 400 and all(len(q.choices) == 4 for q in questions)
    assert all(len(set(q.choices)) == 4 for q in questions)  # no distractor is the answer itself
    assert 0.2 < np.mean([q.gold == 0 for q in questions]) < 0.3  # gold positions are shuffled


def test_without_lm_eval_the_harness_command_says_how_to_install_it(tmp_path):
    (tmp_path / 'lm_eval').mkdir()
    (tmp_path / 'lm_eval' / '__init__.py').write_text("raise ImportError('not installed')\n")
    env = dict(os.environ, PYTHONPATH=f'{tmp_path}{os.pathsep}{REPO}')
    result = subprocess.run(
        [sys.executable, '-m', 'trainer.harness', '--help'], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: lm-evaluation-harness is not installed: pip install 'shardtrain[harness]' (or -e '.[harness]')."
    ]


def extras() -> dict[str, list[str]]:
    """setup.cfg's extras: name -> the project names they install."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO / 'setup.cfg')
    section = parser['options.extras_require']
    return {name: re.findall(r'^\s*([A-Za-z0-9_.-]+)', section[name], re.M) for name in section}


def test_every_extra_the_docs_and_messages_name_installs_what_they_use():
    """pip 23.2 (a fresh Python 3.11 venv's) looks an extra up as typed, while setuptools writes `lm_eval` as
    `lm-eval`: `.[lm_eval]` installed nothing. Names of letters and digits read the same everywhere."""
    found = extras()
    assert all(re.fullmatch(r'[a-z0-9]+', name) for name in found), sorted(found)
    assert 'lm-eval' in found['harness']
    texts = [REPO / 'README.md', *(REPO / 'docs').glob('*.md'), *(REPO / 'trainer').rglob('*.py')]
    named = {m for path in texts for m in re.findall(r"(?:shardtrain|'\.)\[([\w-]+)\]", path.read_text())}
    assert {'harness', 'serve'} <= named and named <= set(found), named - set(found)
    # The server's Python example imports the official client: the serve extra installs it.
    serve_doc = (REPO / 'docs' / 'serve.md').read_text()
    examples = re.findall(r'```python\n(.*?)```', serve_doc, re.S)
    imported = {m for block in examples for m in re.findall(r'^(?:from|import) (\w+)', block, re.M)}
    assert 'openai' in imported and imported - set(sys.stdlib_module_names) <= set(found['serve'])
