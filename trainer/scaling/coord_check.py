"""The coordinate check of muP (Yang et al. 2022, Tensor Programs V, section 7): activation sizes by width.

Models of several widths (the same depth and head size) train a few steps from the same data at the same
learning rate; after each step, the mean absolute value of each layer's output coordinates is recorded.
Under a correct muP they do not depend on the width; under SP they grow with it once the weights move.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import config_dict

from trainer.data import pipeline, tokenizers
from trainer.runtime import mesh as mesh_lib
from trainer.training import train


@dataclasses.dataclass(frozen=True)
class Setting:
    """What the coordinate check varies and fixes."""

    widths: tuple[int, ...]  # the first is the base width of muP
    head_dim: int = 32
    ff_ratio: float = 3.0
    steps: int = 5
    learning_rate: float = 1e-2


def configure(base: config_dict.ConfigDict, width: int, parametrization: str, setting: Setting):
    """`base` at `width` (heads of head_dim), muP based at the first width, a constant rate, one device."""
    config = base.copy_and_resolve_references()
    heads = max(1, width // setting.head_dim)
    config.model.update(
        d_model=width,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=0,
        d_ff=int(setting.ff_ratio * width),
        parametrization=parametrization,
        base_width=setting.widths[0],
        base_head_dim=setting.head_dim,
        dtype='float32',
    )
    config.train.update(
        learning_rate=setting.learning_rate, lr_schedule='constant', warmup_steps=0, grad_clip=0.0, weight_decay=0.0
    )
    for axis in mesh_lib.MESH_AXES:
        config.mesh[axis] = 1
    return config


def layer_sizes(model: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Mean |coordinate| of the embedding output, each block's output (the residual stream) and the logits."""
    positions, segments = batch['positions'], batch['segment_ids']
    x_BTD = model.embed(batch['inputs'], positions)
    sizes = {'embedding': jnp.abs(x_BTD).mean()}
    graphdef, stacked = nnx.split(model.blocks)
    for i in range(model.cfg.num_layers):
        block = nnx.merge(graphdef, jax.tree.map(operator.itemgetter(i), stacked))
        x_BTD, _ = block(x_BTD, positions, segments, None)
        sizes[f'block {i}'] = jnp.abs(x_BTD).mean()
    sizes['logits'] = jnp.abs(model.logits(x_BTD)).mean()
    return sizes


def run(base: config_dict.ConfigDict, setting: Setting, parametrizations=('sp', 'mup'), echo=print) -> dict:
    """{parametrization: {width: {layer: [size after step 0, 1, ..., steps]}}}."""
    tokenizer = tokenizers.make_tokenizer(base.data.tokenizer, base.data.eos_token)
    results: dict[str, dict[int, dict[str, list[float]]]] = {}
    for parametrization in parametrizations:
        results[parametrization] = {}
        for width in setting.widths:
            config = configure(base, width, parametrization, setting)
            mesh = mesh_lib.make_mesh({axis: 1 for axis in mesh_lib.MESH_AXES}, jax.devices()[:1])
            with jax.set_mesh(mesh):
                setup = train.build(config, mesh)
                data = pipeline.train_batches(config, tokenizer, setup.batch_sharding)
                batches = [next(data) for _ in range(setting.steps)]  # the same data for every width
                data.close()
                measure = jax.jit(
                    lambda params, batch, graphdef=setup.sharded.graphdef: layer_sizes(
                        nnx.merge(graphdef, params), batch
                    )
                )
                state = setup.sharded.state
                trace = [jax.device_get(measure(state.params, batches[0]))]
                for batch in batches:
                    state, _ = setup.compiled.train(state, batch)
                    trace.append(jax.device_get(measure(state.params, batches[0])))
            # In the model's order (device_get sorts dict keys): embedding, blocks, logits.
            layers = ['embedding', *(f'block {i}' for i in range(config.model.num_layers)), 'logits']
            results[parametrization][width] = {layer: [float(t[layer]) for t in trace] for layer in layers}
            final = results[parametrization][width]
            last_block = final[layers[-2]][-1]
            echo(
                f'{parametrization} width {width}: after {setting.steps} steps logits {final["logits"][-1]:.3g}, '
                f'{layers[-2]} {last_block:.3g}'
            )
    return results


def growth(results: dict, parametrization: str, step: int) -> dict[str, float]:
    """Per layer, the largest over the smallest size across widths after `step` steps (1 = flat)."""
    by_width = results[parametrization]
    layers = next(iter(by_width.values()))
    ratios = {}
    for layer in layers:
        values = np.array([by_width[w][layer][step] for w in by_width])
        ratios[layer] = float(values.max() / values.min())
    return ratios


def plot(results: dict, out_png: str, steps_shown: tuple[int, ...] = (1, 3, 5)) -> None:
    """A panel per parametrization and step: each layer's size against width."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from trainer.scaling.plot import readable

    names = list(results)
    last = len(next(iter(next(iter(results.values())).values()))['logits']) - 1
    steps_shown = tuple(s for s in steps_shown if s <= last) or (last,)
    fig, axes = plt.subplots(
        len(names), len(steps_shown), figsize=(4 * len(steps_shown), 3.4 * len(names)), squeeze=False
    )
    for row, name in enumerate(names):
        by_width = results[name]
        widths = sorted(by_width)
        layers = list(by_width[widths[0]])
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(layers)))
        for column, step in enumerate(steps_shown):
            ax = axes[row][column]
            for layer, color in zip(layers, colors, strict=True):
                ax.plot(widths, [by_width[w][layer][step] for w in widths], 'o-', color=color, label=layer, ms=3)
            ax.set_xscale('log', base=2)
            ax.set_yscale('log')
            ax.set_title(f'{"muP" if name == "mup" else "SP"}, after step {step}')
            ax.set_xlabel('width (d_model)')
            if column == 0:
                ax.set_ylabel('mean |activation|')
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    readable(fig)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
