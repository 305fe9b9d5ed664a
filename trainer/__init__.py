"""shardtrain's trainer: `python -m trainer --config configs/small_lm.py` (see trainer/training/train.py)."""
