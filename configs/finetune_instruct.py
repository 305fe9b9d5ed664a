"""Instruction fine-tuning of the default model: python -m trainer --config configs/finetune_instruct.py

Starts from the default run's newest checkpoint (runs/small_lm, what the README's first command trains)
and fine-tunes all of it on the bundled instruction set made from the same plays
(scripts/make_finetune_data.py): "Who speaks these lines?" -> the speaker, "Continue:" -> the next line.
The loss counts the answers only (config.data.format='sft'); the eval loss is on held-out speeches.
`--config.checkpoint.restore_from=` another run's workdir/checkpoints fine-tunes that model instead.
"""

from ml_collections import config_dict

from configs import small_lm


def get_config() -> config_dict.ConfigDict:
    """small_lm.py fine-tuned on instructions, from runs/small_lm's newest checkpoint."""
    config = small_lm.get_config()
    config.data.format = 'sft'
    config.data.train_files = small_lm.sample_file('finetune/instruct_train.jsonl')
    config.data.eval_files = small_lm.sample_file('finetune/instruct_eval.jsonl')
    config.data.seq_len = 256  # rows hold several examples, each whole
    config.train.global_batch_size = 16
    config.train.steps = 300
    config.train.warmup_steps = 20
    config.train.learning_rate = 1e-3  # fine-tuning: below pre-training's 3e-3
    config.train.eval_every = 100
    config.train.eval_steps = 24  # up to 384 rows: all 480 held-out examples, packed, each once
    config.checkpoint.every_steps = 100
    config.checkpoint.restore_from = 'runs/small_lm/checkpoints'
    return config
