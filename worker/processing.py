"""Turn stored Stripe events into ledger effects, exactly once in effect.

Each event's ledger effect and its status change commit together. A batch of events shares one transaction,
with a savepoint per event, so one bad event never undoes the others and the cost of a commit is shared. Rows
are claimed with ``SELECT ... FOR UPDATE SKIP LOCKED`` (on SQLite the write lock is taken at BEGIN), and only
pending or waiting rows are claimed, so two workers never apply one event twice and a re-run is a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import structlog
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from ledger.config import get_billing_config
from ledger.db import unit_of_work
from ledger.errors import LedgerError
from ledger.inbox import EventStatus, StripeEvent
from worker.gateway import StripeReader, is_transient_stripe_error
from worker.handlers import handler_for, ignore_reason
from worker.handlers.base import EventContext, Outcome, PermanentEventError, PrerequisiteMissing
from worker.payments import clear_waits, events_waiting_for, record_wait

log = structlog.get_logger("worker.processing")

CLAIMABLE = (EventStatus.PENDING, EventStatus.WAITING)
# Transient failures of one event before it is marked failed for a person to look at.
MAX_TRANSIENT_ATTEMPTS = 8
BATCH_SIZE = 100
# PostgreSQL SQLSTATEs worth a retry: serialization failure, deadlock, lock not available.
TRANSIENT_SQLSTATES = {"40001", "40P01", "55P03"}


@dataclass(slots=True)
class BatchReport:
    """What a call of :func:`process_events` did, counted per outcome."""

    processed: int = 0
    ignored: int = 0
    waiting: int = 0
    failed: int = 0
    # Not claimed: already handled, or being handled by another worker right now.
    skipped: int = 0
    # Hit a transient error: left pending with a backoff, for the caller to re-send.
    retry: list[int] = field(default_factory=list)
    retry_in: float = 0.0
    # Waiting events re-run because their prerequisite landed in this call.
    woken: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "processed": self.processed,
            "ignored": self.ignored,
            "waiting": self.waiting,
            "failed": self.failed,
            "skipped": self.skipped,
            "retry": list(self.retry),
            "woken": self.woken,
        }


def backoff(attempts: int, *, base: float = 2.0, cap: float = 3600.0) -> float:
    """Seconds to wait before attempt ``attempts + 1`` (exponential, capped)."""
    return float(min(cap, base ** min(attempts, 16)))


def is_transient(exc: BaseException) -> bool:
    """Errors that a later attempt may not hit: DB serialization/deadlock/unique races, Stripe 429/5xx/network."""
    if is_transient_stripe_error(exc):
        return True
    if isinstance(exc, IntegrityError):
        return True  # a unique-key race with a concurrent worker; the re-run sees the winner's row
    if isinstance(exc, DBAPIError):
        sqlstate = getattr(exc.orig, "sqlstate", None)
        return sqlstate in TRANSIENT_SQLSTATES or (isinstance(exc, OperationalError) and sqlstate is None)
    return False


def decode(row: StripeEvent) -> dict[str, Any]:
    """The stored raw event as JSON."""
    event = orjson.loads(row.payload)
    if not isinstance(event, dict):
        raise PermanentEventError("stored payload is not a JSON object")
    return event


def _claim(session: Session, ids: Sequence[int]) -> list[StripeEvent]:
    stmt = (
        select(StripeEvent)
        .where(StripeEvent.id.in_(ids), StripeEvent.status.in_(CLAIMABLE))
        .order_by(StripeEvent.created, StripeEvent.id)
        .with_for_update(skip_locked=True)
    )
    return list(session.scalars(stmt))


def _finish(row: StripeEvent, status: EventStatus, *, reason: str | None, error: str | None, now: datetime) -> None:
    row.status = status
    row.status_reason = reason
    row.last_error = error
    row.attempts = (row.attempts or 0) + 1
    row.version = (row.version or 0) + 1
    if status in (EventStatus.PROCESSED, EventStatus.IGNORED):
        row.processed_at = now
        row.next_attempt_at = None


def _run_one(
    session: Session, row: StripeEvent, gateway: StripeReader | None, report: BatchReport, linked: set[str]
) -> None:
    now = datetime.now(UTC)
    handler = handler_for(row.type)
    if handler is None:
        _finish(row, EventStatus.IGNORED, reason=ignore_reason(row.type), error=None, now=now)
        clear_waits(session, row.id)
        report.ignored += 1
        return
    savepoint = session.begin_nested()
    try:
        ctx = EventContext(session=session, row=row, event=decode(row), config=get_billing_config(), gateway=gateway)
        outcome: Outcome = handler(ctx)
        session.flush()
        savepoint.commit()
    except PrerequisiteMissing as missing:
        savepoint.rollback()
        row.next_attempt_at = now + timedelta(seconds=backoff(row.attempts or 0, base=4.0))
        _finish(row, EventStatus.WAITING, reason=missing.reason, error=None, now=now)
        record_wait(session, row.id, missing.awaited_ids)
        report.waiting += 1
        return
    except Exception as exc:
        savepoint.rollback()
        error = f"{type(exc).__name__}: {exc}"[:4000]
        if is_transient(exc) and (row.attempts or 0) + 1 < MAX_TRANSIENT_ATTEMPTS:
            delay = backoff(row.attempts or 0)
            row.next_attempt_at = now + timedelta(seconds=delay)
            _finish(row, row.status, reason=row.status_reason, error=error, now=now)
            report.retry.append(row.id)
            report.retry_in = max(report.retry_in, delay)
            log.warning("event_retry", event_id=row.event_id, type=row.type, error=error, retry_in=delay)
            return
        if not isinstance(exc, PermanentEventError | LedgerError | ValueError | KeyError | TypeError):
            log.exception("event_failed_unexpectedly", event_id=row.event_id, type=row.type)
        _finish(row, EventStatus.FAILED, reason=None, error=error, now=now)
        report.failed += 1
        log.warning("event_failed", event_id=row.event_id, type=row.type, error=error)
        return
    status = EventStatus.IGNORED if outcome.ignored else EventStatus.PROCESSED
    _finish(row, status, reason=outcome.note or None, error=None, now=now)
    clear_waits(session, row.id)
    linked |= ctx.linked_ids
    if outcome.ignored:
        report.ignored += 1
    else:
        report.processed += 1


def _process_chunk(ids: Sequence[int], gateway: StripeReader | None, report: BatchReport) -> list[int]:
    """Process one chunk in one transaction; return the waiting events its grants unblocked."""
    linked: set[str] = set()
    with unit_of_work() as session:
        rows = _claim(session, ids)
        report.skipped += len(set(ids)) - len(rows)
        for row in rows:
            _run_one(session, row, gateway, report, linked)
        return events_waiting_for(session, linked) if linked else []


def process_events(
    event_row_ids: Sequence[int], *, gateway: StripeReader | None = None, batch_size: int = BATCH_SIZE
) -> BatchReport:
    """Apply stored events (by ``stripe_events.id``); already handled ones are skipped. Safe to run again."""
    report = BatchReport()
    queue = list(dict.fromkeys(event_row_ids))
    seen_woken: dict[int, int] = {}
    while queue:
        chunk, queue = queue[:batch_size], queue[batch_size:]
        woken = _process_chunk(chunk, gateway, report)
        # A grant landed: re-run what waited for it now (bounded, so a cycle cannot spin).
        for event_row_id in woken:
            if seen_woken.get(event_row_id, 0) < 3:
                seen_woken[event_row_id] = seen_woken.get(event_row_id, 0) + 1
                report.woken += 1
                queue.append(event_row_id)
    return report


def process_event(event_row_id: int, *, gateway: StripeReader | None = None) -> BatchReport:
    """Apply one stored event."""
    return process_events([event_row_id], gateway=gateway)
