"""A muP base at width 64 with the constants `python -m trainer.scaling tune_base` found: widen it and they transfer.

The search (27 trials, successive halving, seed 0; eval loss 2.3697 on 2.05e+05 tokens), its tuned.py and what
these constants give at widths 128-512 (better than SP at its own best rate at every width): docs/scaling.md,
"Tuning the base". Its init std sits at the top of that search's range; a rerun over wider ranges found an interior
winner as good at width 64 that transfers worse (behind this base by 0.05-0.064 at widths 256 and 512), so this
one stays. A width-512 model with them:
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
    # The winner of the search (trial 5).
    config.train.learning_rate = 0.00904
    config.model.mup_output_multiplier = 2.11
    config.model.mup_input_multiplier = 1.89
    config.model.init_std = 0.0794
    config.train.weight_decay = 0.1
    return config
