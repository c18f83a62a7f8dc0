"""The ASGI application: Stripe webhook receiver, usage API (/v1), health, metrics and the review pages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import structlog
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ledger.errors import LedgerError
from ledger.settings import get_settings
from webhooks import api, entitlements_api, health
from webhooks.inbox_writer import InboxWriter
from webhooks.responses import error_response, ledger_error_response, unavailable, validation_details
from webhooks.review.app import create_review_app
from webhooks.stripe_webhook import StripeWebhookEndpoint
from webhooks.usage_fast import FAST_PREFIXES, ASGIApp, UsageEndpoints
from webhooks.usage_writer import UsageUnavailable, UsageWriter

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
    """FastAPI, with the hot POST paths (Stripe's deliveries, usage) answered before the framework's machinery."""

    fast_posts: dict[str, ASGIApp]
    usage_endpoints: ASGIApp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The hot paths: thousands of requests a second need none of the framework (routing, exception
        # middleware, dependency solving), which costs more than verifying and storing the event or the usage.
        if scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            endpoint = self.fast_posts.get(path)
            if endpoint is None and path.startswith(FAST_PREFIXES):
                endpoint = self.usage_endpoints
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def framework(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The request through FastAPI's routing and handlers (what a fast path hands over)."""
        await super().__call__(scope, receive, send)


def create_app(*, writer: InboxWriter | None = None, usage_writer: UsageWriter | None = None) -> FastAPI:
    """Build the application from settings; ``writer`` and ``usage_writer`` replace the group-committers (tests)."""
    settings = get_settings()
    writer = writer or InboxWriter()
    # SQLite has one writer at a time: more batches in flight would only queue on its lock.
    usage_writer = usage_writer or UsageWriter(
        writers=1 if settings.database_url.startswith("sqlite") else settings.usage_writers
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await usage_writer.aclose()
        await writer.aclose()

    app = BillingApp(
        title="billing-reconciler",
        version="0.1.0",
        summary="Stripe webhook receiver and usage API of the credit ledger",
        lifespan=lifespan,
        # FastAPI's OpenTelemetry hooks ask the tracer and meter providers on every request (several environment
        # reads each); this service exports Prometheus metrics (/metrics) and structured logs instead.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        # /docs is served below from local copies of Swagger UI's files (nothing loads from another host);
        # ReDoc has no local copy, so it is off.
        docs_url=None,
        redoc_url=None,
    )
    app.state.inbox_writer = writer
    app.state.usage_writer = usage_writer
    endpoint = StripeWebhookEndpoint(
        writer,
        secrets=[s.get_secret_value().encode() for s in settings.stripe_webhook_secrets],
        tolerance_seconds=settings.stripe_webhook_tolerance_seconds,
        max_body_bytes=settings.webhook_max_body_bytes,
    )
    app.fast_posts = {WEBHOOK_PATH: endpoint}
    app.usage_endpoints = UsageEndpoints(usage_writer, app.framework)
    # Also routed, for other methods (405) and for the OpenAPI description below.
    app.router.routes.insert(0, Route(WEBHOOK_PATH, endpoint, methods=["POST"], name="stripe_webhook"))
    app.include_router(health.router)
    app.include_router(api.router)
    app.include_router(entitlements_api.router)
    app.mount("/review", create_review_app())
    _local_docs(app)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(LedgerError)
    async def _ledger_error(_: Request, exc: LedgerError) -> Response:
        return ledger_error_response(exc)

    @app.exception_handler(UsageUnavailable)
    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _unavailable(_: Request, exc: Exception) -> Response:
        log.warning("write unavailable", error=repr(exc))
        status, body = unavailable(exc)
        return Response(orjson.dumps(body), status_code=status, media_type="application/json")

    @app.exception_handler(DataError)
    async def _out_of_range(_: Request, exc: DataError) -> Response:
        # A value the request carried, or a total it adds to (the day's usage roll-up), does not fit its column.
        # The transaction rolled back: nothing was charged or recorded.
        log.info("value out of range", error=str(exc.orig).splitlines()[0] if exc.orig else type(exc).__name__)
        return error_response(
            422,
            "value_out_of_range",
            "a value, or a total it adds to (such as the day's usage roll-up), is beyond what can be stored",
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        details = validation_details(exc.errors())
        return error_response(422, "invalid_request", "the request is invalid", details=details)

    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _webhook_openapi(base_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


DOCS_ASSETS = "/docs/assets"


def _local_docs(app: FastAPI) -> None:
    """/docs with Swagger UI's script, stylesheet and icon served by this app (swagger-ui-bundle's copies)."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:  # not installed: no /docs (the schema stays at /openapi.json)
        return
    from fastapi.openapi.docs import get_swagger_ui_html
    from starlette.staticfiles import StaticFiles

    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_path), name="docs_assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="billing-reconciler API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
            # The online validator badge would fetch from validator.swagger.io: off.
            swagger_ui_parameters={"validatorUrl": None},
        )
