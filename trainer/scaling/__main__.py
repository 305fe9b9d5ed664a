"""python -m trainer.scaling <verb> [flags]: scaling-law experiments from sweep to compute-optimal answer.

counts   parameters and training FLOPs per token of a config:  --config configs/small_lm.py [--set K=V]
sweep    plan, then run (or emit) a grid of runs:  --config C --out DIR --widths 64,128 --flops 1e13,3e13
         [--tokens ...] [--lrs 3e-3] [--seeds 0] [--emit run|commands|slurm] [--set model.dtype=float32]
collect  one CSV of a sweep's runs:  --sweep DIR --out runs.csv [--per_eval]
fit      Chinchilla approaches 3 and 2 on a CSV (params, tokens, loss[, flops]):  --csv F --out fit.json
         [--budget C] [--bootstrap 200]
plot     the figures of a CSV and its fit:  --csv F --fit fit.json --out DIR
coord_check  muP's coordinate check, SP beside muP:  --config C --out DIR [--widths 64,...,1024] [--steps 5]
lr_transfer  a learning-rate sweep at several widths, SP and muP:  --config C --out DIR --widths 32,64,128,256
         --lrs 1e-3,3e-3,... --tokens 2e5 [--depth 2] [--mup_config tuned.py] [--mup_lrs ...] [--set ...]
tune_base    search muP's base constants at the base width:  --config C --out DIR --width 64 --tokens 2e5
         [--trials 27] [--search halving|random] [--eta 3] [--rungs 3] [--search_space field=lo:hi,...]
depth_transfer  a learning-rate sweep at several depths, plain residuals and CompleteP:  --config C --out DIR
         --width 64 --depths 2,8 --lrs ... --tokens 2e5 [--set ...]
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

from absl import app, flags

from trainer import cli
from trainer.errors import ConfigError
from trainer.modeling.model_setup import model_config
from trainer.scaling import inputs, sweep, tune_base

_CONFIG = flags.DEFINE_string('config', None, 'counts, sweep: the base config file (file.py or file.py:ARG).')
_SET = flags.DEFINE_multi_string('set', [], 'counts, sweep: a config field for every run, e.g. model.dtype=float32.')
_OUT = flags.DEFINE_string('out', None, 'sweep: its folder; collect: the CSV; fit: the JSON; plot: the folder.')
_WIDTHS = flags.DEFINE_list('widths', [], 'sweep: model widths (d_model); depth and heads follow the rule.')
_TOKENS = flags.DEFINE_list('tokens', [], 'sweep: token budgets (each run of each size trains on each).')
_FLOPS = flags.DEFINE_list('flops', [], 'sweep: FLOP budgets, for IsoFLOP curves (tokens = budget / FLOPs per token).')
_LRS = flags.DEFINE_list('lrs', [], "sweep: peak learning rates; default the config's.")
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'sweep: seeds.')
_ASPECT = flags.DEFINE_integer('aspect', 32, 'sweep: width / depth.')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 32, 'sweep: width of each attention head.')
_FF_RATIO = flags.DEFINE_float('ff_ratio', 3.0, 'sweep: d_ff / d_model.')
_KV_RATIO = flags.DEFINE_integer('kv_ratio', 1, 'sweep: query heads per key/value head.')
_WARMUP = flags.DEFINE_float('warmup_fraction', 0.05, "sweep: warmup steps as a fraction of each run's steps.")
_EMIT = flags.DEFINE_enum(
    'emit', 'run', ['run', 'commands', 'slurm'], 'sweep: run here, or write commands / a SLURM array.'
)
_SWEEP = flags.DEFINE_string('sweep', None, 'collect: the sweep folder.')
_PER_EVAL = flags.DEFINE_bool('per_eval', False, 'collect: a row per eval instead of per run.')
_CSV = flags.DEFINE_string('csv', None, 'fit, plot: a CSV with columns params, tokens, loss (optional: flops, budget).')
_FIT = flags.DEFINE_string('fit', None, "plot: fit's JSON (without it, the runs alone).")
_BUDGET = flags.DEFINE_float('budget', None, 'fit: a FLOP budget to allocate: "train N parameters on D tokens".')
_BOOTSTRAP = flags.DEFINE_integer('bootstrap', 200, 'fit: bootstrap resamples for the standard errors.')
_LOSS = flags.DEFINE_string(
    'loss_column',
    'loss',
    "fit, plot: the CSV column to fit: 'loss', 'eval_loss', or an error rate ('acc_error', 'acc_norm_error').",
)
_MC_FILES = flags.DEFINE_string(
    'mc_files', '', 'sweep: multiple-choice JSON lines to score each point on at its end (acc, acc_norm in collect).'
)
_STEPS = flags.DEFINE_integer('steps', 5, 'coord_check: training steps to follow.')
_LR = flags.DEFINE_float('lr', 1e-2, 'coord_check: the learning rate of every width.')
_DEPTH = flags.DEFINE_integer('depth', 2, 'lr_transfer, tune_base: layers of every width (muP transfers across width).')
_MUP_CONFIG = flags.DEFINE_string(
    'mup_config',
    None,
    "lr_transfer: the muP side's config (tune_base's tuned.py); default --config based at the narrowest width.",
)
_MUP_LRS = flags.DEFINE_list(
    'mup_lrs', [], "lr_transfer: the muP side's learning rates; default --lrs, or --mup_config's own rate."
)
_WIDTH = flags.DEFINE_integer('width', 64, 'tune_base: the base width; depth_transfer: the width of every depth.')
_TRIALS = flags.DEFINE_integer('trials', 27, 'tune_base: settings drawn from the search space.')
_SEARCH = flags.DEFINE_enum(
    'search', 'halving', ['halving', 'random'], 'tune_base: successive halving, or every trial on the full budget.'
)
_ETA = flags.DEFINE_integer('eta', 3, 'tune_base, halving: keep the best 1/eta of each rung; eta x the tokens next.')
_RUNGS = flags.DEFINE_integer('rungs', 3, 'tune_base, halving: rungs; the first trains on tokens / eta^(rungs-1).')
_SPACE = flags.DEFINE_list(
    'search_space', list(tune_base.DEFAULT_SPACE), 'tune_base: config fields, each field=lo:hi (log-uniform) or a|b|c.'
)
_SEARCH_SEED = flags.DEFINE_integer('search_seed', 0, 'tune_base: the seed the trials are drawn with.')
_DEPTHS = flags.DEFINE_list('depths', [], 'depth_transfer: the depths (layers); CompleteP is based at the first.')


def _require(flag, verb: str):
    if flag.value in (None, []):
        cli.fail(f'{verb} needs --{flag.name}.')
    return flag.value


def do_counts() -> None:
    from trainer.modeling import counts

    config = inputs.load_config(_require(_CONFIG, 'counts'), _SET.value)
    found = counts.count(model_config(config), config.data.seq_len)
    print(json.dumps(dataclasses.asdict(found) | {'train_flops_per_token': found.train_flops_per_token}, indent=2))


def do_sweep() -> int:
    config_file = _require(_CONFIG, 'sweep')
    folder = pathlib.Path(_require(_OUT, 'sweep'))
    base = inputs.load_config(config_file, _SET.value)
    shape = sweep.Shape(_ASPECT.value, _HEAD_DIM.value, _FF_RATIO.value, _KV_RATIO.value)
    points = sweep.plan(
        base,
        inputs.numbers(_require(_WIDTHS, 'sweep'), int),
        shape,
        token_budgets=inputs.numbers(_TOKENS.value),
        flop_budgets=inputs.numbers(_FLOPS.value),
        learning_rates=inputs.numbers(_LRS.value),
        seeds=inputs.numbers(_SEEDS.value, int),
        warmup_fraction=_WARMUP.value,
    )
    extra = [f'--config.{setting}' for setting in _SET.value]
    commands = sweep.write(folder, config_file, points, extra)
    total = sum(p.flops for p in points)
    print(f'{len(points)} points, {total:.2e} training FLOPs in all; plan in {folder / "sweep.json"}')
    if _EMIT.value != 'run':
        print(f'wrote {sweep.emit(folder, commands, _EMIT.value)}')
        return 0
    done, failed, stopped = sweep.run(folder, commands, points, mc_files=_MC_FILES.value)
    if stopped:
        print(
            f'stopped: {done} of {len(points)} points done, the running one saved; run the same command to resume '
            '(finished points are skipped, the stopped one resumes from its checkpoint).',
            file=sys.stderr,
        )
        return sweep.EXIT_STOPPED
    print(f'{done} done, {failed} failed; collect with: python -m trainer.scaling collect --sweep {folder} --out ...')
    return 1 if failed else 0


def do_collect() -> None:
    from trainer.scaling import collect

    folder = pathlib.Path(_require(_SWEEP, 'collect'))
    if not (folder / 'sweep.json').is_file():
        raise ConfigError(f'--sweep={folder} holds no sweep.json: give the folder a sweep wrote.')
    table = collect.rows(folder, _PER_EVAL.value)
    out = pathlib.Path(_require(_OUT, 'collect'))
    collect.write_csv(table, out)
    states = [row['state'] for row in table]
    print(f'{len(table)} rows ({states.count("done")} done) in {out}')


def do_fit() -> None:
    from trainer.scaling import fit

    columns = inputs.read_csv(_require(_CSV, 'fit'), _LOSS.value)
    result = fit.fit_and_report(columns, inputs.flops_per_param_token(columns), _BOOTSTRAP.value, _BUDGET.value)
    out = pathlib.Path(_require(_OUT, 'fit'))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + '\n')
    print(f'wrote {out}')


def do_plot() -> None:
    from trainer.scaling import fit, plot

    columns = inputs.read_csv(_require(_CSV, 'plot'), _LOSS.value)
    k = inputs.flops_per_param_token(columns)
    fit3, fit2 = fit.read_fit(_FIT.value) if _FIT.value else (None, None)  # the law's frontier and residuals
    written = plot.all_figures(
        pathlib.Path(_require(_OUT, 'plot')),
        columns['params'],
        columns['tokens'],
        columns.get('flops'),
        columns['loss'],
        fit3,
        fit2,
        k,
        _LOSS.value,
    )
    print('wrote ' + ', '.join(str(p) for p in written))


def do_coord_check() -> None:
    from trainer.scaling import coord_check

    base = inputs.load_config(_require(_CONFIG, 'coord_check'), _SET.value)
    folder = pathlib.Path(_require(_OUT, 'coord_check'))
    widths = tuple(inputs.numbers(_WIDTHS.value or ['64', '128', '256', '512', '1024'], int))
    setting = coord_check.Setting(widths, _HEAD_DIM.value, _FF_RATIO.value, _STEPS.value, _LR.value)
    results = coord_check.run(base, setting)
    folder.mkdir(parents=True, exist_ok=True)
    summary = {name: coord_check.growth(results, name, setting.steps) for name in results}
    record = {'setting': dataclasses.asdict(setting), 'sizes': results, 'growth_after_last_step': summary}
    (folder / 'coord_check.json').write_text(json.dumps(record, indent=2) + '\n')
    coord_check.plot(results, str(folder / 'coord_check.png'))
    for name, ratios in summary.items():
        worst = max(ratios, key=ratios.get)
        print(f'{name}: across widths {widths[0]}-{widths[-1]}, the {worst} size varies {ratios[worst]:.1f}x')
    print(f'wrote {folder / "coord_check.json"}, {folder / "coord_check.png"}')


def _stopped_exit() -> int:
    print('stopped: the running point saved; run the same command to resume.', file=sys.stderr)
    return sweep.EXIT_STOPPED


def _run_transfer(folder: pathlib.Path, variants: dict, widths: list[int], shape: sweep.Shape) -> int:
    from trainer.scaling import lr_transfer

    lrs = inputs.numbers(_require(_LRS, 'the transfer verbs'))
    tokens = inputs.numbers(_require(_TOKENS, 'the transfer verbs'))
    return lr_transfer.run_variants(folder, variants, inputs.load_config, widths, shape, lrs, tokens, _WARMUP.value)


def do_lr_transfer() -> int:
    from trainer.scaling import lr_transfer

    config_file = _require(_CONFIG, 'lr_transfer')
    folder = pathlib.Path(_require(_OUT, 'lr_transfer'))
    widths = inputs.numbers(_require(_WIDTHS, 'lr_transfer'), int)
    shape = sweep.Shape(_ASPECT.value, _HEAD_DIM.value, _FF_RATIO.value, _KV_RATIO.value, _DEPTH.value)
    sp = [*_SET.value, 'model.parametrization=sp']
    if _MUP_CONFIG.value:  # a tuned base: its own base width, constants and (by default) learning rate
        mup_file, mup = _MUP_CONFIG.value, list(_SET.value)
        mup_lrs = inputs.numbers(_MUP_LRS.value) or [inputs.load_config(mup_file, mup).train.learning_rate]
    else:
        mup_file, mup_lrs = config_file, inputs.numbers(_MUP_LRS.value)
        mup = [*_SET.value, 'model.parametrization=mup', f'model.base_width={min(widths)}']
        mup.append(f'model.base_head_dim={_HEAD_DIM.value}')
    try:
        failed = _run_transfer(folder, {'sp': (config_file, sp, []), 'mup': (mup_file, mup, mup_lrs)}, widths, shape)
    except lr_transfer.Stopped:
        return _stopped_exit()
    lr_transfer.report(lr_transfer.collect(folder), folder, 'lr_transfer', by='width')
    return 1 if failed else 0


def do_depth_transfer() -> int:
    from trainer.scaling import lr_transfer

    config_file = _require(_CONFIG, 'depth_transfer')
    folder = pathlib.Path(_require(_OUT, 'depth_transfer'))
    depths = inputs.numbers(_require(_DEPTHS, 'depth_transfer'), int)
    # Plain residuals with CompleteP's fields at their off values (a CompleteP --config works too); CompleteP
    # based at the first depth.
    plain = ['model.depth_scaling=none', 'model.base_depth=0', 'model.depth_alpha=1.0']
    variants = {
        'none': (config_file, [*_SET.value, *plain], []),
        'completep': (config_file, [*_SET.value, 'model.depth_scaling=completep', f'model.base_depth={depths[0]}'], []),
    }
    failed = 0
    try:  # a sweep per depth (the shape fixes the depth), each variant's runs in one folder
        for depth in depths:
            shape = sweep.Shape(_ASPECT.value, _HEAD_DIM.value, _FF_RATIO.value, _KV_RATIO.value, depth)
            failed += _run_transfer(folder / f'depth{depth}', variants, [_WIDTH.value], shape)
    except lr_transfer.Stopped:
        return _stopped_exit()
    table = {}
    for depth in depths:
        for variant, by_depth in lr_transfer.collect(folder / f'depth{depth}', ('none', 'completep'), 'depth').items():
            table.setdefault(variant, {}).update(by_depth)
    lr_transfer.report(table, folder, 'depth_transfer', by='depth')
    return 1 if failed else 0


def do_tune_base() -> int:
    config_file = _require(_CONFIG, 'tune_base')
    folder = pathlib.Path(_require(_OUT, 'tune_base'))
    budgets = inputs.numbers(_require(_TOKENS, 'tune_base'))
    if len(budgets) != 1:
        cli.fail('tune_base needs one --tokens budget (the last rung trains on it).')
    tokens = budgets[0]
    for name, flag in (('trials', _TRIALS), ('eta', _ETA), ('rungs', _RUNGS)):
        if flag.value < (2 if name == 'eta' else 1):
            cli.fail(f'--{name}={flag.value} must be at least {2 if name == "eta" else 1}.')
    shape = sweep.Shape(_ASPECT.value, _HEAD_DIM.value, _FF_RATIO.value, _KV_RATIO.value, _DEPTH.value)
    search = tune_base.Search(
        trials=_TRIALS.value, method=_SEARCH.value, eta=_ETA.value, rungs=_RUNGS.value, seed=_SEARCH_SEED.value
    )
    code = tune_base.tune(
        folder, config_file, _SET.value, _SPACE.value, search, width=_WIDTH.value, shape=shape, tokens=tokens,
        warmup_fraction=_WARMUP.value,
    )  # fmt: skip
    return _stopped_exit() if code == sweep.EXIT_STOPPED else code


VERBS = {
    'counts': do_counts,
    'sweep': do_sweep,
    'collect': do_collect,
    'fit': do_fit,
    'plot': do_plot,
    'coord_check': do_coord_check,
    'lr_transfer': do_lr_transfer,
    'tune_base': do_tune_base,
    'depth_transfer': do_depth_transfer,
}


def main(argv: list[str]) -> int:
    cli.start(argv[:1])
    if len(argv) != 2 or argv[1] not in VERBS:
        cli.fail(f'give one verb: {", ".join(VERBS)} (python -m trainer.scaling --help).')
    try:
        return VERBS[argv[1]]() or 0
    except ConfigError as error:
        cli.fail(str(error))


if __name__ == '__main__':
    app.run(main)
