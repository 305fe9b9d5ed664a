"""A muP base at width 64 with the constants `python -m trainer.scaling tune_base` found: widen it and they transfer.

The search (27 trials, successive halving, seed 0, the default ranges; eval loss 2.3756 on 2.05e+05 tokens, every
constant inside its range), its tuned.py and what these constants give at widths 256 and 512: docs/scaling.md,
"Tuning the base". A width-512 model with them:
    python -m trainer --config configs/small_lm_mup_tuned.py --config.model.d_model=512 \
        --config.model.num_heads=16 --config.model.num_kv_heads=16 --config.model.d_ff=1536
"""

from ml_collections import config_dict

from configs import small_lm


def get_config() -> config_dict.ConfigDict:
    """small_lm.py at the shape and batch the base was tuned at, muP based there, with the tuned constants."""
    config = small_lm.get_config()
    # The shape and budget of the search: the constants were tuned for these.
    config.data.seq_len = 64
    config.train.global_batch_size = 16
    config.train.eval_steps = 4
    # The base model: 2 layers, heads of 32; muP's multipliers are 1 at this width and grow as d_model does.
    config.model.parametrization = 'mup'
    config.model.base_width = 64
    config.model.base_head_dim = 32
    config.model.d_model = 64
    config.model.num_layers = 2
    config.model.num_heads = 2
    config.model.num_kv_heads = 2
    config.model.d_ff = 192
    # The winner of the search (trial 18).
    config.train.learning_rate = 0.007
    config.model.mup_output_multiplier = 2.03
    config.model.mup_input_multiplier = 6.56
    config.model.init_std = 0.0338
    config.train.weight_decay = 0.03
    return config
