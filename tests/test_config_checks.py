"""Every impossible config fails before compiling, with one sentence naming the field."""

import pytest
from conftest import tiny_config

from trainer.errors import ConfigError
from trainer.training import config_checks


def failure(changes: dict, num_devices: int = 8, **mesh_sizes) -> str:
    config = tiny_config('llama', **(mesh_sizes or dict(fsdp=8)))
    config.model.vocab_size = 256  # what the byte tokenizer needs
    for dotted, value in changes.items():
        section, key = dotted.split('.') if '.' in dotted else (None, dotted)
        (config[section] if section else config)[key] = value
    with pytest.raises(ConfigError) as error:
        config_checks.validate(config, num_devices)
    message = str(error.value)
    assert '\n' not in message, 'errors are one line'
    return message


@pytest.mark.parametrize(
    'changes, expected',
    [
        ({'model.num_heads': 5}, 'config.model.num_heads=5 does not divide config.model.d_model=24'),
        ({'model.num_kv_heads': 3}, 'config.model.num_kv_heads=3 does not divide config.model.num_heads=4: use one of'),
        ({'model.family': 'bert'}, "config.model.family='bert' is not known: use one of 'llama', 'gpt2'"),
        ({'model.remat': 'some'}, "config.model.remat='some' is not known: use one of 'none', 'full'"),
        ({'model.dtype': 'float8'}, "config.model.dtype='float8' is not known"),
        ({'data.seq_len': 17}, 'config.data.seq_len=17 exceeds config.model.max_seq_len=16'),
        ({'data.train_files': '/nonexistent/*.txt'}, "config.data.train_files='/nonexistent/*.txt' matches no file"),
        ({'data.eval_files': 'nope.txt'}, "config.data.eval_files='nope.txt' matches no file"),
        ({'data.tokenizer': 'gpt2'}, "config.data.tokenizer='gpt2' is not known"),
        (
            {'model.vocab_size': 200},
            'tokenizer has 256 ids but config.model.vocab_size=200: set vocab_size to at least 256',
        ),
        ({'train.lr_schedule': 'step'}, "config.train.lr_schedule='step' is not known"),
        ({'data.num_streams': 3}, 'config.train.global_batch_size=8 cannot be cut into 3 data streams'),
        ({'train.global_batch_size': 12}, 'config.train.global_batch_size=12 split into 1 micro-batches gives 12'),
        (
            {'train.grad_accum_steps': 3},
            'config.train.grad_accum_steps=3 does not divide config.train.global_batch_size=8',
        ),
        ({'train.warmup_steps': -1}, 'config.train.warmup_steps=-1 must not be negative'),
        ({'train.steps': 0}, 'config.train.steps=0 must be a positive integer'),
        ({'model.dropout': 1.0}, 'config.model.dropout=1.0 must be in [0, 1)'),
        ({'model.mup_weight_decay': 'decoupled'}, "config.model.mup_weight_decay='decoupled' is not known: use one of"),
        ({'model.mup_output_multiplier': 2.0}, 'config.model.mup_output_multiplier=2.0 is a muP constant: set'),
        (
            {'model.parametrization': 'mup', 'model.mup_input_multiplier': 0.0},
            'config.model.mup_input_multiplier=0.0 must be positive',
        ),
        ({'model.depth_scaling': 'depthmup'}, "config.model.depth_scaling='depthmup' is not known: use one of"),
        ({'model.depth_alpha': 2.0}, 'config.model.depth_alpha=2.0 must be in [0.5, 1]'),
        ({'model.base_depth': -1}, 'config.model.base_depth=-1 must be 0'),
        ({'model.attention_impl': 'cudnn'}, "config.model.attention_impl='cudnn' needs an NVIDIA GPU"),
        ({'model.attention_max_segments': -1}, 'config.model.attention_max_segments=-1 must be 0 (seq_len) or'),
    ],
)
def test_bad_values_are_reported_by_field(changes, expected):
    assert expected in failure(changes)


@pytest.mark.parametrize(
    'changes, expected',
    [
        (
            {'model.mup_weight_decay': 'constant'},
            "config.model.mup_weight_decay='constant' acts only under muP: set config.model.parametrization='mup'",
        ),
        (
            {'model.base_depth': 2},
            'config.model.base_depth=2 acts only under CompleteP: set config.model.depth_scaling=',
        ),
        ({'model.depth_alpha': 0.5}, 'config.model.depth_alpha=0.5 acts only under CompleteP: set'),
    ],
)
def test_mup_and_completep_settings_that_would_do_nothing_are_refused(changes, expected):
    assert expected in failure(changes)


def test_the_same_settings_are_accepted_where_they_act():
    for changes in (
        {'model.parametrization': 'mup', 'model.mup_weight_decay': 'constant'},
        {'model.depth_scaling': 'completep', 'model.base_depth': 2, 'model.depth_alpha': 0.5},
    ):
        config = tiny_config('llama', fsdp=8)
        config.model.vocab_size = 256
        for dotted, value in changes.items():
            section, key = dotted.split('.')
            config[section][key] = value
        config_checks.validate(config, 8)


def test_mesh_that_does_not_cover_the_devices():
    message = failure({}, num_devices=8, data=2, fsdp=2, tensor=1)
    assert message == (
        'config.mesh data=2 fsdp=2 tensor=1 does not cover the 8 devices: make the product 8, or set one axis to -1.'
    )


def test_mesh_with_two_wildcards():
    assert 'at most one of config.mesh.data/fsdp/tensor may be -1' in failure({}, data=-1, fsdp=-1)


def test_wildcard_that_does_not_divide():
    assert 'does not cover the 8 devices' in failure({}, data=3, fsdp=-1)


def test_batch_that_the_data_axes_do_not_divide():
    message = failure({'train.global_batch_size': 4}, data=2, fsdp=4)
    assert (
        'which the 8 devices of the batch axes do not divide: use a global_batch_size that is a multiple of 8'
        in message
    )


def test_rule_naming_an_unknown_mesh_axis():
    config = tiny_config('llama', fsdp=8)
    config.model.vocab_size = 256
    config.mesh.rules = (('embed', 'model'),)
    with pytest.raises(ConfigError, match="maps 'embed' to unknown mesh axis 'model'"):
        config_checks.validate(config, 8)


def test_only_empty_data_files(tmp_path):
    (tmp_path / 'empty.txt').write_text('')
    message = failure({'data.train_files': str(tmp_path / '*.txt')})
    empty = tmp_path / 'empty.txt'
    assert message == f"config.data.train_files matches the empty file '{empty}': give files with data in them."
    (tmp_path / 'empty2.txt').write_text('')
    message = failure({'data.train_files': str(tmp_path / '*.txt')})
    assert "config.data.train_files matches only empty files ('" in message and 'give files with data' in message


def test_parameter_that_the_mesh_cannot_split():
    from conftest import mesh_for

    from trainer.training import train as train_lib

    config = tiny_config('llama', fsdp=1, tensor=8)
    config.model.vocab_size = 256
    config_checks.validate(config, 8)  # the config alone is consistent...
    mesh = mesh_for(config)
    with pytest.raises(
        ConfigError,
        match=r"blocks/attention/wk_DKH has 2 along 'kv_heads', which mesh axes "
        r"'tensor' \(8 devices\) do not divide",
    ):
        train_lib.build(config, mesh)  # ...but 2 key/value heads cannot be split 8 ways


def test_default_config_is_valid_on_one_and_eight_devices():
    from configs import small_lm

    for devices in (1, 8):
        config_checks.validate(small_lm.get_config(), devices)


@pytest.mark.parametrize(
    'changes, capability, expected',
    [
        ({'model.dtype': 'float32'}, '9.0', "computes in bfloat16 or float16, not model.dtype='float32'"),
        ({'model.head_dim': 12}, '9.0', 'a head dimension that is a multiple of 8 and at most 256, not 12'),
        ({}, '8.0', 'Hopper (compute capability 9.0) or newer GPUs; this NVIDIA A100 is 8.0'),
    ],
)
def test_what_cudnn_attention_cannot_run_is_refused_on_a_gpu(monkeypatch, changes, capability, expected):
    """The checks behind the GPU one, with the backend and the device faked."""
    gpu = type('FakeGpu', (), {'compute_capability': capability, 'device_kind': 'NVIDIA A100'})()
    monkeypatch.setattr(config_checks.jax, 'default_backend', lambda: 'gpu')
    monkeypatch.setattr(config_checks.jax, 'devices', lambda *_: [gpu])
    config = tiny_config('llama')
    config.model.update(attention_impl='cudnn', dtype='bfloat16', d_model=64, head_dim=16)
    config.model.update(**{key.split('.')[1]: value for key, value in changes.items()})
    with pytest.raises(ConfigError, match=expected.replace('(', r'\(').replace(')', r'\)')):
        config_checks.check_model(config.model)
    if not changes and capability == '8.0':  # and a Hopper passes
        gpu.compute_capability = '9.0'
        config_checks.check_model(config.model)


def test_cudnn_attention_on_a_jax_without_its_wrapper_is_refused(monkeypatch):
    from models import transformer

    monkeypatch.setattr(config_checks.jax, 'default_backend', lambda: 'gpu')
    monkeypatch.setattr(transformer, 'cudnn_attention', None)
    config = tiny_config('llama')
    config.model.update(attention_impl='cudnn', dtype='bfloat16')
    with pytest.raises(ConfigError, match="needs jax's cuDNN attention wrapper, which jax .* lacks"):
        config_checks.check_model(config.model)
