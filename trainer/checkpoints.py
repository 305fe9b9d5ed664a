"""Asynchronous orbax checkpoints of the train state and the data iterator, and resuming from them."""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from ml_collections import config_dict

from trainer.data.pipeline import GlobalBatches
from trainer.errors import ConfigError
from trainer.state import ShardedState, TrainState


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


def _param_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """'blocks/mlp/w_up_DF' -> shape, for the params of a TrainState or of its saved metadata."""

    def name(entry: Any) -> str:
        return str(getattr(entry, 'key', getattr(entry, 'name', getattr(entry, 'idx', entry))))

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {'/'.join(map(name, path[1:])): tuple(leaf.shape) for path, leaf in leaves if name(path[0]) == 'params'}


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


def open_read_only(directory: pathlib.Path) -> ocp.CheckpointManager:
    """Another run's checkpoints folder, for reading only."""
    return ocp.CheckpointManager(
        directory.absolute(),
        item_handlers=_item_handlers(),
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    )


def _abstract(target: TrainState) -> TrainState:
    """Shapes, dtypes and shardings of `target` (arrays or abstract): restored arrays land in this mesh's layout."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)


def _check_same_model(manager: ocp.CheckpointManager, directory: pathlib.Path, step: int, target: TrainState) -> None:
    """A checkpoint of another model shape is an error naming the first parameter that differs."""
    metadata = manager.item_metadata(step)['state']
    saved = _param_shapes(metadata) if metadata is not None else {}
    if not saved:  # files missing: unreadable (restore_latest tries the one before), not another model
        raise FileNotFoundError('its parameter metadata is missing')
    wanted = _param_shapes(target)
    for name in sorted(set(saved) | set(wanted)):
        if saved.get(name) != wanted.get(name):
            raise ConfigError(
                f'{directory / str(step)} holds another model: parameter {name} is {saved.get(name, "absent")} '
                f'there but {wanted.get(name, "absent")} in this config; use the config that run used (its '
                'config.json is in its workdir) or another --workdir.'
            )


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
            create=True,
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
        if self._manager.latest_step() == step:
            return
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

    def restore(self, step: int, target: TrainState, data: GlobalBatches) -> TrainState:
        """The state saved at `step`, laid out like `target`; the data iterator is rewound in place."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(target)), data=ocp.args.JsonRestore()),
        )
        saved = restored['data']
        if saved.get('num_streams') == data.num_streams:
            data.set_state({int(stream): _from_json(text) for stream, text in saved['streams'].items()})
        else:
            logging.warning(
                'the data position in %s is for %s data streams but this run has %d: the data order starts '
                'over; set config.data.num_streams=%s to continue it exactly',
                self.directory / str(step),
                saved.get('num_streams', '?'),
                data.num_streams,
                saved.get('num_streams', '?'),
            )
        return restored['state']

    def restore_latest(self, target: TrainState, data: GlobalBatches) -> tuple[TrainState, int] | None:
        """The newest checkpoint that reads back, skipping (and naming) unreadable ones; None if there is none.

        A folder whose checkpoints are all unreadable is an error: never silently start over there.
        """
        problem = ''
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                _check_same_model(self._manager, self.directory, step, target)
                return self.restore(step, target, data), step
            except ConfigError:
                raise
            except Exception as error:  # orbax raises many types for missing or garbled files
                problem = f'{self.directory / str(step)}: {str(error).strip().splitlines()[0][:300]}'
                logging.warning('checkpoint %s is unreadable; trying the one before', problem)
        if problem:
            raise ConfigError(
                f'no checkpoint in {self.directory} can be read (the oldest tried: {problem}); move that folder '
                'away to start over, or use another --workdir.'
            )
        return None

    def restore_other_run(self, path: str, target: ShardedState, params_only: bool) -> tuple[TrainState, str]:
        """A new run's start from another run's checkpoint: its params only, or its whole train state.

        `path` is a checkpoint (.../checkpoints/600) or a folder of them (its newest is used).
        """
        folder = find_checkpoint(path, 'config.checkpoint.restore_from')
        step = int(folder.name)
        other = open_read_only(folder.parent)
        try:
            _check_same_model(other, folder.parent, step, target.abstract)
            restored = other.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target.abstract)))
        finally:
            other.close()
        state = restored['state']
        return (target.state.replace(params=state.params), str(folder)) if params_only else (state, str(folder))

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
