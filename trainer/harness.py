"""python -m trainer.harness --model shardtrain --model_args path=PATH[,batch_size=8,dtype=float32] --tasks T ...

EleutherAI's lm-evaluation-harness (`pip install 'shardtrain[harness]'`) on our models: PATH is a run's
workdir, a checkpoint or a Hugging Face folder, loaded, batched, sharded and decoded by our own code. Every
other flag is lm_eval's own (`--include_path` for local task YAMLs, `--num_fewshot`, `--limit`,
`--output_path`, ...). The harness has no hook through which its `lm_eval` command finds a model class
from another package (0.4.x registers its own models only), so this command registers ours, named
`shardtrain`, and runs the harness's command line; from Python, `lm_eval.simple_evaluate(model=ShardtrainLM(
path=...), tasks=[...])` does the same.
"""

from __future__ import annotations

import sys
from typing import Any

try:
    from lm_eval import utils as lm_eval_utils
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # an optional extra: say how to get it, in one line, with the exit code of bad input
    print(
        "error: lm-evaluation-harness is not installed: pip install 'shardtrain[harness]' (or -e '.[harness]').",
        file=sys.stderr,
    )
    sys.exit(2)

import numpy as np
import tqdm

from trainer import cli
from trainer.data.tokenizers import prefix_id
from trainer.errors import ConfigError
from trainer.evaluation.loglikelihood import Scorer, encode, encode_pair
from trainer.inference import loading
from trainer.inference.decoding import Generator
from trainer.inference.sampling import GREEDY, Sampling
from trainer.inference.streaming import cut_at_stop


@register_model('shardtrain')
class ShardtrainLM(LM):
    """A run, checkpoint or Hugging Face folder as an lm-evaluation-harness model."""

    def __init__(
        self,
        path: str,
        batch_size: int | str = 8,
        dtype: str | None = None,
        max_gen_toks: int = 256,
        **_: Any,  # the harness passes max_batch_size and device to every model; ours lives on its mesh
    ):
        super().__init__()
        if str(batch_size).startswith('auto'):
            batch_size = 8  # we do not search for the largest batch; give batch_size=N to choose
        try:
            self._loaded = loading.load(str(path), dtype=dtype)
        except ConfigError as error:  # its words name our commands' flag; here the path is given as path=
            raise ConfigError(str(error).replace(f'--model={path}', f'path={path}')) from None
        if self._loaded.tokenizer is None:
            raise ConfigError(f'{path} has no tokenizer.json: the harness gives text, which needs its ids.')
        if self._loaded.model_cfg.head != 'lm':
            raise ConfigError(f'path={path} is a classifier: the harness scores language models.')
        self._tokenizer = self._loaded.tokenizer
        self._scorer = Scorer(self._loaded, int(batch_size))
        self._generator = Generator(
            self._loaded.graphdef, self._loaded.params, self._loaded.model_cfg, self._loaded.mesh
        )
        self._batch_size, self._max_gen_toks = self._scorer.batch_size, int(max_gen_toks)  # rows: whole shards

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None):
        """The model from --model_args, whose settings win over the harness's own flags of the same name: its
        command passes batch_size (1 unless --batch_size says), max_batch_size and device to every model, and
        lm-eval's LM gave both to the constructor, a TypeError for `--model_args path=...,batch_size=16`."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None):
        """As create_from_arg_obj, from 'path=...,batch_size=16' (simple_evaluate with a string model_args)."""
        return cls.create_from_arg_obj(lm_eval_utils.simple_parse_args_string(arg_string), additional_config)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log-likelihood, is greedy) of each request's continuation given its context."""
        pairs = [encode_pair(self._tokenizer, *request.args) for request in requests]
        return [(r.logprob, r.is_greedy) for r in self._scorer.loglikelihoods(pairs, progress=not disable_tqdm)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each request's whole text's log-likelihood, in windows of the model's context (as the harness's hf)."""
        windows, owners = [], []
        for index, request in enumerate(requests):
            ids = encode(self._tokenizer, request.args[0])
            for window in lm_eval_utils.get_rolling_token_windows(
                ids, prefix_id(self._tokenizer), self._scorer.max_length, 1
            ):
                windows.append(lm_eval_utils.make_disjoint_window(window))
                owners.append(index)
        totals = np.zeros(len(requests))
        for owner, found in zip(owners, self._scorer.loglikelihoods(windows, progress=not disable_tqdm), strict=True):
            totals[owner] += found.logprob
        return totals.tolist()

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation, cut where one of its `until` strings appears."""
        groups: dict[str, list[int]] = {}  # one decode batch has one setting: requests grouped by theirs
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        chunks = [
            group[i : i + self._batch_size] for group in groups.values() for i in range(0, len(group), self._batch_size)
        ]
        results: list[str] = [''] * len(requests)
        for chunk in tqdm.tqdm(chunks, unit='batch', desc='generating', disable=disable_tqdm or None):
            kwargs = requests[chunk[0]].args[1]
            until = kwargs.get('until') or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = min(int(kwargs.get('max_gen_toks', self._max_gen_toks)), self._scorer.max_length - 1)
            room = self._generator.max_prompt_tokens(max_new)
            prompts = [
                (encode(self._tokenizer, requests[i].args[0]) or [prefix_id(self._tokenizer)])[-room:] for i in chunk
            ]
            prompts += prompts[-1:] * (self._batch_size - len(prompts))  # a full batch: its rows split over the mesh
            generated, _ = self._generator.generate(
                prompts, max_new, _sampling(kwargs), stop_ids=self._tokenizer.stop_ids
            )
            for index, found in zip(chunk, generated[: len(chunk)], strict=True):
                results[index] = cut_at_stop(self._tokenizer.decode(np.array(found.ids)), until)[0]
        return results


def _sampling(kwargs: dict[str, Any]) -> Sampling:
    """The harness's generation kwargs as our Sampling: greedy unless do_sample with a temperature."""
    temperature = float(kwargs.get('temperature', 1.0) or 0.0)
    if not kwargs.get('do_sample') or temperature <= 0:
        return GREEDY
    return Sampling(temperature, int(kwargs.get('top_k') or 0), float(kwargs.get('top_p') or 1.0))


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except ConfigError as error:  # a bad path= or model folder: one line, exit 2
        cli.fail(str(error))


if __name__ == '__main__':
    main()
