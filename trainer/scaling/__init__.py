"""Scaling-law experiments: exact counts, sweeps, collection, fits and plots (`python -m trainer.scaling`)."""
