"""scripts/bench.py runs end to end on a tiny model: every figure it promises, for a config and a variant."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = (
    '--config.model.num_layers=1 --config.model.d_model=32 --config.model.num_heads=2 --config.model.num_kv_heads=2 '
    '--config.model.d_ff=64 --config.data.seq_len=16 --config.train.global_batch_size=2 --config.mesh.fsdp=1 '
    '--config.data.shuffle_buffer=1'
).split()
ONE_DEVICE = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # not the tests' 8


@pytest.mark.slow  # a benchmark of several variants (54 s here)
def test_bench_reports_speed_overhead_mfu_and_memory_for_each_variant():
    command = [sys.executable, 'scripts/bench.py', '--config', 'configs/small_lm.py', *TINY]
    command += [
        '--steps',
        '2',
        '--pairs',
        '2',
        '--repeats',
        '2',
        '--variant',
        'chunk:model.loss_vocab_chunk=64',
        '--json',
    ]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ONE_DEVICE)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith('{')]
    assert [r['name'] for r in results] == ['config', 'chunk']
    for r in results:
        assert r['tokens_per_s'] > 0 and r['bare_tokens_per_s'] > 0 and r['compile_s'] > 0
        assert r['repeats'] == 2 and len(r['overheads']) == 2 and len(r['loop_overhead_pairs']) == 4
        assert 0 < r['mfu_vs_measured_matmul'] < 1 and r['memory_bytes'] > 0 and r['flops_per_token'] > 0


def test_bench_refuses_a_variant_naming_no_field():
    command = [
        sys.executable,
        'scripts/bench.py',
        '--config',
        'configs/small_lm.py',
        *TINY,
        '--variant',
        'x:model.nope=1',
    ]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ONE_DEVICE)
    assert run.returncode == 2
    assert (
        run.stderr.strip().splitlines()[-1]
        == "error: --variant 'x:model.nope=1': model.nope names no field of the config."
    )


@pytest.mark.slow  # 27 s here
def test_bench_times_the_framework_for_the_first_config_only_when_asked():
    """--framework first: the variant gets its bare loop (and MFU of it) alone; the table prints either way."""
    command = [sys.executable, 'scripts/bench.py', '--config', 'configs/small_lm.py', *TINY, '--steps', '2']
    command += ['--framework', 'first', '--variant', 'f32:model.dtype=float32', '--matmul_size', '256']
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ONE_DEVICE)
    assert run.returncode == 0, run.stderr[-3000:]
    table = [line.split() for line in run.stdout.splitlines()]
    rows = {row[0]: row for row in table if row[:1] in (['config'], ['f32'])}
    assert set(rows) == {'config', 'f32'}
    assert (
        rows['config'][2] != '-' and rows['f32'][2] == '-'
    )  # tokens/s of trainer.training.train: measured, not measured
    assert float(rows['f32'][4]) > 0 and rows['f32'][6] != '-'  # bare loop tokens/s and its MFU
    assert '256-square matmul' in run.stdout
