"""A local stand-in for the OpenAI and Anthropic inference APIs, replaying their real responses and SSE streams.

It answers ``/v1/chat/completions``, ``/v1/responses`` and ``/v1/messages`` with the files of
``shared/fixtures/provider-responses`` (see its SOURCES.md), so the official SDKs, pointed at it by ``base_url``,
parse exactly what the providers send. Like OpenAI, a chat stream ends with the usage chunk only when the request
set ``stream_options.include_usage``. A test scripts the next answers of a route (an error status, a stream cut
after N events, a delay longer than the client's timeout) and reads the log of what was served. The routes,
request ids, the log, SSE and error bodies and the server are the demo's provider's (``worker.demo.provider``);
this module adds the replay of the recordings and the scripts.

Run alone (the benchmark does): ``python tests/client/fake_provider.py --port 8100``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.responses import JSONResponse, Response

from worker.demo.provider import ProviderApp, ProviderServer, Served, error_body, sse

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "provider-responses"

CHAT = "openai.chat_completion.reasoning_details_no_prompt_details.oaipy.json"
CHAT_STREAM_USAGE = "openai.chat_completion_stream.include_usage.oaipy.sse"
CHAT_STREAM_NO_USAGE = "openai.chat_completion_stream.no_usage.oaipy.derived.sse"
RESPONSES = "openai.response.usage_cached_reasoning.oaipy.json"
RESPONSES_STREAM = "openai.response_stream.completed_usage.oaispec.derived.sse"
MESSAGES = "anthropic.message.usage_cache_fields.antpy.json"
MESSAGES_STREAM = "anthropic.message_stream.usage_cache_fields.antpy.sse"
ANTHROPIC_429 = "anthropic.error.rate_limit_429.antpy.derived.json"


@dataclass(frozen=True)
class Reply:
    """One scripted answer: a fixture (JSON or SSE), or an error status; optionally cut or delayed."""

    fixture: str | None = None
    status: int = 200
    cut_after: int | None = None  # SSE events sent before the connection is dropped
    delay: float = 0.0  # seconds before answering (longer than a client's timeout: no answer)
    model: str | None = None  # the served model's name, in place of the fixture's (a JSON answer)


def sse_events(name: str) -> list[str]:
    """The events of an SSE fixture, each as sent (without its blank-line separator)."""
    text = (FIXTURES / name).read_text(encoding="utf-8")
    return [event for event in text.split("\n\n") if event.strip()]


@dataclass
class FakeProvider(ProviderApp):
    """The shipped provider scaffolding (worker.demo.provider), answering from the recorded fixtures."""

    scripts: dict[str, deque[Reply]] = field(default_factory=dict)

    def script(self, route: str, *replies: Reply) -> None:
        """Answer the next requests of ``route`` ("chat", "responses", "messages") with ``replies``, in order."""
        with self._lock:
            self.scripts.setdefault(route, deque()).extend(replies)

    def reset(self) -> None:
        """Forget scripts and the log."""
        with self._lock:
            self.scripts.clear()
            self.log.clear()

    def _next(self, route: str) -> Reply | None:
        with self._lock:
            queue = self.scripts.get(route)
            return queue.popleft() if queue else None

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

    async def answer(self, served: Served) -> Response:
        route = served.route
        reply = self._next(route) or Reply()
        served.status = reply.status
        if reply.delay:
            served.outcome = "late"  # the client has given up by now; nothing it sees is served
            await asyncio.sleep(reply.delay)
        answer_headers = self.headers(served)
        if reply.status >= 400:
            served.outcome = "error" if not reply.delay else "late"
            if reply.fixture:
                error: Any = json.loads((FIXTURES / reply.fixture).read_text(encoding="utf-8"))
            elif route == "messages" and reply.status == 429:
                error = json.loads((FIXTURES / ANTHROPIC_429).read_text())
            else:
                error = error_body(route, reply.status if reply.status in (429, 500) else 500)
            return JSONResponse(error, status_code=reply.status, headers=answer_headers)
        name = reply.fixture or self._default(route, served.request)
        served.fixture = name
        if name.endswith(".json"):
            if reply.model is not None:
                answer = json.loads((FIXTURES / name).read_text(encoding="utf-8"))
                answer["model"] = reply.model
                return JSONResponse(answer, headers=answer_headers)
            return Response((FIXTURES / name).read_bytes(), media_type="application/json", headers=answer_headers)
        if reply.cut_after is not None:
            served.outcome = "cut" if not reply.delay else "late"
        return sse(sse_events(name), headers=answer_headers, cut_after=reply.cut_after)


def main() -> None:
    """Serve the fake provider alone (for the benchmark)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    server = ProviderServer(FakeProvider().app(), host=args.host, port=args.port).start()
    try:
        server.thread.join()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
