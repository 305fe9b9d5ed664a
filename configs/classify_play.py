"""A classifier of which play a passage comes from: python -m trainer --config configs/classify_play.py

The default model (from runs/small_lm's newest checkpoint) with a classifier head over the 12 bundled
plays instead of its next-token head, fine-tuned on passages of the plays as printed, speakers' names
included (scripts/make_finetune_data.py), and evaluated on held-out passages: `python -m trainer.evaluate
--model runs/classify_play --files trainer/sample_data/finetune/play_eval.jsonl` prints the accuracy and
the confusion matrix. Chance is 1/12.
"""

from ml_collections import config_dict

from configs import small_lm

PLAYS = (
    'antony_and_cleopatra,coriolanus,hamlet,julius_caesar,lear,macbeth,merchant_of_venice,midsummer_nights_dream,'
    'much_ado_about_nothing,othello,romeo_and_juliet,twelfth_night'
)


def get_config() -> config_dict.ConfigDict:
    """small_lm.py with a 12-way classifier head, fine-tuned from runs/small_lm."""
    config = small_lm.get_config()
    config.model.head = 'classify'
    config.model.num_classes = 12
    config.model.pool = 'mean'  # the mean over the passage's tokens
    config.data.format = 'classify'
    config.data.class_names = PLAYS
    config.data.train_files = small_lm.sample_file('finetune/play_train.jsonl')
    config.data.eval_files = small_lm.sample_file('finetune/play_eval.jsonl')
    config.data.seq_len = 256  # passages (at most 250 characters) fit whole
    config.train.global_batch_size = 16
    config.train.steps = 300
    config.train.warmup_steps = 20
    config.train.learning_rate = 1e-3
    # The new head learns 10x faster than the pre-trained body (a role in the parameter-role table).
    config.train.param_roles = (('^classifier_', True, 10.0, 0.0),)
    config.train.eval_every = 100
    config.train.eval_steps = 30  # up to 480 rows: all 476 held-out passages, each once
    config.checkpoint.every_steps = 100
    config.checkpoint.restore_from = 'runs/small_lm/checkpoints'
    return config
