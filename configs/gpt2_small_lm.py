"""The default run with a GPT-2-style model: LayerNorm, learned positions, GELU MLP, tied embeddings, biases."""

from ml_collections import config_dict

from configs import small_lm


def get_config() -> config_dict.ConfigDict:
    """small_lm.py with the gpt2 family; everything else (data, schedule, mesh) is unchanged."""
    config = small_lm.get_config()
    config.model.family = 'gpt2'
    config.model.num_kv_heads = config.model.num_heads  # GPT-2 has no grouped-query attention
    config.model.d_ff = 4 * config.model.d_model
    config.model.tie_embeddings = True
    config.model.use_bias = True
    return config
