"""The inbox: every raw Stripe event we were sent or fetched, stored verbatim and once.

Store first, process second. The unique event id makes a redelivery a no-op at the database, and the event's
status is changed in the same transaction as its ledger effect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    func,
    select,
    text,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from ledger.db import Base, BigId
from ledger.models import _enum
from ledger.posting import upsert


class EventStatus(StrEnum):
    PENDING = "pending"
    PROCESSED = "processed"
    FAILED = "failed"
    IGNORED = "ignored"
    # A prerequisite (the payment a refund refers to, say) has not been processed yet.
    WAITING = "waiting"


class EventSource(StrEnum):
    WEBHOOK = "webhook"
    BACKFILL = "backfill"


class StripeEvent(Base):
    """One Stripe event, as received: the raw body and what we did with it."""

    __tablename__ = "stripe_events"
    __table_args__ = (
        Index("ix_stripe_events_status_received_at", "status", "received_at"),
        Index("ix_stripe_events_object_id", "object_id"),
        Index("ix_stripe_events_customer_id", "customer_id"),
        Index("ix_stripe_events_created", "created"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(255), unique=True)
    type: Mapped[str] = mapped_column(String(128))
    api_version: Mapped[str | None] = mapped_column(String(64))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    livemode: Mapped[bool] = mapped_column(Boolean, default=False)
    connected_account: Mapped[str | None] = mapped_column(String(255))
    # "event" (snapshot) or "v2.core.event" (thin).
    object_kind: Mapped[str] = mapped_column(String(32), default="event")
    object_id: Mapped[str | None] = mapped_column(String(255))
    customer_id: Mapped[str | None] = mapped_column(String(255))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    source: Mapped[EventSource] = mapped_column(_enum(EventSource, "event_source"), default=EventSource.WEBHOOK)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    status: Mapped[EventStatus] = mapped_column(
        _enum(EventStatus, "event_status"), default=EventStatus.PENDING, server_default=EventStatus.PENDING.value
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    # Why an event was ignored or what it waits for.
    status_reason: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Bumped by every attempt, so concurrent processors of one event can be told apart.
    version: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


_EVENTS: Table = StripeEvent.__table__  # type: ignore[assignment]


class NotAStripeEvent(ValueError):
    """The JSON body does not have the shape of a Stripe event."""


@dataclass(frozen=True, slots=True)
class EventEnvelope:
    """What we index of an event, read from its JSON without trusting anything else in it."""

    event_id: str
    type: str
    api_version: str | None
    created: datetime
    livemode: bool
    connected_account: str | None
    object_kind: str
    object_id: str | None
    customer_id: str | None


# When a Stripe event can have been created: Stripe did not exist before 2010, and a time past 2100 is no event's.
# Anything outside is refused at the door, so no later step (ordering, windows, a page's date arithmetic) meets a
# time at the edge of what Python or the database holds.
EARLIEST_CREATED = datetime(2010, 1, 1, tzinfo=UTC)
LATEST_CREATED = datetime(2100, 1, 1, tzinfo=UTC)


def _created(value: object) -> datetime:
    if isinstance(value, bool):
        raise NotAStripeEvent("created must be a timestamp")
    if isinstance(value, int):
        try:
            created = datetime.fromtimestamp(value, tz=UTC)
        except (OverflowError, OSError, ValueError) as exc:
            raise NotAStripeEvent("created is out of range") from exc
    elif isinstance(value, str):  # thin (v2) events carry an ISO 8601 string
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            created = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)
        except (ValueError, OverflowError) as exc:
            raise NotAStripeEvent("created is not an ISO 8601 time") from exc
    else:
        raise NotAStripeEvent("created is missing")
    if not EARLIEST_CREATED <= created < LATEST_CREATED:
        raise NotAStripeEvent("created is out of range")
    return created


def has_nul(raw: bytes) -> bool:
    """True when a JSON document's text holds a NUL character (an unescaped ``\\u0000``): no column can store it."""
    start = raw.find(b"\\u0000")
    while start != -1:
        # An escape only when preceded by an even number of backslashes (``\\\\u0000`` is a backslash, then text).
        backslashes = 0
        while start - backslashes - 1 >= 0 and raw[start - backslashes - 1] == 0x5C:
            backslashes += 1
        if backslashes % 2 == 0:
            return True
        start = raw.find(b"\\u0000", start + 1)
    return False


def parse_envelope(event: object) -> EventEnvelope:
    """Read the envelope of a decoded Stripe event (snapshot or thin); raise NotAStripeEvent if it is none."""
    if not isinstance(event, Mapping):
        raise NotAStripeEvent("body is not a JSON object")
    kind = event.get("object")
    event_id = event.get("id")
    event_type = event.get("type")
    if kind not in ("event", "v2.core.event"):
        raise NotAStripeEvent("object is not 'event' or 'v2.core.event'")
    if not isinstance(event_id, str) or not event_id.startswith("evt_") or len(event_id) > 255:
        raise NotAStripeEvent("id is not a Stripe event id")
    if not isinstance(event_type, str) or not event_type or len(event_type) > 128:
        raise NotAStripeEvent("type is missing")
    object_id: str | None = None
    customer_id: str | None = None
    if kind == "event":
        data = event.get("data")
        obj = data.get("object") if isinstance(data, Mapping) else None
        if not isinstance(obj, Mapping):
            raise NotAStripeEvent("data.object is missing")
        object_id = _str_or_none(obj.get("id"))
        customer = obj.get("customer")
        customer_id = _str_or_none(customer.get("id") if isinstance(customer, Mapping) else customer)
        if obj.get("object") == "customer":
            customer_id = object_id
    else:
        related = event.get("related_object")
        if isinstance(related, Mapping):
            object_id = _str_or_none(related.get("id"))
    api_version = event.get("api_version")
    account = event.get("account") or event.get("context")
    return EventEnvelope(
        event_id=event_id,
        type=event_type,
        api_version=api_version if isinstance(api_version, str) else None,
        created=_created(event.get("created")),
        livemode=bool(event.get("livemode", False)),
        connected_account=account if isinstance(account, str) else None,
        object_kind=str(kind),
        object_id=object_id,
        customer_id=customer_id,
    )


def _str_or_none(value: object) -> str | None:
    return value[:255] if isinstance(value, str) else None


def _row(raw: bytes, envelope: EventEnvelope, source: EventSource) -> dict[str, Any]:
    return {
        "event_id": envelope.event_id,
        "type": envelope.type,
        "api_version": envelope.api_version,
        "created": envelope.created,
        "livemode": envelope.livemode,
        "connected_account": envelope.connected_account,
        "object_kind": envelope.object_kind,
        "object_id": envelope.object_id,
        "customer_id": envelope.customer_id,
        "payload": raw,
        "source": source,
        "status": EventStatus.PENDING,
        "received_at": datetime.now(UTC),
    }


def store_event(
    session: Session, raw: bytes, envelope: EventEnvelope, *, source: EventSource = EventSource.WEBHOOK
) -> int | None:
    """Store a raw event once; return its row id, or None when it was stored before (a redelivery)."""
    stmt = (
        upsert(session, _EVENTS)
        .values(_row(raw, envelope, source))
        .on_conflict_do_nothing(index_elements=["event_id"])
        .returning(StripeEvent.id)
    )
    return session.execute(stmt).scalar_one_or_none()


def store_events(
    session: Session, items: Sequence[tuple[bytes, EventEnvelope]], *, source: EventSource = EventSource.WEBHOOK
) -> dict[str, int]:
    """Store many raw events in one statement; return ``{event_id: row id}`` for those that were new."""
    if not items:
        return {}
    if session.get_bind().dialect.name == "postgresql":
        return _store_events_unnest(session, [_row(raw, env, source) for raw, env in items])
    stmt = (
        upsert(session, _EVENTS)
        .on_conflict_do_nothing(index_elements=["event_id"])
        .returning(StripeEvent.event_id, StripeEvent.id)
    )
    # executemany: SQLAlchemy packs the rows into multi-row VALUES from one cached compiled statement
    # ("insertmanyvalues"); .values([...]) recompiles on every call, about five times the CPU per event.
    rows = session.execute(stmt, [_row(raw, env, source) for raw, env in items]).all()
    return {event_id: row_id for event_id, row_id in rows}


_UNNEST_COLUMNS = (
    "event_id",
    "type",
    "api_version",
    "created",
    "livemode",
    "connected_account",
    "object_kind",
    "object_id",
    "customer_id",
    "payload",
    "source",
    "status",
    "received_at",
)
# One array per column: the statement text and its 13 parameters are the same for any number of rows, so
# psycopg parses it once and PostgreSQL runs it prepared. A multi-row VALUES has 13 parameters per row, a new
# text for every batch size and, past 50 parameters, is re-split by psycopg on every call (the webhook
# receiver's group commit spent more CPU there than in the rest of the request).
_UNNEST_INSERT = text(
    "INSERT INTO stripe_events (event_id, type, api_version, created, livemode, connected_account, object_kind,"
    " object_id, customer_id, payload, source, status, received_at)"
    " SELECT * FROM unnest(CAST(:event_id AS varchar[]), CAST(:type AS varchar[]), CAST(:api_version AS varchar[]),"
    " CAST(:created AS timestamptz[]), CAST(:livemode AS boolean[]), CAST(:connected_account AS varchar[]),"
    " CAST(:object_kind AS varchar[]), CAST(:object_id AS varchar[]), CAST(:customer_id AS varchar[]),"
    " CAST(:payload AS bytea[]), CAST(:source AS varchar[]), CAST(:status AS varchar[]),"
    " CAST(:received_at AS timestamptz[]))"
    " ON CONFLICT (event_id) DO NOTHING RETURNING event_id, id"
)


def _store_events_unnest(session: Session, rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    params = {name: [row[name] for row in rows] for name in _UNNEST_COLUMNS}
    params["source"] = [EventSource(value).value for value in params["source"]]
    params["status"] = [EventStatus(value).value for value in params["status"]]
    return {event_id: row_id for event_id, row_id in session.execute(_UNNEST_INSERT, params).all()}


def get_event(session: Session, ident: str) -> StripeEvent | None:
    """The stored event with this Stripe id (evt_...) or this row id, if any."""
    if ident.isdigit():
        return session.get(StripeEvent, int(ident))
    return session.scalars(select(StripeEvent).where(StripeEvent.event_id == ident)).one_or_none()
