"""JSON responses of the HTTP edge: one error shape everywhere, ``{"error": {"code", "message", ...}}``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.responses import Response
from starlette.types import Send

from ledger.errors import (
    AccessRefused,
    HoldNotOpen,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidRequest,
    LedgerError,
    LimitExceeded,
    NotEntitled,
    UnknownCustomer,
    UnknownHold,
)

JSON = b"application/json"

LEDGER_STATUS: dict[type[LedgerError], int] = {
    UnknownCustomer: 404,
    UnknownHold: 404,
    InsufficientCredits: 402,
    AccessRefused: 403,
    IdempotencyConflict: 409,
    HoldNotOpen: 409,
    InvalidRequest: 422,
    LimitExceeded: 429,
    NotEntitled: 403,
}


def error_body(code: str, message: str, **details: Any) -> dict[str, Any]:
    """The error document: a stable machine ``code``, a human ``message`` and optional details."""
    return {"error": {"code": code, "message": message, **details}}


def error_response(
    status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None, **details: Any
) -> Response:
    """A JSON error response."""
    body = orjson.dumps(error_body(code, message, **details))
    return Response(body, status_code=status, media_type="application/json", headers=headers)


async def send_json(
    send: Send, status: int, body: bytes, *, close: bool = False, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """Send a complete JSON response straight on the ASGI channel (the hot paths skip Response)."""
    fields = [(b"content-type", JSON), (b"content-length", str(len(body)).encode()), *headers]
    if close:
        fields.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": fields})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, status: int, code: str, message: str, *, close: bool = False) -> None:
    """Send a JSON error on the ASGI channel."""
    await send_json(send, status, orjson.dumps(error_body(code, message)), close=close)


def ledger_error(exc: LedgerError) -> tuple[int, dict[str, Any]]:
    """A ledger refusal's status and error document, with a stable error code."""
    status = next((code for kind, code in LEDGER_STATUS.items() if isinstance(exc, kind)), 400)
    details: dict[str, Any] = {}
    if isinstance(exc, InsufficientCredits):
        details = {"available": exc.available, "requested": exc.requested}
    elif isinstance(exc, AccessRefused):
        details = {"access_state": exc.state}
    elif isinstance(exc, LimitExceeded):
        # The limit, what was used of what maximum, and when the window resets.
        details = {
            "limit": exc.limit,
            "scope_value": exc.scope_value,
            "used": _amount(exc.used),
            "maximum": _amount(exc.maximum),
            "requested": _amount(exc.requested),
            "reset_at": exc.reset_at.isoformat(),
        }
    elif isinstance(exc, NotEntitled):
        details = {"not_allowed": {"kind": exc.what, "value": exc.value}, "plans": list(exc.plans)}
    return status, error_body(exc.code, str(exc), **details)


def _amount(value: Any) -> Any:
    return format(value.normalize(), "f") if isinstance(value, Decimal) else value


def ledger_error_response(exc: LedgerError) -> Response:
    """Translate a ledger refusal into its status and a stable error code."""
    status, body = ledger_error(exc)
    headers = None
    if isinstance(exc, LimitExceeded):
        headers = {"Retry-After": str(max(1, int((exc.reset_at - datetime.now(UTC)).total_seconds()) + 1))}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def validation_details(errors: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Where and why a request is invalid; the offending input is not echoed back (it may be huge or secret)."""
    return [
        {
            "loc": [str(part) for part in error.get("loc", ())],
            "type": str(error.get("type", "")),
            "msg": str(error.get("msg", "")),
        }
        for error in errors
    ]


def unavailable(exc: Exception) -> tuple[int, dict[str, Any]]:
    """The 503 for a write that cannot be applied now (the database unreachable, a time-out): retry it."""
    if isinstance(exc, OperationalError | InterfaceError):
        return 503, error_body("database_unavailable", "the database cannot be reached; retry later")
    return 503, error_body("usage_unavailable", f"{exc}; retry with the same request id")
