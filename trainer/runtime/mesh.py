"""The device mesh (`data`, `fsdp`, `tensor`) and logical-name -> mesh shardings."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import linen
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.transformer import Rules

MESH_AXES = ('data', 'fsdp', 'tensor')
# The batch axis of every input array; the rules decide which mesh axes split it.
BATCH_AXES = ('activation_batch', 'activation_length')


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Axis sizes in MESH_AXES order, with a single -1 replaced by the devices left over."""
    shape = [int(sizes[axis]) for axis in MESH_AXES]
    if -1 in shape:
        known = math.prod(size for size in shape if size != -1)
        shape[shape.index(-1)] = num_devices // known if known and num_devices % known == 0 else 0
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with the config's axis sizes; assumes a validated config."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(sizes, len(devices))
    # Auto axes: sharding propagates GSPMD-style from the annotated inputs and constraints.
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == jax.device_count():
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def logical_sharding(names: Sequence[str | None], mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of an array whose axes carry these logical names."""
    return NamedSharding(mesh, linen.logical_to_mesh_axes(tuple(names), rules))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of an array held whole on every device (scalars, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of a (batch, sequence) array of token ids."""
    return logical_sharding(BATCH_AXES, mesh, rules)


def describe(mesh: Mesh) -> str:
    """One line such as 'data=1 fsdp=4 tensor=2 (8 devices)'."""
    sizes = ' '.join(f'{name}={size}' for name, size in mesh.shape.items())
    return f'{sizes} ({mesh.devices.size} devices)'
