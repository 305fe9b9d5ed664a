"""Where a profiled window's time went, as text: the trace `train.profile_steps` writes, summarized.

Usage:
  python scripts/trace_summary.py runs/NAME/tensorboard [--top 12]

Reads the newest `*.trace.json.gz` under the folder (the Chrome/Perfetto trace jax.profiler writes beside its
.xplane.pb) and prints: the XLA operations that took the most time (summed over the window, with their share
of all XLA operation time), the collectives' share (all-reduce, all-gather, reduce-scatter, all-to-all,
collective-permute: communication between devices), the host's time blocked on the input pipeline (data
wait) and in compilation (a recompile inside the window shows here). TensorBoard's profile plugin and
ui.perfetto.dev show the same trace as a timeline; this is for a terminal, a log or a bug report.
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import sys

from absl import app, flags

_TOP = flags.DEFINE_integer('top', 12, 'How many of the most expensive XLA operations to list.')

COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute', 'allreduce')
# Events that wrap others (an executable's run, a thunk sequence): counted once through what they contain.
WRAPPERS = ('ThunkExecutor', 'PjRt', 'Execute')


def newest_trace(folder: pathlib.Path) -> pathlib.Path:
    traces = sorted(folder.rglob('*.trace.json.gz'), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise SystemExit(f'error: no *.trace.json.gz under {folder}: profile a run with --config.train.profile_steps=N')
    return traces[-1]


def summarize(path: pathlib.Path, top: int) -> list[str]:
    """The summary's lines."""
    trace = json.loads(gzip.open(path).read())
    events = trace['traceEvents'] if isinstance(trace, dict) else trace
    threads = {(e['pid'], e.get('tid')): e['args']['name'] for e in events if e.get('name') == 'thread_name'}
    spans = [e for e in events if e.get('ph') == 'X']
    start = min(e['ts'] for e in spans)
    end = max(e['ts'] + e.get('dur', 0) for e in spans)
    ops, counts = collections.Counter(), collections.Counter()
    host = collections.Counter()
    for event in spans:
        name, duration = event['name'], event.get('dur', 0) / 1e3  # ms
        thread = threads.get((event['pid'], event.get('tid')), '')
        if name.startswith('$'):  # a Python frame on the host
            if 'pipeline.py' in name and '__next__' in name:
                host['data wait (input pipeline __next__)'] += duration
            elif 'compile' in name and ('pjit' in name or 'dispatch' in name or 'compiler' in name):
                host['compilation'] += duration
        elif 'XLA' in thread and not any(w in name for w in WRAPPERS):
            ops[name] += duration
            counts[name] += 1
    total = sum(ops.values()) or 1.0
    lines = [f'trace {path}', f'window: {(end - start) / 1e3:.1f} ms of wall time; XLA operations: {total:.1f} ms']
    kinds = collections.Counter()
    for name, ms in ops.items():
        kinds[name.rsplit('.', 1)[0]] += ms  # 'ynn_fusion.44' -> 'ynn_fusion': one kind of fused kernel
    lines.append('by kind: ' + ', '.join(f'{kind} {ms / total:.0%}' for kind, ms in kinds.most_common(6)))
    lines.append(f'{"ms":>9} {"share":>6} {"count":>6}  operation')
    for name, ms in ops.most_common(top):
        lines.append(f'{ms:9.1f} {ms / total:6.1%} {counts[name]:6d}  {name}')
    collective = sum(ms for name, ms in ops.items() if any(c in name.lower() for c in COLLECTIVES))
    lines.append(f'collectives: {collective:.1f} ms ({collective / total:.1%} of XLA operation time)')
    for what in ('data wait (input pipeline __next__)', 'compilation'):
        lines.append(f'host {what}: {host[what]:.1f} ms')
    return lines


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit('usage: python scripts/trace_summary.py runs/NAME/tensorboard [--top N]')
    print('\n'.join(summarize(newest_trace(pathlib.Path(argv[1])), _TOP.value)))


if __name__ == '__main__':
    sys.exit(app.run(main))
