"""python -m trainer.serve through the official openai client: the tokens trainer.generate gives, streamed or
whole, their text what they add to the prompt's, 32 clients at once, disconnects, a full server, bad requests,
SIGTERM, and a decode loop that fails."""

import concurrent.futures
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from trainer.chat import conversation_ids
from trainer.data import chat_template
from trainer.data.tokenizers import make_tokenizer

openai = pytest.importorskip('openai')

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'scripts'))
from launch_local import free_port  # noqa: E402

FIXTURE = REPO / 'tests' / 'fixtures' / 'hf' / 'llama_gqa'  # a Llama-2-style folder with its chat template
CONTEXT = 1024


@pytest.fixture(scope='module')
def model_folder(tmp_path_factory) -> pathlib.Path:
    """The fixture with a context of CONTEXT tokens (RoPE has no position table), so a reply can run long enough
    for a client to leave in the middle of it."""
    folder = tmp_path_factory.mktemp('serve') / 'tiny-llama'
    shutil.copytree(FIXTURE, folder)
    config = json.loads((folder / 'config.json').read_text())
    config['max_position_embeddings'] = CONTEXT
    (folder / 'config.json').write_text(json.dumps(config))
    return folder


class Server:
    """A server process on 127.0.0.1 and a free port, its log in a file; `command` runs trainer.serve's main."""

    def __init__(self, folder: pathlib.Path, log: pathlib.Path, *flags: str, command: tuple[str, ...] = ()):
        self.port, self.log = free_port(), log
        command = command or (sys.executable, '-m', 'trainer.serve')
        with open(log, 'w') as out:
            self.process = subprocess.Popen(
                [*command, '--model', str(folder), '--port', str(self.port), *flags],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.time() + 180
        while 'serving ' not in self.text():
            assert self.process.poll() is None and time.time() < deadline, self.text()
            time.sleep(0.2)
        self.url = f'http://127.0.0.1:{self.port}/v1'
        self.client = openai.OpenAI(base_url=self.url, api_key='unused', max_retries=0, timeout=120)

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)


@pytest.fixture(scope='module')
def server(model_folder, tmp_path_factory):
    running = Server(model_folder, tmp_path_factory.mktemp('log') / 'serve.log', '--max_batch', '8')
    yield running
    assert running.stop() == 0, running.text()


def raw_request(url: str, body: bytes | None = None) -> tuple[int, dict]:
    """The status and JSON body of a request the openai client would not send (POST when body is given)."""
    request = urllib.request.Request(url, body, {'content-type': 'application/json'})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# 'f,gi t': a prompt whose greedy reply begins with '▁a', a SentencePiece-style piece that loses its space when
# decoded alone (the fixture's tokenizer is Metaspace BPE, as Llama-2's).
PROMPTS = ['Hello world', 'The cat sat', 'A', 'Once upon a time there was', 'f,gi t']


def test_greedy_completions_are_the_tokens_of_trainer_generate_streamed_or_whole(server, model_folder):
    """The tokens of trainer.generate, and as text what they add to the prompt's: decode(prompt + new) minus
    decode(prompt), as vLLM and OpenAI give it (its leading space kept), in both commands."""
    command = [sys.executable, '-m', 'trainer.generate', '--model', str(model_folder), '--temperature', '0']
    command += ['--max_new_tokens', '20', '--json'] + [f'--prompt={p}' for p in PROMPTS]
    generated = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert generated.returncode == 0, generated.stderr
    expected = [json.loads(line) for line in generated.stdout.splitlines()]
    tokenizer = make_tokenizer(str(model_folder), None)
    for prompt, want in zip(PROMPTS, expected, strict=True):
        ids = tokenizer.encode(prompt).tolist()
        added = tokenizer.decode(ids + want['completion_ids'])[len(tokenizer.decode(ids)) :]
        assert want['completion'] == added, prompt
        whole = server.client.completions.create(model='tiny-llama', prompt=prompt, max_tokens=20, temperature=0)
        assert whole.choices[0].text == want['completion'], prompt
        assert whole.usage.prompt_tokens == len(tokenizer.encode(prompt))
        assert whole.usage.completion_tokens == len(want['completion_ids']) + (whole.choices[0].finish_reason == 'stop')
        chunks = list(
            server.client.completions.create(
                model='tiny-llama',
                prompt=prompt,
                max_tokens=20,
                temperature=0,
                stream=True,
                stream_options={'include_usage': True},
            )
        )
        assert ''.join(c.choices[0].text for c in chunks if c.choices) == want['completion']
        assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
        assert chunks[-1].usage == whole.usage and not chunks[-1].choices
    assert expected[-1]['completion'].startswith(' a')
    # A stop string that starts with a space matches at the start of the reply, streamed or whole.
    stopped = dict(model='tiny-llama', prompt=PROMPTS[-1], max_tokens=20, temperature=0, stop=[' a'])
    whole = server.client.completions.create(**stopped).choices[0]
    assert (whole.text, whole.finish_reason) == ('', 'stop')
    chunks = list(server.client.completions.create(**stopped, stream=True))
    assert ''.join(c.choices[0].text for c in chunks) == '' and chunks[-1].choices[0].finish_reason == 'stop'


def test_a_chat_is_rendered_with_the_models_template_as_trainer_chat_renders_it(server, model_folder):
    messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi there'}]
    tokenizer = make_tokenizer(str(model_folder), None)
    template = chat_template.for_tokenizer(str(model_folder))
    assert template.own
    ids, _ = conversation_ids(template, tokenizer, messages, CONTEXT)
    whole = server.client.chat.completions.create(model='tiny-llama', messages=messages, max_tokens=12, temperature=0)
    assert whole.usage.prompt_tokens == len(ids)
    streamed = list(
        server.client.chat.completions.create(
            model='tiny-llama', messages=messages, max_tokens=12, temperature=0, stream=True
        )
    )
    assert streamed[0].choices[0].delta.role == 'assistant'
    assert ''.join(c.choices[0].delta.content or '' for c in streamed) == whole.choices[0].message.content
    seeded = dict(model='tiny-llama', messages=messages, max_tokens=12, temperature=1.2, top_p=0.9, seed=5)
    first = server.client.chat.completions.create(**seeded).choices[0].message.content
    assert server.client.chat.completions.create(**seeded).choices[0].message.content == first
    with pytest.raises(openai.UnprocessableEntityError, match='roles must be system, user or assistant'):
        server.client.chat.completions.create(  # the template's own raise_exception
            model='tiny-llama', messages=[{'role': 'tool', 'content': 'a', 'tool_call_id': 'x'}]
        )


def test_32_concurrent_streams_each_get_what_they_get_alone(server):
    prompts = [f'Prompt number {i}: ' + 'ab' * (i % 7) for i in range(32)]
    alone = [
        server.client.completions.create(model='tiny-llama', prompt=p, max_tokens=24, temperature=0).choices[0].text
        for p in prompts
    ]

    def stream(prompt: str) -> str:
        chunks = server.client.completions.create(
            model='tiny-llama', prompt=prompt, max_tokens=24, temperature=0, stream=True
        )
        return ''.join(c.choices[0].text for c in chunks)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(stream, prompts))
    assert together == alone


def test_bad_requests_get_openai_errors_and_one_log_line_each(server):
    client, before = server.client, server.text().count('WARNING')
    with pytest.raises(openai.NotFoundError, match='does not exist'):
        client.completions.create(model='gpt-4', prompt='a')
    with pytest.raises(openai.UnprocessableEntityError, match='max_tokens'):
        client.completions.create(model='tiny-llama', prompt='a', max_tokens=-1)
    with pytest.raises(openai.UnprocessableEntityError, match='temperature'):
        client.completions.create(model='tiny-llama', prompt='a', temperature='warm')
    with pytest.raises(openai.UnprocessableEntityError, match='n is not supported'):
        client.completions.create(model='tiny-llama', prompt='a', n=2)
    with pytest.raises(openai.APIStatusError, match='shorten the prompt') as error:
        client.completions.create(model='tiny-llama', prompt='word ' * CONTEXT)
    assert error.value.status_code == 413 and error.value.body['code'] == 'context_length_exceeded'
    status, body = raw_request(f'{server.url}/completions', b'{"prompt": ')
    assert status == 400 and 'not JSON' in body['error']['message']
    assert raw_request(f'{server.url}/completions', b'["a list"]')[0] == 400
    status, body = raw_request(f'{server.url}/nothing')
    assert status == 404 and body['error']['type'] == 'not_found_error'
    assert server.text().count('WARNING') - before == 8
    assert client.completions.create(model='tiny-llama', prompt='still here', max_tokens=3).usage.completion_tokens


def test_a_client_that_leaves_frees_its_row_and_a_full_server_says_503(model_folder, tmp_path):
    server = Server(model_folder, tmp_path / 'serve.log', '--max_batch', '1', '--max_queue', '0')
    try:
        long = dict(model='tiny-llama', prompt='Tell me everything', max_tokens=CONTEXT, temperature=0, stream=True)
        first = server.client.completions.create(**long)
        next(iter(first))  # the first piece: it is decoding, in the only row
        with pytest.raises(openai.APIStatusError) as busy:
            server.client.completions.create(model='tiny-llama', prompt='me too', max_tokens=2)
        assert busy.value.status_code == 503 and busy.value.response.headers['retry-after'] == '1'
        first.close()  # the client leaves in the middle of its reply
        deadline = time.time() + 30
        while raw_request(server.url.removesuffix('/v1') + '/health')[1]['finished'].get('cancelled') != 1:
            assert time.time() < deadline, 'the request of a client that left was not cancelled'
            time.sleep(0.05)
        assert 'the client left after' in server.text()
        reply = server.client.completions.create(model='tiny-llama', prompt='me too', max_tokens=2)
        assert reply.usage.completion_tokens == 2
        # SIGTERM while a long reply streams: it is finished, then the server exits 0
        pieces, ended = [], threading.Event()

        def read_all():
            for chunk in server.client.completions.create(**long):
                pieces.append(chunk)
            ended.set()

        reader = threading.Thread(target=read_all)
        reader.start()
        while not pieces:
            time.sleep(0.01)
        assert server.stop() == 0, server.text()
        reader.join(30)
        assert ended.is_set() and pieces[-1].choices[0].finish_reason == 'length'
        assert np.isclose(len(pieces), CONTEXT - 4, atol=CONTEXT // 2)  # most of the context, in many pieces
    finally:
        if server.process.poll() is None:
            server.process.kill()


def test_the_command_explains_what_it_cannot_do_in_one_line(tmp_path):
    def serve(*args: str, env=None) -> subprocess.CompletedProcess:
        command = [sys.executable, '-m', 'trainer.serve', '--model', str(FIXTURE), *args]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)

    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        busy = serve('--port', str(taken.getsockname()[1]))
    assert busy.returncode == 2 and 'pick another --port' in busy.stderr.strip().splitlines()[-1]
    too_long = serve('--max_seq_len', '100', '--port', str(free_port()))
    assert too_long.returncode == 2 and too_long.stderr.strip().splitlines() == [
        "error: --max_seq_len=100 must be between 2 and the model's context (64)."
    ]
    (tmp_path / 'uvicorn').mkdir()
    (tmp_path / 'uvicorn' / '__init__.py').write_text("raise ImportError('not installed')\n")
    env = dict(os.environ, PYTHONPATH=f'{tmp_path}{os.pathsep}{REPO}')
    missing = serve(env=env)
    assert missing.returncode == 2 and "pip install 'shardtrain[serve]'" in missing.stderr


def test_a_model_without_a_chat_template_gets_the_plain_one_and_its_stop():
    """The default byte-level model has no template: chat replies end where the next 'User:' would begin."""
    import types

    from trainer.serve import Service
    from trainer.serving.openai_api import ChatRequest, CompletionRequest, parse

    tokenizer = make_tokenizer('byte', None)
    engine = types.SimpleNamespace(max_seq_len=64, cfg=types.SimpleNamespace(vocab_size=256))
    service = Service(engine, tokenizer, chat_template.for_tokenizer('byte'), 'small_lm')
    chat = parse(ChatRequest, {'messages': [{'role': 'user', 'content': 'Hi'}], 'stop': 'END', 'temperature': 0})
    ids = service.chat_ids(chat)
    assert tokenizer.decode(ids) == 'User: Hi\n\nAssistant:'
    request = service.engine_request(chat, ids, on_update=None)
    assert list(request.stops) == ['END', chat_template.PLAIN_STOP] and request.max_tokens == 64 - len(ids)
    completion = parse(CompletionRequest, {'prompt': 'ROMEO:', 'max_tokens': 1000})
    request = service.engine_request(completion, service.completion_ids(completion), on_update=None)
    assert list(request.stops) == [] and request.max_tokens == 64 - 6  # cut to the room the prompt leaves
    assert service.engine_request(parse(CompletionRequest, {'prompt': 'x'}), [1], None).max_tokens == 16


def call_app(app, method: str, path: str, body: dict | None = None) -> tuple[int, dict, dict]:
    """One request to an ASGI app in this process, without a server or an HTTP client: status, headers, JSON."""
    import asyncio

    sent = []

    async def receive():
        return {'type': 'http.request', 'body': json.dumps(body).encode() if body else b'', 'more_body': False}

    async def send(message):
        sent.append(message)

    scope = {
        'type': 'http',
        'asgi': {'version': '3.0'},
        'http_version': '1.1',
        'method': method,
        'scheme': 'http',
        'path': path,
        'raw_path': path.encode(),
        'query_string': b'',
        'root_path': '',
        'headers': [(b'content-type', b'application/json')],
        'client': ('127.0.0.1', 1),
        'server': ('127.0.0.1', 80),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m['type'] == 'http.response.start')
    content = b''.join(m.get('body', b'') for m in sent if m['type'] == 'http.response.body')
    return start['status'], {k.decode(): v.decode() for k, v in start['headers']}, json.loads(content)


def test_a_failed_engine_is_no_busy_server_on_health_or_to_new_requests():
    """Once the decode loop has failed, /health says 503 and why, and a request hears that the server is stopping
    (type server_error, no Retry-After): not 'busy, retry' forever. A full queue still says busy."""
    import types

    from trainer.serve import Service, make_app

    failure = 'the decode loop failed (RuntimeError: the device is gone): see the server log.'
    engine = types.SimpleNamespace(
        max_seq_len=64, cfg=types.SimpleNamespace(vocab_size=256), max_batch=1, max_queue=0, steps=3, finished={}
    )
    engine.load, engine.submit = (lambda: (0, 0)), (lambda request: False)
    app = make_app(Service(engine, make_tokenizer('byte', None), chat_template.for_tokenizer('byte'), 'small_lm'))
    request = {'prompt': 'ROMEO:', 'max_tokens': 5}
    engine.failure = None
    status, headers, body = call_app(app, 'POST', '/v1/completions', request)
    assert (status, headers['retry-after'], body['error']['type'], body['error']['code']) == (
        503,
        '1',
        'server_busy',
        'busy',
    )
    assert call_app(app, 'GET', '/health')[0] == 200
    engine.failure = failure
    status, headers, body = call_app(app, 'GET', '/health')
    assert status == 503 and (body['status'], body['error']) == ('failed', failure)
    for stream in (False, True):
        status, headers, body = call_app(app, 'POST', '/v1/completions', {**request, 'stream': stream})
        assert status == 503 and 'retry-after' not in headers
        assert (body['error']['type'], body['error']['code']) == ('server_error', 'engine_failed')
        assert body['error']['message'].startswith(failure + ' This server is stopping, for its supervisor to restart')


# trainer.serve with a decode loop that fails at its first step, as a device that fails would.
FAILING_SERVE = (
    'from absl import app\n'
    'from trainer import serve\nfrom trainer.serving import batching\n'
    'def fail(engine):\n'
    '    raise RuntimeError("the device is gone")\n'
    'batching.Engine._decode_one_step = fail\n'
    'app.run(serve.main)\n'
)


def test_a_failed_decode_loop_fails_the_requests_in_hand_and_the_server_exits_1(model_folder, tmp_path):
    """No zombie: the request in hand gets 500 saying what failed, then the process exits 1 for its supervisor to
    restart it (instead of answering 'busy' forever while /health says ok)."""
    flags = ('--max_batch', '1', '--max_seq_len', '64')  # a small decode step: it compiles faster
    server = Server(model_folder, tmp_path / 'serve.log', *flags, command=(sys.executable, '-c', FAILING_SERVE))
    try:
        with pytest.raises(openai.InternalServerError) as failed:
            server.client.completions.create(model='tiny-llama', prompt='Hello', max_tokens=5)
        message = failed.value.body['message']
        assert message.startswith('the decode loop failed (RuntimeError: the device is gone): see the server log.')
        assert 'stopping, for its supervisor to restart it' in message
        assert server.process.wait(60) == 1, server.text()
        assert 'exiting with status 1, for a supervisor to restart the server' in server.text()
    finally:
        if server.process.poll() is None:
            server.process.kill()
