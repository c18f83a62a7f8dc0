"""Delivery of the outbox to the product's endpoints: at least once, signed, retried for up to three days.

One pass (:func:`deliver_pending`, run by the beat every few seconds and after a redelivery):

1. **fan out**: each outbox row not yet dispatched gets one delivery row per configured endpoint that wants
   its type (``events``; ``"*"`` for all), in one transaction;
2. **claim**: due deliveries whose endpoint is enabled and that have no older undelivered delivery of the same
   customer to the same endpoint (creation order per customer), leased for a while so two workers never send
   the same one at the same time, committed before anything is sent;
3. **send** each, outside any transaction, signed as Stripe signs (``Billing-Signature: t=<unix>,v1=<hex>``,
   one ``v1`` per secret during a roll);
4. **record** the outcome: 2xx is delivered; anything else is retried with exponential backoff until three days
   after the event, then given up. An endpoint failing for the whole horizon is disabled and becomes a review
   item (reconciliation's workflow).

Receivers deduplicate on the event's ``id``: delivery is at least once (a crash between send and record sends
again).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import httpx
import structlog
from sqlalchemy import Table, and_, exists, or_, select, update
from sqlalchemy.orm import Session, aliased

from ledger.config import BillingConfig, NotificationEndpoint, get_billing_config
from ledger.db import unit_of_work
from ledger.models import DeliveryStatus, NotificationDelivery, NotificationEndpointState, OutboxEvent
from ledger.posting import as_utc, upsert
from ledger.settings import secrets_from_env
from reconciliation.models import MismatchKind
from reconciliation.services import Finding, open_review_item

log = structlog.get_logger("worker.notifications")

OUTBOX: Table = OutboxEvent.__table__  # type: ignore[assignment]
DELIVERIES: Table = NotificationDelivery.__table__  # type: ignore[assignment]
ENDPOINTS: Table = NotificationEndpointState.__table__  # type: ignore[assignment]

RETRY_HORIZON = timedelta(days=3)
FIRST_RETRY = timedelta(seconds=30)
MAX_RETRY_GAP = timedelta(hours=6)
# A claimed delivery is not claimed again for this long (a worker that died mid-send gives it back after).
LEASE = timedelta(minutes=2)
SIGNATURE_HEADER = "Billing-Signature"


def retry_delay(attempts: int) -> timedelta:
    """Wait after the ``attempts``-th failed attempt: 30 s doubling (1 min, 2 min, ...), at most 6 hours.

    Over three days that is about 20 attempts, most of them in the first hours.
    """
    return min(FIRST_RETRY * (2 ** max(attempts - 1, 0)), MAX_RETRY_GAP)


def sign(body: bytes, secrets: Sequence[bytes], timestamp: int) -> str:
    """The ``Billing-Signature`` header: ``t=<unix>`` and one ``v1=<hex HMAC-SHA256 of "t.body">`` per secret."""
    signed = str(timestamp).encode() + b"." + body
    parts = [f"t={timestamp}"]
    parts += [f"v1={hmac.new(secret, signed, hashlib.sha256).hexdigest()}" for secret in secrets]
    return ",".join(parts)


@cache
def _secrets(env_name: str) -> tuple[bytes, ...]:
    # Read once per process (settings are read at start): a secret roll is a restart with both secrets set.
    return tuple(s.get_secret_value().encode() for s in secrets_from_env(env_name))


def endpoint_secrets(endpoint: NotificationEndpoint) -> tuple[bytes, ...]:
    """The endpoint's signing secrets, from the environment variable its config names."""
    return _secrets(endpoint.secret_env)


def wants(endpoint: NotificationEndpoint, event_type: str) -> bool:
    """Whether an endpoint subscribed to this event type."""
    return "*" in endpoint.events or event_type in endpoint.events


def payload(row: Any) -> bytes:
    """The JSON body sent for an outbox row (the same bytes on every attempt but for nothing)."""
    created = as_utc(row.created_at)
    assert created is not None
    body = {
        "id": row.event_id,
        "object": "event",
        "type": row.type,
        "created": int(created.timestamp()),
        "created_at": created.isoformat(),
        "customer_id": row.customer_id,
        "data": row.data,
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


# --- 1. fan out -------------------------------------------------------------------------------------------------


def fan_out(session: Session, endpoints: Sequence[NotificationEndpoint], now: datetime, *, batch: int = 1000) -> int:
    """Create the deliveries of outbox rows not yet dispatched; return how many rows were dispatched."""
    query = select(OUTBOX.c.id, OUTBOX.c.type, OUTBOX.c.customer_id, OUTBOX.c.created_at).where(
        OUTBOX.c.dispatched_at.is_(None)
    )
    query = query.order_by(OUTBOX.c.id).limit(batch)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    rows = session.execute(query).all()
    if not rows:
        return 0
    deliveries = [
        {
            "outbox_id": row.id,
            "endpoint_url": endpoint.url,
            "customer_id": row.customer_id,
            "status": DeliveryStatus.PENDING,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": as_utc(row.created_at),
        }
        for row in rows
        for endpoint in endpoints
        if wants(endpoint, row.type)
    ]
    if deliveries:
        session.execute(
            upsert(session, DELIVERIES).on_conflict_do_nothing(index_elements=["outbox_id", "endpoint_url"]),
            deliveries,
        )
    session.execute(update(OUTBOX).where(OUTBOX.c.id.in_([r.id for r in rows])).values(dispatched_at=now))
    return len(rows)


# --- 2. claim ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    delivery_id: int
    endpoint_url: str
    attempts: int
    created_at: datetime
    body: bytes
    event_id: str


def _disabled_urls(session: Session) -> set[str]:
    return set(session.scalars(select(ENDPOINTS.c.url).where(ENDPOINTS.c.disabled_at.is_not(None))))


def claim_due(session: Session, urls: Sequence[str], now: datetime, *, limit: int = 100) -> list[Claimed]:
    """Lease up to ``limit`` due deliveries, each the oldest undelivered one of its customer and endpoint."""
    urls = [u for u in urls if u not in _disabled_urls(session)]
    if not urls:
        return []
    older = aliased(DELIVERIES)
    blocked = exists().where(
        older.c.endpoint_url == DELIVERIES.c.endpoint_url,
        older.c.customer_id == DELIVERIES.c.customer_id,
        older.c.status == DeliveryStatus.PENDING,
        older.c.outbox_id < DELIVERIES.c.outbox_id,
    )
    query = (
        select(DELIVERIES.c.id, DELIVERIES.c.endpoint_url, DELIVERIES.c.attempts, DELIVERIES.c.created_at, OUTBOX)
        .join(OUTBOX, OUTBOX.c.id == DELIVERIES.c.outbox_id)
        .where(
            DELIVERIES.c.status == DeliveryStatus.PENDING,
            DELIVERIES.c.next_attempt_at <= now,
            DELIVERIES.c.endpoint_url.in_(urls),
            or_(DELIVERIES.c.customer_id.is_(None), ~blocked),
        )
        .order_by(DELIVERIES.c.outbox_id, DELIVERIES.c.id)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(of=DELIVERIES, skip_locked=True)
    rows = session.execute(query).all()
    if rows:
        session.execute(
            update(DELIVERIES).where(DELIVERIES.c.id.in_([r.id for r in rows])).values(next_attempt_at=now + LEASE)
        )
    return [
        Claimed(r.id, r.endpoint_url, r.attempts, as_utc(r.created_at) or now, payload(r), r.event_id) for r in rows
    ]


# --- 3. send ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    delivered: bool
    status_code: int | None
    latency_ms: int
    error: str | None


def send(client: httpx.Client, claimed: Claimed, secrets: Sequence[bytes], *, timeout: float) -> Attempt:
    """POST one delivery; a 2xx answer is delivered, anything else (status, timeout, refused) is an error."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "billing-reconciler-notifications/1",
        "Billing-Event-Id": claimed.event_id,
        SIGNATURE_HEADER: sign(claimed.body, secrets, int(time.time())),
    }
    started = time.perf_counter()
    try:
        response = client.post(claimed.endpoint_url, content=claimed.body, headers=headers, timeout=timeout)
    except httpx.TimeoutException as exc:
        return Attempt(False, None, _ms(started), f"timeout after {timeout:g}s ({type(exc).__name__})")
    except httpx.HTTPError as exc:
        return Attempt(False, None, _ms(started), f"{type(exc).__name__}: {exc}"[:500])
    if 200 <= response.status_code < 300:
        return Attempt(True, response.status_code, _ms(started), None)
    return Attempt(False, response.status_code, _ms(started), f"HTTP {response.status_code}: {response.text[:200]}")


def _ms(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)


# --- 4. record --------------------------------------------------------------------------------------------------


def record(session: Session, claimed: Claimed, attempt: Attempt, now: datetime) -> DeliveryStatus:
    """Store an attempt's outcome; schedule the retry or give up past the horizon; track the endpoint's health."""
    attempts = claimed.attempts + 1
    values: dict[str, Any] = {
        "attempts": attempts,
        "last_attempt_at": now,
        "last_status_code": attempt.status_code,
        "last_latency_ms": attempt.latency_ms,
        "last_error": attempt.error,
    }
    if attempt.delivered:
        status = DeliveryStatus.SUCCEEDED
        values |= {"status": status, "delivered_at": now}
    elif now + retry_delay(attempts) - claimed.created_at > RETRY_HORIZON:
        status = DeliveryStatus.FAILED
        values |= {"status": status}
    else:
        status = DeliveryStatus.PENDING
        values |= {"next_attempt_at": now + retry_delay(attempts)}
    session.execute(update(DELIVERIES).where(DELIVERIES.c.id == claimed.delivery_id).values(**values))
    _endpoint_health(session, claimed.endpoint_url, attempt.delivered, now)
    return status


def _endpoint_health(session: Session, url: str, delivered: bool, now: datetime) -> None:
    session.execute(upsert(session, ENDPOINTS).values(url=url).on_conflict_do_nothing(index_elements=["url"]))
    if delivered:
        session.execute(update(ENDPOINTS).where(ENDPOINTS.c.url == url).values(last_success_at=now, failing_since=None))
        return
    session.execute(
        update(ENDPOINTS).where(ENDPOINTS.c.url == url, ENDPOINTS.c.failing_since.is_(None)).values(failing_since=now)
    )
    row = session.execute(
        select(ENDPOINTS.c.failing_since, ENDPOINTS.c.disabled_at).where(ENDPOINTS.c.url == url)
    ).one()
    failing_since = as_utc(row.failing_since)
    if row.disabled_at is None and failing_since is not None and now - failing_since >= RETRY_HORIZON:
        disable_endpoint(session, url, failing_since=failing_since, now=now)


def disable_endpoint(session: Session, url: str, *, failing_since: datetime, now: datetime) -> None:
    """Stop delivering to an endpoint that failed for the whole horizon, and open a review item about it."""
    reason = f"every delivery failed since {failing_since.isoformat()}"
    session.execute(update(ENDPOINTS).where(ENDPOINTS.c.url == url).values(disabled_at=now, disabled_reason=reason))
    given_up = session.execute(
        update(DELIVERIES)
        .where(DELIVERIES.c.endpoint_url == url, DELIVERIES.c.status == DeliveryStatus.PENDING)
        .values(status=DeliveryStatus.FAILED, last_error=f"endpoint disabled: {reason}")
    ).rowcount  # type: ignore[attr-defined]
    finding = Finding(
        kind=MismatchKind.NOTIFICATION_ENDPOINT_DISABLED,
        identity=f"{url}|{failing_since.isoformat()}",
        summary=f"notification endpoint {url} disabled: {reason}",
        unit="count",
        actual=given_up,
        evidence={"url": url, "failing_since": failing_since.isoformat(), "deliveries_given_up": given_up},
        occurred_at=failing_since,
    )
    open_review_item(session, finding, actor="notifications", now=now)
    log.warning("notification_endpoint_disabled", url=url, failing_since=failing_since.isoformat())


# --- one pass ---------------------------------------------------------------------------------------------------


@dataclass
class DeliveryReport:
    dispatched: int = 0
    delivered: int = 0
    retrying: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-able data (the task's result)."""
        return {
            "dispatched": self.dispatched,
            "delivered": self.delivered,
            "retrying": self.retrying,
            "failed": self.failed,
        }


def deliver_pending(
    *,
    now: datetime | None = None,
    config: BillingConfig | None = None,
    client: httpx.Client | None = None,
    timeout: float = 10.0,
    max_rounds: int = 50,
) -> DeliveryReport:
    """One delivery pass: fan out, then claim-send-record until nothing is due (each round its own transactions)."""
    config = config or get_billing_config()
    endpoints = {e.url: e for e in config.notifications.endpoints}
    report = DeliveryReport()
    if not endpoints:
        return report
    own_client = client is None
    http = client or httpx.Client(follow_redirects=False)
    try:
        while True:
            with unit_of_work() as session:
                dispatched = fan_out(session, list(endpoints.values()), now or datetime.now(UTC))
            report.dispatched += dispatched
            if dispatched == 0:
                break
        for _ in range(max_rounds):
            moment = now or datetime.now(UTC)
            with unit_of_work() as session:
                claimed = claim_due(session, list(endpoints), moment)
            if not claimed:
                break
            for item in claimed:
                attempt = send(http, item, endpoint_secrets(endpoints[item.endpoint_url]), timeout=timeout)
                with unit_of_work() as session:
                    status = record(session, item, attempt, now or datetime.now(UTC))
                if status is DeliveryStatus.SUCCEEDED:
                    report.delivered += 1
                elif status is DeliveryStatus.FAILED:
                    report.failed += 1
                else:
                    report.retrying += 1
                    if attempt.error:
                        report.errors.append(attempt.error)
    finally:
        if own_client:
            http.close()
    return report


# --- operators --------------------------------------------------------------------------------------------------


class UnknownDelivery(LookupError):
    """No delivery or event has this id."""


def redeliver(session: Session, ident: str, *, now: datetime) -> list[int]:
    """Send a delivery (by id) or every delivery of an event (by ``evt_...`` id) again now, whatever its status;
    re-enables a disabled endpoint, since a person asked. Return the delivery ids reset."""
    if ident.startswith("evt_"):
        condition = DELIVERIES.c.outbox_id == select(OUTBOX.c.id).where(OUTBOX.c.event_id == ident).scalar_subquery()
    elif ident.isdigit():
        condition = DELIVERIES.c.id == int(ident)
    else:
        raise UnknownDelivery(f"{ident!r} is neither a delivery id nor an event id (evt_...)")
    rows = session.execute(select(DELIVERIES.c.id, DELIVERIES.c.endpoint_url).where(condition)).all()
    if not rows:
        raise UnknownDelivery(f"no delivery {ident}")
    ids = [r.id for r in rows]
    session.execute(
        update(DELIVERIES)
        .where(DELIVERIES.c.id.in_(ids))
        .values(status=DeliveryStatus.PENDING, next_attempt_at=now, delivered_at=None)
    )
    session.execute(
        update(ENDPOINTS)
        .where(and_(ENDPOINTS.c.url.in_({r.endpoint_url for r in rows}), ENDPOINTS.c.disabled_at.is_not(None)))
        .values(disabled_at=None, disabled_reason=None, failing_since=None)
    )
    return ids
