"""`train(config, workdir)`: validate, build the sharded state, run the loop, log and evaluate."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import logging
import math
import os
import pathlib
from typing import Any, NoReturn

import jax
import numpy as np
from ml_collections import config_dict

from models.transformer import ModelConfig
from trainer.data import examples, pipeline, tokenizers
from trainer.errors import ConfigError, StoppedBySignal, TrainingDivergedError
from trainer.hf import config as hf_config
from trainer.hf import tensors as hf_tensors
from trainer.modeling import counts as param_counts
from trainer.modeling import model_setup, param_roles
from trainer.modeling.model_setup import model_config
from trainer.runtime import distributed, flops, stop_signals
from trainer.runtime import mesh as mesh_lib
from trainer.training import checkpoints, config_checks, optimizer, profiling, reporting, steps
from trainer.training import memory as memory_lib
from trainer.training import state as state_lib


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a finished run reports back to its caller."""

    final_step: int
    last_loss: float | None  # mean training loss over the last log interval; None if no step ran
    eval_loss: float | None  # at the final step; None without eval files


@dataclasses.dataclass(frozen=True)
class Setup:
    """A model's sharded train state and the steps compiled for it on one mesh."""

    model_cfg: ModelConfig
    sharded: state_lib.ShardedState
    compiled: steps.CompiledSteps
    batch_sharding: jax.sharding.NamedSharding


def build(config: config_dict.ConfigDict, mesh: jax.sharding.Mesh) -> Setup:
    """Creates the sharded state and jits the steps; call and run the steps under `jax.set_mesh(mesh)`."""
    model_cfg = model_config(config)
    partition = param_roles.partition(config, model_setup.abstract_model(model_cfg)[1])
    if not jax.tree.leaves(partition.trainable_roles()):
        raise ConfigError('config.train.param_roles freeze every parameter: let some train.')
    tx, schedule = optimizer.make_optimizer(config.train, partition.trainable_roles())
    sharded = state_lib.create_train_state(model_cfg, tx, mesh, config.seed, partition)
    compiled = steps.jit_steps(
        sharded.graphdef,
        model_cfg,
        partition,
        tx,
        schedule,
        config.train.grad_accum_steps,
        sharded.shardings,
        mesh,
    )
    return Setup(
        model_cfg=model_cfg,
        sharded=sharded,
        compiled=compiled,
        batch_sharding=mesh_lib.batch_sharding(mesh, model_cfg.sharding_rules),
    )


@dataclasses.dataclass
class _RunContext:
    """What the loop needs besides the state; built once by `train`."""

    config: config_dict.ConfigDict
    compiled: steps.CompiledSteps
    train_data: pipeline.GlobalBatches
    eval_batches: list[dict[str, jax.Array]]
    writer: reporting.MetricsWriter | None
    progress: reporting.Progress
    tokens_per_step: int
    flops_per_token: float
    peak_flops: float | None
    num_devices: int
    checkpointer: checkpoints.Checkpointer
    stop: stop_signals.StopRequest
    profiler: profiling.StepProfiler
    save_by_time: bool = False  # every_minutes has passed on some process, as agreed at the last report


def _raise_if_diverged(fetched: list[dict[str, Any]], last_step: int) -> None:
    """Stops the run at the first of these steps whose loss or gradient norm is NaN or Inf."""
    for offset, metrics in enumerate(fetched):
        for name, what in (('loss', 'the loss'), ('grad_norm', 'the gradient norm')):
            if not np.isfinite(metrics[name]):
                raise TrainingDivergedError(
                    f'{what} became {metrics[name]} at step {last_step - len(fetched) + offset + 1}: lower '
                    'config.train.learning_rate, raise config.train.warmup_steps, or set config.train.grad_clip.'
                )


def _summarize(
    ctx: _RunContext, step: int, fetched: list[dict[str, Any]], seconds: float, timed_steps: int
) -> dict[str, float | None]:
    """Host-side averages of an interval's per-step metrics; stops the run on a NaN or Inf loss or gradient.

    A collective: every process calls it at the same steps. It gathers each process's step time and
    data wait (the slowest host holds back all others), and agrees on whether a timed save is due.
    """
    _raise_if_diverged(fetched, step)
    losses = np.array([m['loss'] for m in fetched])
    summary = {
        'loss': float(losses.mean()),
        'learning_rate': float(fetched[-1]['learning_rate']),
        'grad_norm': float(np.mean([m['grad_norm'] for m in fetched])),
        'tokens_seen': step * ctx.tokens_per_step,
        'step_time_s': None,
        'tokens_per_s': None,
        'tokens_per_s_per_device': None,
        'mfu': None,
        'data_wait_s': None,
        'data_wait_fraction': None,
        'host_step_time_s_min': None,
        'host_step_time_s_max': None,
        'slowest_host': None,
        'host_data_wait_fraction_max': None,
        # The devices' peak bytes in use so far (GPU, TPU; the backend of a CPU reports none).
        'memory_peak_gib': memory_lib.peak_in_use(jax.local_devices()),
    }
    # Time the loop spent blocked on the input pipeline instead of dispatching steps.
    wait = ctx.train_data.take_wait()
    step_time = seconds / timed_steps if timed_steps else float('nan')
    hosts = distributed.every_process([step_time, wait / seconds, ctx.checkpointer.time_due()])
    ctx.save_by_time = bool(hosts[:, 2].any())
    if timed_steps:  # an interval holding only the compiling first step has no speed to report
        summary.update(data_wait_s=wait, data_wait_fraction=wait / seconds)
        summary.update(
            host_step_time_s_min=float(hosts[:, 0].min()),
            host_step_time_s_max=float(hosts[:, 0].max()),
            slowest_host=int(hosts[:, 0].argmax()),
            host_data_wait_fraction_max=float(hosts[:, 1].max()),
        )
        tokens_per_s = ctx.tokens_per_step / step_time
        summary.update(
            step_time_s=step_time, tokens_per_s=tokens_per_s, tokens_per_s_per_device=tokens_per_s / ctx.num_devices
        )
        if ctx.peak_flops:
            summary['mfu'] = ctx.flops_per_token * tokens_per_s / (ctx.peak_flops * ctx.num_devices)
    return summary


def _evaluate(ctx: _RunContext, params: Any) -> dict[str, float]:
    """Over the fixed eval batches: mean loss per counted token (or example), and the bits per byte of text it
    makes (language models) or the share of examples labeled right (classifiers)."""
    results = jax.device_get([ctx.compiled.eval(params, batch) for batch in ctx.eval_batches])
    sums = {name: float(np.sum([r[name] for r in results])) for name in results[0]}
    count = max(sums['count'], 1.0)
    if 'correct' in sums:
        return {'eval_loss': sums['loss'] / count, 'eval_accuracy': sums['correct'] / count}
    return {'eval_loss': sums['loss'] / count, 'eval_bits_per_byte': sums['loss'] / np.log(2) / max(sums['bytes'], 1.0)}


def describe_eval(done: int, scores: dict[str, float]) -> str:
    """'step 600: eval_loss 1.8350 (2.671 bits per byte)', or with the accuracy of a classifier."""
    if 'eval_accuracy' in scores:
        return f'step {done}: eval_loss {scores["eval_loss"]:.4f} (accuracy {scores["eval_accuracy"]:.3f})'
    return f'step {done}: eval_loss {scores["eval_loss"]:.4f} ({scores["eval_bits_per_byte"]:.3f} bits per byte)'


def _announce(
    progress: reporting.Progress,
    mesh,
    counts: param_counts.Counts,
    flops_per_token: float,
    peak: float | None,
    peak_source: str,
) -> None:
    devices = jax.devices()
    progress.message(
        f'devices: {len(devices)} x {devices[0].device_kind} ({jax.process_count()} process(es), '
        f'{jax.local_device_count()} device(s) each)'
    )
    progress.message(f'mesh: {mesh_lib.describe(mesh)}')
    progress.message(
        f'parameters: {counts.params:,} ({counts.non_embedding_params:,} without embeddings) | '
        f'FLOPs per token: {reporting.format_count(flops_per_token)}'
    )
    if peak:
        progress.message(f'peak per device: {reporting.format_count(peak)}FLOP/s ({peak_source})')


def _fine_tuning_lines(config: config_dict.ConfigDict, setup: Setup, tokenizer: tokenizers.Tokenizer) -> list[str]:
    """What a fine-tuning run trains: the share of trainable parameters, the examples read and cut."""
    lines = []
    partition = setup.sharded.partition
    if not partition.everything_trains:
        trainable = sum(math.prod(x.shape) for x in jax.tree.leaves(partition.trainable(setup.sharded.abstract.params)))
        total = sum(math.prod(x.shape) for x in jax.tree.leaves(setup.sharded.abstract.params))
        lines.append(f'trainable: {trainable:,} of {total:,} parameters ({trainable / total:.2%})')
    if config.data.format in examples.FORMATS:
        row = config.data.seq_len + (config.data.format == 'sft')
        srcs = [('train', pipeline.train_sources(config.data)[0])]
        srcs += [('eval', pipeline.eval_source(config.data))] if config.data.eval_files else []
        for field, src in srcs:  # already read (and cached) by the config checks and the streams
            name = f'config.data.{field}_files'
            found = examples.read(src.files, config.data, tokenizer, config.model.num_classes, name)
            lines.append(found.summary(field, row))
    return lines


def train(config: config_dict.ConfigDict, workdir: pathlib.Path) -> TrainResult:
    """Trains `config` for config.train.steps steps, writing everything into `workdir`."""
    config_checks.validate(config, jax.device_count())
    is_chief = jax.process_index() == 0
    if is_chief and config.train.warmup_steps > config.train.steps:
        logging.warning(
            'config.train.warmup_steps=%d is longer than the run (config.train.steps=%d): warming up over all %d steps',
            config.train.warmup_steps,
            config.train.steps,
            optimizer.warmup_steps(config.train),
        )
    _check_workdir(workdir)

    mesh = mesh_lib.make_mesh({axis: config.mesh[axis] for axis in mesh_lib.MESH_AXES})
    tokenizer = tokenizers.make_tokenizer(config.data.tokenizer, config.data.eos_token)
    # Everything opened is closed on every way out, also when a restore fails: a grain iterator or an
    # orbax manager left open prints tracebacks while the interpreter shuts down, after the one-line error.
    with jax.set_mesh(mesh), contextlib.ExitStack() as cleanup:
        setup = build(config, mesh)
        train_data = pipeline.train_batches(config, tokenizer, setup.batch_sharding)
        cleanup.callback(train_data.close)
        eval_batches = pipeline.eval_batches(config, tokenizer, setup.batch_sharding) if config.data.eval_files else []

        counts = param_counts.count(setup.model_cfg, config.data.seq_len)
        flops_per_token = counts.train_flops_per_token
        peak, peak_source = flops.peak_flops_per_device(mesh, config.model.dtype, config.train.peak_flops_per_device)
        checkpointer = checkpoints.Checkpointer(
            workdir / 'checkpoints', config.checkpoint, config.to_json_best_effort()
        )
        cleanup.callback(checkpointer.close)  # waits for the last save
        state, how = _starting_state(config, setup, checkpointer, train_data)
        trains = int(state.step) < config.train.steps
        # The first batch now, before anything is written: a data problem it meets refuses the run (exit 2)
        # and leaves the workdir as it was (or absent).
        first_batch = next(train_data) if trains else None
        _make_workdir(workdir)
        if is_chief and trains:
            # Only a run that trains records its config: a refused or no-op command leaves the last one.
            (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2) + '\n')

        progress = reporting.Progress(int(state.step), config.train.steps, enabled=is_chief, hosts=jax.process_count())
        cleanup.callback(progress.close)
        _announce(progress, mesh, counts, flops_per_token, peak, peak_source)
        for line in _fine_tuning_lines(config, setup, tokenizer):
            progress.message(line)
        if how:
            progress.message(how)
        writer = None
        if is_chief:
            tracker = reporting.WandbRun(workdir, config) if config.logging.wandb_project else None
            writer = reporting.MetricsWriter(workdir, int(state.step), tracker)
            cleanup.callback(writer.close)
        stop = stop_signals.StopRequest()
        cleanup.callback(stop.restore)
        train_cfg = config.train
        # Process 0 alone: each process's trace would hold the same steps, and on one machine their files
        # (named after the host) would overwrite each other.
        profiler = profiling.StepProfiler(
            workdir / 'tensorboard', train_cfg.profile_start_step, train_cfg.profile_steps, enabled=is_chief
        )
        cleanup.callback(profiler.stop)
        ctx = _RunContext(
            config=config,
            compiled=setup.compiled,
            train_data=train_data,
            eval_batches=eval_batches,
            writer=writer,
            progress=progress,
            tokens_per_step=config.train.global_batch_size * config.data.seq_len,
            flops_per_token=flops_per_token,
            peak_flops=peak,
            num_devices=mesh.devices.size,
            checkpointer=checkpointer,
            stop=stop,
            profiler=profiler,
        )
        return _loop(ctx, state, first_batch)


def _check_workdir(workdir: pathlib.Path) -> None:
    """Refuses a --workdir that mkdir would refuse, without making it: a refused run writes nothing."""
    existing = next(folder for folder in (workdir, *workdir.parents) if folder.exists())
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return
    # mkdir's own reasons (and words), as _make_workdir reports them
    reason = errno.EACCES if existing.is_dir() else errno.EEXIST if existing == workdir else errno.ENOTDIR
    _refuse_workdir(workdir, os.strerror(reason))


def _refuse_workdir(workdir: pathlib.Path, reason: str) -> NoReturn:
    raise ConfigError(f'cannot create --workdir {workdir}: {reason}; give a folder you can write to.')


def _make_workdir(workdir: pathlib.Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        _refuse_workdir(workdir, error.strerror)


def _start_from_hugging_face(
    config: config_dict.ConfigDict, sharded: state_lib.ShardedState, model_cfg: ModelConfig
) -> tuple[state_lib.TrainState, list[str]]:
    """A fresh train state around the weights of a Hugging Face folder, each read into its sharding, and the
    parameters the folder did not have."""
    folder = config.checkpoint.restore_from
    if not config.checkpoint.restore_params_only:
        raise ConfigError(
            f'config.checkpoint.restore_from={folder!r} is a Hugging Face folder, which holds weights only: set '
            'config.checkpoint.restore_params_only=True.'
        )
    hf_config.check_matches(config.model.to_dict(), folder)
    params = hf_tensors.load(folder, model_cfg, sharded.abstract.params)
    fresh = sharded.missing(params)
    return sharded.start_from(params), fresh


def _fresh_note(fresh: list[str]) -> str:
    """'; initialized anew: classifier_DC, classifier_bias_C' (adapters and heads a pre-trained model lacks)."""
    if not fresh:
        return ''
    adapters = [name for name in fresh if '/lora/' in name]
    others = [name for name in fresh if '/lora/' not in name]
    parts = ([f'{len(adapters)} LoRA adapter arrays'] if adapters else []) + others
    return '; initialized anew: ' + ', '.join(parts)


def _starting_state(
    config: config_dict.ConfigDict,
    setup: Setup,
    checkpointer: checkpoints.Checkpointer,
    train_data: pipeline.GlobalBatches,
) -> tuple[state_lib.TrainState, str]:
    """The workdir's newest checkpoint, else config.checkpoint.restore_from, else a fresh state; and what it was."""
    sharded = setup.sharded
    restored = checkpointer.restore_latest(sharded.abstract)  # the same command again: carry on
    if restored is not None:
        checkpoints.rewind(
            train_data,
            restored.data_position,
            checkpointer.directory / str(restored.step),
            config.data.restart_order,
        )
        how = f'resumed from step {restored.step} ({checkpointer.directory / str(restored.step)})'
        if restored.step >= config.train.steps:
            how += (
                f'\nnothing to train: the run is at step {restored.step} of config.train.steps={config.train.steps}; '
                'raise steps to train further, or give another --workdir for a new run.'
            )
        return restored.state, how
    if config.checkpoint.restore_from and hf_config.is_model_folder(config.checkpoint.restore_from):
        state, fresh = _start_from_hugging_face(config, sharded, setup.model_cfg)
        return state, f'started from {config.checkpoint.restore_from} (Hugging Face weights{_fresh_note(fresh)})'
    if config.checkpoint.restore_from:  # a new run from another run's checkpoint (fine-tuning)
        params_only = config.checkpoint.restore_params_only
        state, folder, fresh = checkpointer.restore_other_run(config.checkpoint.restore_from, sharded, params_only)
        what = 'parameters' if params_only else f'whole state, step {int(state.step)}'
        return state, f'started from {folder} ({what}{_fresh_note(fresh)})'
    return sharded.state, ''


def _compile_train_step(ctx: _RunContext, state: state_lib.TrainState, batch: dict[str, jax.Array]):
    """The train step compiled for these shapes (the loop runs this executable: one compile, not two), after
    its memory per device is shown and logged; a step that cannot fit stops the run here."""
    compiled = ctx.compiled.train.lower(state, batch).compile()
    memory = memory_lib.step_memory(compiled, state.params, state.opt_state, jax.local_devices()[0])
    ctx.progress.message(memory.line())
    if ctx.writer is not None:
        ctx.writer.write(int(state.step), memory.metrics())
    memory_lib.check_fits(memory)
    return compiled


def _loop(ctx: _RunContext, state: state_lib.TrainState, first_batch: dict[str, jax.Array] | None) -> TrainResult:
    """Dispatches steps ahead of the host: an interval's metrics are fetched after the next step is queued.

    `first_batch` is the first step's, read by `train` before it wrote anything (None: no step to run). Throughput
    is timed between fetches: a fetch returns once its interval's last step is done.
    """
    train_cfg = ctx.config.train
    first_step, total = int(state.step), train_cfg.steps
    pending: list[dict[str, jax.Array]] = []  # device-side metrics of the current interval
    ready: tuple[int, list] | None = None  # a finished interval, reported once the next step is queued
    timer = reporting.IntervalTimer()
    timed_from = first_step  # steps after this one are covered by the timer's current lap
    summary: dict[str, Any] = {}
    eval_loss = None
    previous: dict[str, jax.Array] | None = None  # the metrics of the step before the newest

    def report(step: int, step_metrics: list) -> None:
        nonlocal summary, timed_from
        fetched = jax.device_get(step_metrics)  # waits for the interval's last step
        summary = _summarize(ctx, step, fetched, timer.lap(), step - timed_from)
        timed_from = step
        ctx.progress.update(step, summary)
        if ctx.writer is not None:
            ctx.writer.write(step, summary)

    train_step = ctx.compiled.train
    batches = itertools.chain([first_batch], ctx.train_data)
    for step in range(first_step, total):
        batch = next(batches)
        if step == first_step:
            train_step = _compile_train_step(ctx, state, batch)
        ctx.profiler.before(step + 1)
        with jax.transfer_guard('disallow'):  # the hot loop moves data only where it says so
            state, metrics = train_step(state, batch)
        if where := ctx.profiler.after(step + 1, metrics):
            ctx.progress.message(where)
        pending.append(metrics)
        if previous is not None:
            # At most two steps in flight: the device never idles, and a stop, a save or an error waits
            # for one step, not for the dozens of steps the host could otherwise have queued.
            jax.block_until_ready(previous)
        previous = metrics
        if ready is not None:
            report(*ready)
            ready = None
        done = step + 1
        if step == first_step:  # keep compilation out of the throughput figures
            jax.block_until_ready(metrics)
            ctx.progress.message(f'step {done} compiled and ran in {timer.lap():.1f}s')
            ctx.train_data.take_wait()  # the first batch's wait belongs to start-up
            timed_from = done
        stopping = ctx.stop.reached(done)  # the same step on every process
        eval_due = bool(ctx.eval_batches) and (
            done == total or (train_cfg.eval_every > 0 and done % train_cfg.eval_every == 0)
        )
        if done % train_cfg.log_every == 0 or done == total or eval_due or stopping:
            ready, pending = (done, pending), []
        if eval_due and not stopping:
            report(*ready)
            ready = None
            scores = _evaluate(ctx, state.params)
            eval_loss = scores['eval_loss']
            ctx.progress.message(describe_eval(done, scores))
            if ctx.writer is not None:
                ctx.writer.write(done, scores)
            timer.lap()  # eval time is not training time
        if stopping or ctx.save_by_time or ctx.checkpointer.due(done) or done == total:
            # A diverged state never becomes a checkpoint: every step's loss up to this one is checked first.
            if ready is not None:
                report(*ready)
                ready = None
            _raise_if_diverged(jax.device_get(pending), done)
            # Before the next step is dispatched: that step is given (donates) this state.
            ctx.checkpointer.save(done, state, ctx.train_data)
            ctx.save_by_time = False
        if stopping:
            ctx.checkpointer.wait()
            raise StoppedBySignal(
                f'{ctx.stop.signal_name} received: saved step {done} in {ctx.checkpointer.directory}; '
                'run the same command to resume.'
            )
    if ready is not None:
        report(*ready)
    return TrainResult(final_step=max(total, first_step), last_loss=summary.get('loss'), eval_loss=eval_loss)
