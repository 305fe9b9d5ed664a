#!/usr/bin/env bash
# Reruns the losses and accuracies the README and docs/finetune.md quote, in this checkout, one after another,
# and prints each with the Python and jax that made it. Run it in a fresh clone of the commit the docs describe,
# inside the venv the README's first command makes (about 15 minutes on a 2-core CPU):
#   bash scripts/docs_figures.sh [OUT_DIR]      (default runs/docs_figures; each run's log is kept there)
# Losses reproduce exactly for a given commit, Python and jax (the data order, init and steps are
# deterministic); times and tokens/s depend on the machine and on what else it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/docs_figures}"
mkdir -p "$out"
python - <<'EOF'
import platform, jax
print(f'python {platform.python_version()}, jax {jax.__version__}, commit', end=' ', flush=True)
EOF
git rev-parse --short HEAD

run() {  # name, then the command; prints the command's last lines and its wall time
  local name="$1"; shift
  local start=$SECONDS
  "$@" > "$out/$name.log" 2>&1
  echo "== $name ($((SECONDS - start)) s): $*"
  grep -E "eval_loss|^done:|accuracy|right|nats/token|tok/s" "$out/$name.log" | tail -6 || true
}

skip() { [ -f "$out/$1.log" ] && grep -q "^done:\|nats/\|accuracy\|right" "$out/$1.log"; }  # rerun in place: done parts kept
skip small_lm || run small_lm python -m trainer --config configs/small_lm.py --workdir runs/small_lm
skip before_finetune || run before_finetune python -m trainer.evaluate --model runs/small_lm \
  --files trainer/sample_data/finetune/instruct_eval.jsonl --format sft --seq_len 256
skip finetune_instruct || run finetune_instruct python -m trainer --config configs/finetune_instruct.py --workdir runs/finetune_instruct
skip finetune_lora || run finetune_lora python -m trainer --config configs/finetune_lora.py --workdir runs/finetune_lora
skip classify_play || run classify_play python -m trainer --config configs/classify_play.py --workdir runs/classify_play
skip classify_eval || run classify_eval python -m trainer.evaluate --model runs/classify_play \
  --files trainer/sample_data/finetune/play_eval.jsonl
skip who_speaks || run who_speaks python scripts/who_speaks.py runs/small_lm runs/finetune_instruct runs/finetune_lora
run generate python -m trainer.generate --model runs/small_lm --prompt "ROMEO:" --seed 3
cat "$out/generate.log"
