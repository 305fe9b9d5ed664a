"""Checks a config before anything compiles; each problem is one sentence naming the field and the fix."""

from __future__ import annotations

import importlib.util
import math
import os

import jax
import jax.numpy as jnp
from ml_collections import config_dict

from models import transformer
from models.transformer import (
    ATTENTION_IMPLS,
    DEPTH_SCALINGS,
    FAMILIES,
    HEADS,
    LORA_TARGETS,
    MUP_WEIGHT_DECAYS,
    PARAMETRIZATIONS,
    POOLINGS,
    REMAT_POLICIES,
    ROPE_SCALINGS,
)
from trainer.data import examples, pipeline, sources, tokenizers
from trainer.errors import ConfigError
from trainer.runtime.mesh import MESH_AXES, resolve_mesh_shape

DTYPES = ('float32', 'bfloat16', 'float16')
LR_SCHEDULES = ('cosine', 'linear', 'constant', 'wsd')
OPTIMIZERS = ('adamw', 'muon')


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(section: config_dict.ConfigDict, prefix: str, *names: str) -> None:
    for name in names:
        value = section[name]
        _require(isinstance(value, int) and value > 0, f'{prefix}.{name}={value!r} must be a positive integer.')


def _one_of(value, allowed: tuple, field: str) -> None:
    _require(value in allowed, f'{field}={value!r} is not known: use one of {", ".join(map(repr, allowed))}.')


def check_model(model: config_dict.ConfigDict) -> None:
    """Architecture fields that must agree with each other."""
    _one_of(model.family, FAMILIES, 'config.model.family')
    _one_of(model.remat, tuple(REMAT_POLICIES), 'config.model.remat')
    _one_of(model.dtype, DTYPES, 'config.model.dtype')
    _one_of(model.param_dtype, DTYPES, 'config.model.param_dtype')
    _one_of(model.attention_impl, ATTENTION_IMPLS, 'config.model.attention_impl')
    _one_of(model.rope_scaling, ROPE_SCALINGS, 'config.model.rope_scaling')
    _positive(
        model,
        'config.model',
        'num_layers',
        'num_heads',
        'num_kv_heads',
        'd_model',
        'd_ff',
        'vocab_size',
        'max_seq_len',
        'vocab_multiple',
    )
    _require(
        model.head_dim > 0 or model.d_model % model.num_heads == 0,
        f'config.model.num_heads={model.num_heads} does not divide config.model.d_model={model.d_model}: '
        f'use a head count that divides it, such as {_divisors_near(model.d_model, model.num_heads)}, or set '
        'config.model.head_dim.',
    )
    _require(model.head_dim >= 0, f'config.model.head_dim={model.head_dim} must be 0 (d_model / num_heads) or more.')
    _require(
        model.num_heads % model.num_kv_heads == 0,
        f'config.model.num_kv_heads={model.num_kv_heads} does not divide config.model.num_heads='
        f'{model.num_heads}: use one of {_divisors(model.num_heads)}.',
    )
    head_dim = model.head_dim or model.d_model // model.num_heads
    _require(
        model.family != 'llama' or head_dim % 2 == 0,
        f'the llama family needs an even head dimension for RoPE, but it is {head_dim}: change '
        'config.model.head_dim, num_heads or d_model.',
    )
    _require(
        model.rope_scaling == 'none' or model.rope_scaling_factor > 0,
        f'config.model.rope_scaling_factor={model.rope_scaling_factor} must be positive.',
    )
    _require(
        model.rope_scaling != 'llama3' or model.rope_high_freq_factor > model.rope_low_freq_factor,
        f'config.model.rope_high_freq_factor={model.rope_high_freq_factor} must exceed rope_low_freq_factor='
        f'{model.rope_low_freq_factor} for llama3 scaling.',
    )
    _require(
        model.sliding_window >= 0,
        f'config.model.sliding_window={model.sliding_window} must be 0 (attend to all) or positive.',
    )
    _require(0.0 <= model.dropout < 1.0, f'config.model.dropout={model.dropout} must be in [0, 1).')
    _one_of(model.parametrization, PARAMETRIZATIONS, 'config.model.parametrization')
    _one_of(model.mup_weight_decay, MUP_WEIGHT_DECAYS, 'config.model.mup_weight_decay')
    for name in ('mup_input_multiplier', 'mup_output_multiplier'):
        _require(model[name] > 0, f'config.model.{name}={model[name]} must be positive (1.0 = off).')
        _require(
            model[name] == 1.0 or model.parametrization == 'mup',
            f"config.model.{name}={model[name]} is a muP constant: set config.model.parametrization='mup' or leave "
            'it at 1.0.',
        )
    _one_of(model.depth_scaling, DEPTH_SCALINGS, 'config.model.depth_scaling')
    _require(
        model.base_depth >= 0, f"config.model.base_depth={model.base_depth} must be 0 (the model's own) or positive."
    )
    _require(
        0.5 <= model.depth_alpha <= 1.0,
        f'config.model.depth_alpha={model.depth_alpha} must be in [0.5, 1] (1 = CompleteP, 0.5 = 1/sqrt(depth)).',
    )
    # Settings that would silently do nothing: refused, so a run never looks muP or CompleteP when it is not.
    _require(
        model.mup_weight_decay == 'coupled' or model.parametrization == 'mup',
        f'config.model.mup_weight_decay={model.mup_weight_decay!r} acts only under muP: set '
        "config.model.parametrization='mup' or leave mup_weight_decay at 'coupled'.",
    )
    for name, off in (('base_depth', 0), ('depth_alpha', 1.0)):
        _require(
            model[name] == off or model.depth_scaling == 'completep',
            f"config.model.{name}={model[name]} acts only under CompleteP: set config.model.depth_scaling='completep' "
            f'or leave {name} at {off}.',
        )
    _require(
        model.loss_vocab_chunk >= 0,
        f'config.model.loss_vocab_chunk={model.loss_vocab_chunk} must be 0 (off) or positive.',
    )
    for name in ('base_width', 'base_head_dim'):
        _require(model[name] >= 0, f"config.model.{name}={model[name]} must be 0 (the model's own) or positive.")
    _require(
        model.attention_max_segments >= 0,
        f'config.model.attention_max_segments={model.attention_max_segments} must be 0 (seq_len) or positive.',
    )
    if model.attention_impl == 'cudnn':
        check_cudnn_attention(model)


def check_cudnn_attention(model: config_dict.ConfigDict) -> None:
    """What cuDNN flash attention over packed documents runs on: Hopper or newer, 16-bit, head_dim % 8 == 0."""
    use_xla = "or set config.model.attention_impl='xla'"
    _require(
        jax.default_backend() == 'gpu',
        f"config.model.attention_impl='cudnn' needs an NVIDIA GPU, but the backend is "
        f"{jax.default_backend()!r}: use 'xla'.",
    )
    _require(
        transformer.cudnn_attention is not None,
        f"config.model.attention_impl='cudnn' needs jax's cuDNN attention wrapper, which jax {jax.__version__} "
        "lacks: install the jax version setup.cfg names, or use 'xla'.",
    )
    _require(
        model.dtype in ('bfloat16', 'float16'),
        f"config.model.attention_impl='cudnn' computes in bfloat16 or float16, not model.dtype={model.dtype!r}: "
        f'set config.model.dtype=bfloat16 {use_xla}.',
    )
    head_dim = model.head_dim or model.d_model // model.num_heads
    _require(
        head_dim % 8 == 0 and head_dim <= 256,
        f"config.model.attention_impl='cudnn' needs a head dimension that is a multiple of 8 and at most 256, "
        f'not {head_dim}: {use_xla}.',
    )
    capability = getattr(jax.devices()[0], 'compute_capability', '0')
    _require(
        tuple(int(part) for part in capability.split('.')) >= (9, 0),
        f"config.model.attention_impl='cudnn' reads packed documents on Hopper (compute capability 9.0) or newer "
        f'GPUs; this {jax.devices()[0].device_kind} is {capability}: {use_xla}.',
    )


def check_head(config: config_dict.ConfigDict) -> None:
    """A classifier head goes with labeled data, and the other way round."""
    model, data = config.model, config.data
    _one_of(model.head, HEADS, 'config.model.head')
    _one_of(model.pool, POOLINGS, 'config.model.pool')
    classify = model.head == 'classify'
    _require(
        classify == (data.format == 'classify'),
        "config.model.head='classify' and config.data.format='classify' go together: set both or neither.",
    )
    if not classify:
        return
    _require(model.num_classes >= 2, f'config.model.num_classes={model.num_classes}: a classifier needs 2 or more.')
    names = examples.class_names(data)
    _require(
        not names or len(names) == model.num_classes,
        f'config.data.class_names has {len(names)} names but config.model.num_classes={model.num_classes}: '
        'give a name for every class, or none.',
    )


def check_lora(config: config_dict.ConfigDict) -> None:
    """Adapter rank, scale, dropout, targets and the frozen weights' dtype."""
    lora = config.lora
    _require(lora.rank >= 0, f'config.lora.rank={lora.rank} must be 0 (off) or positive.')
    if not lora.rank:
        return
    _require(lora.alpha > 0, f'config.lora.alpha={lora.alpha} must be positive.')
    _require(0.0 <= lora.dropout < 1.0, f'config.lora.dropout={lora.dropout} must be in [0, 1).')
    _one_of(lora.base_dtype, ('', *DTYPES), 'config.lora.base_dtype')
    targets = [t.strip() for t in lora.targets.split(',') if t.strip()]
    _require(bool(targets), "config.lora.targets is empty: name projections such as 'q,k,v,o'.")
    for target in targets:
        _one_of(target, tuple(LORA_TARGETS), 'a projection in config.lora.targets')
    _require(
        'gate' not in targets or config.model.family == 'llama',
        "config.lora.targets names 'gate', which only the llama family has: leave it out.",
    )


def check_data(config: config_dict.ConfigDict) -> None:
    """Tokenizer, sequence length, pipeline settings and files (which must exist and suit the format)."""
    data = config.data
    _one_of(data.format, sources.FORMATS, 'config.data.format')
    _one_of(data.sample_by, sources.SAMPLE_BY, 'config.data.sample_by')
    _positive(data, 'config.data', 'seq_len', 'max_document_bytes', 'prefetch_batches')
    _require(data.num_workers >= 0, f'config.data.num_workers={data.num_workers} must be 0 (a thread) or more.')
    _require(
        data.num_streams >= 0,
        f'config.data.num_streams={data.num_streams} must be 0 (gcd(global_batch_size, '
        f'{pipeline.DEFAULT_STREAMS})) or a positive number of streams.',
    )
    pipeline.stream_count(data.num_streams, config.train.global_batch_size)  # refuses one not dividing the batch
    _require(data.shuffle_buffer >= 0, f'config.data.shuffle_buffer={data.shuffle_buffer} must not be negative.')
    _require(
        data.seq_len <= config.model.max_seq_len,
        f'config.data.seq_len={data.seq_len} exceeds config.model.max_seq_len={config.model.max_seq_len}: '
        'shorten seq_len or raise max_seq_len.',
    )
    for i, entry in enumerate(data.mixture):
        _require(
            len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], (int, float)) and entry[1] > 0,
            f'config.data.mixture[{i}]={entry!r} must be a (pattern, positive weight) pair.',
        )
    tokenizer = tokenizers.make_tokenizer(data.tokenizer, data.eos_token)
    _require(
        tokenizer.vocab_size <= config.model.vocab_size,
        f'the {data.tokenizer!r} tokenizer has {tokenizer.vocab_size} ids but config.model.vocab_size='
        f'{config.model.vocab_size}: set vocab_size to at least {tokenizer.vocab_size}.',
    )
    train_sources = pipeline.train_sources(data)
    eval_sources = [pipeline.eval_source(data)] if data.eval_files else []
    if data.format in examples.FORMATS:  # read (and count) the examples now: a bad file fails before compiling
        _require(
            not data.mixture, f'config.data.mixture is not supported with format {data.format!r}: use train_files.'
        )
        examples.read(train_sources[0].files, data, tokenizer, config.model.num_classes, 'config.data.train_files')
        for src in eval_sources:
            examples.read(src.files, data, tokenizer, config.model.num_classes, 'config.data.eval_files')
        return
    pipeline.check_sources(train_sources + eval_sources, data, config.model.vocab_size)
    fields = [f'config.data.mixture[{i}]' for i in range(len(data.mixture))] or ['config.data.train_files']
    fields += ['config.data.eval_files'] * len(eval_sources)
    for src, field in zip(train_sources + eval_sources, fields, strict=True):
        pipeline.check_enough_text(src, data, tokenizer, field)


def check_train(train: config_dict.ConfigDict) -> None:
    """Optimizer, schedule and logging fields."""
    _positive(train, 'config.train', 'steps', 'global_batch_size', 'grad_accum_steps', 'log_every', 'eval_steps')
    _one_of(train.lr_schedule, LR_SCHEDULES, 'config.train.lr_schedule')
    _require(train.learning_rate > 0, f'config.train.learning_rate={train.learning_rate} must be positive.')
    # A warmup longer than the run is clamped to it (with a warning): a short smoke test of a long config.
    _require(train.warmup_steps >= 0, f'config.train.warmup_steps={train.warmup_steps} must not be negative.')
    _require(0.0 <= train.min_lr_ratio <= 1.0, f'config.train.min_lr_ratio={train.min_lr_ratio} must be in [0, 1].')
    _require(
        0.0 < train.wsd_decay_fraction <= 1.0,
        f'config.train.wsd_decay_fraction={train.wsd_decay_fraction} must be in (0, 1].',
    )
    _require(train.eval_every >= 0, f'config.train.eval_every={train.eval_every} must be 0 (end only) or positive.')
    _require(train.grad_clip >= 0, f'config.train.grad_clip={train.grad_clip} must be 0 (off) or positive.')
    _require(train.weight_decay >= 0, f'config.train.weight_decay={train.weight_decay} must not be negative.')
    _one_of(train.optimizer, OPTIMIZERS, 'config.train.optimizer')
    _require(0.0 <= train.muon_momentum < 1.0, f'config.train.muon_momentum={train.muon_momentum} must be in [0, 1).')
    _positive(train, 'config.train', 'muon_ns_steps')
    _require(train.muon_rms_scale > 0, f'config.train.muon_rms_scale={train.muon_rms_scale} must be positive.')
    _require(
        train.peak_flops_per_device >= 0,
        f'config.train.peak_flops_per_device={train.peak_flops_per_device} must be 0 (auto) or positive.',
    )


def check_logging(config: config_dict.ConfigDict) -> None:
    """Profiling window and Weights & Biases."""
    train = config.train
    _require(
        train.profile_steps >= 0 and train.profile_start_step >= 1,
        f'config.train.profile_steps={train.profile_steps} and profile_start_step={train.profile_start_step} '
        'must be 0 (off) or positive, and at least 1.',
    )
    if config.logging.wandb_project:
        _require(
            importlib.util.find_spec('wandb') is not None,
            f'config.logging.wandb_project={config.logging.wandb_project!r} needs Weights & Biases: '
            "pip install -e '.[wandb]', or set config.logging.wandb_project=''.",
        )


def check_checkpoint(ckpt: config_dict.ConfigDict) -> None:
    """Save schedule and the checkpoint a new run starts from."""
    _positive(ckpt, 'config.checkpoint', 'keep')
    for name in ('every_steps', 'every_minutes', 'keep_every_steps'):
        _require(ckpt[name] >= 0, f'config.checkpoint.{name}={ckpt[name]} must be 0 (off) or positive.')
    _require(
        not ckpt.restore_from or os.path.isdir(ckpt.restore_from),
        f'config.checkpoint.restore_from={ckpt.restore_from!r} is not a folder: train that run first, or give a '
        'checkpoint such as runs/NAME/checkpoints/600, runs/NAME/checkpoints for its newest, or a Hugging Face '
        'model folder.',
    )


def check_mesh(config: config_dict.ConfigDict, num_devices: int) -> None:
    """Mesh sizes against the device count, rules against the mesh, batch against the data axes."""
    sizes = {axis: config.mesh[axis] for axis in MESH_AXES}
    _require(list(sizes.values()).count(-1) <= 1, 'at most one of config.mesh.data/fsdp/tensor may be -1.')
    for axis, size in sizes.items():
        _require(
            isinstance(size, int) and (size > 0 or size == -1),
            f'config.mesh.{axis}={size!r} must be a positive integer or -1 (all remaining devices).',
        )
    shape = resolve_mesh_shape(sizes, num_devices)
    _require(
        math.prod(shape) == num_devices,
        f'config.mesh data={sizes["data"]} fsdp={sizes["fsdp"]} tensor={sizes["tensor"]} does not cover the '
        f'{num_devices} devices: make the product {num_devices}, or set one axis to -1.',
    )
    for logical, mesh_axes in config.mesh.rules:
        named = mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)
        unknown = [axis for axis in named if axis is not None and axis not in MESH_AXES]
        if unknown:
            raise ConfigError(
                f'config.mesh.rules maps {logical!r} to unknown mesh axis {unknown[0]!r}: use {MESH_AXES} or None.'
            )
    batch_devices = _batch_split(config.mesh.rules, dict(zip(MESH_AXES, shape, strict=True)))
    micro_batch, rem = divmod(config.train.global_batch_size, config.train.grad_accum_steps)
    _require(
        rem == 0,
        f'config.train.grad_accum_steps={config.train.grad_accum_steps} does not divide '
        f'config.train.global_batch_size={config.train.global_batch_size}.',
    )
    _require(
        micro_batch % batch_devices == 0,
        f'config.train.global_batch_size={config.train.global_batch_size} split into '
        f'{config.train.grad_accum_steps} micro-batches gives {micro_batch} sequences, which the '
        f'{batch_devices} devices of the batch axes do not divide: use a global_batch_size that is a multiple '
        f'of {batch_devices * config.train.grad_accum_steps}.',
    )


def _batch_split(rules, sizes: dict[str, int]) -> int:
    """How many ways the batch axis is split: the product of the mesh axes 'activation_batch' maps to."""
    for logical, mesh_axes in rules:
        if logical == 'activation_batch':
            named = mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)
            return math.prod(sizes[axis] for axis in named if axis is not None)
    return 1


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _divisors_near(n: int, target: int) -> str:
    return ' or '.join(str(d) for d in sorted(_divisors(n), key=lambda d: abs(d - target))[:2])


def validate(config: config_dict.ConfigDict, num_devices: int) -> None:
    """Raises ConfigError for the first impossible setting in `config`."""
    check_model(config.model)
    check_head(config)
    check_lora(config)
    check_data(config)
    check_train(config.train)
    check_logging(config)
    # muP's hidden-matrix rates (lr / m) are Adam's rule; Muon's orthogonalized updates follow another
    # (spectral) scaling, and no transfer of one to the other has been measured here.
    _require(
        not (config.train.optimizer == 'muon' and config.model.parametrization == 'mup'),
        "config.train.optimizer='muon' with config.model.parametrization='mup' is not supported (muP's rules here "
        "are Adam's): use parametrization='sp' with Muon, or optimizer='adamw' with muP.",
    )
    check_checkpoint(config.checkpoint)
    check_mesh(config, num_devices)
    _require(
        jnp.dtype(config.model.param_dtype).itemsize >= jnp.dtype(config.model.dtype).itemsize,
        f'config.model.param_dtype={config.model.param_dtype!r} is narrower than the compute dtype '
        f'{config.model.dtype!r}: store parameters in float32.',
    )
