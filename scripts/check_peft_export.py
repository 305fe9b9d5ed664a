"""Checks a LoRA export with Hugging Face peft: base + adapter folder gives the merged folder's logits.

Usage (in an environment with torch, transformers and peft; not this project's):
  python scripts/check_peft_export.py --base HF_DIR --adapter ADAPTER_DIR --merged MERGED_DIR

HF_DIR is the model the LoRA run started from; ADAPTER_DIR and MERGED_DIR are what
`scripts/convert_hf.py export --adapter` and `export` wrote from its checkpoint. Prints the largest
difference of the logits on random tokens and exits 1 above 1e-4 (relative to the largest logit).
"""

import argparse
import sys

import peft
import torch
import transformers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--base', required=True)
    parser.add_argument('--adapter', required=True)
    parser.add_argument('--merged', required=True)
    args = parser.parse_args()
    base = transformers.AutoModelForCausalLM.from_pretrained(args.base, torch_dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, args.adapter).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(args.merged, torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = merged(tokens).logits, adapted(tokens).logits
    error = float((actual - expected).abs().max() / expected.abs().max())
    print(f'peft base + adapter vs merged export: largest relative difference {error:.2e}')
    return 0 if error < 1e-4 else 1


if __name__ == '__main__':
    sys.exit(main())
