"""What the scaling verbs read: a base config with --set fields, lists of numbers, a runs CSV."""

from __future__ import annotations

import csv
import importlib.util
import pathlib

import numpy as np
from ml_collections import config_dict

from trainer.errors import ConfigError


def load_config(spec: str, settings: list[str]) -> config_dict.ConfigDict:
    """A config file's get_config() (with its ':ARG'), then --set fields, typed like the fields they replace."""
    path, _, argument = spec.partition(':')
    if not pathlib.Path(path).is_file():
        raise ConfigError(f'--config={spec} is not a file: give a config such as configs/small_lm.py.')
    module_spec = importlib.util.spec_from_file_location('sweep_base_config', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(argument) if argument else module.get_config()
    for setting in settings:
        key, _, value = setting.partition('=')
        section, _, name = key.rpartition('.')
        holder = config[section] if section else config
        if name not in holder:
            raise ConfigError(f'--set {setting}: {key} names no field of the config.')
        old = holder[name]
        holder[name] = value.lower() in ('1', 'true') if isinstance(old, bool) else type(old)(value)
    return config


def numbers(values: list[str], kind=float) -> list:
    try:
        return [kind(float(v)) if kind is int else kind(v) for v in values]
    except ValueError as error:
        raise ConfigError(f'not a number: {error}') from None


def read_csv(path: str, loss_column: str) -> dict[str, np.ndarray]:
    """The columns fit and plot use; rows not 'done' (from collect) are left out."""
    try:
        with open(path, newline='') as f:
            rows = list(csv.DictReader(f))
    except OSError as error:
        raise ConfigError(f'cannot read --csv={path}: {error.strerror}.') from None
    rows = [r for r in rows if r.get('state', 'done') in ('done', '')]
    needed = ('params', 'tokens', loss_column)
    missing = [c for c in needed if not rows or c not in rows[0]]
    if missing:
        raise ConfigError(
            f'--csv={path} lacks the column(s) {", ".join(missing)}: it needs params, tokens and {loss_column}.'
        )
    columns = {}
    for name in ('params', 'tokens', loss_column, 'flops', 'budget'):
        if name in rows[0] and all(r[name] not in ('', None) for r in rows):
            try:
                columns[name] = np.array([float(r[name]) for r in rows])
            except ValueError as error:
                raise ConfigError(f'--csv={path}, column {name}: {error}.') from None
    columns['loss'] = columns.pop(loss_column)
    return columns


def flops_per_param_token(columns: dict[str, np.ndarray]) -> float:
    """k in C = k N D: the data's own, from a flops column, else 6 (the convention)."""
    if 'flops' in columns:
        return float(np.median(columns['flops'] / (columns['params'] * columns['tokens'])))
    return 6.0
