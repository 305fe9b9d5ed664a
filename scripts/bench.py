"""Training speed of a config, and of variants of it side by side: the framework's loop against a bare one.

Usage:
  python scripts/bench.py --config configs/small_lm.py [--config.x.y=value ...] [--steps 30]
      [--variant 'f32:model.dtype=float32' --variant 'remat:model.remat=full'] [--json]

For the config and each variant (the config with `key=value,...` overrides), in one process, one after
another:
- compile time of the train step (lowered and compiled ahead of time);
- the framework: `trainer.train` itself (grain pipeline, metrics, the host one step ahead), its tokens/s
  from metrics.jsonl, the best of three logged intervals of --steps steps (compilation left out);
- the bare loop: the same jitted step on one fixed batch, no pipeline, no metrics fetched, the
  best of three timings of --steps steps; the framework's overhead is 1 - framework / bare;
- MFU of both against the datasheet peak (or on CPU the measured bf16 matmul peak trainer.flops uses)
  and against a matmul peak measured here in the compute dtype;
- memory: the device's peak bytes (GPU `memory_stats`) or the compiled step's memory analysis.

Speeds are ratios measured in one run on one machine: quote them so, never as absolute numbers from a
shared machine. --json prints one JSON object per line.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_dict, config_flags  # noqa: E402

from trainer import cli, flops, train, xla_flags  # noqa: E402
from trainer import mesh as mesh_lib  # noqa: E402
from trainer.data import pipeline, tokenizers  # noqa: E402
from trainer.errors import ConfigError  # noqa: E402
from trainer.scaling import counts  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A config file, as for python -m trainer.')
_STEPS = flags.DEFINE_integer('steps', 30, 'Timed steps per measurement (after one compiling step).')
_VARIANTS = flags.DEFINE_multi_string('variant', [], "'name:key=value,key=value': the config with these overrides.")
_JSON = flags.DEFINE_bool('json', False, 'One JSON object per measured config instead of a table.')


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
    """tokens/s of trainer.train: the best of three logged intervals of `steps` steps after the compiling one.

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


def measure(name: str, config: config_dict.ConfigDict, steps: int) -> dict:
    """Every figure of one config."""
    train.config_checks.validate(config, jax.device_count())
    mesh = mesh_lib.make_mesh({axis: config.mesh[axis] for axis in mesh_lib.MESH_AXES})
    tokenizer = tokenizers.make_tokenizer(config.data.tokenizer, config.data.eos_token)
    tokens_per_step = config.train.global_batch_size * config.data.seq_len
    with jax.set_mesh(mesh):
        setup = train.build(config, mesh, tokenizer)
        data = pipeline.train_batches(config, tokenizer, setup.batch_sharding)
        batch = next(data)
        data.close()
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
        device = jax.devices()[0]
        stats = device.memory_stats() if jax.default_backend() == 'gpu' else None
        if stats and 'peak_bytes_in_use' in stats:
            memory, memory_source = stats['peak_bytes_in_use'], 'device peak'
        else:
            analysis = compiled.memory_analysis()
            memory = analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
            memory, memory_source = memory + analysis.output_size_in_bytes - analysis.alias_size_in_bytes, 'compiled'
        peak, peak_source = flops.peak_flops_per_device(mesh, config.model.dtype, config.train.peak_flops_per_device)
        matmul_peak = flops.measure_matmul_flops(mesh, config.model.dtype, size=1024)
        del state
    bare = steps * tokens_per_step / best
    framework = framework_speed(config, steps)
    per_token = counts.count(train.model_config(config), config.data.seq_len).train_flops_per_token
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
        'tokens_per_s_per_device': framework / devices,
        'overhead': 1 - framework / bare,
        'flops_per_token': per_token,
        'mfu': per_token * framework / (peak * devices) if peak else None,
        'peak_flops': peak,
        'peak_source': peak_source,
        'mfu_vs_measured_matmul': per_token * framework / (matmul_peak * devices),
        'measured_matmul_flops': matmul_peak,
        'memory_bytes': memory,
        'memory_source': memory_source,
    }


def main(argv: list[str]) -> int:
    cli.start(argv)
    try:
        base = _CONFIG.value
        if base.train.xla_gpu_flags:  # as python -m trainer sets them, before a backend starts
            os.environ['XLA_FLAGS'] = xla_flags.with_gpu_flags(os.environ.get('XLA_FLAGS', ''))
        runs = [('config', base)] + [variant(base, spec) for spec in _VARIANTS.value]
        results = []
        for name, config in runs:
            results.append(measure(name, config, _STEPS.value))
            if _JSON.value:
                print(json.dumps(results[-1]), flush=True)
    except ConfigError as error:
        cli.fail(str(error))
    if not _JSON.value:
        first = results[0]['tokens_per_s']
        head = results[0]
        print(f'{head["devices"]} x {head["device_kind"]}, jax {head["jax"]}, {_STEPS.value} steps each')
        print(
            f'{"":>12} {"compile":>8} {"tok/s":>9} {"/device":>9} {"bare tok/s":>10} {"overhead":>8} {"MFU":>6} '
            f'{"MFU*":>6} {"memory":>9} {"ratio":>6}'
        )
        for r in results:
            mfu = f'{r["mfu"]:.1%}' if r['mfu'] is not None else '-'
            print(
                f'{r["name"]:>12} {r["compile_s"]:>7.1f}s {r["tokens_per_s"]:>9.0f} '
                f'{r["tokens_per_s_per_device"]:>9.0f} '
                f'{r["bare_tokens_per_s"]:>10.0f} {r["overhead"]:>8.1%} {mfu:>6} {r["mfu_vs_measured_matmul"]:>6.1%} '
                f'{r["memory_bytes"] / 2**20:>7.0f}MB {r["tokens_per_s"] / first:>6.2f}'
            )
        print('MFU: against', results[0]['peak_source'], '| MFU*: against a matmul measured here in the compute dtype')
    return 0


if __name__ == '__main__':
    app.run(main)
