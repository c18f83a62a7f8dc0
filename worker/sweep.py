"""The safety net: stored events nobody handled (a lost message, a crashed worker) are sent again."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from ledger.db import unit_of_work
from ledger.inbox import EventStatus, StripeEvent


def stale_event_ids(
    session: Session, *, older_than: timedelta, now: datetime | None = None, limit: int = 10_000
) -> list[int]:
    """Pending events received longer ago than ``older_than``, and waiting events whose retry time came."""
    now = now or datetime.now(UTC)
    stmt = (
        select(StripeEvent.id)
        .where(
            or_(
                and_(
                    StripeEvent.status == EventStatus.PENDING,
                    StripeEvent.received_at <= now - older_than,
                    or_(StripeEvent.next_attempt_at.is_(None), StripeEvent.next_attempt_at <= now),
                ),
                and_(StripeEvent.status == EventStatus.WAITING, StripeEvent.next_attempt_at <= now),
            )
        )
        .order_by(StripeEvent.created, StripeEvent.id)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def sweep(
    hand_over: Callable[[Sequence[int]], None],
    *,
    older_than: timedelta,
    now: datetime | None = None,
    batch: int = 200,
) -> int:
    """Hand stale events to the worker again, in batches; return how many were sent.

    The ids are read in their own short transaction and handed over after it ends, so an in-process (eager)
    worker never waits on the sweep's own lock.
    """
    with unit_of_work() as session:
        ids = stale_event_ids(session, older_than=older_than, now=now)
    for start in range(0, len(ids), batch):
        hand_over(ids[start : start + batch])
    return len(ids)
