"""Training speed of a config, and of variants of it side by side: the framework's loop against a bare one.

Usage:
  python scripts/bench.py --config configs/small_lm.py [--config.x.y=value ...] [--steps 30] [--repeats 3]
      [--variant 'f32:model.dtype=float32' --variant 'remat:model.remat=full'] [--json]

For the config and each variant (the config with `key=value,...` overrides), in one process, one after
another:
- compile time of the train step (lowered and compiled ahead of time);
- the framework: `trainer.training.train` itself (grain pipeline, metrics, the host one step ahead), its tokens/s
  from metrics.jsonl, the best of three logged intervals of --steps steps (compilation left out);
- the bare loop: the same jitted step on one fixed batch, no pipeline, no metrics fetched, the
  best of three timings of --steps steps; the framework's overhead is 1 - framework / bare;
- MFU of both against the datasheet peak (or on CPU the measured bf16 matmul peak trainer.runtime.flops uses)
  and against a matmul peak measured here in the compute dtype;
- memory: the device's peak bytes (GPU `memory_stats`) or the compiled step's memory analysis.

With --pairs N, also the training loop's own per-step work (fresh batches, dispatch, two steps in flight)
against the bare step, in N alternating back-to-back pairs: the median ratio (the framework's overhead above
compares two timings taken a minute apart, which a shared machine's drift moves by several percent).

With --repeats N, each config is measured N times (bare loop, then framework, each time) and every figure
is the median: on a shared machine a slow minute then moves one pair, not the result.

Speeds are ratios measured in one run on one machine: quote them so, never as absolute numbers from a
shared machine. --json prints one JSON object per line.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_dict, config_flags  # noqa: E402

from trainer import cli  # noqa: E402
from trainer.data import pipeline, tokenizers  # noqa: E402
from trainer.errors import ConfigError  # noqa: E402
from trainer.modeling import counts, model_setup  # noqa: E402
from trainer.runtime import flops, xla_flags  # noqa: E402
from trainer.runtime import mesh as mesh_lib  # noqa: E402
from trainer.training import train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A config file, as for python -m trainer.')
_STEPS = flags.DEFINE_integer('steps', 30, 'Timed steps per measurement (after one compiling step).')
_VARIANTS = flags.DEFINE_multi_string('variant', [], "'name:key=value,key=value': the config with these overrides.")
_JSON = flags.DEFINE_bool('json', False, 'One JSON object per measured config instead of a table.')
_PAIRS = flags.DEFINE_integer(
    'pairs', 0, "Also time the loop's per-step work against the bare step in this many alternating pairs (0 = not)."
)
_REPEATS = flags.DEFINE_integer(
    'repeats', 1, 'Measure each config this many times, bare loop and framework in turn; report the medians.'
)
_FRAMEWORK = flags.DEFINE_enum(
    'framework',
    'all',
    ['all', 'first', 'none'],
    'Time trainer.training.train itself for every config, for the first only (variants get the bare loop alone: on a '
    'leased GPU each framework run costs a second compilation), or for none.',
)
_MATMUL_SIZE = flags.DEFINE_integer(
    'matmul_size', 0, 'Side of the measured square matmul; 0 = 1024 on CPU, 8192 on accelerators (to fill the chip).'
)


def variant(base: config_dict.ConfigDict, spec: str) -> tuple[str, config_dict.ConfigDict]:
    """('name', base with the overrides of 'name:key=value,...'), values typed like the fields they replace."""
    name, _, settings = spec.partition(':')
    config = base.copy_and_resolve_references()
    for setting in filter(None, settings.split(',')):
        key, _, value = setting.partition('=')
        section, _, field = key.strip().rpartition('.')
        holder = config[section] if section else config
        if field not in holder:
            raise ConfigError(f'--variant {spec!r}: {key} names no field of the config.')
        old = holder[field]
        holder[field] = value.lower() in ('1', 'true') if isinstance(old, bool) else type(old)(value)
    return name or 'variant', config


def framework_speed(config: config_dict.ConfigDict, steps: int) -> float:
    """tokens/s of trainer.training.train: the best of three logged intervals of `steps` steps after the compiling one.

    The best of three, as for the bare loop, so that the overhead compares like with like.
    """
    config = config.copy_and_resolve_references()
    warmup = min(config.train.warmup_steps, steps)
    config.train.update(steps=3 * steps + 1, log_every=steps, eval_every=0, warmup_steps=warmup)
    config.data.eval_files = ''
    config.checkpoint.update(every_steps=0, every_minutes=0.0, restore_from='')
    with tempfile.TemporaryDirectory() as workdir:
        train.train(config, pathlib.Path(workdir))
        lines = [json.loads(line) for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]
    # The first interval holds steps-1 timed steps (the compiling one is left out), the last only one.
    return max(line['tokens_per_s'] for line in lines[:3] if line.get('tokens_per_s'))


def paired_loop_overhead(compiled, state, batch, data, steps: int, pairs: int) -> tuple[Any, list[float]]:
    """The training loop's own per-step work (a fresh batch from the pipeline, dispatch under the transfer guard,
    at most two steps in flight, as trainer.training.train does) against the bare step, timed in alternating pairs.

    Back to back and in alternating order, each pair sees the same machine: on a shared, noisy one the
    median of the pairs' ratios measures what the loop costs where two separate timings cannot.
    """

    def bare(state):
        for _ in range(steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        return state

    def loop(state):
        previous = None
        for _ in range(steps):
            fresh = next(data)
            with jax.transfer_guard('disallow'):
                state, metrics = compiled(state, fresh)
            if previous is not None:
                jax.block_until_ready(previous)
            previous = metrics
        jax.block_until_ready(metrics)
        return state

    overheads = []
    for pair in range(pairs):
        seconds = {}
        for name, run in (('bare', bare), ('loop', loop))[:: 1 if pair % 2 == 0 else -1]:
            start = time.perf_counter()
            state = run(state)
            seconds[name] = time.perf_counter() - start
        overheads.append(seconds['loop'] / seconds['bare'] - 1)
    return state, overheads


def measure(name: str, config: config_dict.ConfigDict, steps: int, with_framework: bool = True) -> dict:
    """Every figure of one config (without trainer.training.train's own speed unless `with_framework`)."""
    train.config_checks.validate(config, jax.device_count())
    mesh = mesh_lib.make_mesh({axis: config.mesh[axis] for axis in mesh_lib.MESH_AXES})
    tokenizer = tokenizers.make_tokenizer(config.data.tokenizer, config.data.eos_token)
    tokens_per_step = config.train.global_batch_size * config.data.seq_len
    with jax.set_mesh(mesh):
        setup = train.build(config, mesh)
        # Closed on any failure too: a failed variant's pipeline threads must not go on filling batches.
        with contextlib.closing(pipeline.train_batches(config, tokenizer, setup.batch_sharding)) as data:
            batch = next(data)
            start = time.perf_counter()
            compiled = setup.compiled.train.lower(setup.sharded.abstract, batch).compile()
            compile_s = time.perf_counter() - start
            state = setup.sharded.state
            state, metrics = compiled(state, batch)  # warm
            jax.block_until_ready(metrics)
            best = float('inf')
            for _ in range(3):
                start = time.perf_counter()
                for _ in range(steps):
                    state, metrics = compiled(state, batch)
                jax.block_until_ready(metrics)
                best = min(best, time.perf_counter() - start)
            state, loop_overheads = paired_loop_overhead(compiled, state, batch, data, steps, _PAIRS.value)
        analysis = compiled.memory_analysis()
        memory = analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
        memory += analysis.output_size_in_bytes - analysis.alias_size_in_bytes
        # The device's peak is the process's so far: variants measured after a bigger one report its peak.
        stats = jax.devices()[0].memory_stats() if jax.default_backend() == 'gpu' else None
        device_peak = stats.get('peak_bytes_in_use') if stats else None
        peak, peak_source = flops.peak_flops_per_device(mesh, config.model.dtype, config.train.peak_flops_per_device)
        size = _MATMUL_SIZE.value or (1024 if jax.default_backend() == 'cpu' else 8192)
        matmul_peak = flops.measure_matmul_flops(mesh, config.model.dtype, size=size)
        del state
    bare = steps * tokens_per_step / best
    framework = framework_speed(config, steps) if with_framework else None
    speed = framework or bare  # MFU of the framework where it was timed, else of the bare loop
    per_token = counts.count(model_setup.model_config(config), config.data.seq_len).train_flops_per_token
    devices = mesh.devices.size
    return {
        'name': name,
        'devices': devices,
        'device_kind': jax.devices()[0].device_kind,
        'jax': jax.__version__,
        'compile_s': compile_s,
        'bare_step_s': best / steps,
        'bare_tokens_per_s': bare,
        'tokens_per_s': framework,
        'tokens_per_s_per_device': framework / devices if framework else None,
        'overhead': 1 - framework / bare if framework else None,
        'loop_overhead_pairs': loop_overheads,
        'loop_overhead': statistics.median(loop_overheads) if loop_overheads else None,
        'flops_per_token': per_token,
        'mfu_of': 'framework' if framework else 'bare loop',
        'mfu': per_token * speed / (peak * devices) if peak else None,
        'peak_flops': peak,
        'peak_source': peak_source,
        'mfu_vs_measured_matmul': per_token * speed / (matmul_peak * devices),
        'measured_matmul_flops': matmul_peak,
        'measured_matmul_size': size,
        'memory_bytes': memory,  # the compiled step's arguments, temporaries and outputs
        'device_peak_bytes': device_peak,
    }


def median_of(repeats: list[dict]) -> dict:
    """One result whose every figure is the median over the repeats (each pair of bare loop and framework was
    measured back to back, so the median overhead is that of a pair, not of two medians)."""
    merged = dict(repeats[0])
    for key, value in merged.items():
        if isinstance(value, float) and all(r[key] is not None for r in repeats):
            merged[key] = float(statistics.median(r[key] for r in repeats))
    merged['repeats'] = len(repeats)
    merged['overheads'] = [r['overhead'] for r in repeats if r['overhead'] is not None]
    merged['loop_overhead_pairs'] = [ratio for r in repeats for ratio in r['loop_overhead_pairs']]
    if merged['loop_overhead_pairs']:
        merged['loop_overhead'] = statistics.median(merged['loop_overhead_pairs'])
    return merged


def _optional(value: float | None, form: str) -> str:
    """`value` in format `form` ('>9.0f'), or '-' right-aligned to the same width where it was not measured."""
    return format(value, form) if value is not None else '-'.rjust(int(form[1:].split('.')[0]))


def print_table(results: list[dict]) -> None:
    """The results as a table; ratios are to the first config that ran, bare loop to bare loop."""
    head = next(r for r in results if 'error' not in r)
    print(
        f'{head["devices"]} x {head["device_kind"]}, jax {head["jax"]}, {_STEPS.value} steps each, '
        f'median of {_REPEATS.value} measurement(s)'
    )
    print(
        f'{"":>12} {"compile":>8} {"tok/s":>9} {"/device":>9} {"bare tok/s":>10} {"overhead":>8} {"MFU":>6} '
        f'{"MFU*":>6} {"memory":>9} {"ratio":>6}'
    )
    for r in results:
        if 'error' in r:
            print(f'{r["name"]:>12} failed: {r["error"]}')
            continue
        print(
            f'{r["name"]:>12} {r["compile_s"]:>7.1f}s {_optional(r["tokens_per_s"], ">9.0f")} '
            f'{_optional(r["tokens_per_s_per_device"], ">9.0f")} {r["bare_tokens_per_s"]:>10.0f} '
            f'{_optional(r["overhead"], ">8.1%")} {_optional(r["mfu"], ">6.1%")} {r["mfu_vs_measured_matmul"]:>6.1%} '
            f'{r["memory_bytes"] / 2**20:>7.0f}MB {r["bare_tokens_per_s"] / head["bare_tokens_per_s"]:>6.2f}'
        )
    print(
        f'MFU: against {head["peak_source"]} | MFU*: against a {head["measured_matmul_size"]}-square matmul measured '
        'here in the compute dtype | both of the framework where timed, else of the bare loop | ratio: bare loops'
    )
    for r in results:
        if r.get('loop_overhead') is not None:
            print(
                f"{r['name']}: the loop's per-step work costs {r['loop_overhead']:+.1%} of the bare step "
                f'(median of {_PAIRS.value} alternating pairs of {_STEPS.value} steps)'
            )


def main(argv: list[str]) -> int:
    cli.start(argv)
    try:
        base = _CONFIG.value
        xla_flags.apply(base.train.xla_gpu_flags)  # as python -m trainer does, before a backend starts
        runs = [('config', base)] + [variant(base, spec) for spec in _VARIANTS.value]
        for _, config in runs:  # every config's mistakes before the first measurement
            train.config_checks.validate(config, jax.device_count())
        results = []
        for index, (name, config) in enumerate(runs):
            framework = _FRAMEWORK.value == 'all' or (_FRAMEWORK.value == 'first' and index == 0)
            try:
                measured = [measure(name, config, _STEPS.value, framework) for _ in range(_REPEATS.value)]
            except ConfigError:
                raise
            except Exception as error:  # out of memory, a kernel the backend lacks: the other variants still run
                results.append({'name': name, 'error': f'{type(error).__name__}: {str(error).strip().splitlines()[0]}'})
                print(f'{name}: failed: {results[-1]["error"]}', file=sys.stderr, flush=True)
            else:
                results.append(median_of(measured))
            if _JSON.value:
                print(json.dumps(results[-1]), flush=True)
    except ConfigError as error:
        cli.fail(str(error))
    if all('error' in r for r in results):
        print(f'error: every config failed; the first: {results[0]["error"]}', file=sys.stderr)
        return 1
    if not _JSON.value:
        print_table(results)
    return 0


if __name__ == '__main__':
    app.run(main)
