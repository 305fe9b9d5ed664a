"""Greedy answers of models to the held-out "Who speaks these lines?" prompts of the instruction demo: how many
name the right speaker (case aside), and the first few answers (docs/finetune.md quotes them).

Usage: python scripts/who_speaks.py runs/small_lm runs/finetune_instruct runs/finetune_lora
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from trainer.inference import loading  # noqa: E402
from trainer.inference.decoding import Generator  # noqa: E402

EVAL = pathlib.Path(__file__).resolve().parents[1] / 'trainer' / 'sample_data' / 'finetune' / 'instruct_eval.jsonl'


def main() -> int:
    records = [json.loads(line) for line in EVAL.read_text().splitlines()]
    who = [r for r in records if 'prompt' in r and r['prompt'].startswith('Who speaks')]
    for model in sys.argv[1:]:
        loaded = loading.load(model, {'data': 1, 'fsdp': 1, 'tensor': 1})
        generator = Generator(loaded.graphdef, loaded.params, loaded.model_cfg, loaded.mesh)
        right, shown = 0, []
        for start in range(0, len(who), 32):
            chunk = who[start : start + 32]
            prompts = [loaded.tokenizer.encode(r['prompt']).tolist()[-200:] for r in chunk]
            results, _ = generator.generate(prompts, 24, stop_ids=loaded.tokenizer.stop_ids)
            for record, result in zip(chunk, results, strict=True):
                answer = loaded.tokenizer.decode(result.ids).split('\n')[0].strip()
                right += answer.lower() == record['completion'].strip().lower()
                if len(shown) < 4:
                    shown.append(f'{answer!r} for {record["completion"]!r}')
        print(f'{model}: {right} of {len(who)} right; first answers: {", ".join(shown)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
