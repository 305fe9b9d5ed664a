"""LoRA fine-tuning of the default model on the instruction set: python -m trainer --config configs/finetune_lora.py

configs/finetune_instruct.py with rank-8 adapters on every projection: only the adapters train (and have
optimizer state); the base weights stay frozen, stored in bfloat16. Export merges the adapters
(scripts/convert_hf.py export) or writes them alone (--adapter, a PEFT folder).
"""

from ml_collections import config_dict

from configs import finetune_instruct


def get_config() -> config_dict.ConfigDict:
    """finetune_instruct.py with LoRA adapters instead of full fine-tuning."""
    config = finetune_instruct.get_config()
    config.lora.rank = 8
    config.lora.alpha = 16.0
    config.lora.targets = 'q,k,v,o,gate,up,down'
    config.train.learning_rate = 3e-3  # adapters start at 0 and take a higher rate than full fine-tuning
    config.train.weight_decay = 0.0
    return config
