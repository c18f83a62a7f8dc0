"""Backfill: page Stripe's Events API and store what the inbox misses, through the same idempotent path."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from ledger.db import unit_of_work
from ledger.inbox import EventSource, NotAStripeEvent, parse_envelope, store_events
from reconciliation.gateway import EVENTS_RETENTION_DAYS


@dataclass(frozen=True, slots=True)
class BackfillReport:
    since: datetime
    clamped: bool
    seen: int
    stored: int
    malformed: int


def _chunks(items: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def earliest_backfill(now: datetime) -> datetime:
    """How far back Stripe still serves events."""
    return now - timedelta(days=EVENTS_RETENTION_DAYS)


def backfill(
    gateway: Any,
    *,
    since: datetime,
    hand_over: Callable[[Sequence[int]], None],
    now: datetime | None = None,
    page: int = 100,
) -> BackfillReport:
    """Store events created since ``since`` (at most 30 days back) that are not stored yet; hand them over."""
    now = now or datetime.now(UTC)
    since = since if since.tzinfo else since.replace(tzinfo=UTC)
    floor = earliest_backfill(now)
    clamped = since < floor
    since = max(since, floor)
    seen = stored = malformed = 0
    for chunk in _chunks(gateway.list_events(created_gte=since), page):
        items: list[tuple[bytes, Any]] = []
        for event in chunk:
            seen += 1
            try:
                # The SDK turns Stripe's decimal strings into Decimal; str() gives the wire form back.
                items.append((orjson.dumps(event, default=str), parse_envelope(event)))
            except NotAStripeEvent:
                malformed += 1
        with unit_of_work() as session:
            new = store_events(session, items, source=EventSource.BACKFILL)
        stored += len(new)
        if new:
            # Only after the commit: the worker must find the rows it is told about.
            hand_over(sorted(new.values()))
    return BackfillReport(since=since, clamped=clamped, seen=seen, stored=stored, malformed=malformed)
