"""A run's saved config (its config.json, or the copy in each checkpoint), read back with today's fields."""

from __future__ import annotations

import json

from ml_collections import config_dict


def parse(text: str) -> config_dict.ConfigDict:
    """The saved config over the default one: fields added to the framework since that run get their defaults
    (all of them off: LoRA, muP, a classifier head), so every reader can rely on every field being there."""
    from configs import small_lm  # where every field is declared, with its default

    config = small_lm.get_config()
    config.update(json.loads(text))
    return config
