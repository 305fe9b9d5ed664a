"""Tokens/s of one config run as 1 process and as N processes on this machine, side by side.

Usage:
  python scripts/bench_processes.py --num_processes 2 [--steps 100] [-- --config.model.num_layers=2 ...]

Both runs use the same config and mesh over the same devices (on a machine without GPUs, --cpu_devices
simulated CPU devices); the second splits them between processes with scripts/launch_local.py. It
prints each run's median tokens/s over its log intervals (the compiling first step left out) and their
ratio: the cost of crossing processes (gloo over TCP on CPU, NCCL on GPUs) for this model.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.runtime.distributed import visible_gpus  # noqa: E402


def median_tokens_per_s(workdir: pathlib.Path) -> float:
    lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    return statistics.median(line['tokens_per_s'] for line in lines if line.get('tokens_per_s'))


def run(command: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f'{" ".join(command[:6])} ... failed:\n{result.stderr[-2000:]}')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--num_processes', type=int, default=2)
    parser.add_argument('--cpu_devices', type=int, default=8)
    parser.add_argument('--steps', type=int, default=100)
    parser.add_argument('--config', default='configs/small_lm.py')
    parser.add_argument('overrides', nargs=argparse.REMAINDER, help='-- then config overrides for both runs')
    args = parser.parse_args()
    overrides = args.overrides[1:] if args.overrides[:1] == ['--'] else args.overrides
    common = [
        '--config',
        args.config,
        f'--config.train.steps={args.steps}',
        f'--config.train.warmup_steps={min(10, args.steps // 2)}',
        '--config.train.log_every=10',
        '--config.data.eval_files=',
        '--config.checkpoint.every_steps=0',
        *overrides,
    ]
    env = dict(os.environ)
    if not visible_gpus():  # the single process gets the same simulated CPU devices the launcher splits
        flag = f'--xla_force_host_platform_device_count={args.cpu_devices}'
        env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=f'{env.get("XLA_FLAGS", "")} {flag}'.strip())
    with tempfile.TemporaryDirectory() as scratch:
        one, many = pathlib.Path(scratch) / 'one', pathlib.Path(scratch) / 'many'
        run([sys.executable, '-m', 'trainer', '--workdir', str(one), *common], env)
        launcher = [sys.executable, 'scripts/launch_local.py', '--num_processes', str(args.num_processes)]
        launcher += ['--cpu_devices', str(args.cpu_devices), '--']
        run([*launcher, sys.executable, '-m', 'trainer', '--workdir', str(many), *common], env)
        single, multi = median_tokens_per_s(one), median_tokens_per_s(many)
    print(f'1 process:  {single:,.0f} tokens/s')
    print(f'{args.num_processes} processes: {multi:,.0f} tokens/s')
    print(f'ratio {args.num_processes} processes / 1 process: {multi / single:.2f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
