"""Decode and prefill speed: tokens/s of trainer.inference.decoding for the default model, a ~100M and a ~1B shape.

Usage:
  python scripts/bench_generate.py [--models small,100m] [--prompt_tokens 128] [--new_tokens 128] [--repeats 3]
      [--batch_sizes 1,8] [--max_seq_len N]

Random weights (speed does not depend on them), greedy, no stop token, so every row decodes all its
tokens. Prints, per model and batch size (1 and 8): compile time (prefill and step, once), prefill
tokens/s (prompt tokens / prefill time) and decode tokens/s (new tokens of all rows / decode time), the
best of --repeats, and for decode the fraction of a memory-bandwidth bound when --bandwidth is given
(params bytes as stored x steps / s / bandwidth: each step reads every parameter once).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import small_lm  # noqa: E402
from trainer.inference.decoding import Generator  # noqa: E402
from trainer.runtime import mesh as mesh_lib  # noqa: E402
from trainer.training import train  # noqa: E402


def config_100m():
    """The ~100M variant of scripts/bench_checkpoint.py, with room for prompt and reply."""
    config = small_lm.get_config()
    config.model.update(num_layers=14, d_model=768, num_heads=12, num_kv_heads=4, d_ff=2048, max_seq_len=512)
    return config


def config_1b():
    """TinyLlama's shape (1.1B parameters, bf16 compute), as in docs/performance.md's training benchmark."""
    config = small_lm.get_config()
    config.model.update(
        num_layers=22, d_model=2048, num_heads=32, num_kv_heads=4, d_ff=5632, vocab_size=32000, max_seq_len=2048
    )
    config.model.scan_layers = True
    return config


MODELS = {'small': ('configs/small_lm.py', small_lm.get_config), '100m': ('~100M variant', config_100m)}
MODELS['1b'] = ('~1B (TinyLlama shape)', config_1b)


def measure(
    name: str, config, prompt_tokens: int, new_tokens: int, repeats: int, bandwidth: float, batch_sizes: list[int]
) -> None:
    config.mesh.update(data=1, fsdp=1, tensor=1)
    mesh = mesh_lib.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
    with jax.set_mesh(mesh):
        setup = train.build(config, mesh)
        params = setup.sharded.state.params
    generator = Generator(setup.sharded.graphdef, params, setup.model_cfg, mesh)
    params_bytes = (
        sum(x.nbytes for x in jax.tree.leaves(params)) * (2 if config.model.dtype == 'bfloat16' else 4) // 4
    )  # read in the compute dtype
    print(f'{name}: {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.1f}M parameters, {config.model.dtype} compute')
    rng = np.random.default_rng(0)
    for batch in batch_sizes:
        prompts = rng.integers(1, setup.model_cfg.vocab_size, (batch, prompt_tokens)).tolist()
        runs = [generator.generate(prompts, new_tokens) for _ in range(repeats)]
        compile_s = runs[0][1].compile_s
        prefill = max(batch * prompt_tokens / t.prefill_s for _, t in runs)
        decode = max(t.new_tokens / t.decode_s for _, t in runs)
        line = f'  batch {batch}: compile {compile_s:.1f}s | prefill {prefill:,.0f} tokens/s | '
        line += f'decode {decode:,.0f} tokens/s ({batch / decode * 1e3:.0f} ms per step)'
        if bandwidth:
            line += f' ({params_bytes * decode / batch / bandwidth:.1%} of the bandwidth bound)'
        print(line, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', default='small,100m', help=f'comma-separated, of {", ".join(MODELS)}')
    parser.add_argument('--prompt_tokens', type=int, default=128)
    parser.add_argument('--new_tokens', type=int, default=120)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--batch_sizes', default='1,8', help='comma-separated rows per batch')
    parser.add_argument('--max_seq_len', type=int, default=0, help="the models' context instead of their own")
    parser.add_argument('--bandwidth', type=float, default=0.0, help='memory bandwidth in bytes/s (H100: 3.35e12)')
    args = parser.parse_args()
    print(f'devices: {jax.devices()[0].device_kind}, jax {jax.__version__}')
    names = args.models.split(',')
    if unknown := [name for name in names if name not in MODELS]:
        parser.error(f'--models: unknown {", ".join(unknown)}; choose from {", ".join(MODELS)}')
    for name in names:
        title, make_config = MODELS[name]
        config = make_config()
        if args.max_seq_len:
            config.model.max_seq_len = args.max_seq_len
        batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
        measure(title, config, args.prompt_tokens, args.new_tokens, args.repeats, args.bandwidth, batch_sizes)
    return 0


if __name__ == '__main__':
    sys.exit(main())
