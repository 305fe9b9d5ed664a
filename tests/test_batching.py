"""Continuous batching: rows with their own positions decode what each sequence decodes alone; their text is what
their tokens add to the prompt's, read incrementally; prompt-length buckets; failures that end one request or all."""

import itertools
import pathlib
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from tokenizer_fixtures import MISTRAL, TEXTS

from models.transformer import Decoder, KVCache
from trainer.data.tokenizers import make_tokenizer
from trainer.inference import loading, sampling, streaming
from trainer.inference.decoding import Generator
from trainer.modeling.model_setup import model_config
from trainer.serving.batching import Engine, Request, prompt_bucket, prompt_buckets

FIXTURES = pathlib.Path(__file__).resolve().parent / 'fixtures'
FIXTURE = FIXTURES / 'hf' / 'llama_gqa'
# Real tokenizers: Mistral's SentencePiece model and its tokenizer.json (Metaspace, byte fallback), the Llama-2-style
# fixture's Metaspace BPE, GPT-2's byte-level BPE, bytes.
TOKENIZERS = {
    'mistral_sentencepiece_model': str(MISTRAL / 'tokenizer.model'),
    'mistral_tokenizer_json': str(MISTRAL),
    'llama_metaspace_bpe': str(FIXTURE),
    'gpt2_byte_level_bpe': str(FIXTURES / 'hf' / 'gpt2'),
    'byte': 'byte',
}
MULTI_BYTE = [
    'The capital of France is Paris, 日本語の文章です。 😀🎉👍🏽 中文字符 한국어 ∑∫√',
    '🇫🇷🇯🇵 𝔘𝔫𝔦𝔠𝔬𝔡𝔢  spaced   out 漢字',
]


def streamed(text_stream: streaming.TextStream, ids) -> tuple[list[str], bool]:
    """The pieces a TextStream gives for these tokens, its last (finish) included, and whether it stopped."""
    pieces = []
    for token in ids:
        piece, stopped = text_stream.add(token)
        pieces.append(piece)
        if stopped:
            break
    return pieces + [text_stream.finish()], text_stream.done


@pytest.mark.parametrize('name', TOKENIZERS)
def test_a_reply_is_the_text_its_tokens_add_to_the_prompt_read_incrementally(name):
    """Cut anywhere (inside a character too), the pieces add up to decode(prompt + new) minus decode(prompt), and no
    piece ends inside a character (each holds whole characters only, on valid text); random ids too."""
    tokenizer = make_tokenizer(TOKENIZERS[name])
    for text in TEXTS + MULTI_BYTE:
        ids = tokenizer.encode(text).tolist()
        for cut in range(1, len(ids)):
            prompt, new = ids[:cut], ids[cut:]
            pieces, _ = streamed(streaming.TextStream(tokenizer.decode, prompt, []), new)
            assert ''.join(pieces) == streaming.completion_text(tokenizer.decode, prompt, new), (text, cut)
            assert not any('\ufffd' in piece for piece in pieces), (text, cut, pieces)
    if name == 'mistral_tokenizer_json':
        return  # on invalid bytes its ByteFallback decoder replaces text already shown (docs/serve.md)
    rng = np.random.default_rng(0)
    for _ in range(100):  # what a model may sample: broken characters, special tokens anywhere
        ids = rng.integers(0, tokenizer.vocab_size, rng.integers(2, 24)).tolist()
        cut = int(rng.integers(1, len(ids)))
        pieces, _ = streamed(streaming.TextStream(tokenizer.decode, ids[:cut], []), ids[cut:])
        assert ''.join(pieces) == streaming.completion_text(tokenizer.decode, ids[:cut], ids[cut:]), ids


@pytest.mark.parametrize('name', ['mistral_sentencepiece_model', 'mistral_tokenizer_json'])
def test_a_sentencepiece_reply_keeps_its_leading_space_and_stops_at_a_stop_string_that_starts_with_one(name, capsys):
    """As transformers gives it: 'The capital of France is' goes on ' Paris', not 'Paris' (the first piece decoded
    alone loses its '▁'); so a stop string ' Paris' ends the reply before anything is said."""
    tokenizer = make_tokenizer(TOKENIZERS[name])
    prompt = tokenizer.encode('The capital of France is').tolist()
    new = tokenizer.encode('The capital of France is Paris, 日本語 😀').tolist()[len(prompt) :]
    assert tokenizer.decode(new) == 'Paris, 日本語 😀'  # what the server returned before
    pieces, stopped = streamed(streaming.TextStream(tokenizer.decode, prompt, []), new)
    assert ''.join(pieces) == ' Paris, 日本語 😀' and not stopped
    assert streamed(streaming.TextStream(tokenizer.decode, prompt, [' Paris']), new) == (['', ''], True)
    pieces, stopped = streamed(streaming.TextStream(tokenizer.decode, prompt, [' 日本', 'xyz']), new)
    assert ''.join(pieces) == ' Paris,' and stopped
    streamer = streaming.Streamer(tokenizer.decode, prompt, [])  # trainer.generate's and trainer.chat's
    for token in new:
        streamer(np.array([token]))
    streamer.finish()
    assert capsys.readouterr().out == ' Paris, 日本語 😀\n'
    stop_when = streaming.StopStrings(tokenizer.decode, [prompt, prompt], [' Paris'])
    assert stop_when(np.array([new[:1], [tokenizer.encode('The capital of France is', False)[0]]])).tolist() == [
        True,
        False,
    ]


def test_prompt_buckets_grow_geometrically():
    """Not one compile per 64 tokens: 19 prompt lengths at a 32k context, each under 1.5 times the one before."""
    buckets = prompt_buckets(32768)
    assert len(buckets) == 19 and buckets[:5] == (64, 96, 128, 192, 256) and buckets[-1] == 32768
    assert all(b % 32 == 0 for b in buckets) and all(b / a <= 1.5 for a, b in itertools.pairwise(buckets))
    for length in [1, 64, 65, 97, 1000, 5000, 32767]:
        width = prompt_bucket(length, 32768)
        assert length <= width <= max(64, 1.5 * length), length
    assert prompt_buckets(64) == (64,) and prompt_buckets(40) == (40,) and prompt_buckets(100) == (64, 96, 100)
    assert prompt_bucket(99, 100) == 100


def primitives(jaxpr, outside_cond: bool) -> set[str]:
    """The primitives a jaxpr runs, looking inside nested jaxprs; with outside_cond, not inside lax.cond's."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        if outside_cond and eqn.primitive.name == 'cond':
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else [value]:
                inner = getattr(sub, 'jaxpr', sub)
                if hasattr(inner, 'eqns'):
                    names |= primitives(inner, outside_cond)
    return names


def test_a_batch_of_greedy_rows_skips_the_sorts_of_top_k_and_top_p():
    """The full-vocabulary sorts run only in a branch that a batch without sampled rows does not take; greedy rows
    get the argmax and sampled rows the tokens the unconditional filters give."""
    logits = jax.random.normal(jax.random.key(0), (4, 50))
    keys = jax.vmap(jax.random.key)(jnp.arange(4))
    arrays = (jnp.zeros(4), jnp.zeros(4, jnp.int32), jnp.ones(4))
    jaxpr = jax.make_jaxpr(sampling.next_tokens_per_row)(logits, keys, *arrays).jaxpr
    assert 'sort' not in primitives(jaxpr, outside_cond=True), 'a full-vocabulary sort runs for greedy rows'
    assert 'sort' in primitives(jaxpr, outside_cond=False) and 'cond' in primitives(jaxpr, outside_cond=True)
    next_tokens = jax.jit(sampling.next_tokens_per_row)  # eager, the ops below take seconds each here

    @jax.jit
    def unconditional(logits, keys, temperature, k, p):  # the filters applied to every row, as before the conds
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        filtered = sampling.keep_top_p(sampling.keep_top_k_per_row(scaled, k), p[:, None])
        sampled = jax.vmap(jax.random.categorical)(keys, filtered)
        return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1))

    assert next_tokens(logits, keys, *arrays).tolist() == jnp.argmax(logits, axis=-1).tolist()
    temperature, top_k, top_p = jnp.array([0.0, 0.7, 1.3, 0.0]), jnp.array([0, 5, 0, 0]), jnp.array([1, 1, 0.8, 1])
    for k, p in [(top_k, top_p), (top_k * 0, top_p), (top_k, top_p * 0 + 1), (top_k * 0, top_p * 0 + 1)]:
        expected = unconditional(logits, keys, temperature, k, p).tolist()
        assert next_tokens(logits, keys, temperature, k, p).tolist() == expected


def test_a_cache_with_one_write_index_per_row_decodes_each_row_as_alone():
    """Rows at different positions in one cache (each from slot 0) give the logits each sequence has alone."""
    cfg = model_config(tiny_config('llama'))
    graphdef, params = nnx.split(Decoder(cfg, nnx.Rngs(0)))
    extend = jax.jit(lambda *args: nnx.merge(graphdef, params).extend(*args))  # eager decoding takes 20 s here
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    lengths = [3, 7]  # row 0 has read 3 tokens, row 1 seven, when they decode together
    cache = KVCache.empty(cfg, batch=2, slots=16)
    prompt = jnp.where(jnp.arange(7)[None] < jnp.array(lengths)[:, None], tokens[:, :7], 0)
    real = (jnp.arange(7)[None] < jnp.array(lengths)[:, None]).astype(jnp.int32)
    positions = jnp.where(real == 1, jnp.arange(7)[None], -1)
    _, cache = extend(prompt, positions, real, cache)
    position = jnp.array(lengths, jnp.int32)
    full = jax.jit(lambda t: nnx.merge(graphdef, params)(t))(
        tokens
    )  # causal: position t's logits are those of the sequence cut after t
    for step in range(4):
        new = jnp.stack([tokens[0, lengths[0] + step], tokens[1, lengths[1] + step]])[:, None]
        logits, cache = extend(new, position[:, None], jnp.ones((2, 1), jnp.int32), cache.replace(index_B=position))
        for row in range(2):
            alone = full[row, lengths[row] + step]
            np.testing.assert_allclose(logits[row, 0], alone, rtol=1e-4, atol=1e-5, err_msg=f'row {row} step {step}')
        position = position + 1


@pytest.fixture(scope='module')
def loaded():
    return loading.load(str(FIXTURE), {'data': 1, 'fsdp': 1, 'tensor': 1})


def decode_ids(ids) -> str:
    return ''.join(f'{int(i)} ' for i in ids)  # one word per token: the text says which tokens came


def run_engine(
    loaded, requests: list[dict], max_batch: int, max_queue: int = 64, engine: Engine | None = None
) -> tuple[list, Engine]:
    """Submits every request at once; (text, finish_reason, completion_tokens) for each, and the engine. With
    `engine` (of rows of 256 tokens), on that engine, left running, and each result also has the update's error."""
    keep = engine is not None
    if engine is None:
        engine = Engine(
            loaded.graphdef, loaded.params, loaded.model_cfg, loaded.mesh, decode_ids, max_batch, 64, max_queue
        )
    if engine._thread is None:
        engine.start()
    results, done = [None] * len(requests), threading.Event()
    texts = [[] for _ in requests]

    def on_update(i):
        def record(update):
            texts[i].append(update.text)
            if update.finish_reason:
                results[i] = (''.join(texts[i]), update.finish_reason, update.completion_tokens)
                results[i] += (update.error,) if keep else ()
                if all(results):
                    done.set()

        return record

    for i, fields in enumerate(requests):
        assert engine.submit(Request(on_update=on_update(i), **fields))
    assert done.wait(120)
    if not keep:
        engine.close(10)
    return results, engine


def test_requests_joining_and_leaving_the_batch_get_what_each_gets_alone(loaded):
    generator = Generator(loaded.graphdef, loaded.params, loaded.model_cfg, loaded.mesh)
    prompts = [[5, 17, 33], [8, 9, 10, 11, 12, 13, 14], [40], list(range(1, 50)), [7, 7], [3, 1, 4, 1, 5]]
    lengths = [10, 4, 12, 15, 1, 9]  # rows leave at different steps; the later prompts join as they do
    requests = [{'prompt_ids': p, 'max_tokens': n} for p, n in zip(prompts, lengths, strict=True)]
    results, engine = run_engine(loaded, requests, max_batch=3)
    for prompt, n, (text, reason, count) in zip(prompts, lengths, results, strict=True):
        alone = generator.generate([prompt], n)[0][0].ids
        assert text == decode_ids(alone) and (reason, count) == ('length', n), prompt
    assert engine.busiest == 3 and engine.steps < sum(lengths), 'the rows did not decode together'


def test_a_long_prompt_runs_to_the_end_of_its_row_and_stops_at_a_stop_token(loaded):
    generator = Generator(loaded.graphdef, loaded.params, loaded.model_cfg, loaded.mesh)
    prompt = list(range(1, 60))
    expected = generator.generate([prompt], 5)[0][0].ids
    stop = expected[2]
    (long, stopped), _ = run_engine(
        loaded,
        [{'prompt_ids': prompt, 'max_tokens': 100}, {'prompt_ids': prompt, 'max_tokens': 100, 'stop_ids': [stop]}],
        2,
    )
    assert long == (decode_ids(expected), 'length', 5)  # 59 + 5 fill the 64 slots
    first = expected.index(stop)
    assert stopped == (decode_ids(expected[:first]), 'stop', first + 1)  # the stop token counts, is not shown


def test_stop_strings_end_the_text_before_them(loaded):
    generator = Generator(loaded.graphdef, loaded.params, loaded.model_cfg, loaded.mesh)
    expected = generator.generate([[5, 17, 33]], 10)[0][0].ids
    stop = f'{expected[3]} {expected[4]}'
    [(text, reason, _)], _ = run_engine(loaded, [{'prompt_ids': [5, 17, 33], 'max_tokens': 10, 'stops': [stop]}], 2)
    assert (text, reason) == (decode_ids(expected[:3]), 'stop')


def test_a_seeded_request_samples_the_same_text_whoever_shares_its_batch(loaded):
    warm = sampling.Sampling(temperature=1.5, top_k=20, top_p=0.9)
    mine = {'prompt_ids': [5, 17, 33], 'max_tokens': 12, 'sampling': warm, 'seed': 7}
    others = [{'prompt_ids': [i, i + 1], 'max_tokens': 12, 'sampling': warm, 'seed': i} for i in range(3)]
    alone, _ = run_engine(loaded, [mine], 4)
    crowded, _ = run_engine(loaded, [*others[:2], mine, others[2]], 4)
    assert crowded[2] == alone[0]
    assert run_engine(loaded, [{**mine, 'seed': 8}], 4)[0][0] != alone[0]
    greedy, _ = run_engine(loaded, [{**mine, 'sampling': sampling.GREEDY}], 4)
    top_1, _ = run_engine(loaded, [{**mine, 'sampling': sampling.Sampling(temperature=1.5, top_k=1)}], 4)
    assert top_1 == greedy


def test_per_row_filters_keep_what_the_shared_ones_keep():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 3))
    kept = sampling.keep_top_k_per_row(logits, jnp.array([2, 0, 1]))
    assert np.isfinite(kept).tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    kept = sampling.keep_top_p(logits, jnp.array([[0.8], [1.0], [0.81]]))
    assert np.isfinite(kept).tolist() == [[True, True, False, False], [True] * 4, [True, True, True, False]]


def test_a_cancelled_request_frees_its_row_and_a_full_queue_refuses(loaded):
    engine = Engine(loaded.graphdef, loaded.params, loaded.model_cfg, loaded.mesh, decode_ids, 1, 64, 1)
    ended, updates, served = threading.Event(), [], threading.Event()

    def on_update(update):
        updates.append(update)
        if update.finish_reason:
            ended.set()

    first = Request([1, 2, 3], 60, on_update)
    waiting = Request([4, 5], 3, lambda update: update.finish_reason and served.set())
    assert engine.submit(first) and engine.submit(waiting)  # before start: one for the row, one queued
    assert not engine.submit(Request([6], 3, lambda update: None)), 'a third request passed one row and a queue of 1'
    engine.start()
    engine.cancel(first)
    assert ended.wait(60) and updates[-1].finish_reason == 'cancelled' and updates[-1].completion_tokens < 60
    assert served.wait(60), 'the row of the cancelled request was not given to the next'
    engine.close(30)
    assert engine.load() == (0, 0)


def test_heads_split_over_two_devices_serve_the_same_tokens(loaded):
    split = loading.load(str(FIXTURE), {'data': 1, 'fsdp': 1, 'tensor': 2}, 'float32')
    assert len(split.params['blocks']['attention']['wk_DKH'].sharding.device_set) == 2
    requests = [{'prompt_ids': [5, 17, 33], 'max_tokens': 8}, {'prompt_ids': list(range(1, 30)), 'max_tokens': 8}]
    assert run_engine(split, requests, 2)[0] == run_engine(loaded, requests, 2)[0]


def test_a_failing_device_ends_every_request_with_an_error_instead_of_hanging(loaded):
    engine = Engine(loaded.graphdef, loaded.params, loaded.model_cfg, loaded.mesh, decode_ids, 1, 64, 4)
    ended, reasons, errors = threading.Event(), [], []

    def fail():
        raise RuntimeError('the device is gone')

    engine._decode_one_step = fail  # as a device that fails would

    def on_update(update):
        if update.finish_reason:
            reasons.append(update.finish_reason)
            errors.append(update.error)
            if len(reasons) == 3:
                ended.set()

    for prompt in ([1, 2], [3], [4, 5, 6]):  # one in the row, two waiting
        assert engine.submit(Request(prompt, 5, on_update))
    engine.start()
    assert ended.wait(60) and reasons == ['error'] * 3
    assert engine.failure == 'the decode loop failed (RuntimeError: the device is gone): see the server log.'
    assert errors == [engine.failure] * 3
    assert not engine.submit(Request([1], 5, on_update)), 'a failed engine took a request'
    engine.close(5)


def test_a_prompt_length_whose_prefill_fails_fails_that_request_alone(loaded):
    """Out of memory compiling one bucket (refused from then on, without compiling again), or running one before
    the cache is given to it: that request ends with 'error', the others and later ones are served."""
    engine = Engine(loaded.graphdef, loaded.params, loaded.model_cfg, loaded.mesh, decode_ids, 2, 256, 8)
    compile_once, compiles = engine._compile, []

    def compile_or_fail(key, *args):
        compiles.append(key)
        if key[:2] == ('admit', 128):
            raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.9 GiB.\nmore details')
        compiled = compile_once(key, *args)
        if key[:2] == ('admit', 192):

            def fail_before_running(*args):
                raise RuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating the temporaries.')

            return fail_before_running
        return compiled

    engine._compile = compile_or_fail
    prompts = {'short': [5, 17, 33], 'bucket_128': list(range(1, 100)), 'bucket_192': list(range(1, 140))}
    requests = [{'prompt_ids': prompts[name], 'max_tokens': 4} for name in ['bucket_128', 'short', 'bucket_192']]
    requests.append({'prompt_ids': list(range(2, 110)), 'max_tokens': 4})  # bucket 128 again
    results, _ = run_engine(loaded, requests, 2, engine=engine)
    expected = Generator(loaded.graphdef, loaded.params, loaded.model_cfg, loaded.mesh).generate([[5, 17, 33]], 4)
    assert results[1] == (decode_ids(expected[0][0].ids), 'length', 4, '')
    for i, (length, width) in {0: (99, 128), 2: (139, 192), 3: (108, 128)}.items():
        text, reason, count, error = results[i]
        assert (text, reason, count) == ('', 'error', 0)
        assert error.startswith(f'the prefill of a {length}-token prompt (padded to {width} tokens) failed (Runtime')
        assert 'Out of memory' in error and error.endswith(
            'send a shorter prompt, or serve with a smaller --max_seq_len or --max_batch.'
        )
    assert compiles.count(('admit', 128, 2, 256)) == 1 and engine.failure is None
    assert run_engine(loaded, [{'prompt_ids': [5, 17, 33], 'max_tokens': 4}], 2, engine=engine)[0] == [results[1]]
