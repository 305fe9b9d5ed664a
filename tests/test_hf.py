"""Hugging Face models in and out: logits equal transformers' for every family and variant (fixtures made by
scripts/make_hf_fixtures.py; read here with safetensors alone)."""

import json
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import TINY_RUN_OVERRIDES, mesh_for, read_metrics, run_trainer_in, sharded_logits
from safetensors.numpy import load_file, save_file

from configs import small_lm
from trainer.data import chat_template, pipeline, tokenizers
from trainer.errors import ConfigError
from trainer.hf import config as hf_config
from trainer.hf import tensors as hf_tensors
from trainer.training import train

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'scripts'))
import convert_hf  # noqa: E402

FIXTURES = REPO / 'tests' / 'fixtures' / 'hf'
VARIANTS = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def fixture_config(name: str, **mesh_sizes):
    """small_lm with the fixture's architecture, in float32, on a mesh of the given sizes."""
    folder = FIXTURES / name
    config = small_lm.get_config()
    config.model.update(hf_config.model_fields(hf_config.read(folder), str(folder)))
    config.model.dtype = 'float32'
    config.model.vocab_multiple = 4  # padded rows (301 -> 304 for gpt2): never predicted, never exported
    for axis in ('data', 'fsdp', 'tensor'):
        config.mesh[axis] = mesh_sizes.get(axis, 1)
    return config


def imported_logits(name: str, input_ids: np.ndarray, **mesh_sizes) -> np.ndarray:
    config = fixture_config(name, **mesh_sizes)
    mesh = mesh_for(config)
    with jax.set_mesh(mesh):
        setup = train.build(config, mesh)
        params = hf_tensors.load(str(FIXTURES / name), setup.model_cfg, setup.sharded.abstract.params)
        return sharded_logits(setup.sharded.graphdef, params, input_ids)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def test_every_family_and_variant_has_a_fixture():
    assert VARIANTS == ['gpt2', 'llama3_tied', 'llama_gqa', 'llama_linear_rope', 'mistral_window', 'qwen2_bias']


@pytest.mark.parametrize('name', VARIANTS)
def test_imported_logits_equal_transformers(name):
    reference = load_file(str(FIXTURES / name / 'reference.safetensors'))
    logits = imported_logits(name, reference['input_ids'])
    vocab = reference['logits'].shape[-1]
    assert np.all(np.isneginf(logits[..., vocab:])), 'padded ids are never predicted'
    assert relative_error(logits[..., :vocab], reference['logits']) < 1e-4


@pytest.mark.parametrize('name', ['llama3_tied', 'gpt2'])
def test_an_import_sharded_over_every_mesh_axis_gives_the_same_logits(name):
    reference = load_file(str(FIXTURES / name / 'reference.safetensors'))
    rows = np.concatenate([reference['input_ids']] * 2)  # 4 rows: one per block of the data x fsdp axes
    logits = imported_logits(name, rows, data=2, fsdp=2, tensor=2)
    vocab = reference['logits'].shape[-1]
    assert relative_error(logits[:2, :, :vocab], reference['logits']) < 1e-4
    assert relative_error(logits[2:, :, :vocab], reference['logits']) < 1e-4


@pytest.mark.parametrize('name, bos', [('llama_gqa', 1), ('gpt2', None)])
def test_a_model_folder_tokenizes_as_transformers_does(name, bos):
    """The same ids as transformers' tokenizer (its post-processor's BOS included, once), then our EOS."""
    tokenizer = tokenizers.make_tokenizer(str(FIXTURES / name))
    expected = json.loads((FIXTURES / name / 'tokenizer_ids.json').read_text())
    for text, ids in expected.items():
        assert tokenizer.encode(text).tolist() == ids
        assert (ids[0] == bos) == (bos is not None)
    assert tokenizer.eos_id == (2 if name == 'llama_gqa' else 0)  # '</s>', '<|endoftext|>'
    config = small_lm.get_config()
    config.data.update(train_files=str(FIXTURES / name / 'tokenizer_ids.json'), format='text', sample_by='document')
    (source,) = pipeline.train_sources(config.data)
    document = next(iter(pipeline._documents(source, config.data, tokenizer, 0, False)))['tokens'].tolist()
    assert document[-1] == tokenizer.eos_id and document.count(1) == (1 if bos else document.count(1))


def load_exported(folder: pathlib.Path) -> dict[str, np.ndarray]:
    tensors = {}
    for file in folder.glob('model*.safetensors'):
        tensors.update(load_file(str(file)))
    return tensors


@pytest.mark.parametrize('name', VARIANTS)
def test_import_export_import_is_bit_identical(tmp_path, name):
    checkpoint = convert_hf.import_folder(str(FIXTURES / name), tmp_path / 'checkpoint')
    exported = tmp_path / 'exported'
    convert_hf.export_checkpoint(str(checkpoint), exported, 'float32', max_shard_bytes=40_000)
    original = load_file(str(FIXTURES / name / 'model.safetensors'))
    again = load_exported(exported)
    assert again.keys() == original.keys()
    for key, value in original.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)
    files = sorted(p.name for p in exported.glob('model*.safetensors'))
    assert len(files) > 1 and (exported / 'model.safetensors.index.json').is_file()  # split at 40 kB
    exported_config = hf_config.read(exported)
    assert (
        exported_config['architectures'] == json.loads((FIXTURES / name / 'config.json').read_text())['architectures']
    )
    assert hf_config.model_fields(exported_config) == hf_config.model_fields(hf_config.read(FIXTURES / name))
    assert not list(tmp_path.glob('.*incomplete'))  # written under a temporary name, renamed at the end


def instruct_folder(out: pathlib.Path) -> pathlib.Path:
    """llama_gqa as an Instruct model's folder: a chat template in chat_template.jinja (before the one in
    tokenizer_config.json), special_tokens_map.json, and generation_config.json with several stop ids and sampling
    defaults."""
    shutil.copytree(FIXTURES / 'llama_gqa', out)
    (out / 'chat_template.jinja').write_text(
        '{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}'
        '{% if add_generation_prompt %}<|assistant|>{% endif %}'
    )
    (out / 'special_tokens_map.json').write_text(json.dumps({'bos_token': '<s>', 'eos_token': '</s>'}))
    generation = {'bos_token_id': 1, 'eos_token_id': [2, 7, 11], 'do_sample': True, 'temperature': 0.6}
    (out / 'generation_config.json').write_text(json.dumps(generation | {'top_p': 0.9, 'top_k': 20}))
    return out


def test_an_export_carries_the_source_folder_s_chat_template_stop_ids_and_special_tokens(tmp_path):
    """transformers renders the same chat from the export as from the source and reads the same stop ids and
    sampling defaults (compared as files and fields: the tests never import transformers)."""
    source = instruct_folder(tmp_path / 'instruct')
    checkpoint = convert_hf.import_folder(str(source), tmp_path / 'checkpoint')
    exported = tmp_path / 'exported'
    convert_hf.export_checkpoint(str(checkpoint), exported, 'float32', max_shard_bytes=2**30)
    for name in ('chat_template.jinja', 'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.json'):
        assert (exported / name).read_bytes() == (source / name).read_bytes(), name
    assert json.loads((exported / 'generation_config.json').read_text()) == json.loads(
        (source / 'generation_config.json').read_text()
    )
    messages = [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]
    ours, theirs = (chat_template.for_tokenizer(str(folder)) for folder in (exported, source))
    assert ours.own and ours.render(messages) == theirs.render(messages)
    assert ours.render(messages) == '<|user|>Hi</s><|assistant|>Hello</s><|assistant|>'  # the file's, not the field's
    assert tokenizers.special_tokens(str(exported)) == tokenizers.special_tokens(str(source))
    exported_tokenizer, source_tokenizer = (tokenizers.make_tokenizer(str(f)) for f in (exported, source))
    assert exported_tokenizer.stop_ids == source_tokenizer.stop_ids == (2, 7, 11)
    assert (exported_tokenizer.bos_id, exported_tokenizer.eos_id) == (1, 2)
    # Without a chat_template.jinja, tokenizer_config.json's template travels (inside that file, copied above).
    (source / 'chat_template.jinja').unlink()
    again = tmp_path / 'again'
    convert_hf.export_checkpoint(str(checkpoint), again, 'float32', max_shard_bytes=2**30)
    assert not (again / 'chat_template.jinja').exists()
    rendered = chat_template.for_tokenizer(str(again)).render(messages)
    assert rendered == chat_template.for_tokenizer(str(source)).render(messages) and '[INST] Hi [/INST]' in rendered


def test_exported_files_are_all_readable_as_the_umask_allows(tmp_path):
    """safetensors writes 0600; the export gives the weights the mode of every other file it writes."""
    checkpoint = convert_hf.import_folder(str(FIXTURES / 'gpt2'), tmp_path / 'checkpoint')
    exported = tmp_path / 'exported'
    convert_hf.export_checkpoint(str(checkpoint), exported, 'float32', max_shard_bytes=2**30)
    modes = {p.name: p.stat().st_mode & 0o777 for p in exported.iterdir()}
    assert modes['model.safetensors'] == modes['config.json'] == modes['tokenizer.json'], modes
    assert len(set(modes.values())) == 1 and modes['config.json'] & 0o044 == 0o044, modes  # the umask here: 022


def test_bad_folders_are_named_in_one_line(tmp_path):
    folder = tmp_path / 'model'
    shutil.copytree(FIXTURES / 'llama_gqa', folder)
    config = json.loads((folder / 'config.json').read_text())

    def error(**changes) -> str:
        (folder / 'config.json').write_text(json.dumps(dict(config, **changes)))
        with pytest.raises(ConfigError) as raised:
            convert_hf.import_folder(str(folder), tmp_path / f'out{len(changes)}')
        return str(raised.value)

    assert "holds a BertForMaskedLM ('bert') model, which is not supported: supported are LlamaForCausalLM" in error(
        architectures=['BertForMaskedLM'], model_type='bert'
    )
    assert "RoPE scaling of type 'yarn'" in error(rope_parameters={'rope_type': 'yarn', 'factor': 2.0})
    (folder / 'config.json').write_text(json.dumps(config))
    tensors = load_file(str(folder / 'model.safetensors'))
    save_file({k: v for k, v in tensors.items() if 'layers.1.mlp.up_proj' not in k}, str(folder / 'model.safetensors'))
    assert 'lacks the tensor model.layers.1.mlp.up_proj.weight' in error()
    save_file(dict(tensors, extra=np.zeros(3, np.float32)), str(folder / 'model.safetensors'))
    assert 'has a tensor this model does not use: extra' in error()
    wrong = dict(tensors, **{'model.norm.weight': np.zeros(31, np.float32)})
    save_file(wrong, str(folder / 'model.safetensors'))
    assert 'tensor model.norm.weight has shape (31,) but this config needs (32,)' in error()
    (folder / 'model.safetensors').rename(folder / 'pytorch_model.bin')
    assert 'holds PyTorch .bin weights only: convert them once with transformers' in error()


@pytest.mark.parametrize(
    'setting, named',
    [
        ({'scale_attn_by_inverse_layer_idx': True}, 'scale_attn_by_inverse_layer_idx=true'),
        ({'reorder_and_upcast_attn': True}, 'reorder_and_upcast_attn=true'),
        ({'scale_attn_weights': False}, 'scale_attn_weights=false'),
    ],
)
def test_gpt2_attention_variants_are_refused_not_imported_wrong(tmp_path, setting, named):
    folder = tmp_path / 'model'
    shutil.copytree(FIXTURES / 'gpt2', folder)
    config = json.loads((folder / 'config.json').read_text())
    (folder / 'config.json').write_text(json.dumps(config | setting))
    with pytest.raises(ConfigError, match=rf'^{folder}/config.json: {re.escape(named)} .* is not supported\.$'):
        convert_hf.import_folder(str(folder), tmp_path / 'out')


def test_a_run_whose_model_differs_from_the_folder_names_the_field(tmp_path):
    result = run_trainer_in(
        tmp_path,
        '--config=configs/small_lm.py',
        f'--config.checkpoint.restore_from={FIXTURES / "llama_gqa"}',
        f'--config.data.tokenizer={FIXTURES / "llama_gqa"}',
        '--config.model.vocab_size=99',
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f'error: config.model.num_layers=4 does not match the model in {FIXTURES / "llama_gqa"} (2): set '
        f'--config.model.num_layers=2, or use configs/finetune_hf.py:{FIXTURES / "llama_gqa"}, which reads them all.'
    )


@pytest.mark.slow  # 27 s here; fine-tuning an imported model is in test_finetune
def test_fine_tuning_an_imported_model_lowers_its_loss(tmp_path):
    result = run_trainer_in(
        tmp_path,
        f'--config=configs/finetune_hf.py:{FIXTURES / "llama_gqa"}',
        '--config.train.steps=30',
        '--config.train.log_every=10',
        '--config.train.learning_rate=1e-2',
        '--config.train.warmup_steps=2',
        '--config.train.global_batch_size=8',
        '--config.data.seq_len=64',
        '--config.data.eval_files=',
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'started from {FIXTURES / "llama_gqa"} (Hugging Face weights)' in result.stdout
    losses = [line['loss'] for line in read_metrics(tmp_path)]
    assert losses[-1] < losses[0] - 0.3, losses  # 4.48 -> 3.89 when written


def test_a_vocabulary_the_tensor_axis_does_not_divide_asks_for_padding():
    config = fixture_config('gpt2', fsdp=4, tensor=2)
    config.model.vocab_multiple = 1  # 301 rows over 2 devices
    with pytest.raises(ConfigError, match='set config.model.vocab_multiple to a multiple of 2'):
        train.build(config, mesh_for(config))


def test_an_exported_byte_level_model_brings_a_tokenizer_json_of_the_same_ids(tmp_path):
    """Our generate reads the exported folder and writes what the checkpoint writes; the tokenizer.json (which
    transformers loads) gives the byte tokenizer's ids."""
    run = tmp_path / 'run'
    trained = run_trainer_in(run, '--config=configs/small_lm.py', *TINY_RUN_OVERRIDES, '--config.train.steps=5')
    assert trained.returncode == 0, trained.stderr[-2000:]
    exported = tmp_path / 'exported'
    convert_hf.export_checkpoint(str(run / 'checkpoints'), exported, 'float32', max_shard_bytes=2**30)
    texts = [' Hello  world\n', 'naïve café — “quoted” 😀 \t12345']
    hf = tokenizers.make_tokenizer(str(exported))
    assert (hf.eos_id, hf.bos_id, hf.stop_ids) == (0, None, (0,))
    for text in texts:
        assert hf.encode(text).tolist() == tokenizers.ByteTokenizer().encode(text).tolist()
        assert hf.decode(hf.encode(text)) == text
    generated = []
    for model in (run, exported):
        command = [sys.executable, '-m', 'trainer.generate', f'--model={model}', '--prompt=ROMEO:', '--json']
        command += ['--temperature=0', '--max_new_tokens=12', '--dtype=float32']
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        generated.append(json.loads(result.stdout)['completion_ids'])
    assert generated[0] == generated[1] and len(generated[0]) > 0
