"""Decoding with a KV cache: equal to recomputing everything, to transformers' greedy search, batch or alone."""

import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from safetensors.numpy import load_file

from models.transformer import Decoder, KVCache
from trainer.inference import decoding, loading, sampling
from trainer.inference.decoding import Generator
from trainer.modeling.model_setup import model_config

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / 'tests' / 'fixtures' / 'hf'


@pytest.mark.parametrize(
    'family, changes',
    [('llama', {}), ('gpt2', {}), ('llama', {'sliding_window': 5}), ('llama', {'num_kv_heads': 1})],
    ids=['llama_gqa', 'gpt2', 'llama_window_5', 'llama_one_kv_head'],
)
def test_cached_decoding_equals_recomputing_the_whole_sequence(family, changes):
    cfg = dataclasses.replace(model_config(tiny_config(family)), **changes)
    model = Decoder(cfg, nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 14), 0, cfg.vocab_size)
    full = model(tokens)
    cache = KVCache.empty(cfg, batch=2, slots=16)
    ones = jnp.ones((2, 6), jnp.int32)
    prefix, cache = model.extend(tokens[:, :6], jnp.broadcast_to(jnp.arange(6), (2, 6)), ones, cache)
    np.testing.assert_allclose(prefix, full[:, :6], rtol=1e-4, atol=1e-5)
    for t in range(6, 14):  # one token at a time
        step, cache = model.extend(tokens[:, t : t + 1], jnp.full((2, 1), t), jnp.ones((2, 1), jnp.int32), cache)
        np.testing.assert_allclose(step[:, 0], full[:, t], rtol=1e-4, atol=1e-5, err_msg=f'token {t}')


def fixture_generator(name: str) -> tuple[Generator, loading.LoadedModel]:
    loaded = loading.load(str(FIXTURES / name), {'data': 1, 'fsdp': 1, 'tensor': 1})  # the folder's float32
    return Generator(loaded.graphdef, loaded.params, loaded.model_cfg, loaded.mesh), loaded


@pytest.mark.parametrize('name', sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()))
def test_greedy_generation_equals_transformers(name):
    reference = load_file(str(FIXTURES / name / 'reference.safetensors'))
    generator, _ = fixture_generator(name)
    eos = json.loads((FIXTURES / name / 'config.json').read_text()).get('eos_token_id')
    stop = [eos] if eos is not None else []
    results, _ = generator.generate(reference['greedy_prompt'].tolist(), 8, stop_ids=stop)
    for row, expected in zip(results, reference['greedy_ids'].tolist(), strict=True):
        end = expected.index(eos) if eos in expected else len(expected)  # transformers pads after EOS
        assert row.ids == expected[:end] and row.stopped == (end < len(expected))


def test_heads_split_over_two_devices_decode_the_same_tokens():
    prompts = [[5, 17, 33], [8, 9, 10, 11, 12, 13, 14]]
    one, _ = fixture_generator('llama_gqa')
    loaded = loading.load(str(FIXTURES / 'llama_gqa'), {'data': 1, 'fsdp': 1, 'tensor': 2}, 'float32')
    two = Generator(loaded.graphdef, loaded.params, loaded.model_cfg, loaded.mesh)
    assert len(loaded.params['blocks']['attention']['wk_DKH'].sharding.device_set) == 2
    assert two.generate(prompts, 6)[0] == one.generate(prompts, 6)[0]


def test_prefill_and_every_step_update_the_kv_cache_in_place():
    """The cache is the donated argument of both compiled functions: a step never copies the whole cache."""
    generator, _ = fixture_generator('llama_gqa')
    generator.generate([[1, 2, 3]], 4)
    (_, rows, width, slots), prefill = next((k, f) for k, f in generator._compiled.items() if k[0] == 'prefill')
    step = next(f for k, f in generator._compiled.items() if k[0] == 'step')
    old_caches = [
        jax.device_put(
            KVCache.empty(generator.cfg, rows, slots), decoding.cache_shardings(generator.cfg, generator._mesh)
        )
    ]
    old_caches.append(
        jax.device_put(
            KVCache.empty(generator.cfg, rows, slots), decoding.cache_shardings(generator.cfg, generator._mesh)
        )
    )
    ids, positions, segments = (jnp.ones((rows, width), jnp.int32) for _ in range(3))
    logits, _ = prefill(generator._params, ids, positions, segments, old_caches[0])
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old_caches[0])[:2]), 'prefill copied the cache'
    step(generator._params, logits, jnp.ones((rows,), jnp.int32), old_caches[1], jax.random.key(0))
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old_caches[1])[:2]), 'a decode step copied the cache'


def test_prompts_of_different_lengths_decode_as_one_batch_as_each_alone():
    generator, _ = fixture_generator('llama_gqa')
    prompts = [[5, 17, 33], [8, 9, 10, 11, 12, 13, 14], [40]]
    together, _ = generator.generate(prompts, 6)
    for prompt, result in zip(prompts, together, strict=True):
        alone, _ = generator.generate([prompt], 6)
        assert result.ids == alone[0].ids, prompt


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    generator, _ = fixture_generator('mistral_window')
    prompt = [[5, 17, 33, 2, 9]]
    warm = sampling.Sampling(temperature=1.5)
    first, _ = generator.generate(prompt, 10, warm, seed=3)
    assert generator.generate(prompt, 10, warm, seed=3)[0] == first
    assert generator.generate(prompt, 10, warm, seed=4)[0] != first
    greedy, _ = generator.generate(prompt, 10)
    top_1, _ = generator.generate(prompt, 10, sampling.Sampling(temperature=1.5, top_k=1), seed=5)
    assert top_1 == greedy


def test_filters_keep_what_they_promise():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    assert np.isfinite(sampling.keep_top_k(logits, 2)).tolist() == [[True, True, False, False]]
    assert np.isfinite(sampling.keep_top_p(logits, 0.8)).tolist() == [[True, True, False, False]]  # 0.5 + 0.3
    assert np.isfinite(sampling.keep_top_p(logits, 0.81)).tolist() == [[True, True, True, False]]
    assert np.isfinite(sampling.keep_top_p(logits, 0.1)).tolist() == [[True, False, False, False]]
    # Temperature sharpens: at 0.5 the most likely token is drawn more often than at 1.
    draws = jax.random.split(jax.random.key(0), 2000)

    def share_of_first(temperature: float) -> float:
        choose = jax.vmap(lambda key: sampling.next_tokens(logits, key, sampling.Sampling(temperature=temperature)))
        return float(jnp.mean(choose(draws) == 0))

    assert share_of_first(1.0) == pytest.approx(0.5, abs=0.04)
    assert share_of_first(0.5) == pytest.approx(0.25 / (0.25 + 0.09 + 0.0225 + 0.0025), abs=0.04)


def run_generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-m', 'trainer.generate', *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_the_command_decodes_a_batch_to_json_lines_and_explains_bad_input():
    model = f'--model={FIXTURES / "llama_gqa"}'
    result = run_generate(model, '--prompt=When shall we', '--prompt=Fair is', '--max_new_tokens=5', '--json')
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r['prompt'] for r in records] == ['When shall we', 'Fair is']
    assert all(len(r['completion_ids']) <= 5 and r['tokens_per_s'] > 0 and 'completion' in r for r in records)
    for args, message in [
        ([model, '--prompt='], 'error: a prompt is empty'),
        ([model, '--prompt=x', '--top_p=0'], 'error: --top_p=0.0 must be in (0, 1]'),
        (['--model=/tmp', '--prompt=x'], "error: --model=/tmp holds no model: give a run's workdir"),
        ([model, '--prompt=x', '--max_new_tokens=64'], 'error: --max_new_tokens=64 must be between 1 and'),
    ]:
        bad = run_generate(*args)
        assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(message), bad.stderr[-1000:]
    long = run_generate(model, '--prompt=' + 'fair is foul ' * 40, '--max_new_tokens=8', '--temperature=0')
    assert long.returncode == 0 and 'is cut to its last 56, to leave room for --max_new_tokens=8' in long.stderr


def test_every_eos_id_of_generation_config_stops_the_command(tmp_path):
    """Llama-3.x Instruct lists several ids ("eos_token_id": [...]): the first of them generated ends the text."""
    folder = tmp_path / 'model'
    shutil.copytree(FIXTURES / 'llama_gqa', folder)
    args = [f'--model={folder}', '--prompt=When shall we', '--max_new_tokens=8', '--temperature=0', '--json']
    free = run_generate(*args)
    assert free.returncode == 0, free.stderr[-2000:]
    ids = json.loads(free.stdout)['completion_ids']
    stop = next(i for i in ids[2:] if i not in ids[:2])  # an id first generated at step 2 or later
    (folder / 'generation_config.json').write_text(json.dumps({'eos_token_id': [2, stop]}))
    stopped = run_generate(*args)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert json.loads(stopped.stdout)['completion_ids'] == ids[: ids.index(stop)]


def test_a_folder_computes_in_its_own_dtype_unless_told(tmp_path):
    folder = tmp_path / 'model'
    shutil.copytree(FIXTURES / 'llama_gqa', folder)
    one = {'data': 1, 'fsdp': 1, 'tensor': 1}
    assert loading.load(str(folder), one).model_cfg.dtype == 'float32'  # "dtype": "float32", as transformers
    assert loading.load(str(folder), one, 'bfloat16').model_cfg.dtype == 'bfloat16'  # --dtype
    settings = json.loads((folder / 'config.json').read_text())
    del settings['dtype']
    (folder / 'config.json').write_text(json.dumps(settings | {'torch_dtype': 'bfloat16'}))  # transformers 4's key
    assert loading.load(str(folder), one).model_cfg.dtype == 'bfloat16'
