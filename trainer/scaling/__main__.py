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

import csv
import dataclasses
import importlib.util
import json
import pathlib
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_dict

from trainer import cli
from trainer.errors import ConfigError
from trainer.scaling import sweep, tune_base
from trainer.train import model_config

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


def load_config(spec: str, settings: list[str]) -> config_dict.ConfigDict:
    """A config file's get_config() (with its ':ARG'), then --set fields, typed like the fields they replace."""
    path, _, argument = spec.partition(':')
    if not pathlib.Path(path).is_file():
        raise ConfigError(f'--config={spec} is not a file: give a config such as configs/small_lm.py.')
    module_spec = importlib.util.spec_from_file_location('sweep_base_config', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(argument) if argument else module.get_config()
    for setting in settings:
        key, _, value = setting.partition('=')
        section, _, name = key.rpartition('.')
        holder = config[section] if section else config
        if name not in holder:
            raise ConfigError(f'--set {setting}: {key} names no field of the config.')
        old = holder[name]
        holder[name] = value.lower() in ('1', 'true') if isinstance(old, bool) else type(old)(value)
    return config


def _numbers(values: list[str], kind=float) -> list:
    try:
        return [kind(float(v)) if kind is int else kind(v) for v in values]
    except ValueError as error:
        raise ConfigError(f'not a number: {error}') from None


def read_csv(path: str, loss_column: str) -> dict[str, np.ndarray]:
    """The columns fit and plot use; rows not 'done' (from collect) are left out."""
    try:
        with open(path, newline='') as f:
            rows = list(csv.DictReader(f))
    except OSError as error:
        raise ConfigError(f'cannot read --csv={path}: {error.strerror}.') from None
    rows = [r for r in rows if r.get('state', 'done') in ('done', '')]
    needed = ('params', 'tokens', loss_column)
    missing = [c for c in needed if not rows or c not in rows[0]]
    if missing:
        raise ConfigError(
            f'--csv={path} lacks the column(s) {", ".join(missing)}: it needs params, tokens and {loss_column}.'
        )
    columns = {}
    for name in ('params', 'tokens', loss_column, 'flops', 'budget'):
        if name in rows[0] and all(r[name] not in ('', None) for r in rows):
            try:
                columns[name] = np.array([float(r[name]) for r in rows])
            except ValueError as error:
                raise ConfigError(f'--csv={path}, column {name}: {error}.') from None
    columns['loss'] = columns.pop(loss_column)
    return columns


def flops_per_param_token(columns: dict[str, np.ndarray]) -> float:
    """k in C = k N D: the data's own, from a flops column, else 6 (the convention)."""
    if 'flops' in columns:
        return float(np.median(columns['flops'] / (columns['params'] * columns['tokens'])))
    return 6.0


def do_counts() -> None:
    from trainer import counts

    config = load_config(_require(_CONFIG, 'counts'), _SET.value)
    found = counts.count(model_config(config), config.data.seq_len)
    print(json.dumps(dataclasses.asdict(found) | {'train_flops_per_token': found.train_flops_per_token}, indent=2))


def do_sweep() -> int:
    config_file = _require(_CONFIG, 'sweep')
    folder = pathlib.Path(_require(_OUT, 'sweep'))
    base = load_config(config_file, _SET.value)
    shape = sweep.Shape(_ASPECT.value, _HEAD_DIM.value, _FF_RATIO.value, _KV_RATIO.value)
    points = sweep.plan(
        base,
        _numbers(_require(_WIDTHS, 'sweep'), int),
        shape,
        token_budgets=_numbers(_TOKENS.value),
        flop_budgets=_numbers(_FLOPS.value),
        learning_rates=_numbers(_LRS.value),
        seeds=_numbers(_SEEDS.value, int),
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

    columns = read_csv(_require(_CSV, 'fit'), _LOSS.value)
    k = flops_per_param_token(columns)
    fit3 = fit.approach3(columns['params'], columns['tokens'], columns['loss'], bootstraps=_BOOTSTRAP.value)
    law = fit3.law
    result = {
        'approach3': dataclasses.asdict(law) | {'standard_errors': fit3.standard_errors, 'objective': fit3.objective},
        'warning': fit3.warning,
        'points': fit3.points,
        'flops_per_param_token': k,
        'compute_optimal': {  # N*(C) = params_coefficient * C^params_exponent, D*(C) = C / (k N*(C))
            'params_exponent': law.beta / (law.alpha + law.beta),
            'tokens_exponent': law.alpha / (law.alpha + law.beta),
            'params_coefficient': law.optimal(1.0, k)[0],
            'tokens_coefficient': law.optimal(1.0, k)[1],
        },
    }
    print(
        f'L(N, D) = {law.E:.3f} + {law.A:.4g} / N^{law.alpha:.3f} + {law.B:.4g} / D^{law.beta:.3f}  '
        f'(standard errors: alpha {fit3.standard_errors["alpha"]:.3f}, beta {fit3.standard_errors["beta"]:.3f}, '
        f'E {fit3.standard_errors["E"]:.3f}; {fit3.points} points)'
    )
    if fit3.warning:
        print(f'warning: {fit3.warning}; its predictions are loose (fit.json and the figures say so too).')
    print(
        f'compute-optimal: N* ~ C^{result["compute_optimal"]["params_exponent"]:.3f}, '
        f'D* ~ C^{result["compute_optimal"]["tokens_exponent"]:.3f} (C = {k:.2f} N D)'
    )
    if 'flops' in columns:
        try:
            fit2 = fit.approach2(columns['params'], columns['flops'], columns['loss'], k, columns.get('budget'))
            result['approach2'] = dataclasses.asdict(fit2)
            print(f'IsoFLOP (approach 2): N* ~ C^{fit2.params_exponent:.3f} over {len(fit2.curves)} budgets')
        except ConfigError as error:
            print(f'IsoFLOP (approach 2) left out: {error}')
    if _BUDGET.value:
        n, d = law.optimal(_BUDGET.value, k)
        result['budget'] = {'flops': _BUDGET.value, 'params': n, 'tokens': d, 'loss': float(law.loss(n, d))}
        print(
            f'for {_BUDGET.value:.2e} FLOPs: train {n:,.0f} parameters on {d:,.0f} tokens (loss {law.loss(n, d):.3f})'
        )
    out = pathlib.Path(_require(_OUT, 'fit'))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + '\n')
    print(f'wrote {out}')


def do_plot() -> None:
    from trainer.scaling import fit, plot

    columns = read_csv(_require(_CSV, 'plot'), _LOSS.value)
    k = flops_per_param_token(columns)
    fit3 = fit2 = None
    if _FIT.value:  # the fitted law's frontier, allocation and residuals
        saved = json.loads(pathlib.Path(_FIT.value).read_text())
        law = fit.Law(**{name: saved['approach3'][name] for name in ('E', 'A', 'B', 'alpha', 'beta')})
        fit3 = fit.Approach3(
            law,
            saved['approach3']['standard_errors'],
            saved['approach3']['objective'],
            saved['points'],
            0,
            saved.get('warning', ''),
        )
        if 'approach2' in saved:
            curves = [fit.IsoFlop(**{**c, 'parabola': tuple(c['parabola'])}) for c in saved['approach2']['curves']]
            fit2 = fit.Approach2(**{**saved['approach2'], 'curves': curves})
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

    base = load_config(_require(_CONFIG, 'coord_check'), _SET.value)
    folder = pathlib.Path(_require(_OUT, 'coord_check'))
    widths = tuple(_numbers(_WIDTHS.value or ['64', '128', '256', '512', '1024'], int))
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


def _transfer(folder, variants, widths, shape, lrs, echo=print) -> int:
    """Runs a sweep per variant ({name: (config file, settings, learning rates)}); returns the failed runs."""
    failed = 0
    for name, (config_file, settings, rates) in variants.items():
        base = load_config(config_file, settings)
        points = sweep.plan(
            base,
            widths,
            shape,
            token_budgets=_numbers(_require(_TOKENS, 'the transfer verbs')),
            learning_rates=rates or lrs,
            warmup_fraction=_WARMUP.value,
        )
        commands = sweep.write(folder / name, config_file, points, [f'--config.{s}' for s in settings])
        echo(f'{name}: {len(points)} runs in {folder / name}')
        done, failed_here, stopped = sweep.run(folder / name, commands, points)
        if stopped:
            raise _Stopped()
        failed += failed_here
    return failed


class _Stopped(Exception):
    """A transfer sweep was stopped by a signal (its running point saved)."""


def _stopped_exit() -> int:
    print('stopped: the running point saved; run the same command to resume.', file=sys.stderr)
    return sweep.EXIT_STOPPED


def do_lr_transfer() -> int:
    from trainer.scaling import lr_transfer

    config_file = _require(_CONFIG, 'lr_transfer')
    folder = pathlib.Path(_require(_OUT, 'lr_transfer'))
    widths = _numbers(_require(_WIDTHS, 'lr_transfer'), int)
    lrs = _numbers(_require(_LRS, 'lr_transfer'))
    shape = sweep.Shape(_ASPECT.value, _HEAD_DIM.value, _FF_RATIO.value, _KV_RATIO.value, _DEPTH.value)
    sp = [*_SET.value, 'model.parametrization=sp']
    if _MUP_CONFIG.value:  # a tuned base: its own base width, constants and (by default) learning rate
        mup_file, mup = _MUP_CONFIG.value, list(_SET.value)
        mup_lrs = _numbers(_MUP_LRS.value) or [load_config(mup_file, mup).train.learning_rate]
    else:
        mup_file, mup_lrs = config_file, _numbers(_MUP_LRS.value)
        mup = [*_SET.value, 'model.parametrization=mup', f'model.base_width={min(widths)}']
        mup.append(f'model.base_head_dim={_HEAD_DIM.value}')
    try:
        failed = _transfer(folder, {'sp': (config_file, sp, []), 'mup': (mup_file, mup, mup_lrs)}, widths, shape, lrs)
    except _Stopped:
        return _stopped_exit()
    table = lr_transfer.collect(folder)
    lr_transfer.plot(table, str(folder / 'lr_transfer.png'))
    (folder / 'lr_transfer.json').write_text(json.dumps(table, indent=2) + '\n')
    for parametrization, by_width in table.items():
        best = ', '.join(f'{w}: {row["best_lr"]:.2g} (loss {min(row["losses"]):.4f})' for w, row in by_width.items())
        print(f'{parametrization}: best learning rate by width: {best}')
    print(f'wrote {folder / "lr_transfer.json"}, {folder / "lr_transfer.png"}')
    return 1 if failed else 0


def do_depth_transfer() -> int:
    from trainer.scaling import lr_transfer

    config_file = _require(_CONFIG, 'depth_transfer')
    folder = pathlib.Path(_require(_OUT, 'depth_transfer'))
    depths = _numbers(_require(_DEPTHS, 'depth_transfer'), int)
    lrs = _numbers(_require(_LRS, 'depth_transfer'))
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
            failed += _transfer(folder / f'depth{depth}', variants, [_WIDTH.value], shape, lrs)
    except _Stopped:
        return _stopped_exit()
    table = {}
    for depth in depths:
        for variant, by_depth in lr_transfer.collect(folder / f'depth{depth}', ('none', 'completep'), 'depth').items():
            table.setdefault(variant, {}).update(by_depth)
    lr_transfer.plot(table, str(folder / 'depth_transfer.png'), by='depth')
    (folder / 'depth_transfer.json').write_text(json.dumps(table, indent=2) + '\n')
    for variant, by_depth in table.items():
        best = ', '.join(f'{d}: {row["best_lr"]:.2g} (loss {min(row["losses"]):.4f})' for d, row in by_depth.items())
        print(f'{variant}: best learning rate by depth: {best}')
    print(f'wrote {folder / "depth_transfer.json"}, {folder / "depth_transfer.png"}')
    return 1 if failed else 0


def do_tune_base() -> int:
    config_file = _require(_CONFIG, 'tune_base')
    folder = pathlib.Path(_require(_OUT, 'tune_base'))
    budgets = _numbers(_require(_TOKENS, 'tune_base'))
    if len(budgets) != 1:
        cli.fail('tune_base needs one --tokens budget (the last rung trains on it).')
    tokens = budgets[0]
    for name, flag in (('trials', _TRIALS), ('eta', _ETA), ('rungs', _RUNGS)):
        if flag.value < (2 if name == 'eta' else 1):
            cli.fail(f'--{name}={flag.value} must be at least {2 if name == "eta" else 1}.')
    width = _WIDTH.value
    fixed = {'model.parametrization': 'mup', 'model.base_width': width, 'model.base_head_dim': _HEAD_DIM.value}
    probe = load_config(config_file, _SET.value)
    if probe.model.depth_scaling == 'completep':
        fixed['model.base_depth'] = _DEPTH.value
    settings = [*_SET.value, *(f'{k}={v}' for k, v in fixed.items())]
    base = load_config(config_file, settings)
    knobs = tune_base.parse_space(_SPACE.value, base)
    shape = sweep.Shape(_ASPECT.value, _HEAD_DIM.value, _FF_RATIO.value, _KV_RATIO.value, _DEPTH.value)
    plan = tune_base.rung_plan(_TRIALS.value, _SEARCH.value, _ETA.value, _RUNGS.value, tokens)
    print(
        f'tune_base: {_TRIALS.value} trials at width {width} ({_SEARCH.value}: '
        + ', '.join(f'{n} on {t:.3g} tokens' for n, t in plan)
        + f'); searching {", ".join(k.field for k in knobs)}'
    )
    found, stopped, failed = tune_base.search(
        folder,
        config_file,
        base,
        [f'--config.{s}' for s in settings],
        knobs,
        width=width,
        shape=shape,
        trials=_TRIALS.value,
        method=_SEARCH.value,
        eta=_ETA.value,
        rungs=_RUNGS.value,
        tokens=tokens,
        seed=_SEARCH_SEED.value,
        warmup_fraction=_WARMUP.value,
    )
    if stopped:
        return _stopped_exit()
    winner = tune_base.best(found)
    last_loss = [loss for loss in winner.losses if loss is not None][-1]
    if not np.isfinite(last_loss):
        cli.fail(f'every trial of the last rung failed or diverged: see {folder}/rung*/runs/*/train.log.')
    # The tuned config: the sweep's --set fields, muP based here, the shape of the base model, the winner.
    shaped = shape.overrides(width)
    typed = {}  # the --set fields as the config typed them
    for setting in _SET.value:
        key = setting.partition('=')[0]
        section, _, name = key.rpartition('.')
        typed[key] = (base[section] if section else base)[name]
    chosen = {**typed, **fixed, **shaped, **winner.setting}
    chosen = {k: v for k, v in chosen.items() if k != 'model.head_dim'}
    summary = (
        f'muP base at width {width}, {_SEARCH.value} search of {_TRIALS.value} trials (seed {_SEARCH_SEED.value}): '
        f'eval loss {last_loss:.4f} on {tokens:.3g} tokens.'
    )
    (folder / 'tuned.py').write_text(tune_base.tuned_config_text(config_file, folder, chosen, summary))
    record = {
        'best': {'trial': winner.index, 'settings': winner.setting, 'loss': last_loss},
        'settings': chosen,
        'rungs': [{'trials': n, 'tokens': t} for n, t in plan],
        'trials': [dataclasses.asdict(t) for t in found],
        'search_space': _SPACE.value,
        'warnings': tune_base.edge_warnings(knobs, winner.setting),
    }
    (folder / 'best.json').write_text(json.dumps(record, indent=2) + '\n')
    tune_base.plot(found, knobs, winner, str(folder / 'tune_base.png'))
    print('best: ' + ', '.join(f'{k}={v:g}' for k, v in winner.setting.items()) + f' (eval loss {last_loss:.4f})')
    for line in record['warnings']:
        print(line)
    print(f'wrote {folder / "tuned.py"} (train or sweep with --config {folder / "tuned.py"}), best.json, tune_base.png')
    return 1 if failed else 0


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
