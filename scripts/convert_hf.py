"""Hugging Face model folders into this trainer's checkpoints, and checkpoints back into model folders.

Usage:
  python scripts/convert_hf.py import --hf_dir DIR --out CKPT
  python scripts/convert_hf.py export --checkpoint CKPT --out DIR [--dtype bfloat16] [--max_shard_gb 5] [--adapter]

import writes CKPT/0, a checkpoint of the folder's weights alone (in float32), which a run takes with
--config configs/finetune_hf.py:DIR --config.checkpoint.restore_from=CKPT (a run can also start straight
from DIR). export writes DIR, a folder that transformers' AutoModelForCausalLM.from_pretrained loads:
config.json (Llama, Mistral, Qwen2 or GPT-2, whichever computes the same), model.safetensors (split
into files of at most --max_shard_gb with an index above that), generation_config.json, and the
tokenizer files when the run used a Hugging Face tokenizer (from a model folder: its special tokens, chat
template and generation_config.json, every stop id and sampling default, travel with it). A LoRA run's
adapters are merged into the weights, and a muP model's multipliers folded into them (the same logits
from a standard model); with --adapter the adapters are written alone instead, as a PEFT folder
(adapter_config.json, adapter_model.safetensors) for the base model. CKPT is a checkpoint
(.../checkpoints/600) or a folder of them (its newest is used). Both write under a temporary name and rename
at the end.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from trainer.data import tokenizers  # noqa: E402
from trainer.errors import ConfigError  # noqa: E402
from trainer.hf import config as hf_config  # noqa: E402
from trainer.hf import folder as hf_folder  # noqa: E402
from trainer.inference import loading  # noqa: E402
from trainer.modeling import lora, model_setup  # noqa: E402
from trainer.training import checkpoints  # noqa: E402


def import_folder(hf_dir: str, out: pathlib.Path) -> pathlib.Path:
    """Writes the weights of the Hugging Face folder `hf_dir` as a params-only checkpoint; returns its folder."""
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f'--out {out} exists and is not empty: remove it or give another folder.')
    loaded = loading.load(hf_dir)  # read straight into the shardings of all this host's devices
    temporary = out.with_name(f'.{out.name}.incomplete')
    shutil.rmtree(temporary, ignore_errors=True)
    with jax.set_mesh(loaded.mesh):
        checkpoints.save_params(temporary, loaded.params, loaded.config.to_json_best_effort())
    if out.exists():
        out.rmdir()  # empty, checked above
    temporary.rename(out)
    return out / '0'


def export_checkpoint(
    checkpoint: str, out: pathlib.Path, dtype: str, max_shard_bytes: int, adapter: bool = False
) -> pathlib.Path:
    """Writes the parameters of `checkpoint` as a Hugging Face folder at `out` (LoRA adapters merged in), or with
    `adapter` its LoRA adapters alone as a PEFT folder; returns the checkpoint used."""
    folder = checkpoints.find_checkpoint(checkpoint, '--checkpoint')
    config, params = checkpoints.read_params(folder)
    config.mesh.rules = ()
    model_cfg = model_setup.model_config(config)
    if model_cfg.head != 'lm':
        raise ConfigError(f'{folder} is a classifier: only language models export to Hugging Face folders.')
    host_params = jax.tree.map(np.asarray, params)
    if adapter:
        if not model_cfg.lora_rank:
            raise ConfigError(f'{folder} has no LoRA adapters (config.lora.rank=0): export the whole model instead.')
        base = config.checkpoint.restore_from if hf_config.is_model_folder(config.checkpoint.restore_from) else ''
        lora.write_peft(host_params, model_cfg, base, out)
        return folder
    host_params, model_cfg = lora.merge(host_params, model_cfg)
    host_params, model_cfg = hf_folder.fold_parametrization(host_params, model_cfg)
    try:
        tokenizer = tokenizers.make_tokenizer(config.data.tokenizer, config.data.eos_token)
    except ConfigError:  # the run's tokenizer file is not on this machine: no ids in config.json
        tokenizer = None
    hf_folder.write(
        host_params, model_cfg, config.model.to_dict(), tokenizer, config.data.tokenizer, out, dtype, max_shard_bytes
    )
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest='verb', required=True)
    importing = verbs.add_parser('import', help='a Hugging Face folder -> a params-only checkpoint')
    importing.add_argument('--hf_dir', required=True, help='a Hugging Face model folder')
    importing.add_argument('--out', required=True, type=pathlib.Path, help='the checkpoint folder to write')
    exporting = verbs.add_parser('export', help='a checkpoint -> a Hugging Face folder')
    exporting.add_argument('--checkpoint', required=True, help='a checkpoint folder, or a folder of them')
    exporting.add_argument('--out', required=True, type=pathlib.Path, help='the model folder to write')
    exporting.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
    exporting.add_argument('--max_shard_gb', type=float, default=5.0, help='largest weight file, in GiB')
    exporting.add_argument(
        '--adapter', action='store_true', help='write the LoRA adapters alone, as a PEFT folder (default: merged)'
    )
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        if args.verb == 'import':
            written = import_folder(args.hf_dir, args.out)
            print(f'imported {args.hf_dir} into {written} in {time.perf_counter() - start:.1f}s')
        else:
            used = export_checkpoint(
                args.checkpoint, args.out, args.dtype, int(args.max_shard_gb * 2**30), args.adapter
            )
            what = 'LoRA adapters (PEFT)' if args.adapter else args.dtype
            print(f'exported {used} ({what}) to {args.out} in {time.perf_counter() - start:.1f}s')
    except ConfigError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
