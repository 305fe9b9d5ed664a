"""The README's promise: the default config gets well under 2.0 nats per byte on a CPU."""

import os
import pathlib
import subprocess
import sys

import pytest
from conftest import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_default_config_reaches_eval_loss_well_under_two(tmp_path):
    """About five minutes on 2 cores: the full default run, on one device as a laptop would have."""
    env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
    result = subprocess.run(
        [sys.executable, '-m', 'trainer', '--config', 'configs/small_lm.py', '--workdir', str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = read_metrics(tmp_path)
    final_eval = [line['eval_loss'] for line in lines if 'eval_loss' in line][-1]
    assert final_eval < 1.85, final_eval
