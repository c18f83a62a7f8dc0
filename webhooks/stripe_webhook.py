"""POST /webhooks/stripe: verify, store the raw event once, answer fast; the worker does the rest.

A plain ASGI endpoint rather than a FastAPI route: it runs thousands of times a second and needs nothing of the
framework. Nothing is stored unless the signature is good and the body is a Stripe event; nothing is answered
2xx unless the event's row is committed (Stripe retries anything else, for up to three days).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import orjson
from starlette.types import Receive, Scope, Send

from ledger.inbox import EventEnvelope, NotAStripeEvent, has_nul, parse_envelope
from webhooks import metrics
from webhooks.inbox_writer import InboxUnavailable, InboxWriter, StoreOutcome
from webhooks.responses import send_error, send_json
from webhooks.signature import SignatureError, verify_signature

_STORED = b'{"received":true,"duplicate":false}'
_DUPLICATE = b'{"received":true,"duplicate":true}'

# Column widths of stripe_events (ledger.inbox.StripeEvent): refuse what the table cannot hold up front, so one
# odd event never fails the batch it shares.
_MAX_LENGTHS = {"api_version": 64, "connected_account": 255, "object_id": 255, "customer_id": 255}


class BodyTooLarge(Exception):
    pass


class Rejected(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _check_storable(envelope: EventEnvelope) -> None:
    for name in ("event_id", "type", "api_version", "connected_account", "object_id", "customer_id"):
        value = getattr(envelope, name)
        if value is None:
            continue
        if "\x00" in value:
            raise NotAStripeEvent(f"{name} contains a NUL character")
        limit = _MAX_LENGTHS.get(name)
        if limit is not None and len(value) > limit:
            raise NotAStripeEvent(f"{name} is longer than {limit} characters")


class StripeWebhookEndpoint:
    """The ASGI endpoint that receives Stripe webhook deliveries."""

    def __init__(
        self, writer: InboxWriter, *, secrets: Sequence[bytes], tolerance_seconds: int, max_body_bytes: int
    ) -> None:
        self.writer = writer
        self.secrets = list(secrets)
        self.tolerance_seconds = tolerance_seconds
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        metrics.EVENTS_RECEIVED.inc()
        try:
            outcome = await self._handle(scope, receive)
        except Rejected as exc:
            metrics.EVENTS_REJECTED.labels(exc.code).inc()
            # After refusing an oversized body we did not read it all: close the connection rather than drain it.
            await send_error(send, exc.status, exc.code, exc.message, close=exc.status == 413)
        else:
            if outcome is StoreOutcome.STORED:
                metrics.EVENTS_STORED.inc()
                await send_json(send, 200, _STORED)
            else:
                metrics.EVENTS_DUPLICATE.inc()
                await send_json(send, 200, _DUPLICATE)
        metrics.WEBHOOK_LATENCY.observe(time.perf_counter() - started)

    async def _handle(self, scope: Scope, receive: Receive) -> StoreOutcome:
        signature: str | None = None
        content_length: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"stripe-signature":
                signature = value.decode("latin-1")
            elif name == b"content-length":
                content_length = value
        if not self.secrets:
            raise Rejected(
                503, "webhook_not_configured", "no Stripe webhook secret is configured (STRIPE_WEBHOOK_SECRETS)"
            )
        if content_length is not None and content_length.isdigit() and int(content_length) > self.max_body_bytes:
            raise self._too_large()
        body = await self._read_body(receive)
        try:
            verify_signature(body, signature, self.secrets, tolerance_seconds=self.tolerance_seconds)
        except SignatureError as exc:
            raise Rejected(400, exc.failure.value, str(exc)) from exc
        try:
            event = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise Rejected(400, "invalid_json", f"the body is not JSON: {exc}") from exc
        try:
            envelope = parse_envelope(event)
            _check_storable(envelope)
            if has_nul(body):
                # Anywhere in the event: a handler would later write that string to a text column and fail.
                raise NotAStripeEvent("a field contains a NUL character")
        except (NotAStripeEvent, ValueError, TypeError, OverflowError) as exc:
            # ValueError and friends too: a field the envelope reads may be of any shape; none is a server error.
            raise Rejected(400, "not_a_stripe_event", f"the body is not a Stripe event: {exc}") from exc
        try:
            return await self.writer.submit(body, envelope)
        except InboxUnavailable as exc:
            raise Rejected(503, "inbox_unavailable", f"{exc}; retry later") from exc

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Rejected(400, "client_disconnected", "the client went away before the body was complete")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _too_large(self) -> Rejected:
        return Rejected(413, "body_too_large", f"the body is larger than {self.max_body_bytes} bytes")
