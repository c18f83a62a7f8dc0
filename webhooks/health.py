"""Liveness, readiness (database, broker, and the inbox backlog) and Prometheus metrics."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from fastapi import APIRouter
from sqlalchemy import func, select, text
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from ledger.db import unit_of_work
from ledger.inbox import EventStatus, StripeEvent
from ledger.settings import get_settings
from webhooks.metrics import render_metrics

router = APIRouter(tags=["operations"])

UNPROCESSED = (EventStatus.PENDING, EventStatus.WAITING, EventStatus.FAILED)


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def check_database() -> dict[str, Any]:
    """Reach the database and count stored events left unprocessed for longer than the configured minutes."""
    settings = get_settings()
    cutoff = datetime.now(UTC) - timedelta(minutes=settings.unprocessed_event_minutes)
    try:
        with unit_of_work() as session:
            session.execute(text("SELECT 1"))
            stale = session.scalar(
                select(func.count())
                .select_from(StripeEvent)
                .where(StripeEvent.status.in_(UNPROCESSED), StripeEvent.received_at < cutoff)
            )
    except Exception as exc:
        return {"ok": False, "error": type(exc).__name__}
    return {"ok": True, "stale_unprocessed_events": int(stale or 0)}


def check_broker() -> dict[str, Any]:
    """Reach the Celery broker (the embedded default needs no server)."""
    url = get_settings().celery_broker_url
    if not url:
        return {"ok": True, "broker": "embedded"}
    try:
        if url.startswith(("redis://", "rediss://", "unix://")):
            import redis

            client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
            try:
                client.ping()
            finally:
                client.close()
        else:
            from kombu import Connection

            with Connection(url, connect_timeout=1) as conn:
                conn.ensure_connection(max_retries=1)
    except Exception as exc:
        return {"ok": False, "broker": url.split("://", 1)[0], "error": type(exc).__name__}
    return {"ok": True, "broker": url.split("://", 1)[0]}


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Database and broker reachable, inbox backlog under the threshold",
    responses={503: {"description": "Not ready; the body has the numbers"}},
)
async def readyz() -> Response:
    settings = get_settings()
    database = await run_in_threadpool(check_database)
    broker = await run_in_threadpool(check_broker)
    stale = database.get("stale_unprocessed_events")
    backlog = {
        "count": stale,
        "older_than_minutes": settings.unprocessed_event_minutes,
        "threshold": settings.unprocessed_event_threshold,
        "ok": stale is not None and stale <= settings.unprocessed_event_threshold,
    }
    ready = database["ok"] and broker["ok"] and backlog["ok"]
    body = {
        "status": "ready" if ready else "unavailable",
        "database": {k: v for k, v in database.items() if k != "stale_unprocessed_events"},
        "broker": broker,
        "unprocessed_events": backlog,
    }
    return _json(200 if ready else 503, body)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus_metrics() -> Response:
    payload, content_type = render_metrics()
    return Response(payload, media_type=content_type)
