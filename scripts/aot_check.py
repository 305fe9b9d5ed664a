"""Compiles a config's train step ahead of time and reports what each device would hold, without running it.

Usage:
  python scripts/aot_check.py --config configs/small_lm.py [--config.x.y=value ...] [--devices 8]

Nothing is allocated: the state and batch are abstract, so a 7B config compiles on a laptop. On a
machine without the accelerators, --devices simulates that many CPU devices for the mesh (set before
jax starts); sizes in bytes per device: parameters and optimizer state (the step's arguments), the
largest temporaries, and their sum, which must fit the device's memory with room to spare (XLA's
figures on CPU are close to, not the same as, a GPU's). FLOPs are XLA's count for one step, per device.
"""

from __future__ import annotations

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def _set_devices(argv: list[str]) -> None:
    """--devices N must act before jax is imported."""
    for i, arg in enumerate(argv):
        count = arg.split('=', 1)[1] if arg.startswith('--devices=') else (argv[i + 1] if arg == '--devices' else None)
        if count:
            flag = f'--xla_force_host_platform_device_count={count}'
            os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {flag}'.strip()
            os.environ.setdefault('JAX_PLATFORMS', 'cpu')


_set_devices(sys.argv)

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from trainer import cli  # noqa: E402
from trainer.errors import ConfigError  # noqa: E402
from trainer.modeling import param_roles  # noqa: E402
from trainer.runtime import mesh as mesh_lib  # noqa: E402
from trainer.training import train  # noqa: E402
from trainer.training.steps import BATCH_KEYS  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A config file, as for python -m trainer.')
flags.DEFINE_integer('devices', 0, 'Simulate this many CPU devices for the mesh (0: the real devices).')


def _gib(n: float) -> str:
    return f'{n / 2**30:.2f} GiB'


def report(config) -> dict[str, float]:
    """Compiles config's train step for its mesh; returns per-device bytes and FLOPs."""
    mesh = mesh_lib.make_mesh({axis: config.mesh[axis] for axis in mesh_lib.MESH_AXES})
    with jax.set_mesh(mesh):
        setup = train.build(config, mesh)
        shape = (config.train.global_batch_size, config.data.seq_len)
        batch = {
            name: jax.ShapeDtypeStruct(
                shape, 'float32' if name == 'weights' else 'int32', sharding=setup.batch_sharding
            )
            for name in BATCH_KEYS
        }
        compiled = setup.compiled.train.lower(setup.sharded.abstract, batch).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    params = setup.sharded.abstract.params
    trainable = setup.sharded.partition.trainable(params)
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    return {
        'devices': mesh.devices.size,
        'params': count(params),
        'trainable_params': count(trainable),
        'arguments_bytes': memory.argument_size_in_bytes,
        'temporary_bytes': memory.temp_size_in_bytes,
        'output_bytes': memory.output_size_in_bytes,
        'alias_bytes': memory.alias_size_in_bytes,
        # Donated outputs reuse their arguments' buffers: peak = arguments + temporaries + new outputs.
        'peak_bytes': memory.argument_size_in_bytes
        + memory.temp_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes,
        'flops_per_step': float(cost.get('flops', 0.0)) if cost else 0.0,
    }


def main(argv: list[str]) -> int:
    cli.start(argv)
    try:
        config = _CONFIG.value
        train.config_checks.check_model(config.model)
        train.config_checks.check_lora(config)
        param_roles.table(config)
        found = report(config)
    except ConfigError as error:
        cli.fail(str(error))
    print(
        f'{found["params"]:,} parameters ({found["trainable_params"]:,} trainable) on {found["devices"]} devices; '
        f'per device: arguments {_gib(found["arguments_bytes"])} (params and optimizer state), '
        f'temporaries {_gib(found["temporary_bytes"])}, peak {_gib(found["peak_bytes"])}; '
        f'{found["flops_per_step"] / 1e12:.2f} TFLOPs per step per device'
    )
    return 0


if __name__ == '__main__':
    app.run(main)
