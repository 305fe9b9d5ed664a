"""A sweep's runs as one table: a row per run (or per eval) with its counts, tokens, FLOPs and losses."""

from __future__ import annotations

import csv
import json
import pathlib
from typing import Any

from trainer.modeling import counts
from trainer.modeling.model_setup import model_config
from trainer.scaling.sweep import SCORES_FILE
from trainer.training import saved_config

COLUMNS = (
    'name',
    'state',
    'params',
    'non_embedding_params',
    'tokens',
    'flops',
    'budget',
    'loss',
    'eval_loss',
    'acc',  # on the sweep's --mc_files, with the harness's standard errors; *_error = 1 - acc, for fit and plot
    'acc_stderr',
    'acc_error',
    'acc_norm',
    'acc_norm_stderr',
    'acc_norm_error',
    'learning_rate',
    'width',
    'depth',
    'step',
    'wall_s',
)


def _metrics(workdir: pathlib.Path) -> list[dict[str, Any]]:
    path = workdir / 'metrics.jsonl'
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _row(common: dict, losses: list[dict], step: int, eval_loss, tokens_per_step: int, flops_per_token: float):
    """One row: the run at `step`, with the training loss logged last by then."""
    loss = [m['loss'] for m in losses if m['step'] <= step]
    return common | {
        'tokens': step * tokens_per_step,
        'flops': step * tokens_per_step * flops_per_token,
        'loss': loss[-1] if loss else '',
        'eval_loss': '' if eval_loss is None else eval_loss,
        'step': step,
    }


def rows(sweep: pathlib.Path, per_eval: bool = False) -> list[dict[str, Any]]:
    """A row per point of the sweep (per eval with per_eval); unfinished points have state 'running' or 'failed'."""
    plan = json.loads((sweep / 'sweep.json').read_text())
    table = []
    for name in plan['points']:
        workdir = sweep / 'runs' / name
        point = json.loads((workdir / 'point.json').read_text())
        status = json.loads((workdir / 'status.json').read_text()) if (workdir / 'status.json').exists() else {}
        metrics = _metrics(workdir)
        losses = [m for m in metrics if 'loss' in m]
        evals = [m for m in metrics if 'eval_loss' in m]
        steps = point['overrides']['train.steps']
        finished = bool(losses) and losses[-1]['step'] >= steps
        state = status.get('state') or ('done' if finished else 'running' if metrics else 'planned')
        common = {
            'name': name,
            'state': state,
            'budget': point['budget'],
            'learning_rate': point['learning_rate'],
            'width': point['width'],
            'depth': point['depth'],
            'wall_s': status.get('wall_s', ''),
        }
        scores_file = workdir / SCORES_FILE
        if scores_file.exists():
            scores = json.loads(scores_file.read_text())
            for name in ('acc', 'acc_norm'):
                common |= {
                    name: scores[name],
                    f'{name}_stderr': scores[f'{name}_stderr'],
                    f'{name}_error': 1 - scores[name],
                }
        config_file = workdir / 'config.json'
        if not config_file.exists():
            table.append(common | {'params': point['params']})
            continue
        config = saved_config.parse(config_file.read_text())
        found = counts.count(model_config(config), config.data.seq_len)
        tokens_per_step = config.train.global_batch_size * config.data.seq_len

        measured = common | {
            'params': found.params,
            'non_embedding_params': found.non_embedding_params,
        }
        per_token = found.train_flops_per_token
        if per_eval:
            table += [_row(measured, losses, m['step'], m['eval_loss'], tokens_per_step, per_token) for m in evals]
        else:
            last = losses[-1]['step'] if losses else 0
            eval_loss = evals[-1]['eval_loss'] if evals else None
            table.append(_row(measured, losses, last, eval_loss, tokens_per_step, per_token))
    return table


def write_csv(table: list[dict[str, Any]], path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in table:
            writer.writerow({column: row.get(column, '') for column in COLUMNS})
