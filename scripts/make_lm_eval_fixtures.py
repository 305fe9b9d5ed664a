"""Runs lm-evaluation-harness's own `hf` model on the tiny Hugging Face fixtures and writes what it scored.

Needs torch, transformers and lm-eval, which the project's tests do not; run it once, in a separate
environment, when a fixture or task changes, and commit what it writes:

  python3.11 -m venv /tmp/hf && /tmp/hf/bin/pip install torch==2.13.0 transformers lm-eval==0.4.13
  /tmp/hf/bin/python scripts/make_lm_eval_fixtures.py

For tests/fixtures/hf/{gpt2,llama_gqa} and the three local tasks `write_tasks` makes over
tests/fixtures/lm_eval/tiny_*.jsonl (multiple choice, rolling log-likelihood, greedy generation), it writes
tests/fixtures/lm_eval/reference.json: each task's metrics and each request's responses (per choice
log-likelihoods, per document log-likelihoods, generated text). tests/test_harness.py compares our native
scoring and our harness model with them, without torch.
"""

from __future__ import annotations

import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / 'tests' / 'fixtures'
DATA = FIXTURES / 'lm_eval'
MODELS = ('gpt2', 'llama_gqa')
TASKS = ('shardtrain_tiny_mc', 'shardtrain_tiny_rolling', 'shardtrain_tiny_generate')

_TASK_YAML = {
    'shardtrain_tiny_mc': """
task: shardtrain_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/tiny_mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    'shardtrain_tiny_rolling': """
task: shardtrain_tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/tiny_text.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    'shardtrain_tiny_generate': """
task: shardtrain_tiny_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/tiny_mc.jsonl
test_split: test
output_type: generate_until
doc_to_text: context
doc_to_target: "{{{{choices[gold]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def write_tasks(folder: pathlib.Path, data: pathlib.Path = DATA) -> None:
    """The local task YAMLs (no download: the data files are local JSON lines) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in _TASK_YAML.items():
        (folder / f'{name}.yaml').write_text(text.format(data=data.resolve()).lstrip())


def responses(samples: list[dict]) -> list:
    """Each document's responses in document order: a list of (log-likelihood, is greedy), a float, or text."""
    found = []
    for sample in sorted(samples, key=lambda s: s['doc_id']):
        resps = [r[0] for r in sample['resps']]
        found.append(
            resps[0] if isinstance(resps[0], str) else [list(r) if isinstance(r, tuple | list) else r for r in resps]
        )
    return found


def main() -> None:
    import tempfile

    import lm_eval
    import torch
    import transformers
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tasks:
        write_tasks(pathlib.Path(tasks))
        manager = TaskManager(include_path=tasks)
        reference = {
            'versions': {
                'lm_eval': lm_eval.__version__,
                'transformers': transformers.__version__,
                'torch': torch.__version__,
            },
            'models': {},
        }
        for model in MODELS:
            out = lm_eval.simple_evaluate(
                model='hf',
                model_args=f'pretrained={FIXTURES / "hf" / model},dtype=float32,device=cpu',
                tasks=list(TASKS),
                task_manager=manager,
                batch_size=1,  # no padding: the fixtures' tokenizers pad on the right, which generation must not
                log_samples=True,
            )
            reference['models'][model] = {
                task: {'metrics': out['results'][task], 'responses': responses(out['samples'][task])} for task in TASKS
            }
    (DATA / 'reference.json').write_text(json.dumps(reference, indent=1, default=float) + '\n')
    print(f'wrote {DATA / "reference.json"}', file=sys.stderr)


if __name__ == '__main__':
    main()
