"""Fine-tuning: instruction data with a loss mask, packing, the parameter-role table, LoRA and a classifier."""

import json
import logging
import pathlib
import shutil

import jax
import numpy as np
import pytest
from conftest import losses_by_step, mesh_for, read_metrics, run_trainer_in, sharded_logits, tiny_config
from flax import nnx

from trainer.data import examples, pipeline, tokenizers
from trainer.errors import ConfigError
from trainer.inference import loading
from trainer.modeling import lora, param_roles
from trainer.training import checkpoints, steps, train

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / 'tests' / 'fixtures' / 'hf'
BYTES = tokenizers.make_tokenizer('byte')


def write_jsonl(path: pathlib.Path, records: list) -> str:
    path.write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in records))
    return str(path)


def sft_config(tmp_path: pathlib.Path, records: list, **mesh_sizes):
    config = tiny_config('llama', **mesh_sizes)
    config.model.vocab_size = 256
    config.data.update(format='sft', train_files=write_jsonl(tmp_path / 'sft.jsonl', records), eval_files='')
    config.data.shuffle_buffer = 0
    return config


PAIRS = [{'prompt': f'Q{i}:', 'completion': 'ab' * (i % 3 + 1)} for i in range(40)]


def first_batch(config) -> dict[str, np.ndarray]:
    src = pipeline.train_sources(config.data)[0]
    found = examples.read(src.files, config.data, BYTES, 0, 'test')
    dataset = examples.make_dataset(found, config.data, 0, config.train.global_batch_size, shuffle=False)
    return next(iter(dataset))


def test_only_completion_tokens_and_their_eos_carry_weight(tmp_path):
    config = sft_config(tmp_path, [{'prompt': 'Who?', 'completion': 'Me'}])
    batch = first_batch(config)
    row = batch['inputs'][0], batch['targets'][0], batch['weights'][0]
    counted = [(chr(t) if t else 'EOS') for t, w in zip(row[1], row[2], strict=True) if w]
    assert counted[:3] == ['M', 'e', 'EOS']  # 'Who?' is read, never predicted
    assert ''.join(chr(t) for t in row[1][:5]) == 'ho?Me'  # targets are the next tokens


def test_masked_targets_change_no_gradient(tmp_path):
    config = sft_config(tmp_path, PAIRS, fsdp=8)
    batch = first_batch(config)
    assert 0 < batch['weights'].sum() < (batch['segment_ids'] > 0).sum()  # some targets masked, some not
    scrambled = dict(batch)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, batch['targets'].shape).astype(np.int32)
    scrambled['targets'] = np.where(batch['weights'] > 0, batch['targets'], noise)  # only masked targets change
    mesh = mesh_for(config)
    with jax.set_mesh(mesh):
        setup = train.build(config, mesh)
        params = setup.sharded.state.params

        def grads(b):
            placed = {k: jax.device_put(v, setup.batch_sharding) for k, v in b.items()}
            loss = lambda p: steps.summed_loss(p, placed, setup.sharded.graphdef, setup.model_cfg, None)[0]  # noqa: E731
            # Jitted: dispatched op by op, the backward pass's hundreds of small collective programs on 8 simulated
            # devices aborted in XLA's rendezvous on a loaded 2-core machine (CI, 2026-12-04; reproduced here).
            return jax.device_get(jax.jit(jax.grad(loss))(params))

        same, changed = grads(batch), grads(scrambled)
        assert not np.array_equal(batch['targets'], scrambled['targets'])
        jax.tree.map(np.testing.assert_array_equal, same, changed)


def test_packing_keeps_every_example_whole_in_one_row(tmp_path):
    records = [{'prompt': 'p' * (i % 7), 'completion': chr(65 + i % 26) * (3 + i % 9)} for i in range(60)]
    config = sft_config(tmp_path, records)
    config.data.seq_len = 15
    src = pipeline.train_sources(config.data)[0]
    found = examples.read(src.files, config.data, BYTES, 0, 'test')
    dataset = examples.make_dataset(found, config.data, 0, 4, shuffle=False, repeat=False)
    pieces = []
    for batch in dataset:
        for tokens, segments in zip(batch['inputs'], batch['segment_ids'], strict=True):
            for segment in set(segments.tolist()) - {0}:
                where = np.flatnonzero(segments == segment)
                assert np.all(np.diff(where) == 1)  # contiguous
                pieces.append(tokens[where].tolist())
    # Each example appears once, whole (the row's last token is only a target, so a piece may lack its EOS).
    wanted = sorted(e.tokens.tolist() for e in found.examples)
    got = sorted(pieces)
    assert len(got) == len(wanted)
    for piece, example in zip(got, wanted, strict=True):
        assert example[: len(piece)] == piece and len(example) - len(piece) <= 1


def test_packed_examples_do_not_see_each_other(tmp_path):
    config = sft_config(tmp_path, PAIRS)
    batch = first_batch(config)
    row = {k: v[:1] for k, v in batch.items()}
    segments = row['segment_ids'][0]
    assert len(set(segments.tolist()) - {0}) >= 2
    mesh = mesh_for(config)
    with jax.set_mesh(mesh):
        setup = train.build(config, mesh)
        model = nnx.merge(setup.sharded.graphdef, setup.sharded.state.params)
        packed = np.asarray(model(row['inputs'], row['positions'], row['segment_ids']))
        for segment in set(segments.tolist()) - {0}:
            where = np.flatnonzero(segments == segment)
            alone = np.asarray(model(row['inputs'][:, where]))
            np.testing.assert_allclose(packed[0, where], alone[0], rtol=1e-5, atol=1e-5)


def test_a_chat_learns_only_the_assistant_turns(tmp_path):
    chat = {
        'messages': [
            {'role': 'user', 'content': 'Hi'},
            {'role': 'assistant', 'content': 'Yo'},
            {'role': 'user', 'content': 'Bye'},
            {'role': 'assistant', 'content': 'Ciao'},
        ]
    }
    config = sft_config(tmp_path, [chat])
    config.data.seq_len = 80
    example = examples.read((str(tmp_path / 'sft.jsonl'),), config.data, BYTES, 0, 'test').examples[0]
    text = bytes(example.tokens[:-1].astype(np.uint8)).decode()
    assert text == 'User: Hi\n\nAssistant: Yo\n\nUser: Bye\n\nAssistant: Ciao\n\n'  # the plain template
    learned = bytes(t for t, m in zip(example.tokens[:-1], example.mask[:-1], strict=True) if m).decode()
    assert learned == ' Yo\n\n Ciao\n\n' and example.mask[-1] == 1  # and the EOS after the last answer


def test_a_models_own_chat_template_marks_the_assistant_turns(tmp_path):
    folder = FIXTURES / 'llama_gqa'
    tokenizer = tokenizers.make_tokenizer(str(folder))
    config = sft_config(
        tmp_path, [{'messages': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Yo'}]}]
    )
    config.data.update(tokenizer=str(folder), seq_len=200)
    example = examples.read((str(tmp_path / 'sft.jsonl'),), config.data, tokenizer, 0, 'test').examples[0]
    # The template writes '<s>[INST] Hi [/INST]\n Yo </s>\n': the part after the generation prompt is learned,
    # and no second EOS after the template's own.
    reply = tokenizer.encode(' Yo </s>\n', add_special_tokens=False)
    np.testing.assert_array_equal(example.tokens[example.mask > 0], reply)
    prompt = tokenizer.encode('<s>[INST] Hi [/INST]\n', add_special_tokens=False)
    np.testing.assert_array_equal(example.tokens[example.mask == 0], prompt)  # its own template writes the BOS


def test_bad_records_are_named_and_skipped(tmp_path, caplog):
    records = [
        {'prompt': 'a', 'completion': 'b'},
        '{not json',
        {'prompt': 'a'},
        {'prompt': 'a', 'completion': '  '},
        {'messages': [{'role': 'user', 'content': 'only a question'}]},
        {'prompt': 'c', 'completion': 'd'},
    ]
    config = sft_config(tmp_path, records)
    with caplog.at_level(logging.WARNING):
        found = examples.read((str(tmp_path / 'sft.jsonl'),), config.data, BYTES, 0, 'test')
    assert (len(found.examples), found.skipped) == (2, 4)
    text = caplog.text
    for line, why in [(2, 'not valid JSON'), (3, "no text field 'completion'"), (4, 'is empty'), (5, 'no assistant')]:
        assert f'sft.jsonl:{line}: ' in text and why in text


def test_a_file_with_nothing_usable_is_one_line(tmp_path):
    config = sft_config(tmp_path, [{'text': 'no prompt here'}])
    with pytest.raises(ConfigError, match='holds no usable .sft. example'):
        examples.read((str(tmp_path / 'sft.jsonl'),), config.data, BYTES, 0, 'config.data.train_files')


def test_a_long_example_is_cut_and_counted(tmp_path):
    config = sft_config(tmp_path, [{'prompt': 'x', 'completion': 'y' * 50}, {'prompt': 'x', 'completion': 'y'}])
    found = examples.read((str(tmp_path / 'sft.jsonl'),), config.data, BYTES, 0, 'test')
    assert found.cut == 1 and max(len(e.tokens) for e in found.examples) == config.data.seq_len + 1


def test_the_role_table_decides_by_the_first_match():
    config = tiny_config('gpt2')
    config.train.param_roles = (('mlp/w_up', True, 0.5, 2.0), ('attention/', False, 1.0, 1.0))
    _, shapes, _ = train.state_lib.abstract_model(train.model_config(config))
    roles = param_roles.partition(config, shapes).roles
    assert roles['blocks']['mlp']['w_up_DF'] == param_roles.Role(True, 0.5, 2.0)
    assert not roles['blocks']['attention']['wq_DNH'].trainable
    assert not roles['blocks']['attention']['biases']['o_D'].trainable  # user rules come before the built-in ones
    assert roles['blocks']['mlp']['biases']['up_F'] == param_roles.NO_DECAY
    assert roles['blocks']['mlp']['w_down_FD'] == param_roles.Role()
    assert roles['embedding_VD'] == param_roles.NO_DECAY


@pytest.mark.slow  # the roles table itself is tested by the default suite (39 s here)
def test_learning_rate_multipliers_scale_the_updates():
    """With a constant schedule and no decay, a parameter with multiplier 0.5 moves half as far on step 1."""
    from conftest import random_batch

    def first_update(multiplier: float):
        config = tiny_config('llama', fsdp=8)
        config.train.update(lr_schedule='constant', warmup_steps=0, weight_decay=0.0, grad_clip=0.0)
        config.train.param_roles = (('mlp/w_up_DF', True, multiplier, 1.0),)
        mesh = mesh_for(config)
        with jax.set_mesh(mesh):
            setup = train.build(config, mesh)
            before = jax.device_get(setup.sharded.state.params)
            state, _ = setup.compiled.train(setup.sharded.state, random_batch(setup, config))
            after = jax.device_get(state.params)
        return jax.tree.map(lambda a, b: a - b, after, before)

    full, half = first_update(1.0), first_update(0.5)
    np.testing.assert_allclose(half['blocks']['mlp']['w_up_DF'], 0.5 * full['blocks']['mlp']['w_up_DF'], rtol=1e-5)
    np.testing.assert_allclose(half['blocks']['mlp']['w_gate_DF'], full['blocks']['mlp']['w_gate_DF'], rtol=1e-6)


def lora_config(**mesh_sizes):
    config = tiny_config('llama', **mesh_sizes)
    config.lora.update(rank=4, alpha=8.0, targets='q,k,v,o,gate,up,down', base_dtype='')
    config.train.update(learning_rate=1e-2, warmup_steps=0)
    return config


def run_steps(config, count: int = 3):
    from conftest import random_batch

    mesh = mesh_for(config)
    with jax.set_mesh(mesh):
        setup = train.build(config, mesh)
        state = setup.sharded.state
        initial = jax.device_get(state.params)
        losses = []
        for seed in range(count):
            state, metrics = setup.compiled.train(state, random_batch(setup, config, seed))
            losses.append(float(metrics['loss']))
        return setup, initial, jax.device_get(state.params), jax.device_get(state.opt_state), losses


def test_lora_trains_only_the_adapters_and_keeps_optimizer_state_for_them_alone():
    setup, initial, final, opt_state, _ = run_steps(lora_config(fsdp=8))
    flat_initial = dict(jax.tree_util.tree_flatten_with_path(initial)[0])
    changed = {
        param_roles.path_name(path)
        for path, value in jax.tree_util.tree_flatten_with_path(final)[0]
        if not np.array_equal(value, flat_initial[path])
    }
    assert changed and all('/lora/' in name for name in changed), changed
    assert any(name.endswith('/b') for name in changed)  # b starts at 0 and moves
    adapters = sum(x.size for x in jax.tree.leaves(setup.sharded.partition.trainable(initial)))
    moments = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0)
    assert moments == 2 * adapters  # Adam's two moments, for the adapters only
    assert adapters < 0.5 * sum(x.size for x in jax.tree.leaves(initial))


@pytest.mark.slow  # 23 s here; LoRA training is in the default suite
def test_lora_base_weights_can_be_held_in_bfloat16():
    config = lora_config(fsdp=8)
    config.lora.base_dtype = 'bfloat16'
    _, _, final, _, losses = run_steps(config, 1)
    assert final['blocks']['attention']['wq_DNH'].dtype == np.dtype('bfloat16')
    assert final['blocks']['attention']['lora']['q']['a'].dtype == np.float32 and np.isfinite(losses[0])


@pytest.mark.slow  # 25 s here
def test_a_base_weight_unfrozen_beside_lora_is_stored_and_trained_in_param_dtype():
    """lora.base_dtype is for the frozen base: a base weight that train.param_roles makes trainable is float32, so
    its small updates do not round away in bfloat16."""
    config = lora_config(fsdp=8)
    config.lora.base_dtype = 'bfloat16'
    config.train.param_roles = (('mlp/w_up_DF', True, 1.0, 1.0),)
    _, initial, final, _, _ = run_steps(config, 2)
    assert final['blocks']['mlp']['w_up_DF'].dtype == np.float32  # trained: param_dtype
    assert final['blocks']['mlp']['w_down_FD'].dtype == np.dtype('bfloat16')  # frozen: lora.base_dtype
    moved = np.abs(np.asarray(final['blocks']['mlp']['w_up_DF']) - np.asarray(initial['blocks']['mlp']['w_up_DF']))
    assert (moved > 0).mean() > 0.9  # nearly every entry moved


@pytest.mark.slow  # 52 s here; sharded == one device is in the default suite for the base model
def test_lora_on_a_2x2x2_mesh_equals_one_device():
    _, _, one, _, one_losses = run_steps(lora_config(fsdp=1))
    _, _, mesh, _, mesh_losses = run_steps(lora_config(data=2, fsdp=2, tensor=2))
    np.testing.assert_allclose(mesh_losses, one_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), mesh, one)


def test_the_merged_model_gives_the_adapted_models_logits():
    config = lora_config(fsdp=8)
    setup, _, params, _, _ = run_steps(config)
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (2, 12)).astype(np.int32)
    adapted = sharded_logits(setup.sharded.graphdef, params, tokens)
    merged, plain_cfg = lora.merge(params, setup.model_cfg)
    assert plain_cfg.lora_rank == 0 and 'lora' not in merged['blocks']['attention']
    plain_graphdef = train.state_lib.abstract_model(plain_cfg)[0]
    plain = sharded_logits(plain_graphdef, merged, tokens)
    np.testing.assert_allclose(plain, adapted, rtol=1e-5, atol=1e-5)


def test_the_peft_folder_holds_each_adapter_as_torch_lays_it_out(tmp_path):
    config = lora_config()
    setup, _, params, _, _ = run_steps(config, 1)
    lora.write_peft(params, setup.model_cfg, 'base', tmp_path / 'adapter')
    saved = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
    assert saved['r'] == 4 and saved['lora_alpha'] == 8.0 and 'q_proj' in saved['target_modules']
    from safetensors.numpy import load_file

    tensors = load_file(tmp_path / 'adapter' / 'adapter_model.safetensors')
    cfg = setup.model_cfg
    a = tensors['base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight']
    b = tensors['base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight']
    assert a.shape == (4, cfg.d_model) and b.shape == (cfg.num_heads * cfg.head_dim, 4)
    ours = params['blocks']['attention']['lora']['q']
    update = (b @ a).T * (8.0 / 4)  # torch: W' = W + B A scale, W (out, in); ours (in, out)
    expected = np.tensordot(ours['a'][1], ours['b'][1], axes=1).reshape(cfg.d_model, -1) * (8.0 / 4)
    np.testing.assert_allclose(update, expected, rtol=1e-5, atol=1e-7)


def classify_config(tmp_path: pathlib.Path, **mesh_sizes):
    config = tiny_config('llama', **mesh_sizes)
    config.model.update(vocab_size=256, head='classify', num_classes=3, pool='last')
    rng = np.random.default_rng(0)
    letters = 'abc'

    def record(i: int) -> dict:
        label = i % 3
        noise = ''.join(rng.choice(list('xyz'), 6))
        return {'text': noise[:3] + letters[label] + noise[3:], 'label': ['red', 'green', 'blue'][label]}

    config.data.update(
        format='classify',
        class_names='red,green,blue',
        train_files=write_jsonl(tmp_path / 'train.jsonl', [record(i) for i in range(96)]),
        eval_files=write_jsonl(tmp_path / 'eval.jsonl', [record(i) for i in range(30)]),
    )
    config.train.update(steps=60, learning_rate=1e-2, warmup_steps=5, eval_steps=4)
    return config


@pytest.mark.parametrize('pool', ['last', pytest.param('mean', marks=pytest.mark.slow)])
def test_a_classifier_learns_a_separable_task_to_full_accuracy(tmp_path, pool):
    config = classify_config(tmp_path, fsdp=8)
    config.model.pool = pool
    mesh = mesh_for(config)
    with jax.set_mesh(mesh):
        setup = train.build(config, mesh)
        data = pipeline.train_batches(config, BYTES, setup.batch_sharding)
        evals = pipeline.eval_batches(config, BYTES, setup.batch_sharding)
        state = setup.sharded.state
        for _ in range(config.train.steps):
            state, _ = setup.compiled.train(state, next(data))
        data.close()
        sums = jax.device_get([setup.compiled.eval(state.params, batch) for batch in evals])
    assert sum(s['count'] for s in sums) == 30  # every eval example once, padding rows count nothing
    assert sum(s['correct'] for s in sums) == 30


def test_a_label_outside_the_classes_is_skipped(tmp_path, caplog):
    config = classify_config(tmp_path)
    write_jsonl(
        tmp_path / 'bad.jsonl', [{'text': 'a', 'label': 'purple'}, {'text': 'b', 'label': 7}, {'text': 'c', 'label': 1}]
    )
    with caplog.at_level(logging.WARNING):
        found = examples.read((str(tmp_path / 'bad.jsonl'),), config.data, BYTES, 3, 'test')
    assert [e.label for e in found.examples] == [1] and found.skipped == 2
    assert "bad.jsonl:1: label 'purple' is not one of" in caplog.text and 'bad.jsonl:2: label 7' in caplog.text


def test_a_head_and_data_format_that_disagree_are_one_line(tmp_path):
    config = classify_config(tmp_path)
    config.data.format = 'sft'
    with pytest.raises(ConfigError, match="head='classify' and config.data.format='classify' go together"):
        train.config_checks.validate(config, 8)


def test_instruction_tuning_a_hugging_face_model_resumes_bit_exactly(tmp_path):
    chats = [
        {'messages': [{'role': 'user', 'content': f'Say {w}'}, {'role': 'assistant', 'content': f'{w} {w}'}]}
        for w in ('yes', 'no', 'maybe', 'never', 'always', 'soon') * 4
    ]
    data = write_jsonl(tmp_path / 'chats.jsonl', chats)
    args = [
        f'--config=configs/finetune_hf.py:{FIXTURES / "llama_gqa"}',
        '--config.data.format=sft',
        f'--config.data.train_files={data}',
        f'--config.data.eval_files={data}',
        '--config.data.seq_len=64',
        '--config.train.steps=8',
        '--config.train.log_every=1',
        '--config.train.eval_every=0',
        '--config.train.global_batch_size=8',
        '--config.train.learning_rate=1e-2',
        '--config.train.warmup_steps=2',
        '--config.checkpoint.every_steps=4',
        '--config.lora.rank=4',
        '--config.lora.base_dtype=float32',
    ]
    first = run_trainer_in(tmp_path / 'run', *args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert 'initialized anew: 8 LoRA adapter arrays' in first.stdout  # q, k, v, o: a and b each
    assert 'train: 24 examples' in first.stdout
    uninterrupted = losses_by_step(tmp_path / 'run')
    assert uninterrupted[8] < uninterrupted[1]
    shutil.rmtree(tmp_path / 'run' / 'checkpoints' / '8')  # as if killed after the step-4 save
    again = run_trainer_in(tmp_path / 'run', *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert 'resumed from step 4' in again.stdout
    resumed = losses_by_step(tmp_path / 'run')
    assert [resumed[s] for s in range(5, 9)] == [uninterrupted[s] for s in range(5, 9)]
    assert any(line.get('eval_loss', 0) > 0 for line in read_metrics(tmp_path / 'run'))


def test_a_run_saved_before_lora_and_mup_existed_still_loads(tmp_path):
    config = tiny_config('llama')
    config.mesh.fsdp = 1
    mesh = mesh_for(config)
    with jax.set_mesh(mesh):
        params = train.build(config, mesh).sharded.state.params
        saved = json.loads(config.to_json_best_effort())
        del saved['lora'], saved['model']['parametrization'], saved['model']['head']  # as an older run wrote it
        checkpoints.save_params(tmp_path / 'ckpt', params, json.dumps(saved))
    loaded = loading.load(str(tmp_path / 'ckpt'))
    assert loaded.model_cfg.lora_rank == 0 and loaded.model_cfg.parametrization == 'sp'
    assert loaded.config.lora.rank == 0 and loaded.config.model.d_model == config.model.d_model
