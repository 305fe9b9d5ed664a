#!/usr/bin/env bash
# Every GPU path of the project in one call on a lent NVIDIA GPU, within a fixed time (docs/performance.md):
# the install, the bf16 matmul and copy ceilings, GPT-2 124M and a ~1B Llama through scripts/bench.py,
# `pytest -m gpu`, decoding speed, the XLA GPU flags off, and (on the other CPU cores, beside it all) the whole
# suite. Sections run in order of importance; each gets what is left of DEADLINE seconds, so the summary is
# always printed. Logs go to $OUT (the device tool brings them back), or to /tmp/gpu_check elsewhere.
#
#   bash scripts/gpu_check.sh            # wheels the machine lacks in .whl/ (docs/performance.md says which)
#   SECTIONS='generate_1b pytest_gpu' SUITE=0 DEADLINE=300 bash scripts/gpu_check.sh   # some sections only
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
DEADLINE=${DEADLINE:-420}
export PYTHONUNBUFFERED=1
# Compiled programs kept for the run: trainer.training.train compiles the step bench.py has just compiled.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/gpu_check_jax_cache} JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
log() { echo "== $(date -u +%T) [${SECONDS}s] $*" | tee -a "$OUT/log.txt"; }
# run SECONDS_AT_MOST NAME COMMAND...: the command under a timeout of what is left, its output to the log.
run() {
  local most=$1 name=$2 left=$((DEADLINE - SECONDS - 15))
  shift 2
  if [ -n "${SECTIONS:-}" ] && [[ " $SECTIONS " != *" $name "* ]]; then return; fi
  ((left < most)) && most=$left
  if ((most < 20)); then log "$name: skipped, ${left}s left"; return; fi
  log "$name (at most ${most}s): $*"
  timeout -k 5 "$most" "$@" 2>&1 | tee -a "$OUT/log.txt" | tee "$OUT/$name.txt" >/dev/null
  log "$name: exit ${PIPESTATUS[0]}"
}

# PY set: that interpreter as it is (a dry run of this script elsewhere); else a fresh venv over the image's
# jax[cuda] (the machine reaches no registry: the CUDA extra's packages are the image's) with the carried wheels
# and this project installed, or, should that fail, the wheels on PYTHONPATH.
if [ -z "${PY:-}" ]; then
  log "install: a fresh venv over the image's jax[cuda]; carried wheels; this project"
  if python3 -m venv --system-site-packages /tmp/venv && /tmp/venv/bin/pip install -q --no-index --no-deps \
    --no-build-isolation --no-compile .whl/*.whl -e . 2>&1 | tail -3 | tee -a "$OUT/log.txt" \
    && [ "${PIPESTATUS[0]}" = 0 ]; then
    PY=/tmp/venv/bin/python
  else
    log "install: the venv failed; the wheels go on PYTHONPATH instead"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -3
    export PYTHONPATH="/tmp/site:$PWD"
    PY=python3
  fi
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv \
  | tee -a "$OUT/log.txt"
"$PY" -c 'import jax, flax, optax, orbax.checkpoint as o, grain; print("python", __import__("sys").version.split()[0],
  "jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "grain", grain.__version__,
  "devices", jax.devices())' 2>&1 | tee -a "$OUT/log.txt"

# The whole suite on the CPU cores 8-15 (JAX_PLATFORMS=cpu, no GPU visible), beside the GPU work on cores 0-7.
GPU="" SUITE_CORES=""
if command -v taskset >/dev/null; then GPU="taskset -c 0-7" SUITE_CORES="taskset -c 8-15"; fi
if [ "${SUITE:-1}" = 1 ]; then
  log "suite: pytest -n 6 in the background, CPU only"
  (CUDA_VISIBLE_DEVICES='' JAX_PLATFORMS=cpu timeout -k 5 $((DEADLINE - 40)) $SUITE_CORES \
    "$PY" -m pytest -q -n 6 -p no:cacheprovider >"$OUT/suite.txt" 2>&1; echo "suite exit $?" >>"$OUT/suite.txt") &
fi

run 60 ceilings $GPU "$PY" - <<'EOF'
import time, jax, jax.numpy as jnp
def timed(f, *a, n=20):
    f(*a).block_until_ready()
    t = time.perf_counter()
    for _ in range(n): out = f(*a)
    out.block_until_ready()
    return (time.perf_counter() - t) / n
x = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
print(f'bf16 8192^3 matmul, random operands: {2 * 8192**3 / timed(jax.jit(lambda a: a @ a), x) / 1e12:.0f} TFLOP/s')
y = jax.random.normal(jax.random.key(1), (2**30,), jnp.float32)  # 4 GiB
print(f'device copy: {2 * y.nbytes / timed(jax.jit(lambda a: a * 2), y) / 1e12:.2f} TB/s (read + write)')
EOF

GPT2="--config configs/gpt2_small_lm.py --config.mesh.fsdp=1 --config.model.num_layers=12 --config.model.d_model=768
  --config.model.num_heads=12 --config.model.num_kv_heads=12 --config.model.d_ff=3072 --config.model.vocab_size=50257
  --config.model.vocab_multiple=128 --config.model.max_seq_len=1024 --config.data.seq_len=1024
  --config.train.global_batch_size=32 --config.model.attention_impl=cudnn"
LLAMA_1B="--config configs/small_lm.py --config.mesh.fsdp=1 --config.model.num_layers=22 --config.model.d_model=2048
  --config.model.num_heads=32 --config.model.num_kv_heads=4 --config.model.d_ff=5632 --config.model.vocab_size=32000
  --config.model.max_seq_len=2048 --config.data.seq_len=2048 --config.train.global_batch_size=8
  --config.model.scan_layers=True --config.model.attention_impl=cudnn"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
# shellcheck disable=SC2086
run 120 bench_gpt2 $GPU "$PY" scripts/bench.py $GPT2 --steps 10 --framework first --json \
  --variant 'xla:model.attention_impl=xla' --variant 'bound128:model.attention_max_segments=128'
XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda,cpu run 120 pytest_gpu $GPU "$PY" -m pytest -m gpu -n 0 -v \
  -p no:cacheprovider tests
# shellcheck disable=SC2086
run 180 bench_1b $GPU "$PY" scripts/bench.py $LLAMA_1B --steps 10 --framework first --json \
  --variant 'remat_attn:model.remat=attention_outputs' --variant 'xla:model.attention_impl=xla'
unset XLA_PYTHON_CLIENT_MEM_FRACTION
run 90 generate_1b $GPU "$PY" scripts/bench_generate.py --models 1b,100m --repeats 2 --bandwidth 4.8e12
# shellcheck disable=SC2086
XLA_FLAGS='' run 80 bench_1b_no_flags $GPU "$PY" scripts/bench.py $LLAMA_1B --steps 10 --framework none --json \
  --config.train.xla_gpu_flags=False

log "waiting for the suite"
wait
[ -f "$OUT/suite.txt" ] && tail -5 "$OUT/suite.txt" | tee -a "$OUT/log.txt"
log "summary"
"$PY" - "$OUT"/bench_gpt2.txt "$OUT"/bench_1b.txt "$OUT"/bench_1b_no_flags.txt <<'EOF' 2>&1 | tee -a "$OUT/log.txt"
import json, pathlib, sys
for path in map(pathlib.Path, sys.argv[1:]):
    lines = path.read_text().splitlines() if path.exists() else []
    for r in (json.loads(line) for line in lines if line.startswith('{')):
        if 'error' in r:
            print(f'{path.stem} {r["name"]} failed: {r["error"]}')
            continue
        framework = f'{r["tokens_per_s"]:,.0f}' if r['tokens_per_s'] else '-'
        peak = (r['device_peak_bytes'] or 0) / 2**30
        print(
            f'{path.stem} {r["name"]}: compile {r["compile_s"]:.0f}s, bare {r["bare_tokens_per_s"]:,.0f} tok/s '
            f'({r["bare_step_s"] * 1e3:.1f} ms/step), framework {framework} tok/s, MFU ({r["mfu_of"]}) '
            f'{r["mfu"]:.1%} of the datasheet, {r["mfu_vs_measured_matmul"]:.1%} of the measured matmul '
            f'({r["measured_matmul_flops"] / 1e12:.0f} TFLOP/s); compiled {r["memory_bytes"] / 2**30:.1f} GiB, '
            f'device peak so far {peak:.1f} GiB'
        )
EOF
grep -E 'passed|failed|error' "$OUT/pytest_gpu.txt" 2>/dev/null | tail -3
grep -E 'batch|parameters' "$OUT/generate_1b.txt" 2>/dev/null
log "done"
