"""A local stand-in for the OpenAI and Anthropic inference APIs, replaying their real responses and SSE streams.

It answers ``/v1/chat/completions``, ``/v1/responses`` and ``/v1/messages`` with the files of
``shared/fixtures/provider-responses`` (see its SOURCES.md), so the official SDKs, pointed at it by ``base_url``,
parse exactly what the providers send. Like OpenAI, a chat stream ends with the usage chunk only when the request
set ``stream_options.include_usage``. A test scripts the next answers of a route (an error status, a stream cut
after N events, a delay longer than the client's timeout) and reads the log of what was served.

Run alone (the benchmark does): ``python tests/client/fake_provider.py --port 8100``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "provider-responses"

CHAT = "openai.chat_completion.reasoning_details_no_prompt_details.oaipy.json"
CHAT_STREAM_USAGE = "openai.chat_completion_stream.include_usage.oaipy.sse"
CHAT_STREAM_NO_USAGE = "openai.chat_completion_stream.no_usage.oaipy.derived.sse"
RESPONSES = "openai.response.usage_cached_reasoning.oaipy.json"
RESPONSES_STREAM = "openai.response_stream.completed_usage.oaispec.derived.sse"
MESSAGES = "anthropic.message.usage_cache_fields.antpy.json"
MESSAGES_STREAM = "anthropic.message_stream.usage_cache_fields.antpy.sse"
ANTHROPIC_429 = "anthropic.error.rate_limit_429.antpy.derived.json"

# OpenAI's error document ({"error": {"message", "type", "param", "code"}}, the API reference's Error schema). No
# recorded OpenAI error body exists among the fixtures (SOURCES.md says so), so these two are written here.
OPENAI_ERRORS = {
    429: {"error": {"message": "Rate limit reached", "type": "requests", "param": None, "code": "rate_limit_exceeded"}},
    500: {"error": {"message": "The server had an error", "type": "server_error", "param": None, "code": None}},
}
ANTHROPIC_500 = {"type": "error", "error": {"type": "api_error", "message": "Internal server error"}}


@dataclass(frozen=True)
class Reply:
    """One scripted answer: a fixture (JSON or SSE), or an error status; optionally cut or delayed."""

    fixture: str | None = None
    status: int = 200
    cut_after: int | None = None  # SSE events sent before the connection is dropped
    delay: float = 0.0  # seconds before answering (longer than a client's timeout: no answer)


@dataclass
class Served:
    """What the fake did with one request."""

    route: str
    request_id: str  # the provider's id of its answer (x-request-id)
    request: dict[str, Any]
    headers: dict[str, str]
    status: int
    fixture: str | None
    outcome: str  # "served", "error", "cut", "late"


class CutStream(Exception):
    """Raised inside a streaming body: the server drops the connection half-way."""


def sse_events(name: str) -> list[str]:
    """The events of an SSE fixture, each as sent (without its blank-line separator)."""
    text = (FIXTURES / name).read_text(encoding="utf-8")
    return [event for event in text.split("\n\n") if event.strip()]


@dataclass
class FakeProvider:
    """The app, its scripts per route, and the log of what it served."""

    scripts: dict[str, deque[Reply]] = field(default_factory=dict)
    log: list[Served] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def script(self, route: str, *replies: Reply) -> None:
        """Answer the next requests of ``route`` ("chat", "responses", "messages") with ``replies``, in order."""
        with self._lock:
            self.scripts.setdefault(route, deque()).extend(replies)

    def reset(self) -> None:
        """Forget scripts and the log."""
        with self._lock:
            self.scripts.clear()
            self.log.clear()

    def served(self, route: str | None = None, outcome: str = "served") -> list[Served]:
        """Requests answered with ``outcome`` (by default: served in full)."""
        return [s for s in self.log if s.outcome == outcome and (route is None or s.route == route)]

    def _next(self, route: str) -> Reply | None:
        with self._lock:
            queue = self.scripts.get(route)
            return queue.popleft() if queue else None

    def app(self) -> Starlette:
        """The ASGI app."""
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self._endpoint("chat"), methods=["POST"]),
                Route("/v1/responses", self._endpoint("responses"), methods=["POST"]),
                Route("/v1/messages", self._endpoint("messages"), methods=["POST"]),
            ]
        )

    def _endpoint(self, route: str) -> Any:
        async def endpoint(request: Request) -> Response:
            body = await request.json()
            return await self._answer(route, body, dict(request.headers))

        return endpoint

    def _default(self, route: str, body: dict[str, Any]) -> str:
        stream = body.get("stream") is True
        if route == "chat":
            if not stream:
                return CHAT
            wants_usage = (body.get("stream_options") or {}).get("include_usage") is True
            return CHAT_STREAM_USAGE if wants_usage else CHAT_STREAM_NO_USAGE
        if route == "responses":
            return RESPONSES_STREAM if stream else RESPONSES
        return MESSAGES_STREAM if stream else MESSAGES

    async def _answer(self, route: str, body: dict[str, Any], headers: dict[str, str]) -> Response:
        reply = self._next(route) or Reply()
        request_id = f"req_fake_{next(self._ids)}"
        record = Served(route, request_id, body, headers, reply.status, None, "served")
        self.log.append(record)
        if reply.delay:
            record.outcome = "late"  # the client has given up by now; nothing it sees is served
            await asyncio.sleep(reply.delay)
        answer_headers = {"x-request-id": request_id, "request-id": request_id, "retry-after-ms": "10"}
        if reply.status >= 400:
            record.outcome = "error" if not reply.delay else "late"
            if reply.fixture:
                error: Any = json.loads((FIXTURES / reply.fixture).read_text(encoding="utf-8"))
            elif route == "messages":
                error = json.loads((FIXTURES / ANTHROPIC_429).read_text()) if reply.status == 429 else ANTHROPIC_500
            else:
                error = OPENAI_ERRORS.get(reply.status, OPENAI_ERRORS[500])
            return JSONResponse(error, status_code=reply.status, headers=answer_headers)
        name = reply.fixture or self._default(route, body)
        record.fixture = name
        if name.endswith(".json"):
            return Response((FIXTURES / name).read_bytes(), media_type="application/json", headers=answer_headers)
        events = sse_events(name)
        if reply.cut_after is not None:
            record.outcome = "cut" if not reply.delay else "late"

        async def stream() -> Any:
            for n, event in enumerate(events):
                if reply.cut_after is not None and n >= reply.cut_after:
                    raise CutStream(f"connection dropped after {n} events")
                yield (event + "\n\n").encode()
                await asyncio.sleep(0)

        return StreamingResponse(stream(), media_type="text/event-stream", headers=answer_headers)


def main() -> None:
    """Serve the fake provider alone (for the benchmark)."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    uvicorn.run(FakeProvider().app(), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
