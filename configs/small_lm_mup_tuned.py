"""muP base at width 64, halving search of 27 trials (seed 0): eval loss 2.3697 on 2.05e+05 tokens.

Written by `python -m trainer.scaling tune_base`: the base config with the tuned settings; muP is based at
this model's width, so set model.d_model (and heads, d_ff) wider and the constants transfer.

The run behind it, its search and what it gives at widths 128-512 (better than SP at its own best rate at
every width): docs/scaling.md, "Tuning the base". A width-512 model with these constants:
    python -m trainer --config configs/small_lm_mup_tuned.py --config.model.d_model=512 \
        --config.model.num_heads=16 --config.model.num_kv_heads=16 --config.model.d_ff=1536
"""

import importlib.util
import pathlib

BASE_CONFIG = pathlib.Path(__file__).resolve().parent / 'small_lm.py'
BASE_ARGUMENT = ''
SETTINGS = {
    'data.seq_len': 64,
    'train.global_batch_size': 16,
    'train.eval_steps': 4,
    'model.parametrization': 'mup',
    'model.base_width': 64,
    'model.base_head_dim': 32,
    'model.d_model': 64,
    'model.num_layers': 2,
    'model.num_heads': 2,
    'model.num_kv_heads': 2,
    'model.d_ff': 192,
    'train.learning_rate': 0.00904,
    'model.mup_output_multiplier': 2.11,
    'model.mup_input_multiplier': 1.89,
    'model.init_std': 0.0794,
    'train.weight_decay': 0.1,
}


def get_config():
    spec = importlib.util.spec_from_file_location('tuned_base_config', BASE_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(BASE_ARGUMENT) if BASE_ARGUMENT else module.get_config()
    for key, value in SETTINGS.items():
        section, name = key.rsplit('.', 1)
        config[section][name] = type(config[section][name])(value)
    return config
