"""Fine-tune (or train on) a Hugging Face model: python -m trainer --config configs/finetune_hf.py:DIR

DIR is a Hugging Face model folder (config.json, model*.safetensors, tokenizer.json; Llama, Mistral,
Qwen2 or GPT-2): the architecture is read from its config.json, the run starts from its weights, and its
tokenizer reads the data (by default the bundled Shakespeare sample). Everything else is small_lm.py's,
with a fine-tuning learning rate; override any field as usual, e.g. --config.data.train_files=...
"""

from ml_collections import config_dict

from configs import small_lm
from trainer.hf import config as hf_config


def get_config(hf_dir: str | None = None) -> config_dict.ConfigDict:
    """small_lm.py with the model, weights and tokenizer of the Hugging Face folder `hf_dir`."""
    if not hf_dir:
        raise ValueError('give the model folder after the file name: --config configs/finetune_hf.py:DIR')
    config = small_lm.get_config()
    config.model.update(hf_config.model_fields(hf_config.read(hf_dir), hf_dir))
    config.model.scan_layers = True  # pre-trained models are deep: compile time independent of depth
    config.model.vocab_multiple = 128  # so that mesh.tensor divides the embedding rows (GPT-2 has 50257)
    config.checkpoint.restore_from = hf_dir  # its weights (a workdir's own checkpoints, once there, come first)
    config.data.tokenizer = hf_dir  # its tokenizer.json, with the BOS/EOS transformers' tokenizer gives
    config.data.seq_len = min(config.data.seq_len, config.model.max_seq_len)
    config.train.learning_rate = 1e-4  # fine-tuning: far below pre-training's
    config.train.warmup_steps = 20
    config.train.steps = 200
    return config
