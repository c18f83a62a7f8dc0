"""The usage API's hot path: ``POST /v1/usage`` answered without the framework's per-request machinery.

Every AI call a product makes comes through here. Measured with py-spy on the running server, FastAPI's
middleware stack, routing, dependency solving and response validation cost ~75% of the server's CPU per call,
the consumption itself a few percent. So, as for the Stripe webhook, :class:`BillingApp` hands these requests
to this plain ASGI endpoint first. It does the common case only, with the routes' own pieces (the token check,
the ``ConsumeRequest`` model validated straight from the bytes, the group-committing writer, the response model)
and hands anything else (no or a bad token, an invalid body, an odd header) to the FastAPI route with the body it
read, so every refusal is the route's own, and the contract (statuses, error bodies, OpenAPI) has one source.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from pydantic import TypeAdapter, ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.types import Message, Receive, Scope, Send

from ledger.errors import InvalidRequest, LedgerError
from webhooks.api import ConsumeRequest, ConsumeResponse, consume_response, replayed_status, request_id_of
from webhooks.api import token_is_valid as default_token_check
from webhooks.responses import JSON, ledger_error, unavailable
from webhooks.usage_writer import UsageUnavailable, UsageWriter

ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

USAGE_PATH = "/v1/usage"
# Bodies past this size are left to the framework (its own limits and errors); a usage body is ~300 bytes.
_MAX_FAST_BODY = 64 * 1024
_REQUEST = TypeAdapter(ConsumeRequest)
_RESPONSE = TypeAdapter(ConsumeResponse)
_REPLAYED_HEADER = (b"idempotent-replayed", b"true")


class UsageEndpoint:
    """``POST /v1/usage`` for a request that is well-formed; anything else goes to ``fallback`` (the route)."""

    def __init__(
        self,
        writer: UsageWriter,
        fallback: ASGIApp,
        *,
        token_check: Callable[[bytes], bool] = default_token_check,
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
        media_type = (content_type or b"").partition(b";")[0].strip().lower()
        if scheme.lower() != b"bearer" or not self.token_check(token) or media_type != JSON:
            await self.fallback(scope, receive, send)
            return
        body, complete = await _read_body(receive)
        if not complete:
            await self.fallback(scope, _replay(body, receive, complete=False), send)
            return
        try:
            request = _REQUEST.validate_json(body)
            key = idempotency_key.decode("ascii") if idempotency_key is not None else None
            request_id = request_id_of(request.request_id, key)
        except (ValidationError, InvalidRequest, UnicodeDecodeError):
            await self.fallback(scope, _replay(body, receive, complete=True), send)
            return
        # Applied with the other calls in flight, in one transaction, and answered once that committed.
        try:
            outcome = await self.writer.submit(request.consume_input(request_id))
        except (UsageUnavailable, OperationalError, InterfaceError) as exc:
            status, error = unavailable(exc)
            await _send(send, status, _ERROR.dump_json(error), ())
            return
        if isinstance(outcome, LedgerError):
            status, error = ledger_error(outcome)
            await _send(send, status, _ERROR.dump_json(error), ())
            return
        headers = (_REPLAYED_HEADER,) if outcome.replayed else ()
        await _send(send, replayed_status(outcome.replayed), _RESPONSE.dump_json(consume_response(outcome)), headers)


_ERROR: TypeAdapter[dict[str, object]] = TypeAdapter(dict[str, object])


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
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
        if size > _MAX_FAST_BODY:
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


async def _send(send: Send, status: int, body: bytes, extra: tuple[tuple[bytes, bytes], ...]) -> None:
    headers = [(b"content-type", JSON), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
