"""The README's set-up commands are the ones CI runs."""

import pathlib
import re
import subprocess
import sys
import zipfile

REPO = pathlib.Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    return re.findall(r'```bash\n(.+?)\n```', (REPO / 'README.md').read_text())


def test_readme_has_the_two_setup_commands():
    train, test = readme_commands()[:2]
    assert train.endswith('python -m trainer --config configs/small_lm.py')
    assert test.endswith('python -m pytest')


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = (REPO / '.ci' / 'run').read_text().splitlines()
    assert readme_commands()[1] in ci_lines


def test_sample_data_and_configs_ship_inside_the_wheel(tmp_path):
    """A non-editable install must train the default config too: the wheel carries the sample."""
    build = [sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(tmp_path)]
    subprocess.run([*build, str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob('shardtrain-*.whl')
    names = set(zipfile.ZipFile(wheel).namelist())
    samples = {p.relative_to(REPO).as_posix() for p in (REPO / 'trainer' / 'sample_data').rglob('*') if p.is_file()}
    # 13 plays, 4 fine-tuning sets, the multiple-choice demo task, provenance
    assert len(samples) == 19 and samples <= names, samples - names
    assert {'configs/small_lm.py', 'models/transformer.py', 'trainer/__main__.py'} <= names
