"""python -m trainer.serve --model PATH [--host 127.0.0.1] [--port 8000] [--max_batch N] [--max_seq_len N] ...

Serves one model over the OpenAI API: GET /v1/models, POST /v1/completions and POST /v1/chat/completions,
streamed (server-sent events) or whole, and GET /health (rows in use, requests waiting, requests ended by why).
Continuous batching (trainer.serving.batching): up to --max_batch requests decode together, up to --max_queue more
wait, and past that a request gets 503 with Retry-After. Chat requests are rendered with the model's chat
template as trainer.chat renders them. SIGTERM (or Ctrl-C) stops taking connections, lets the requests in
flight finish for up to --shutdown_timeout_s, and exits 0. If the decode loop fails (a bug, the device), the
requests in hand get 500, /health and new requests 503, and the process exits 1 for its supervisor to restart.

Starlette and uvicorn (the `serve` extra) are imported only here, so that training never needs them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from absl import app, flags

from trainer import cli
from trainer.data import chat_template
from trainer.data.tokenizers import prefix_id
from trainer.errors import ConfigError
from trainer.inference import text_model
from trainer.inference.model_flag import MODEL
from trainer.inference.sampling import Sampling
from trainer.serving.batching import Engine, Request, Update
from trainer.serving.openai_api import ApiError, ChatRequest, CompletionRequest, Reply, Usage, parse

_HOST = flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on; 0.0.0.0 opens the server to the network.')
_PORT = flags.DEFINE_integer('port', 8000, 'Port to listen on.')
_MAX_BATCH = flags.DEFINE_integer('max_batch', 8, 'Requests decoded together (rows of the KV cache).')
_MAX_SEQ_LEN = flags.DEFINE_integer(
    'max_seq_len', None, "Tokens per request, prompt and reply together; default: the model's context."
)
_MAX_QUEUE = flags.DEFINE_integer('max_queue', 64, 'Requests that may wait for a free row; more get 503.')
_NAME = flags.DEFINE_string('served_model_name', None, "The model's name in the API; default: --model's folder name.")
_SHUTDOWN_S = flags.DEFINE_float(
    'shutdown_timeout_s', 30.0, 'On SIGTERM, seconds the requests in flight get to finish before they are cut.'
)
_COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions; chat replies run to the context
_FAILED_EXIT = 1  # the exit status after the decode loop failed: not 0, so that a supervisor restarts the server
_STOPPING = ' This server is stopping, for its supervisor to restart it: retry on another server, or later.'

log = logging.getLogger('trainer.serve')


class Service:
    """What the endpoints share: the engine, the tokenizer and chat template, the model's name and context."""

    def __init__(self, engine: Engine, tokenizer, template: chat_template.ChatTemplate, name: str):
        self.engine, self.tokenizer, self.template, self.name = engine, tokenizer, template, name

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise ApiError(
                404,
                f'the model {model!r} does not exist: this server serves {self.name!r}.',
                'model',
                'model_not_found',
            )

    def completion_ids(self, request: CompletionRequest) -> list[int]:
        prompt = request.prompt
        if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], int)):  # token ids
            vocab = self.engine.cfg.vocab_size
            if any(not 0 <= i < vocab for i in prompt):
                raise ApiError(422, f'prompt: token ids must be in [0, {vocab}).', 'prompt', 'invalid_value')
            ids = list(prompt)
        else:
            text = prompt[0] if isinstance(prompt, list) else prompt
            ids = self.tokenizer.encode(text).tolist()
        return ids or [prefix_id(self.tokenizer)]  # an empty prompt: a sample from the start of a document

    def chat_ids(self, request: ChatRequest) -> list[int]:
        try:
            text = self.template.render(request.conversation(), add_generation_prompt=True)
        except Exception as error:  # the template's own raise_exception ("roles must alternate"), or a bug in it
            raise ApiError(422, f"messages: the model's chat template refused them: {error}", 'messages') from None
        return self.tokenizer.encode(text, add_special_tokens=not self.template.own).tolist()

    def engine_request(self, body: CompletionRequest | ChatRequest, ids: list[int], on_update) -> Request:
        """The engine's request for these prompt ids, within the context; a prompt that leaves no room is 413."""
        context = self.engine.max_seq_len
        if len(ids) >= context:
            raise ApiError(
                413,
                f'the prompt is {len(ids)} tokens, and this server holds {context} per request (--max_seq_len), '
                'with room for the reply: shorten the prompt.',
                'messages' if isinstance(body, ChatRequest) else 'prompt',
                'context_length_exceeded',
            )
        asked = body.max_tokens
        if isinstance(body, ChatRequest):
            asked = body.max_completion_tokens or asked
        elif asked is None:
            asked = _COMPLETION_MAX_TOKENS
        room = context - len(ids)
        stops = body.stop_strings()
        if isinstance(body, ChatRequest) and not self.template.own:
            stops.append(chat_template.PLAIN_STOP)
        return Request(
            prompt_ids=ids,
            max_tokens=min(asked or room, room),
            on_update=on_update,
            sampling=Sampling(body.temperature, max(body.top_k, 0), body.top_p),
            seed=body.seed if body.seed is not None else random.randrange(2**31),
            stop_ids=self.tokenizer.stop_ids,
            stops=stops,
        )


def _error_response(error: ApiError, http_request) -> Any:
    from starlette.responses import JSONResponse

    log.warning('%d %s %s: %s', error.status, http_request.method, http_request.url.path, error.message)
    headers = {'Retry-After': '1'} if error.code == 'busy' else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def _updates(service: Service, body, ids: list[int], http_request=None) -> AsyncIterator[Update]:
    """The engine's updates for one request, ending with the one that says why it ended. When the consumer stops
    early (a streaming client went away) or `http_request` disconnects, the request is cancelled: its row frees."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def on_update(update: Update) -> None:  # called in the engine's thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, update)
        except RuntimeError:  # the event loop has closed: nobody is waiting
            pass

    request = service.engine_request(body, ids, on_update)
    if not service.engine.submit(request):
        if service.engine.failure is not None:
            raise _engine_failed(service.engine.failure)
        raise ApiError(
            503, 'the server is busy (every row and the queue are taken): retry shortly.', None, 'busy', 'server_busy'
        )
    finished = False
    try:
        while not finished:
            try:
                update = await asyncio.wait_for(queue.get(), timeout=0.5)
            except TimeoutError:
                if http_request is not None and await http_request.is_disconnected():
                    return
                continue
            finished = update.finish_reason is not None
            yield update
    finally:
        if not finished:
            service.engine.cancel(request)


def _engine_failed(failure: str) -> ApiError:
    """What a new request hears once the decode loop has failed: this server will not decode again."""
    return ApiError(503, failure + _STOPPING, None, 'engine_failed')


def _request_failed(service: Service, update: Update) -> ApiError:
    """A request that ended with 'error': why, in the engine's words, and whether the server is stopping."""
    message = update.error or 'the decoding failed: see the server log.'
    return ApiError(500, message + (_STOPPING if service.engine.failure else ''), None, 'decoding_failed')


def _sse(data: dict[str, Any] | str) -> str:
    return f'data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n'


def make_app(service: Service):
    """The Starlette app of the three endpoints; errors as OpenAI's error objects."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def models(http_request):
        created = int(time.time())
        entry = {'id': service.name, 'object': 'model', 'created': created, 'owned_by': 'shardtrain'}
        return JSONResponse({'object': 'list', 'data': [entry]})

    async def complete(http_request, kind, chat: bool):
        started = time.perf_counter()
        try:
            try:
                raw = await http_request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ApiError(400, f'the body is not JSON: {error}.') from None
            body = parse(kind, raw)
            service.check_model(body.model)
            ids = service.chat_ids(body) if chat else service.completion_ids(body)
            reply = Reply(chat=chat, model=service.name)
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            if body.stream:
                updates = _updates(service, body, ids)
                first = await anext(updates)  # a busy server or a bad request is an error status, not a stream
                if first.finish_reason == 'error':  # failed before any text: an error status too
                    raise _request_failed(service, first)
                return StreamingResponse(
                    _stream(reply, first, updates, len(ids), include_usage, http_request, started),
                    media_type='text/event-stream',
                )
            texts, last = [], None
            async for update in _updates(service, body, ids, http_request):
                texts.append(update.text)
                last = update
            if last is None or last.finish_reason == 'cancelled':  # the client went away
                _log_left(http_request, last.completion_tokens if last else 0)
                return JSONResponse({}, status_code=499)
            if last.finish_reason == 'error':
                raise _request_failed(service, last)
            usage = Usage(len(ids), last.completion_tokens)
            _log_done(http_request, usage, last.finish_reason, started)
            return JSONResponse(reply.whole(''.join(texts), last.finish_reason, usage))
        except ApiError as error:
            return _error_response(error, http_request)

    async def _stream(reply, first, updates, prompt_tokens, include_usage, http_request, started):
        update = first
        try:
            if reply.chat:
                yield _sse(reply.chunk(None, first=True))
            while True:
                if update.finish_reason == 'error':  # the status (200) has gone: the error is the last event
                    yield _sse(_request_failed(service, update).body())
                    return
                if update.text:
                    yield _sse(reply.chunk(update.text))
                if update.finish_reason is not None:
                    break
                update = await anext(updates)
        finally:  # the client went away (Starlette cancels this stream), or it ended: the row is freed either way
            await updates.aclose()
            if update.finish_reason is None:
                _log_left(http_request, update.completion_tokens)
        yield _sse(reply.chunk(None, update.finish_reason))
        usage = Usage(prompt_tokens, update.completion_tokens)
        if include_usage:
            yield _sse(reply.usage_chunk(usage))
        yield _sse('[DONE]')
        _log_done(http_request, usage, update.finish_reason, started)

    async def health(http_request):
        rows, waiting = service.engine.load()
        failure = service.engine.failure
        return JSONResponse(
            {
                'status': 'ok' if failure is None else 'failed',
                **({} if failure is None else {'error': failure}),
                'model': service.name,
                'rows_in_use': rows,
                'waiting': waiting,
                'max_batch': service.engine.max_batch,
                'max_queue': service.engine.max_queue,
                'decode_steps': service.engine.steps,
                'finished': dict(service.engine.finished),
            },
            status_code=200 if failure is None else 503,
        )

    async def completions(http_request):
        return await complete(http_request, CompletionRequest, chat=False)

    async def chat_completions(http_request):
        return await complete(http_request, ChatRequest, chat=True)

    async def http_error(http_request, error: HTTPException):
        status = error.status_code
        message = {404: f'no such endpoint: {http_request.url.path}', 405: 'method not allowed here'}.get(
            status, str(error.detail)
        )
        return _error_response(ApiError(status, message), http_request)

    async def server_error(http_request, error: Exception):
        log.exception('500 %s %s', http_request.method, http_request.url.path, exc_info=error)
        return JSONResponse(ApiError(500, f'internal error: {error}').body(), status_code=500)

    routes = [
        Route('/health', health, methods=['GET']),
        Route('/v1/models', models, methods=['GET']),
        Route('/v1/completions', completions, methods=['POST']),
        Route('/v1/chat/completions', chat_completions, methods=['POST']),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})


def _log_done(http_request, usage: Usage, reason: str, started: float) -> None:
    log.info(
        '200 %s %s: %d prompt + %d completion tokens in %.2f s (%s)',
        http_request.method,
        http_request.url.path,
        usage.prompt_tokens,
        usage.completion_tokens,
        time.perf_counter() - started,
        reason,
    )


def _log_left(http_request, completion_tokens: int) -> None:
    log.info(
        '499 %s %s: the client left after %d completion tokens; its request was cancelled',
        http_request.method,
        http_request.url.path,
        completion_tokens,
    )


def _check_port(host: str, port: int) -> None:
    """A port this process cannot listen on is a one-line error."""
    try:
        with socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind((host, port))
    except OSError as error:
        cli.fail(f'cannot listen on {host}:{port}: {error.strerror}: pick another --port (or --host).')


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s', '%H:%M:%S'))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv: list[str]) -> int:
    cli.start(argv)
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        cli.fail("serving needs Starlette and uvicorn: pip install 'shardtrain[serve]' (or -e '.[serve]').")
    _check_port(_HOST.value, _PORT.value)  # before minutes of loading and compiling, not after
    if _MAX_BATCH.value < 1 or _MAX_QUEUE.value < 0:
        cli.fail(f'--max_batch={_MAX_BATCH.value} must be at least 1 and --max_queue={_MAX_QUEUE.value} at least 0.')
    try:
        loaded = text_model.load()
        template = chat_template.for_tokenizer(loaded.config.data.tokenizer)
    except ConfigError as error:
        cli.fail(str(error))
    context = loaded.model_cfg.max_seq_len
    max_seq_len = _MAX_SEQ_LEN.value or context
    if not 2 <= max_seq_len <= context:
        cli.fail(f"--max_seq_len={max_seq_len} must be between 2 and the model's context ({context}).")
    _setup_logging()
    name = _NAME.value or os.path.basename(os.path.normpath(MODEL.value))
    engine = Engine(
        loaded.graphdef,
        loaded.params,
        loaded.model_cfg,
        loaded.mesh,
        loaded.tokenizer.decode,
        _MAX_BATCH.value,
        max_seq_len,
        _MAX_QUEUE.value,
    )
    started = time.perf_counter()
    engine.start()
    log.info(
        'compiled the decode step for %d rows of %d tokens in %.1f s',
        _MAX_BATCH.value,
        max_seq_len,
        time.perf_counter() - started,
    )
    service = Service(engine, loaded.tokenizer, template, name)
    config = uvicorn.Config(
        make_app(service),
        host=_HOST.value,
        port=_PORT.value,
        log_level='warning',
        access_log=False,
        timeout_graceful_shutdown=_SHUTDOWN_S.value,
    )
    serving = (
        f'serving {loaded.source} as {name!r} at http://{_HOST.value}:{_PORT.value}/v1 '
        f'({_MAX_BATCH.value} rows, queue {_MAX_QUEUE.value})'
    )

    class Server(uvicorn.Server):
        """uvicorn's server, saying so once it listens (so that a client reading the log can connect at once)."""

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                log.info(serving)

        async def on_tick(self, counter: int) -> bool:
            """uvicorn asks this every 0.1 s whether to stop: also once the engine has failed (after the requests
            in hand have had their 500, uvicorn's graceful shutdown lets their responses go out)."""
            return engine.failure is not None or await super().on_tick(counter)

    server = Server(config)
    # uvicorn catches SIGTERM/SIGINT while it serves, shuts down gracefully, then raises the signal again
    # for the handlers it found: these no-ops make that graceful stop exit 0 instead of dying by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
    finally:
        engine.close(timeout=_SHUTDOWN_S.value)
    if engine.failure is not None:
        log.error('exiting with status %d, for a supervisor to restart the server: %s', _FAILED_EXIT, engine.failure)
        return _FAILED_EXIT
    log.info('stopped')
    return 0


if __name__ == '__main__':
    app.run(main)
