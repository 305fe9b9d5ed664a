"""The model as the trainer sets it up: its config from a run config, parameter roles, LoRA adapters, parameter
and FLOP counts."""
