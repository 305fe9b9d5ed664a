"""The tree reads as the architecture: packages by concern, and lower layers never import higher ones."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# trainer's layers, lowest first; a module may import its own layer and those before it. `errors` and `cli` are
# the shared base (errors imports nothing); 'commands' are the modules at trainer/'s top (python -m trainer.<verb>).
LAYERS = ['errors', 'cli', 'runtime', 'data', 'modeling', 'hf', 'training', 'inference', 'evaluation', 'serving',
          'scaling', 'commands']  # fmt: skip


def layer(module: str) -> str:
    """'trainer.training.steps' -> 'training'; 'trainer.serve' -> 'commands'."""
    parts = module.split('.')
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return 'commands'


def imports(path: pathlib.Path) -> list[str]:
    """The trainer modules (or packages) a file imports, wherever in it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split('.')[0] == 'trainer':
            found += [f'trainer.{a.name}' for a in node.names] if node.module == 'trainer' else [node.module]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split('.')[0] == 'trainer']
    return found


def test_no_module_imports_one_from_a_higher_layer():
    upward = []
    for path in sorted((ROOT / 'trainer').rglob('*.py')):
        module = '.'.join(path.relative_to(ROOT).with_suffix('').parts)
        for target in imports(path):
            if LAYERS.index(layer(target)) > LAYERS.index(layer(module)):
                upward.append(f'{module} imports {target}')
    assert not upward, upward


def test_the_top_of_trainer_holds_the_commands_and_packages_by_concern():
    modules = sorted(p.stem for p in (ROOT / 'trainer').glob('*.py'))
    assert modules == ['__init__', '__main__', 'chat', 'cli', 'errors', 'evaluate', 'generate', 'harness', 'serve']
    packages = sorted(p.name for p in (ROOT / 'trainer').iterdir() if (p / '__init__.py').is_file())
    assert packages == [
        'data', 'evaluation', 'hf', 'inference', 'modeling', 'runtime', 'scaling', 'serving', 'training'
    ]  # fmt: skip


def loaded_by(statement: str, prefix: str) -> list[str]:
    check = f'import sys; {statement}; print(sorted(m for m in sys.modules if m.startswith({prefix!r})))'
    result = subprocess.run([sys.executable, '-c', check], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return eval(result.stdout)  # a printed list of strings


def test_training_imports_nothing_of_the_scaling_package():
    assert loaded_by('import trainer.training.train, trainer.__main__, trainer.generate', 'trainer.scaling') == []


def test_serving_and_decoding_do_not_load_the_input_pipeline():
    for command in ('trainer.serve', 'trainer.generate', 'trainer.chat'):
        assert loaded_by(f'import {command}', 'trainer.data.pipeline') == [], command
        assert loaded_by(f'import {command}', 'grain') == [], command
