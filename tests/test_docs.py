"""The README's set-up commands are the ones CI runs."""

import pathlib
import re

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


def test_sample_data_ships_inside_the_package():
    setup = (REPO / 'setup.cfg').read_text()
    assert 'trainer = sample_data/*.txt' in setup
    for name in ('train.txt', 'eval.txt', 'PROVENANCE.md'):
        assert (REPO / 'trainer' / 'sample_data' / name).stat().st_size > 0
