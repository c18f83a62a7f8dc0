"""A local stand-in for the OpenAI and Anthropic inference APIs: the demo's provider, and the tests' scaffolding.

The official ``openai`` and ``anthropic`` packages, pointed at it by ``base_url``, parse what it sends exactly as
what the providers send: ``/v1/chat/completions`` (a completion, or an SSE stream of chunks that ends with the
usage chunk when the request set ``stream_options.include_usage``, as OpenAI does) and ``/v1/messages`` (a message,
or the ``message_start`` ... ``message_delta`` ... ``message_stop`` event stream).

:class:`ProviderApp` is the scaffolding (routes, request ids, the log of what was served, SSE and error bodies) and
:class:`ProviderServer` serves an app in a thread; the tests' replaying fake builds on both.
:class:`SyntheticProvider` is the demo's provider: it needs no recorded files, and answers deterministically:

- prompt tokens: a quarter of the characters of every text of the prompt (rounded up) plus 3 per message and 3
  to prime the answer, as OpenAI counts chat messages; Anthropic is counted the same way (the system prompt as
  one more message);
- output tokens: the request's ``max_tokens`` (``max_completion_tokens``), as if the model wrote to its limit, or
  256 without one;
- prompt caching: the longest prefix of whole messages (from 1,024 tokens up) that an earlier request sent is read
  from the cache, in steps of 128 tokens, as both providers cache prefixes. OpenAI reports it in
  ``prompt_tokens_details.cached_tokens`` (included in ``prompt_tokens``); Anthropic in
  ``cache_read_input_tokens`` (not included in ``input_tokens``).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import math
import socket
import threading
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from worker.demo.serving import ThreadedServer

ROUTES = {"chat": "/v1/chat/completions", "responses": "/v1/responses", "messages": "/v1/messages"}
# OpenAI's error document ({"error": {"message", "type", "param", "code"}}, the API reference's Error schema) and
# Anthropic's ({"type": "error", "error": {"type", "message"}}).
OPENAI_ERRORS = {
    400: {"error": {"message": "Invalid request", "type": "invalid_request_error", "param": None, "code": None}},
    429: {"error": {"message": "Rate limit reached", "type": "requests", "param": None, "code": "rate_limit_exceeded"}},
    500: {"error": {"message": "The server had an error", "type": "server_error", "param": None, "code": None}},
}
ANTHROPIC_ERRORS = {
    400: {"type": "error", "error": {"type": "invalid_request_error", "message": "Invalid request"}},
    500: {"type": "error", "error": {"type": "api_error", "message": "Internal server error"}},
}


def error_body(route: str, status: int, message: str | None = None) -> dict[str, Any]:
    """The provider's error document for ``status`` on ``route`` (OpenAI's shape, or Anthropic's on messages)."""
    table = ANTHROPIC_ERRORS if route == "messages" else OPENAI_ERRORS
    body = json.loads(json.dumps(table.get(status, table[500])))
    if message is not None:
        body["error"]["message"] = message
    return body


def sse(events: Iterable[str], *, headers: dict[str, str], cut_after: int | None = None) -> StreamingResponse:
    """A ``text/event-stream`` answer of ``events`` (each as sent, without its blank line); cut after N if asked."""

    async def stream() -> AsyncIterator[bytes]:
        for n, event in enumerate(events):
            if cut_after is not None and n >= cut_after:
                raise CutStream(f"connection dropped after {n} events")
            yield (event + "\n\n").encode()
            await asyncio.sleep(0)  # one event a write, as a provider flushes them

    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


class CutStream(Exception):
    """Raised inside a streaming body: the server drops the connection half-way."""


@dataclass
class Served:
    """What the provider did with one request."""

    route: str
    request_id: str  # the provider's id of its answer (x-request-id)
    request: dict[str, Any]
    headers: dict[str, str]
    status: int = 200
    fixture: str | None = None
    outcome: str = "served"  # "served", "error", "cut", "late"
    usage: dict[str, Any] | None = None  # the usage object the provider reported, as sent


@dataclass
class ProviderApp:
    """Routes of the inference APIs, request ids and the log of what was served; subclasses answer."""

    log: list[Served] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> Starlette:
        """The ASGI app."""
        return Starlette(
            routes=[Route(path, self._endpoint(route), methods=["POST"]) for route, path in ROUTES.items()]
        )

    def _endpoint(self, route: str) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                body = await request.json()
            except ValueError:
                body = None
            if not isinstance(body, dict):
                return JSONResponse(error_body(route, 400, "the body is not a JSON object"), status_code=400)
            with self._lock:
                served = Served(route, f"req_fake_{next(self._ids)}", body, dict(request.headers))
                self.log.append(served)
            return await self.answer(served)

        return endpoint

    def headers(self, served: Served) -> dict[str, str]:
        """The answer's headers: the request id under both providers' names, and a short retry-after."""
        return {"x-request-id": served.request_id, "request-id": served.request_id, "retry-after-ms": "10"}

    def served(self, route: str | None = None, outcome: str = "served") -> list[Served]:
        """Requests answered with ``outcome`` (by default: served in full)."""
        with self._lock:
            return [s for s in self.log if s.outcome == outcome and (route is None or s.route == route)]

    async def answer(self, served: Served) -> Response:
        """The answer to one logged request."""
        raise NotImplementedError


# --- the synthetic provider ---------------------------------------------------------------------------------------

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 3
PRIMING_TOKENS = 3
DEFAULT_OUTPUT_TOKENS = 256
CACHE_MIN_TOKENS = 1024
CACHE_STEP_TOKENS = 128
CREATED = 1_780_000_000  # a fixed timestamp: answers are the same on every run


def text_of(value: Any) -> str:
    """Every string inside a message's content (parts, tool arguments), joined: what the model reads."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return "".join(text_of(v) for k, v in value.items() if k not in ("type", "role", "cache_control"))
    if isinstance(value, list | tuple):
        return "".join(text_of(v) for v in value)
    return ""


def message_tokens(message: Any) -> int:
    """Tokens of one message: a quarter of its characters, rounded up, and the per-message overhead."""
    return math.ceil(len(text_of(message)) / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE


def _digest(messages: Sequence[Any]) -> str:
    return hashlib.sha256(json.dumps(list(messages), sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class SyntheticProvider(ProviderApp):
    """Answers synthesized from the request, the same on every run for the same sequence of requests."""

    _prefixes: set[str] = field(default_factory=set)

    def count(self, cache: str, messages: Sequence[Any]) -> tuple[int, int]:
        """(prompt tokens, of which read from the cache) for a prompt; remembers its prefixes for later requests.

        ``cache`` names the cache (a provider's and model's own: another model's prefixes are not hits).
        """
        prompt = PRIMING_TOKENS + sum(message_tokens(m) for m in messages)
        cached = 0
        with self._lock:
            running = PRIMING_TOKENS
            for i, message in enumerate(messages):
                running += message_tokens(message)
                prefix = cache + _digest(messages[: i + 1])
                if prefix in self._prefixes and running >= CACHE_MIN_TOKENS:
                    cached = running // CACHE_STEP_TOKENS * CACHE_STEP_TOKENS
                self._prefixes.add(prefix)
        return prompt, cached

    async def answer(self, served: Served) -> Response:
        body = served.request
        model, messages = body.get("model"), body.get("messages")
        if not isinstance(model, str) or not isinstance(messages, list) or not messages:
            served.outcome, served.status = "error", 400
            return JSONResponse(
                error_body(served.route, 400, "model and messages are required"), status_code=400,
                headers=self.headers(served),
            )  # fmt: skip
        if served.route == "chat":
            return self._chat(served, model, messages)
        if served.route == "messages":
            return self._message(served, model, messages)
        served.outcome, served.status = "error", 400
        return JSONResponse(
            error_body(served.route, 400, "the demo provider answers chat completions and messages"),
            status_code=400,
            headers=self.headers(served),
        )

    @staticmethod
    def _limit(body: dict[str, Any], *names: str) -> int:
        for name in names:
            value = body.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return DEFAULT_OUTPUT_TOKENS

    @staticmethod
    def _text(model: str, output_tokens: int) -> str:
        return f"A synthetic answer from {model}, {output_tokens} tokens long."

    def _chat(self, served: Served, model: str, messages: list[Any]) -> Response:
        body = served.request
        prompt, cached = self.count(f"openai|{model}|", messages)
        output = self._limit(body, "max_completion_tokens", "max_tokens")
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": output,
            "total_tokens": prompt + output,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        }
        answer_id = f"chatcmpl-{served.request_id}"
        text = self._text(model, output)
        if body.get("stream") is not True:
            served.usage = usage
            return JSONResponse(
                {
                    "id": answer_id,
                    "object": "chat.completion",
                    "created": CREATED,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text, "refusal": None},
                            "logprobs": None,
                            "finish_reason": "length",
                        }
                    ],
                    "usage": usage,
                },
                headers=self.headers(served),
            )

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            data = {"id": answer_id, "object": "chat.completion.chunk", "created": CREATED, "model": model}
            return "data: " + json.dumps({**data, "choices": choices, **extra})

        events = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]
        events += [chunk([{"index": 0, "delta": {"content": w}, "finish_reason": None}]) for w in _words(text)]
        events.append(chunk([{"index": 0, "delta": {}, "finish_reason": "length"}]))
        # Like OpenAI: the usage chunk (no choices) only when the request asked for it.
        if (body.get("stream_options") or {}).get("include_usage") is True:
            events.append(chunk([], usage=usage))
            served.usage = usage
        events.append("data: [DONE]")
        return sse(events, headers=self.headers(served))

    def _message(self, served: Served, model: str, messages: list[Any]) -> Response:
        body = served.request
        system = body.get("system")
        system_message = [{"role": "system", "content": system}] if system else []
        prompt, cached = self.count(f"anthropic|{model}|", system_message + messages)
        output = self._limit(body, "max_tokens")
        usage = {
            "input_tokens": prompt - cached,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached,
            "output_tokens": output,
        }
        served.usage = usage
        message_id = f"msg_{served.request_id}"
        text = self._text(model, output)
        message = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "max_tokens",
            "stop_sequence": None,
            "usage": usage,
        }
        if body.get("stream") is not True:
            return JSONResponse(message, headers=self.headers(served))

        def event(name: str, data: dict[str, Any]) -> str:
            return f"event: {name}\ndata: {json.dumps({'type': name, **data})}"

        start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
        events = [
            event("message_start", {"message": start}),
            event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ]
        events += [
            event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": w}}) for w in _words(text)
        ]
        events += [
            event("content_block_stop", {"index": 0}),
            event(
                "message_delta",
                {"delta": {"stop_reason": "max_tokens", "stop_sequence": None}, "usage": {"output_tokens": output}},
            ),
            event("message_stop", {}),
        ]
        return sse(events, headers=self.headers(served))


def _words(text: str) -> list[str]:
    words = text.split(" ")
    return [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]


# --- serving ------------------------------------------------------------------------------------------------------


class ProviderServer(ThreadedServer):
    """An ASGI app served by uvicorn on a thread of this process, on ``port`` (0: any free one); its ``url`` is the
    base address (the OpenAI SDK's base_url is this plus ``/v1``)."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 0) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        super().__init__(app, sock, name="fake provider", log_level="critical", lifespan="off")
