"""The XLA GPU flags the launcher sets: the user's XLA_FLAGS win, and this jaxlib knows every flag."""

import os
import pathlib
import subprocess
import sys

from trainer.runtime import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_flags_are_added_where_xla_flags_does_not_set_them():
    given = '--xla_force_host_platform_device_count=8 --xla_gpu_enable_latency_hiding_scheduler=false'
    flags = xla_flags.with_gpu_flags(given)
    assert flags.startswith(given)
    assert '--xla_gpu_enable_latency_hiding_scheduler=false' in flags  # the user's value stands ...
    assert '--xla_gpu_enable_latency_hiding_scheduler=true' not in flags  # ... alone
    assert xla_flags.given(flags) == xla_flags.given(given) | set(xla_flags.GPU_FLAGS)
    assert xla_flags.with_gpu_flags(flags) == flags  # applying twice changes nothing
    assert xla_flags.with_gpu_flags('') == ' '.join(f'--{k}={v}' for k, v in xla_flags.GPU_FLAGS.items())


def test_this_jaxlib_knows_every_gpu_flag():
    """XLA aborts on a flag it does not know (renamed or removed in a new jaxlib); it parses GPU flags on CPU too."""
    env = dict(os.environ, XLA_FLAGS=xla_flags.with_gpu_flags('--xla_force_host_platform_device_count=2'))
    env['JAX_PLATFORMS'] = 'cpu'
    result = subprocess.run(
        [sys.executable, '-c', 'import jax; print(jax.device_count())'], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == '2'
    env['XLA_FLAGS'] += ' --xla_gpu_no_such_flag=true'  # the check can fail
    assert subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'], env=env, capture_output=True).returncode


def test_the_launcher_adds_them_unless_the_config_says_no(tmp_path):
    off = tmp_path / 'no_gpu_flags.py'
    off.write_text(
        'from configs import small_lm\n\n\ndef get_config():\n'
        '    config = small_lm.get_config()\n    config.train.xla_gpu_flags = False\n    return config\n'
    )
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', PYTHONPATH=str(ROOT))
    for config, expected in (('configs/small_lm.py', set(xla_flags.GPU_FLAGS)), (off, set())):
        code = (
            'import os; from absl import flags; from trainer import __main__ as launcher;'
            f"flags.FLAGS(['python', '--config={config}']); launcher.set_xla_flags(); print(os.environ['XLA_FLAGS'])"
        )
        run = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, cwd=ROOT)
        assert run.returncode == 0, run.stderr[-2000:]
        assert xla_flags.given(run.stdout) == {'xla_force_host_platform_device_count'} | expected
