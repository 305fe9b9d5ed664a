"""Lower layers never import higher ones: training runs without the scaling tools (which sit on top of it)."""

import subprocess
import sys


def test_training_imports_nothing_of_the_scaling_package():
    check = (
        'import sys, trainer.train, trainer.__main__, trainer.generate; '
        "print(sorted(m for m in sys.modules if m.startswith('trainer.scaling')))"
    )
    result = subprocess.run([sys.executable, '-c', check], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == '[]'
