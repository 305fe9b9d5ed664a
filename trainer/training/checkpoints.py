"""Asynchronous orbax checkpoints of the train state and the data iterator, and resuming from them."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import re
import sys
import time
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from ml_collections import config_dict

from trainer.errors import ConfigError
from trainer.modeling import param_roles
from trainer.training import saved_config
from trainer.training.state import ShardedState, TrainState

if TYPE_CHECKING:  # annotations only: decoding loads checkpoints without importing the input pipeline
    from trainer.data.pipeline import GlobalBatches


def _to_json(value: Any) -> str:
    """JSON that keeps tuples tuples (grain's packer state has them, and plain JSON makes them lists)."""

    def mark(x: Any) -> Any:
        if isinstance(x, tuple):
            return {'__tuple__': [mark(item) for item in x]}
        if isinstance(x, list):
            return [mark(item) for item in x]
        if isinstance(x, dict):
            return {key: mark(item) for key, item in x.items()}
        return x

    return json.dumps(mark(value))


def _from_json(text: str) -> Any:
    return json.loads(text, object_hook=lambda d: tuple(d['__tuple__']) if set(d) == {'__tuple__'} else d)


def _gather_json(value: Any) -> list[str]:
    """Every process's `value` as JSON, in process order (each process has its own data position)."""
    text = _to_json(value)
    if jax.process_count() == 1:
        return [text]
    encoded = np.frombuffer(text.encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([len(encoded)], np.int32)).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: len(encoded)] = encoded
    rows = multihost_utils.process_allgather(padded).reshape(len(lengths), -1)
    return [bytes(row[:n]).decode() for row, n in zip(rows, lengths, strict=True)]


def _data_position(data: GlobalBatches) -> dict[str, Any]:
    """Every data stream's position, gathered from the processes that run them."""
    streams = {}
    for text in _gather_json({str(stream): state for stream, state in data.get_state().items()}):
        streams.update({stream: _to_json(state) for stream, state in _from_json(text).items()})
    return {'num_streams': data.num_streams, 'streams': dict(sorted(streams.items(), key=lambda kv: int(kv[0])))}


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """'params/blocks/mlp/w_up_DF' -> shape, for every array of a TrainState or of its saved metadata."""

    def name(entry: Any) -> str:
        return str(getattr(entry, 'key', getattr(entry, 'name', getattr(entry, 'idx', entry))))

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {'/'.join(map(name, path)): tuple(leaf.shape) for path, leaf in leaves}


def find_checkpoint(path: str, field: str) -> pathlib.Path:
    """A checkpoint folder (.../checkpoints/600), or the newest one in a folder of them."""
    folder = pathlib.Path(path)
    if (folder / 'state').is_dir():
        return folder
    steps = sorted(int(p.name) for p in folder.glob('[0-9]*') if p.name.isdigit() and (p / 'state').is_dir())
    if not steps:
        raise ConfigError(
            f'{field}={path!r} holds no checkpoint: give a checkpoint folder such as runs/NAME/checkpoints/600, '
            'or runs/NAME/checkpoints for its newest.'
        )
    return folder / str(steps[-1])


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
    """Each checkpoint's items, named so that saved shapes and the config can be read back alone."""
    return {
        'state': ocp.StandardCheckpointHandler(),
        'data': ocp.JsonCheckpointHandler(),
        'config': ocp.JsonCheckpointHandler(),
    }


class _DropReadOnlyNotices(logging.Filter):
    """orbax warns that a manager opened for reading is 'read only', which reads as if the folder were."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not message.startswith(('Given directory is read only', 'CheckpointManagerOptions.read_only=True'))


logging.getLogger('absl').addFilter(_DropReadOnlyNotices())


def open_read_only(
    directory: pathlib.Path, state_handler: ocp.CheckpointHandler | None = None
) -> ocp.CheckpointManager:
    """Another run's checkpoints folder, for reading only (optionally with another handler for the state)."""
    handlers = _item_handlers()
    if state_handler is not None:
        handlers['state'] = state_handler
    return ocp.CheckpointManager(
        directory.absolute(),
        item_handlers=handlers,
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    )


def _abstract(target: TrainState) -> TrainState:
    """Shapes, dtypes and shardings of `target` (arrays or abstract): restored arrays land in this mesh's layout."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)


# config.train fields whose value changes the optimizer state's structure (clipping adds a state of its own).
_OPTIMIZER_STRUCTURE_FIELDS = {'optimizer': lambda value: value, 'grad_clip': lambda value: value > 0}


def _saved_config(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The config a checkpoint was saved with ({} if it cannot be read)."""
    try:
        saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
        return json.loads(saved['config'])
    except Exception:  # an old or damaged config item: the message then names the differing array instead
        return {}


def _optimizer_difference(saved_config: dict[str, Any], config_json: str, saved: set[str], wanted: set[str]) -> str:
    """Says why a checkpoint's optimizer state has another structure than this config's."""
    if not saved:
        return 'it holds parameters alone, as an import from Hugging Face does'
    ours = json.loads(config_json).get('train', {})
    theirs = saved_config.get('train', {})
    for name, structural in _OPTIMIZER_STRUCTURE_FIELDS.items():
        if name in ours and name in theirs and structural(ours[name]) != structural(theirs[name]):
            return f'config.train.{name} is {theirs[name]} there but {ours[name]} here'
    first = sorted(saved ^ wanted)[0]
    return f'{first} is {"only in the checkpoint" if first in saved else "missing from the checkpoint"}'


# config.model fields that decide parameter shapes: what a checkpoint of another model differs in.
_SHAPE_FIELDS = (
    'family', 'num_layers', 'd_model', 'num_heads', 'num_kv_heads', 'head_dim', 'd_ff', 'vocab_size',
    'vocab_multiple', 'max_seq_len', 'tie_embeddings', 'use_bias', 'qkv_bias',
)  # fmt: skip


def _model_overrides(saved_config: dict[str, Any], config_json: str) -> str:
    """'--config.model.d_ff=64 --config.model.num_layers=2': the shape fields where the checkpoint's config and
    this one disagree, set to the checkpoint's values ('' when its config cannot be read)."""
    theirs, ours = saved_config.get('model', {}), json.loads(config_json).get('model', {})
    return ' '.join(
        f'--config.model.{name}={theirs[name]}'
        for name in _SHAPE_FIELDS
        if name in theirs and name in ours and theirs[name] != ours[name]
    )


def _check_matches(
    manager: ocp.CheckpointManager,
    directory: pathlib.Path,
    step: int,
    target: TrainState,
    config_json: str,
    optimizer_fix: str,
    params_only: bool = False,
    other_run: bool = False,
) -> None:
    """A checkpoint of another model shape or optimizer is a ConfigError naming what differs (and `optimizer_fix`).

    `other_run`: the checkpoint is config.checkpoint.restore_from's (another run's, or an import), not this
    workdir's. Raises FileNotFoundError when the checkpoint's metadata is missing: unreadable, not another model.
    """
    metadata = manager.item_metadata(step)['state']
    saved = _leaf_shapes(metadata) if metadata is not None else {}
    if not saved:
        raise FileNotFoundError('its metadata is missing')
    wanted = _leaf_shapes(target)
    checkpoint = directory / str(step)
    for name in sorted(set(saved) | set(wanted)):
        if params_only and name.removeprefix('params/') in new_in_fine_tuning(set(saved), set(wanted)):
            continue  # started fresh: LoRA adapters, a classifier head (and the LM head it replaces)
        if name.startswith('params/') and saved.get(name) != wanted.get(name):
            overrides = _model_overrides(_saved_config(manager, step), config_json)
            if other_run:  # its config is saved inside it (an import from Hugging Face has no workdir)
                fix = f'its model: {overrides}' if overrides else "config.model to that checkpoint's model"
                fix = f'set {fix}, or restore_from a checkpoint of this model'
            else:
                fix = "use the config this run used (this workdir's config.json) or another --workdir"
                fix += f' (it had {overrides})' if overrides else ''
            raise ConfigError(
                f'{checkpoint} holds another model: parameter {name.removeprefix("params/")} is '
                f'{saved.get(name, "absent")} there but {wanted.get(name, "absent")} in this config; {fix}.'
            )
    if params_only:
        return
    saved_rest = {name for name in saved if not name.startswith('params/')}
    wanted_rest = {name for name in wanted if not name.startswith('params/')}
    if saved_rest != wanted_rest or any(saved[name] != wanted[name] for name in saved_rest):
        why = _optimizer_difference(_saved_config(manager, step), config_json, saved_rest, wanted_rest)
        raise ConfigError(
            f"{checkpoint} holds an optimizer state of another structure than this config's ({why}): set the "
            f'config back to match it, or {optimizer_fix}.'
        )


def new_in_fine_tuning(saved: set[str], wanted: set[str]) -> set[str]:
    """Parameter paths a fine-tuning run may start fresh or leave behind: adapters and a classifier head that a
    pre-trained model lacks, and the language-model head a classifier does not use. Either set may carry
    'params/' prefixes; the result does not."""
    saved = {name.removeprefix('params/') for name in saved}
    wanted = {name.removeprefix('params/') for name in wanted}
    fresh = {name for name in wanted - saved if re.search(param_roles.ADAPTER_PATTERN, name)}
    dropped = {'unembedding_DV'} & saved - wanted if 'classifier_DC' in wanted else set()
    return fresh | dropped


def _reason(error: Exception) -> str:
    """A short, readable account of why a checkpoint did not read back (TensorStore's are pages long)."""
    text = str(error).strip()
    arrays = re.findall(r"'path': '([^'/]+)/'", text)  # TensorStore names the array it failed on
    if arrays:
        return f'cannot read its array {arrays[-1]}'
    first = (text.splitlines() or [''])[0].split(' See full TensorStore details')[0]
    return f'{type(error).__name__}: {first[:200]}' if first else type(error).__name__


class _DropFailedRestoreStragglers(logging.Filter):
    """asyncio's 'exception was never retrieved' for the reads a failed restore left behind."""

    def filter(self, record: logging.LogRecord) -> bool:
        return 'exception was never retrieved' not in str(record.msg)


def _silence_failed_restore_stragglers() -> None:
    """Keeps the reads still in flight after a failed restore from printing tracebacks.

    orbax gives up at the first array that does not read back and closes its event loop while
    TensorStore's other reads are still running; each of those then reports its error (or 'Event loop
    is closed') as an unraisable exception or through asyncio's logger: pages of tracebacks around the
    trainer's one-line message. Installed only once a restore has failed.
    """
    previous = sys.unraisablehook
    if getattr(previous, 'shardtrain_filter', False):
        return

    def hook(unraisable) -> None:
        message = str(unraisable.exc_value)
        if 'Event loop is closed' in message or 'TensorStore' in message:
            return
        previous(unraisable)

    hook.shardtrain_filter = True
    sys.unraisablehook = hook
    logging.getLogger('asyncio').addFilter(_DropFailedRestoreStragglers())


@dataclasses.dataclass(frozen=True)
class Restored:
    """A checkpoint read back: the state, its step, and where the data streams were."""

    state: TrainState
    step: int
    data_position: dict[str, Any]


def rewind(data: GlobalBatches, position: dict[str, Any], where: pathlib.Path, restart_order: bool = False) -> None:
    """Puts the data streams back where a checkpoint says (any devices, any process count).

    A checkpoint of another stream count cannot be continued: refused, naming the count that continues it,
    unless `restart_order` (config.data.restart_order) asks to start the data order over.
    """
    saved = position.get('num_streams')
    if saved is None:  # save_params writes no data position: such a checkpoint starts runs, it ends none
        raise ConfigError(
            f'{where} holds parameters alone, no data position to resume from: give it as '
            f'config.checkpoint.restore_from={where} with an empty --workdir, or remove it from this workdir.'
        )
    if saved == data.num_streams:
        data.set_state({int(stream): _from_json(text) for stream, text in position['streams'].items()})
        return
    if not restart_order:
        raise ConfigError(
            f'the data position in {where} is for {saved} data streams but this run cuts the batch into '
            f'{data.num_streams}: set config.data.num_streams={saved} to continue it exactly, or '
            'config.data.restart_order=True to start the data order over (documents already trained on come again).'
        )
    logging.warning(
        'the data position in %s is for %s data streams but this run has %d: the data order starts over, as '
        'config.data.restart_order=True asks (documents already trained on come again)',
        where,
        saved,
        data.num_streams,
    )


def save_params(directory: pathlib.Path, params: Any, config_json: str) -> pathlib.Path:
    """A checkpoint of parameters alone (step 0), which config.checkpoint.restore_from takes; returns its folder."""
    manager = ocp.CheckpointManager(
        directory.absolute(), item_handlers=_item_handlers(), options=ocp.CheckpointManagerOptions(create=True)
    )
    try:
        manager.save(
            0,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({'params': params}),
                data=ocp.args.JsonSave({}),
                config=ocp.args.JsonSave({'config': config_json}),
            ),
            force=True,
        )
        manager.wait_until_finished()
    finally:
        manager.close()
    return directory / '0'


def restore_params(folder: pathlib.Path, abstract_params: Any) -> Any:
    """The parameters alone of checkpoint `folder`, laid out as `abstract_params` (shapes, dtypes, shardings)."""
    # A partial restore (the params subtree) needs the generic PyTree handler; it reads what the standard
    # handler wrote.
    manager = open_read_only(folder.parent, ocp.PyTreeCheckpointHandler())
    try:
        wanted = {'params': abstract_params}
        args = ocp.args.PyTreeRestore(
            item=wanted, restore_args=ocp.checkpoint_utils.construct_restore_args(wanted), partial_restore=True
        )
        return manager.restore(int(folder.name), args=ocp.args.Composite(state=args))['state']['params']
    finally:
        manager.close()


def read_params(folder: pathlib.Path) -> tuple[config_dict.ConfigDict, Any]:
    """A checkpoint's config and its parameters alone, whole on this host's first CPU device (for exports)."""
    step = int(folder.name)
    manager = open_read_only(folder.parent)
    try:
        saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
        metadata = manager.item_metadata(step)['state']['params']
    finally:
        manager.close()
    host = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=host), metadata)
    return saved_config.parse(saved['config']), restore_params(folder, abstract)


class Checkpointer:
    """Saves every N steps and/or minutes into workdir/checkpoints/<step>, keeping the newest few.

    orbax writes each checkpoint into a temporary folder and renames it when complete, so a run
    killed mid-save leaves nothing that counts as a checkpoint.
    """

    def __init__(self, directory: pathlib.Path, ckpt_cfg: config_dict.ConfigDict, config_json: str):
        self._cfg, self._config_json = ckpt_cfg, config_json
        options = ocp.CheckpointManagerOptions(
            max_to_keep=ckpt_cfg.keep,
            keep_period=ckpt_cfg.keep_every_steps or None,
            enable_async_checkpointing=True,
            cleanup_tmp_directories=True,  # remove what a killed run left half-written
            create=False,  # the first save makes the folder: a run refused before it writes nothing
        )
        self.directory = directory
        self._manager = ocp.CheckpointManager(directory.absolute(), options=options, item_handlers=_item_handlers())
        self._last_save_time = time.monotonic()

    def due(self, step: int) -> bool:
        """Whether `step` is a save scheduled by every_steps."""
        return bool(self._cfg.every_steps) and step % self._cfg.every_steps == 0

    def time_due(self) -> bool:
        """Whether every_minutes have passed since the last save, by this process's clock.

        Processes' clocks differ, so the loop asks this only at log steps and saves when any says yes.
        """
        minutes = self._cfg.every_minutes
        return bool(minutes) and time.monotonic() - self._last_save_time >= 60 * minutes

    def save(self, step: int, state: TrainState, data: GlobalBatches) -> None:
        """Starts an asynchronous save; returns once the arrays are copied off the devices.

        The data iterator's state is read here, synchronously: grain's own orbax handler reads it
        in the background, by when the loop has already taken the next batch.
        """
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(_data_position(data)),
                config=ocp.args.JsonSave({'config': self._config_json}),
            ),
            force=True,
        )
        self._last_save_time = time.monotonic()

    def restore(self, step: int, target: TrainState) -> Restored:
        """The state saved at `step`, laid out like `target`, and the data position saved with it."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(target)), data=ocp.args.JsonRestore()),
        )
        return Restored(state=restored['state'], step=step, data_position=restored['data'])

    def restore_latest(self, target: TrainState) -> Restored | None:
        """The newest checkpoint that reads back; None if there is none.

        Unreadable newer ones are moved aside to checkpoints/corrupt-<step> (their steps are saved anew
        as the run passes them). A folder whose checkpoints are all unreadable is an error: never
        silently start over there.
        """
        unreadable: list[tuple[int, str]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            fix = (
                'start a new run from its parameters alone with '
                f'--config.checkpoint.restore_from={self.directory / str(step)} and another --workdir'
            )
            try:
                _check_matches(self._manager, self.directory, step, target, self._config_json, fix)
                restored = self.restore(step, target)
            except ConfigError:
                raise
            except Exception as error:  # orbax raises many types for missing or garbled files
                _silence_failed_restore_stragglers()
                unreadable.append((step, _reason(error)))
                continue
            for bad_step, reason in unreadable:
                moved = self._move_aside(bad_step)
                if moved is not None:
                    logging.warning(
                        'checkpoint %s is unreadable (%s): moved it to %s; resuming from step %d',
                        self.directory / str(bad_step),
                        reason,
                        moved,
                        step,
                    )
            if unreadable:
                self._manager.reload()
            return restored
        if unreadable:
            step, reason = unreadable[0]
            raise ConfigError(
                f'no checkpoint in {self.directory} can be read (the newest, {self.directory / str(step)}: {reason}); '
                f'move {self.directory} away to start over, or use another --workdir.'
            )
        return None

    def _move_aside(self, step: int) -> pathlib.Path | None:
        """Renames checkpoint `step` to corrupt-<step> (process 0 does it; all wait); returns the new path there."""
        destination = self.directory / f'corrupt-{step}'
        suffix = 1
        while destination.exists():
            destination, suffix = self.directory / f'corrupt-{step}-{suffix}', suffix + 1
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(destination)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f'shardtrain: moved checkpoint {step} aside')
        return destination if jax.process_index() == 0 else None

    def restore_other_run(
        self, path: str, target: ShardedState, params_only: bool
    ) -> tuple[TrainState, str, list[str]]:
        """A new run's start from another run's checkpoint: its params with a fresh optimizer, or its whole state;
        the checkpoint used, and the params initialized anew (LoRA adapters, a classifier head).

        `path` is a checkpoint (.../checkpoints/600) or a folder of them (its newest is used). Params alone
        are read alone: the other run's optimizer may differ, and nothing else is held in memory.
        """
        folder = find_checkpoint(path, 'config.checkpoint.restore_from')
        step = int(folder.name)
        other = open_read_only(folder.parent)
        try:
            fix = 'restore its parameters alone with --config.checkpoint.restore_params_only=True'
            _check_matches(
                other, folder.parent, step, target.abstract, self._config_json, fix, params_only, other_run=True
            )
            if params_only:
                saved = set(_leaf_shapes(other.item_metadata(step)['state']['params']))
                fresh = new_in_fine_tuning(saved, set(_leaf_shapes(target.abstract.params)))
                abstract = param_roles.select_paths(target.abstract.params, lambda name: name not in fresh)
                fresh_params = sorted(name for name in fresh if name in _leaf_shapes(target.abstract.params))
                return target.start_from(restore_params(folder, abstract)), str(folder), fresh_params
            restored = other.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target.abstract)))
            return restored['state'], str(folder), []
        finally:
            other.close()

    def wait(self) -> None:
        """Blocks until the save in flight, if any, is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        # orbax (0.12.8) starts removing a killed run's half-written folders in a thread when the manager
        # opens, and neither wait_until_finished() nor close() waits for it: a run that ends at once (a
        # one-line error) would have that thread fail during interpreter shutdown and print a traceback.
        await_cleanup = getattr(self._manager, '_maybe_await_cleanup_tmp_directory', None)
        if await_cleanup is not None:
            await_cleanup()
        self._manager.close()
        # A run refused before its first save (another model, a bad restore_from) leaves no empty folder behind.
        if jax.process_index() == 0 and self.directory.is_dir() and not any(self.directory.iterdir()):
            self.directory.rmdir()
