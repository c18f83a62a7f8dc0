"""The ASGI application: Stripe webhook receiver, usage API (/v1), health, metrics and the review pages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ledger.errors import (
    AccessRefused,
    HoldNotOpen,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidRequest,
    LedgerError,
    UnknownCustomer,
    UnknownHold,
)
from ledger.settings import get_settings
from webhooks import api, health
from webhooks.inbox_writer import InboxWriter
from webhooks.responses import error_response
from webhooks.review.app import create_review_app
from webhooks.stripe_webhook import StripeWebhookEndpoint

WEBHOOK_PATH = "/webhooks/stripe"

log = structlog.get_logger(__name__)


def _webhook_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    json_error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            }
        },
    }
    schema["paths"][WEBHOOK_PATH] = {
        "post": {
            "summary": "Receive a Stripe webhook delivery",
            "description": "Verifies Stripe-Signature over the raw body, stores the event once, answers after commit.",
            "operationId": "receive_stripe_webhook",
            "tags": ["webhooks"],
            "parameters": [
                {"name": "Stripe-Signature", "in": "header", "required": True, "schema": {"type": "string"}}
            ],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
            "responses": {
                "200": {"description": "Stored (or already stored)"},
                "400": {"description": "Bad signature or not a Stripe event", "content": json_error},
                "413": {"description": "Body too large", "content": json_error},
                "503": {"description": "Cannot store now; retry", "content": json_error},
            },
        }
    }
    return schema


class BillingApp(FastAPI):
    """FastAPI, with Stripe's webhook deliveries answered before the framework's middleware and routing."""

    stripe_webhook: StripeWebhookEndpoint | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The hot path: thousands of deliveries a second need none of the framework (routing, exception
        # middleware, telemetry), which costs more than verifying and storing the event.
        if (
            self.stripe_webhook is not None
            and scope["type"] == "http"
            and scope["path"] == WEBHOOK_PATH
            and scope["method"] == "POST"
        ):
            await self.stripe_webhook(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


LEDGER_STATUS: dict[type[LedgerError], int] = {
    UnknownCustomer: 404,
    UnknownHold: 404,
    InsufficientCredits: 402,
    AccessRefused: 403,
    IdempotencyConflict: 409,
    HoldNotOpen: 409,
    InvalidRequest: 422,
}


def ledger_error_response(exc: LedgerError) -> Response:
    """Translate a ledger refusal into its status and a stable error code."""
    status = next((code for kind, code in LEDGER_STATUS.items() if isinstance(exc, kind)), 400)
    details: dict[str, Any] = {}
    if isinstance(exc, InsufficientCredits):
        details = {"available": exc.available, "requested": exc.requested}
    elif isinstance(exc, AccessRefused):
        details = {"access_state": exc.state}
    return error_response(status, exc.code, str(exc), **details)


def create_app(*, writer: InboxWriter | None = None) -> FastAPI:
    """Build the application from settings; ``writer`` replaces the inbox writer (tests)."""
    settings = get_settings()
    writer = writer or InboxWriter()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await writer.aclose()

    app = BillingApp(
        title="billing-reconciler",
        version="0.1.0",
        summary="Stripe webhook receiver and usage API of the credit ledger",
        lifespan=lifespan,
    )
    app.state.inbox_writer = writer
    endpoint = StripeWebhookEndpoint(
        writer,
        secrets=[s.get_secret_value().encode() for s in settings.stripe_webhook_secrets],
        tolerance_seconds=settings.stripe_webhook_tolerance_seconds,
        max_body_bytes=settings.webhook_max_body_bytes,
    )
    app.stripe_webhook = endpoint
    # Also routed, for other methods (405) and for the OpenAPI description below.
    app.router.routes.insert(0, Route(WEBHOOK_PATH, endpoint, methods=["POST"], name="stripe_webhook"))
    app.include_router(health.router)
    app.include_router(api.router)
    app.mount("/review", create_review_app())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(LedgerError)
    async def _ledger_error(_: Request, exc: LedgerError) -> Response:
        return ledger_error_response(exc)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database_unavailable(_: Request, exc: Exception) -> Response:
        log.warning("database unavailable", error=repr(exc))
        return error_response(503, "database_unavailable", "the database cannot be reached; retry later")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        return error_response(422, "invalid_request", "the request is invalid", details=validation_details(exc))

    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _webhook_openapi(base_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    """Where and why a request is invalid; the offending input is not echoed back (it may be huge or secret)."""
    return [
        {
            "loc": [str(part) for part in error.get("loc", ())],
            "type": str(error.get("type", "")),
            "msg": str(error.get("msg", "")),
        }
        for error in exc.errors()
    ]
