"""Writes a params-only copy of a training checkpoint (optionally in bfloat16), for inference and sharing.

Usage:
  python scripts/export_params.py --checkpoint runs/small_lm/checkpoints --output exported/small_lm [--dtype bfloat16]

--checkpoint is a checkpoint (.../checkpoints/600) or a folder of them (its newest is used); a LoRA
run's adapters are merged into the weights (the config says rank 0). The output
folder gets `params/` (an orbax checkpoint of the parameter tree alone, about a third of the training
checkpoint: no optimizer moments) and `config.json` (the run's config, for rebuilding the model).
Load it with `orbax.checkpoint.StandardCheckpointer().restore(output / 'params')`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from trainer.errors import ConfigError  # noqa: E402
from trainer.modeling import lora, model_setup  # noqa: E402
from trainer.training import checkpoints  # noqa: E402


def export(checkpoint: str, output: pathlib.Path, dtype: str) -> pathlib.Path:
    """Exports the parameters of `checkpoint` into `output`; returns the checkpoint folder used."""
    folder = checkpoints.find_checkpoint(checkpoint, '--checkpoint')
    config, params = checkpoints.read_params(folder)  # whole, on the host: whatever mesh trained it
    params, _ = lora.merge(jax.tree.map(np.asarray, params), model_setup.model_config(config))
    config.lora.rank = 0  # merged: a plain model
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.dtype(dtype)), params)
    output.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as saver:
        saver.save((output / 'params').absolute(), params, force=True)
    (output / 'config.json').write_text(config.to_json_best_effort(indent=2) + '\n')
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--checkpoint', required=True, help='a checkpoint folder, or a folder of them')
    parser.add_argument('--output', required=True, type=pathlib.Path)
    parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
    args = parser.parse_args()
    try:
        folder = export(args.checkpoint, args.output, args.dtype)
    except ConfigError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    print(f'exported the parameters of {folder} ({args.dtype}) to {args.output}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
