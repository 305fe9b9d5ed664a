"""Load on python -m trainer.serve: tokens/s and latency at several numbers of concurrent clients.

Usage:
  python scripts/bench_serve.py --model runs/small_lm [--concurrency 1,8,32] [--requests 32] [--max_tokens 64]
      [--max_batch 32] [--prompt_chars 40] [--json]

Starts the server on a free 127.0.0.1 port (loopback only), warms it up, then sends the same --requests
requests (streamed completions, temperature 0.8, one seed each) first one after another ("sequential"),
then from N clients at once for each N of --concurrency, each client sending its share back to back.
Prints, per run: completion tokens/s over the run's wall time, requests/s, and per-request time to first
token and total latency (p50, p90, p99). Stops the server (SIGTERM) when done, and every request has a
timeout, so it ends by itself. Uses only the standard library as a client, so that it measures the server.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
TEXT = (
    'Our revels now are ended. These our actors, as I foretold you, were all spirits and are melted into air, '
    "into thin air; and, like the baseless fabric of this vision, the cloud-capp'd towers, the gorgeous palaces"
)


def free_port() -> int:
    # launch_local.free_port's twin: importing that script would import jax into this stdlib-only client
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, max_batch: int, log: pathlib.Path) -> subprocess.Popen:
    command = [sys.executable, '-m', 'trainer.serve', '--model', model, '--port', str(port)]
    command += ['--max_batch', str(max_batch), '--max_queue', '1024']
    with open(log, 'w') as out:
        server = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while 'serving ' not in log.read_text():
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            sys.exit(f'error: the server did not start:\n{log.read_text()}')
        time.sleep(0.2)
    return server


def one_request(port: int, prompt: str, max_tokens: int, seed: int) -> tuple[float, float, int]:
    """A streamed completion: (seconds to the first text, seconds in all, completion tokens)."""
    body = {'prompt': prompt, 'max_tokens': max_tokens, 'temperature': 0.8, 'seed': seed, 'stream': True}
    body['stream_options'] = {'include_usage': True}
    connection = http.client.HTTPConnection('127.0.0.1', port, timeout=300)
    start = time.perf_counter()
    connection.request('POST', '/v1/completions', json.dumps(body), {'content-type': 'application/json'})
    response = connection.getresponse()
    if response.status != 200:
        sys.exit(f'error: the server answered {response.status}: {response.read()[:200]!r}')
    first, tokens = None, 0
    for line in response:
        if not line.startswith(b'data: ') or line.strip() == b'data: [DONE]':
            continue
        chunk = json.loads(line[6:])
        if chunk['choices'] and chunk['choices'][0]['text'] and first is None:
            first = time.perf_counter() - start
        if chunk.get('usage'):
            tokens = chunk['usage']['completion_tokens']
    connection.close()
    total = time.perf_counter() - start
    return (first if first is not None else total), total, tokens


def run(port: int, clients: int, prompts: list[str], max_tokens: int) -> dict:
    """Every prompt sent once, from `clients` clients at once, each sending its share one after another."""
    shares = [list(range(i, len(prompts), clients)) for i in range(clients)]

    def client(indices: list[int]) -> list[tuple[float, float, int]]:
        return [one_request(port, prompts[i], max_tokens, seed=i) for i in indices]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for share in pool.map(client, shares) for r in share]
    wall = time.perf_counter() - start
    first, total, tokens = (np.array(column) for column in zip(*results, strict=True))
    percentiles = lambda values: [round(float(np.percentile(values, q)), 3) for q in (50, 90, 99)]  # noqa: E731
    return {
        'clients': clients,
        'requests': len(prompts),
        'completion_tokens': int(tokens.sum()),
        'wall_s': round(wall, 2),
        'tokens_per_s': round(float(tokens.sum() / wall), 1),
        'requests_per_s': round(len(prompts) / wall, 2),
        'first_token_s_p50_p90_p99': percentiles(first),
        'latency_s_p50_p90_p99': percentiles(total),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', required=True, help="a run's workdir, a checkpoint or a Hugging Face folder")
    parser.add_argument('--concurrency', default='1,8,32', help='numbers of concurrent clients, comma-separated')
    parser.add_argument('--requests', type=int, default=32, help='requests per run')
    parser.add_argument('--max_tokens', type=int, default=64, help='completion tokens per request, at most')
    parser.add_argument('--max_batch', type=int, default=32, help="the server's --max_batch")
    parser.add_argument('--prompt_chars', type=int, default=40, help='characters per prompt (from different offsets)')
    parser.add_argument('--json', action='store_true', help='print one JSON object per run')
    args = parser.parse_args()
    prompts = [(TEXT * 4)[i * 7 : i * 7 + args.prompt_chars] for i in range(args.requests)]
    log = pathlib.Path('/tmp') / f'bench_serve_{time.time_ns()}.log'
    port = free_port()
    server = start_server(args.model, port, args.max_batch, log)
    try:
        run(port, min(args.max_batch, len(prompts)), prompts, args.max_tokens)  # warm-up: compiles every shape
        runs = [{'name': 'sequential', **run(port, 1, prompts, args.max_tokens)}]
        for clients in (int(c) for c in args.concurrency.split(',')):
            runs.append({'name': f'{clients} concurrent', **run(port, clients, prompts, args.max_tokens)})
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    if args.json:
        for record in runs:
            print(json.dumps(record))
        return
    sequential = runs[0]['tokens_per_s']
    print(
        f'{"run":<14} {"tokens/s":>9} {"x seq":>6} {"req/s":>6}  {"first token p50/p90/p99 s":>26}  '
        'latency p50/p90/p99 s'
    )
    for record in runs:
        first = '/'.join(f'{v:.3f}' for v in record['first_token_s_p50_p90_p99'])
        latency = '/'.join(f'{v:.2f}' for v in record['latency_s_p50_p90_p99'])
        ratio = record['tokens_per_s'] / sequential
        print(
            f'{record["name"]:<14} {record["tokens_per_s"]:>9.1f} {ratio:>6.2f} {record["requests_per_s"]:>6.2f}  '
            f'{first:>26}  {latency}'
        )
    print(f'server log: {log}')


if __name__ == '__main__':
    main()
