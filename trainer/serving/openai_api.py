"""The OpenAI API's requests and responses: what /v1/completions and /v1/chat/completions accept and return.

Requests are validated with pydantic (the library the official client is built on): a field of the wrong type
or out of range is an `ApiError` with status 422 naming the field. Fields a client may send but this server
cannot honour (n > 1, penalties, logprobs, echo, tools) are refused by name rather than silently ignored;
fields it does not know are ignored, as OpenAI's clients send more with each version.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error object, whose type is `kind` (by default
    the status's: not_found_error, server_error for 5xx, else invalid_request_error)."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        default = 'not_found_error' if status == 404 else 'server_error' if status >= 500 else 'invalid_request_error'
        self.kind = kind or default

    def body(self) -> dict[str, Any]:
        return {'error': {'message': self.message, 'type': self.kind, 'param': self.param, 'code': self.code}}


class _StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra='ignore')

    model: str | None = None  # None: the one model this server serves
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default and range; 0 is greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # not OpenAI's, but vLLM's and llama.cpp's: 0 or -1 = all
    stop: str | list[str] | None = None
    seed: int | None = None  # None: a fresh one per request
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    user: str | None = None

    def refuse_unsupported(self) -> None:
        """Fields this server cannot honour, named (422), instead of answering something else than was asked."""
        unsupported = {
            'n': self.n != 1,
            'presence_penalty': self.presence_penalty != 0,
            'frequency_penalty': self.frequency_penalty != 0,
            'logit_bias': bool(self.logit_bias),
            'logprobs': self.logprobs not in (None, False, 0),
        }
        for field, asked in unsupported.items():
            if asked:
                raise ApiError(422, f'{field} is not supported by this server: leave it out.', field, 'unsupported')

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(422, 'stop must be up to 4 non-empty strings.', 'stop', 'invalid_value')
        return stops


class CompletionRequest(_Common):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int]
    echo: bool = False
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo or self.suffix:
            field = 'echo' if self.echo else 'suffix'
            raise ApiError(422, f'{field} is not supported by this server: leave it out.', field, 'unsupported')
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) != 1:
            raise ApiError(422, 'one prompt per request: send several requests at once instead.', 'prompt')


class _TextPart(BaseModel):
    type: Literal['text']
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra='ignore')

    role: Literal['system', 'developer', 'user', 'assistant', 'tool']  # the template decides what it renders
    content: str | list[_TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return ''.join(part.text for part in self.content)
        return self.content or ''


class ChatRequest(_Common):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    tools: list[Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise ApiError(422, 'tools are not supported by this server: leave them out.', 'tools', 'unsupported')

    def conversation(self) -> list[dict[str, str]]:
        """The messages as chat templates take them (a 'developer' message is the system message)."""
        return [{'role': 'system' if m.role == 'developer' else m.role, 'content': m.text()} for m in self.messages]


def parse(kind: type[_Common], body: Any) -> _Common:
    """The request in `body` (decoded JSON), or an ApiError naming its first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, 'the body must be a JSON object.')
    try:
        request = kind.model_validate(body)
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        field = '.'.join(str(part) for part in first['loc']) or None
        raise ApiError(422, f'{field}: {first["msg"]}.', field, 'invalid_value') from None
    request.refuse_unsupported()
    return request


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def body(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {'prompt_tokens': self.prompt_tokens, 'completion_tokens': self.completion_tokens, 'total_tokens': total}


@dataclasses.dataclass(frozen=True)
class Reply:
    """Builds one request's response objects, whole or as stream chunks, with one id and creation time."""

    chat: bool
    model: str
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def _head(self, chunk: bool) -> dict[str, Any]:
        if self.chat:
            kind = 'chat.completion.chunk' if chunk else 'chat.completion'
            return {'id': f'chatcmpl-{self.id}', 'object': kind, 'created': self.created, 'model': self.model}
        return {'id': f'cmpl-{self.id}', 'object': 'text_completion', 'created': self.created, 'model': self.model}

    def whole(self, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        """The non-streaming response."""
        if self.chat:
            choice = {'index': 0, 'message': {'role': 'assistant', 'content': text}, 'logprobs': None}
        else:
            choice = {'index': 0, 'text': text, 'logprobs': None}
        return {**self._head(False), 'choices': [{**choice, 'finish_reason': finish_reason}], 'usage': usage.body()}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
        """One streamed piece of text (the chat stream's first one also names the role), or the last, with why."""
        if self.chat:
            delta: dict[str, str] = {'role': 'assistant'} if first else {}
            if text is not None:
                delta['content'] = text
            choice = {'index': 0, 'delta': delta, 'logprobs': None}
        else:
            choice = {'index': 0, 'text': text or '', 'logprobs': None}
        return {**self._head(True), 'choices': [{**choice, 'finish_reason': finish_reason}]}

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """The stream's last chunk when stream_options.include_usage asks for it: no choices, the usage."""
        return {**self._head(True), 'choices': [], 'usage': usage.body()}
