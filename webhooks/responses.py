"""JSON responses of the HTTP edge: one error shape everywhere, ``{"error": {"code", "message", ...}}``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Send

JSON = b"application/json"


def error_body(code: str, message: str, **details: Any) -> dict[str, Any]:
    """The error document: a stable machine ``code``, a human ``message`` and optional details."""
    return {"error": {"code": code, "message": message, **details}}


def error_response(
    status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None, **details: Any
) -> Response:
    """A JSON error response."""
    body = orjson.dumps(error_body(code, message, **details))
    return Response(body, status_code=status, media_type="application/json", headers=headers)


async def send_json(send: Send, status: int, body: bytes, *, close: bool = False) -> None:
    """Send a complete JSON response straight on the ASGI channel (the webhook's hot path skips Response)."""
    headers = [(b"content-type", JSON), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, status: int, code: str, message: str, *, close: bool = False) -> None:
    """Send a JSON error on the ASGI channel."""
    await send_json(send, status, orjson.dumps(error_body(code, message)), close=close)
