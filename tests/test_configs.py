"""Every file in configs/ loads through the command-line machinery and passes validation."""

import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from trainer.errors import ConfigError
from trainer.training import config_checks

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p for p in (REPO / 'configs').glob('*.py') if p.name != '__init__.py')
# Configs that take an argument (`--config file.py:ARG`), and one to test them with.
ARGUMENTS = {'finetune_hf.py': f':{REPO / "tests" / "fixtures" / "hf" / "llama_gqa"}'}


def test_there_are_configs():
    assert any(p.name == 'small_lm.py' for p in CONFIG_FILES)


@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda p: p.name)
def test_config_loads_overrides_and_validates(path):
    argv = [__file__, f'--config={path}{ARGUMENTS.get(path.name, "")}', '--config.train.steps=70']
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file('config', flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    config = flag_values.config
    assert config.train.steps == 70
    base_run = config.checkpoint.restore_from
    if base_run.startswith('runs/'):  # a demo that starts from the default run, which a fresh clone has not trained
        with config.unlocked():
            config.checkpoint.restore_from = str(REPO / 'no_such_run' / 'checkpoints')
        with pytest.raises(ConfigError, match='is not a folder: train that run first'):
            config_checks.validate(config, num_devices=8)
        config.checkpoint.restore_from = ''
    config_checks.validate(config, num_devices=8)
