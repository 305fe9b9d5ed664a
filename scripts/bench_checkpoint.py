"""Checkpoint costs on this machine: how long a save blocks training, its total time, restore time and size.

Usage: python scripts/bench_checkpoint.py [--repeats 3]

For configs/small_lm.py and a ~100M-parameter variant of it: the blocking part of an asynchronous save
(what the training loop waits for), the total save time (until the files are complete), the restore
time onto the same mesh, the size on disk, and one train step's time, so that the blocking time can be
read as a share of a checkpoint interval (config.checkpoint.every_steps steps).
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from configs import small_lm  # noqa: E402
from trainer.data import pipeline, tokenizers  # noqa: E402
from trainer.runtime import mesh as mesh_lib  # noqa: E402
from trainer.training import (
    checkpoints,
    train,  # noqa: E402
)


def config_100m():
    config = small_lm.get_config()
    config.model.update(num_layers=14, d_model=768, num_heads=12, num_kv_heads=12, d_ff=2048)
    return config


def measure(name: str, config, repeats: int) -> None:
    mesh = mesh_lib.make_mesh({axis: config.mesh[axis] for axis in mesh_lib.MESH_AXES})
    with jax.set_mesh(mesh), tempfile.TemporaryDirectory() as tmp:
        setup = train.build(config, mesh)
        data = pipeline.train_batches(config, tokenizers.make_tokenizer('byte'), setup.batch_sharding)
        current, metrics = setup.compiled.train(setup.sharded.state, next(data))
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        current, metrics = setup.compiled.train(current, next(data))
        jax.block_until_ready(metrics)
        step_time = time.perf_counter() - start
        blocking, total, restore = [], [], []
        for repeat in range(repeats):
            folder = pathlib.Path(tmp) / f'ck{repeat}'
            checkpointer = checkpoints.Checkpointer(folder, config.checkpoint, config.to_json_best_effort())
            start = time.perf_counter()
            checkpointer.save(2, current, data)
            blocking.append(time.perf_counter() - start)
            checkpointer.wait()
            total.append(time.perf_counter() - start)
            size = sum(f.stat().st_size for f in folder.rglob('*') if f.is_file())
            start = time.perf_counter()
            restored = checkpointer.restore_latest(current)
            jax.block_until_ready(restored.state)
            restore.append(time.perf_counter() - start)
            checkpointer.close()
            shutil.rmtree(folder)
        data.close()
    params = sum(x.size for x in jax.tree.leaves(current.params))
    interval = config.checkpoint.every_steps * step_time
    print(f'{name}: {params / 1e6:.1f}M params, checkpoint {size / 2**20:.0f} MiB; train step {step_time:.2f}s')
    print(
        f'  save blocks {min(blocking):.3f}s (first {blocking[0]:.3f}s), complete after {min(total):.2f}s, '
        f'restore {min(restore):.2f}s; blocking = {100 * min(blocking) / interval:.3f}% of a '
        f'{config.checkpoint.every_steps}-step interval'
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    print(f'devices: {jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}')
    measure('configs/small_lm.py', small_lm.get_config(), args.repeats)
    measure('~100M variant (14 layers, d_model 768, d_ff 2048)', config_100m(), args.repeats)
    return 0


if __name__ == '__main__':
    sys.exit(main())
