"""The usage API's hot paths, answered without the framework's per-request machinery.

Every AI call a product makes comes through ``POST /v1/usage`` (or a hold and its capture or release). Measured
with py-spy on the running server, FastAPI's middleware stack, routing, dependency solving and response
validation cost ~75% of the server's CPU per call, the consumption itself a few percent. So, as for the Stripe
webhook, :class:`~webhooks.app.BillingApp` hands these requests to this plain ASGI endpoint first. It does the
common case only, with the routes' own pieces (the token check, the request models validated straight from the
bytes, the same ledger calls on the same writer, the response models) and hands anything else (no or a bad
token, an invalid body or path, an odd header) to the FastAPI route with the body it read. So every refusal is
the route's own, and the contract (statuses, error bodies, OpenAPI) has one source: webhooks/api.py.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import TypeAdapter, ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.types import Message, Receive, Scope, Send

from ledger.errors import InvalidRequest, LedgerError
from webhooks import api
from webhooks.responses import JSON, ledger_error, send_json, unavailable
from webhooks.usage_writer import UsageUnavailable, UsageWriter

ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

FAST_PREFIXES = ("/v1/usage", "/v1/holds")
_BATCH_PATH = "/v1/usage/batch"
_HOLD_ACTION = re.compile(r"^/v1/holds/([A-Za-z0-9_.:\-]{1,255})/(capture|release)$")
# Bodies past this size are left to the framework (its own limits and errors); a usage body is ~300 bytes, and
# a batch holds up to 1,000 of them.
_MAX_FAST_BODY = 64 * 1024
_MAX_FAST_BATCH_BODY = 2 * 1024 * 1024
_REPLAYED_HEADER = ((b"idempotent-replayed", b"true"),)
_DUMP: dict[type[Any], TypeAdapter[Any]] = {
    model: TypeAdapter(model)
    for model in (api.ConsumeResponse, api.HoldResponse, api.CaptureResponse)
}
_ERROR: TypeAdapter[dict[str, Any]] = TypeAdapter(dict[str, Any])
_CONSUME = TypeAdapter(api.ConsumeRequest)
_BATCH = TypeAdapter(api.UsageBatchRequest)
_HOLD = TypeAdapter(api.HoldRequest)
_CAPTURE = TypeAdapter(api.CaptureRequest)
_RELEASE = TypeAdapter(api.ReleaseRequest)


class _Decline(Exception):
    """Not the common case: the route answers it."""


class UsageEndpoints:
    """POST /v1/usage, /v1/usage/batch, /v1/holds, /v1/holds/{id}/capture and /release for well-formed requests."""

    def __init__(
        self,
        writer: UsageWriter,
        fallback: ASGIApp,
        *,
        token_check: Callable[[bytes], bool] = api.token_is_valid,
    ) -> None:
        self.writer = writer
        self.fallback = fallback
        self.token_check = token_check

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        authorization = idempotency_key = content_type = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"idempotency-key":
                idempotency_key = value
            elif name == b"content-type":
                content_type = value
        scheme, _, token = (authorization or b"").partition(b" ")
        if scheme.lower() != b"bearer" or not self.token_check(token):
            await self.fallback(scope, receive, send)
            return
        limit = _MAX_FAST_BATCH_BODY if scope["path"] == _BATCH_PATH else _MAX_FAST_BODY
        body, complete = await _read_body(receive, limit)
        if not complete:
            await self.fallback(scope, _replay(body, receive, complete=False), send)
            return
        json_body = (content_type or b"").partition(b";")[0].strip().lower() == JSON
        try:
            status, answer, replayed = await self._apply(scope["path"], body, json_body, idempotency_key)
        except (_Decline, ValidationError, UnicodeDecodeError):
            await self.fallback(scope, _replay(body, receive, complete=True), send)
            return
        except LedgerError as exc:
            status, error = ledger_error(exc)
            await send_json(send, status, _ERROR.dump_json(error))
            return
        except (UsageUnavailable, OperationalError, InterfaceError) as exc:
            status, error = unavailable(exc)
            await send_json(send, status, _ERROR.dump_json(error))
            return
        extra = _REPLAYED_HEADER if replayed else ()
        payload = answer if isinstance(answer, bytes) else _DUMP[type(answer)].dump_json(answer)
        await send_json(send, status, payload, headers=extra)

    async def _apply(self, path: str, body: bytes, json_body: bool, key: bytes | None) -> tuple[int, Any, bool]:
        """Parse, apply on the writer, and give (status, response model, replayed); _Decline hands over."""
        if path == "/v1/usage":
            consume = _CONSUME.validate_json(_json(body, json_body))
            outcome = await self.writer.submit(consume.consume_input(_request_id(consume.request_id, key)))
            if isinstance(outcome, LedgerError):
                raise outcome
            return api.replayed_status(outcome.replayed), api.consume_response(outcome), outcome.replayed
        if path == _BATCH_PATH:
            batch = _BATCH.validate_json(_json(body, json_body))
            return 200, await api.apply_usage_batch(batch, self.writer), False
        if path == "/v1/holds":
            hold = _HOLD.validate_json(_json(body, json_body))
            request_id = _request_id(hold.request_id, key)
            placed = await self.writer.run_statement(
                api.hold_as_statement(hold, request_id), api.apply_hold, hold, request_id
            )
            return api.replayed_status(placed.replayed), api.hold_response(placed), placed.replayed
        match = _HOLD_ACTION.match(path)
        if match is None:
            raise _Decline
        hold_id, action = match.groups()
        if action == "capture":
            capture = _CAPTURE.validate_json(_json(body, json_body)) if body else api.CaptureRequest()
            captured = await self.writer.run_statement(
                api.capture_as_statement(hold_id, capture), api.apply_capture, hold_id, capture
            )
            return 200, api.capture_response(captured), captured.replayed
        release = _RELEASE.validate_json(_json(body, json_body)) if body else None
        released = await self.writer.run(api.apply_release, hold_id, release)
        return 200, api.hold_response(released), released.replayed


def _json(body: bytes, json_body: bool) -> bytes:
    if not json_body:
        raise _Decline
    return body


def _request_id(body_value: str | None, header: bytes | None) -> str:
    try:
        return api.request_id_of(body_value, header.decode("ascii") if header is not None else None)
    except InvalidRequest as exc:
        raise _Decline from exc


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, bool]:
    """The request body, and whether it was read whole within the fast path's size."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks), False
        if not message.get("more_body", False):
            return b"".join(chunks), True


def _replay(body: bytes, receive: Receive, *, complete: bool) -> Receive:
    """A ``receive`` that gives back the body already read, then whatever is left of the request."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": not complete}
        return await receive()

    return replayed
