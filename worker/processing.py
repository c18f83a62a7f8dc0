"""Turn stored Stripe events into ledger effects, exactly once in effect.

Each event's ledger effect and its status change commit together, in one transaction. Rows are claimed with
``SELECT ... FOR UPDATE SKIP LOCKED`` (on SQLite the write lock is taken at BEGIN), and only pending or waiting
rows are claimed, so two workers never apply one event twice and a re-run is a no-op.

A task carries a batch of ids, applied in one transaction when it can: one claim, the customers' accounts
locked up front in a fixed order (skipping those another worker holds, whose events go in a later pass), one
status write. An event that raises is set aside and the batch runs again without it; set-aside events get a
transaction each, where a failure or a missing prerequisite is recorded on the event alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import structlog
from sqlalchemy import ARRAY, BigInteger, Connection, Table, any_, bindparam, or_, select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from ledger import accounts as ledger_accounts
from ledger.config import get_billing_config
from ledger.db import get_engine
from ledger.errors import LedgerError
from ledger.inbox import EventStatus, StripeEvent
from ledger.models import Account
from ledger.posting import BACKENDS
from ledger.settings import get_settings
from reconciliation.gateway import StripeReader, is_transient_stripe_error
from worker.handlers import handler_for, ignore_reason
from worker.handlers.base import (
    ClaimedEvent,
    EventContext,
    Outcome,
    PermanentEventError,
    PrerequisiteMissing,
    stripe_id,
)
from worker.payments import clear_waits, customers_of_payments, events_waiting_for, record_waits

log = structlog.get_logger("worker.processing")

CLAIMABLE = (EventStatus.PENDING, EventStatus.WAITING)
# Transient failures of one event before it is marked failed for a person to look at.
MAX_TRANSIENT_ATTEMPTS = 8
BATCH_SIZE = 100
# Fields of a customer-less object (refund, dispute) that name the payment it belongs to.
PAYMENT_FIELDS = ("payment_intent", "charge", "invoice")
# Events applied in one transaction: enough to share its fixed costs (claim, account locks, status write: 50
# spends a fifth less CPU per event than 20), few enough that a worker waiting for a customer another one holds
# waits only tens of milliseconds.
TRANSACTION_EVENTS = 50
# Tries of a group in one transaction (each without the event that raised) before it goes one event at a time.
BATCH_PASSES = 3
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


def decode(row: ClaimedEvent) -> dict[str, Any]:
    """The stored raw event as JSON."""
    event = orjson.loads(row.payload)
    if not isinstance(event, dict):
        raise PermanentEventError("stored payload is not a JSON object")
    return event


def _among(column: Any, dialect_name: str) -> Any:
    """``column`` is one of the ``ids`` parameter's values: ``= ANY(array)`` on PostgreSQL, built once and cached
    whatever the number of ids (an expanding IN is re-rendered on every call); ``IN`` elsewhere."""
    if dialect_name == "postgresql":
        return column == any_(bindparam("ids", type_=ARRAY(BigInteger)))
    return column.in_(bindparam("ids", expanding=True))


def _claim_statement(dialect_name: str) -> Any:
    columns = ("id", "event_id", "type", "created", "customer_id", "status", "attempts", "version", "payload")
    return (
        select(*(_EVENTS.c[name] for name in columns))
        # One comparison per claimable status, not IN (...): an IN over a list is re-rendered on every call.
        .where(_among(_EVENTS.c.id, dialect_name), or_(*(_EVENTS.c.status == status for status in CLAIMABLE)))
        .order_by(_EVENTS.c.created, _EVENTS.c.id)
        .with_for_update(skip_locked=True)
    )


def _claim(session: Session, ids: Sequence[int]) -> list[ClaimedEvent]:
    conn = session.connection()
    return [
        ClaimedEvent(
            id=r.id,
            event_id=r.event_id,
            type=r.type,
            created=r.created if r.created.tzinfo else r.created.replace(tzinfo=UTC),
            customer_id=r.customer_id,
            status=r.status,
            attempts=r.attempts or 0,
            version=r.version or 0,
            payload=r.payload,
        )
        for r in conn.execute(_CLAIM[conn.dialect.name], {"ids": list(ids)})
    ]


def _status_values(
    row: ClaimedEvent,
    status: EventStatus,
    now: datetime,
    *,
    reason: str | None = None,
    error: str | None = None,
    next_attempt_at: datetime | None = None,
) -> dict[str, Any]:
    done = status in (EventStatus.PROCESSED, EventStatus.IGNORED)
    return {
        "status": status,
        "status_reason": reason,
        "last_error": error,
        "attempts": row.attempts + 1,
        "version": row.version + 1,
        "next_attempt_at": next_attempt_at,
        "processed_at": now if done else None,
    }


_EVENTS: Table = StripeEvent.__table__  # type: ignore[assignment]
_ACCOUNTS: Table = Account.__table__  # type: ignore[assignment]
_CLAIM = {name: _claim_statement(name) for name in BACKENDS}
# One statement for a batch's statuses, sent as an executemany.
_STATUS_UPDATE = (
    _EVENTS.update()
    .where(_EVENTS.c.id == bindparam("row_id"))
    .values({c: bindparam(c) for c in ("status", "status_reason", "last_error", "attempts", "version")})
    .values(next_attempt_at=bindparam("next_attempt_at"), processed_at=bindparam("processed_at"))
)


def _write_status(session: Session, row: ClaimedEvent, values: dict[str, Any]) -> None:
    # A Core UPDATE: no ORM state to synchronise for a row this transaction only reads once.
    session.execute(_EVENTS.update().where(_EVENTS.c.id == row.id).values(**values))
    if row.status == EventStatus.WAITING and values["status"] != EventStatus.WAITING:
        clear_waits(session, [row.id])


@contextmanager
def _async_commits(conn: Connection) -> Iterator[None]:
    """Commit without waiting for the WAL flush on this connection, while the batch runs.

    Safe for exactly-once effect: a crash loses only the newest commits, each whole (effect and status
    together, in WAL order), and the sweep runs those events again. It spares each event a disk flush.
    """
    if conn.dialect.name != "postgresql" or get_settings().worker_synchronous_commit:
        yield
        return
    conn.exec_driver_sql("SET synchronous_commit TO OFF")
    conn.commit()
    try:
        yield
    finally:
        if not conn.invalidated:
            conn.rollback()
            conn.exec_driver_sql("RESET synchronous_commit")
            conn.commit()


@contextmanager
def _transaction(conn: Connection) -> Iterator[Session]:
    """One unit of work on the batch's connection: commit when the block ends, roll back if it raises."""
    with Session(bind=conn, expire_on_commit=False) as session, session.begin():
        yield session


def _ignore_all(conn: Connection, ids: Sequence[int], report: BatchReport) -> None:
    """Types without a handler change nothing: mark them ignored together, in one transaction."""
    now = datetime.now(UTC)
    with _transaction(conn) as session:
        rows = _claim(session, ids)
        report.skipped += len(ids) - len(rows)
        for row in rows:
            _write_status(session, row, _status_values(row, EventStatus.IGNORED, now, reason=ignore_reason(row.type)))
        report.ignored += len(rows)


def _apply_one(conn: Connection, event_row_id: int, gateway: StripeReader | None, report: BatchReport) -> set[str]:
    """Apply one event and mark it, in one transaction; return the Stripe ids that got a grant."""
    with _transaction(conn) as session:
        rows = _claim(session, [event_row_id])
        if not rows:  # done already, or another worker has it right now
            report.skipped += 1
            return set()
        row = rows[0]
        handler = handler_for(row.type)
        assert handler is not None
        event = decode(row)
        # The account first, as in a batch: a handler's other rows (object versions, refund states) are only
        # ever locked under it, so this transaction and a batch cannot wait on each other in a cycle.
        customer = _customers(session, [row], {row.id: event}).get(row.id)
        if customer is not None:
            with suppress(_AccountsMissing):  # a new customer: the handler opens the account
                _lock_accounts(session, [customer], wait=True)
        ctx = EventContext(session=session, row=row, event=event, config=get_billing_config(), gateway=gateway)
        outcome: Outcome = handler(ctx)
        status = EventStatus.IGNORED if outcome.ignored else EventStatus.PROCESSED
        _write_status(session, row, _status_values(row, status, datetime.now(UTC), reason=outcome.note or None))
    if outcome.ignored:
        report.ignored += 1
    else:
        report.processed += 1
    return ctx.linked_ids


def _record_failure(conn: Connection, event_row_id: int, exc: Exception, report: BatchReport) -> None:
    """The event's effect was rolled back; say why on the event, in a transaction of its own."""
    now = datetime.now(UTC)
    with _transaction(conn) as session:
        rows = _claim(session, [event_row_id])
        if not rows:
            report.skipped += 1
            return
        row = rows[0]
        if isinstance(exc, PrerequisiteMissing):
            retry_at = now + timedelta(seconds=backoff(row.attempts, base=4.0))
            _write_status(
                session, row, _status_values(row, EventStatus.WAITING, now, reason=exc.reason, next_attempt_at=retry_at)
            )
            record_waits(session, {row.id: exc.awaited_ids})
            report.waiting += 1
            return
        error = f"{type(exc).__name__}: {exc}"[:4000]
        if is_transient(exc) and row.attempts + 1 < MAX_TRANSIENT_ATTEMPTS:
            delay = backoff(row.attempts)
            values = _status_values(row, row.status, now, error=error, next_attempt_at=now + timedelta(seconds=delay))
            values["status_reason"] = None
            _write_status(session, row, values)
            report.retry.append(row.id)
            report.retry_in = max(report.retry_in, delay)
            log.warning("event_retry", event_id=row.event_id, type=row.type, error=error, retry_in=delay)
            return
        if not isinstance(exc, PermanentEventError | LedgerError | ValueError | KeyError | TypeError):
            log.error("event_failed_unexpectedly", event_id=row.event_id, type=row.type, exc_info=exc)
        _write_status(session, row, _status_values(row, EventStatus.FAILED, now, error=error))
        report.failed += 1
        log.warning("event_failed", event_id=row.event_id, type=row.type, error=error)


class _EventFailed(Exception):
    """An event of a batch raised: the batch is rolled back, and that event is set aside."""

    def __init__(self, event_row_id: int) -> None:
        super().__init__(event_row_id)
        self.event_row_id = event_row_id


class _AccountsMissing(Exception):
    """A batch names customers without an account: open them first (see :func:`_open_accounts`), then retry."""

    def __init__(self, customer_ids: list[str]) -> None:
        super().__init__(customer_ids)
        self.customer_ids = customer_ids


def _lock_accounts(session: Session, customer_ids: Sequence[str], *, wait: bool) -> set[str]:
    """Lock the accounts of these customers; return the customers locked (raise when some have no account).

    Locks are taken in customer id order, so two batches cannot deadlock over accounts. Without ``wait``, an
    account another transaction holds is skipped (SKIP LOCKED): its customer's events are left for the next
    pass, so workers do not wait on each other's batch. The account row is what the ledger serializes a
    customer on, and every handler takes it before other rows of that customer.
    """
    if not customer_ids:
        return set()
    ordered = sorted(set(customer_ids))
    lock = (
        select(_ACCOUNTS.c.customer_id)
        .where(_ACCOUNTS.c.customer_id.in_(ordered))
        .order_by(_ACCOUNTS.c.customer_id)
        .with_for_update(key_share=True, skip_locked=not wait)
    )
    locked = set(session.scalars(lock))
    rest = [c for c in ordered if c not in locked]
    if rest:
        existing = set(session.scalars(select(_ACCOUNTS.c.customer_id).where(_ACCOUNTS.c.customer_id.in_(rest))))
        missing = [c for c in rest if c not in existing]
        if missing:
            raise _AccountsMissing(missing)
    return locked


def _open_accounts(conn: Connection, customer_ids: Sequence[str]) -> None:
    """Open the accounts of new customers in a short transaction of their own, in customer id order.

    Opened inside a batch, a new account's uncommitted row would make another worker opening the same one
    wait for that whole batch (and could deadlock with it); an empty account is harmless, and the event
    that needed it opens it anyway.
    """
    with _transaction(conn) as session:
        ledger_accounts.open_accounts(session, customer_ids)


def _customers(session: Session, rows: Sequence[ClaimedEvent], events: dict[int, Any]) -> dict[int, str]:
    """The customer each event's effect lands on, where known: its own, or the one whose payment it names.

    Refunds and disputes carry no customer; the payment links of the charge or payment intent they name do.
    """
    found = {r.id: r.customer_id for r in rows if r.customer_id}
    named: dict[int, list[str]] = {}
    for row in rows:
        if row.id not in found:
            data = events[row.id].get("data")
            obj = data.get("object") if isinstance(data, dict) else None
            if isinstance(obj, dict):
                named[row.id] = [i for i in (stripe_id(obj.get(k)) for k in PAYMENT_FIELDS) if i]
    if named:
        owners = customers_of_payments(session, [i for ids in named.values() for i in ids])
        for row_id, ids in named.items():
            owner = next((owners[i] for i in ids if i in owners), None)
            if owner:
                found[row_id] = owner
    return found


def _apply_batch(
    conn: Connection, ids: Sequence[int], gateway: StripeReader | None, report: BatchReport, *, wait: bool
) -> tuple[list[int], list[int], set[str]]:
    """Apply a chunk in one transaction: one claim, the accounts locked up front, one status write.

    Returns the claimed events left for a later pass (their customer is busy in another worker), those set
    aside to run one by one (they raised inside their savepoint), and the Stripe ids that got a grant. Any
    other error rolls the whole batch back (:class:`_EventFailed` names the event that raised), so the report
    is only counted once the batch committed.
    """
    done = BatchReport()
    deferred: list[int] = []
    set_aside: list[int] = []
    linked: set[str] = set()
    with _transaction(conn) as session:
        rows = _claim(session, ids)
        done.skipped = len(set(ids)) - len(rows)
        handled = [r for r in rows if handler_for(r.type) is not None]
        events = {r.id: decode(r) for r in handled}
        customers = _customers(session, handled, events)
        locked = _lock_accounts(session, list(customers.values()), wait=wait)
        config = get_billing_config()
        statuses: list[dict[str, Any]] = []
        cleared: list[int] = []
        for row in rows:
            handler = handler_for(row.type)
            now = datetime.now(UTC)
            if handler is None:
                values = _status_values(row, EventStatus.IGNORED, now, reason=ignore_reason(row.type))
                done.ignored += 1
            elif row.id in customers and customers[row.id] not in locked:
                # Another worker holds this customer: keep the order of its events by leaving them all for the
                # next pass, which waits for the account.
                deferred.append(row.id)
                continue
            else:
                ctx = EventContext(session=session, row=row, event=events[row.id], config=config, gateway=gateway)
                try:
                    if row.id in customers:
                        outcome: Outcome = handler(ctx)
                    else:
                        # No known customer (a refund or dispute of a payment not granted yet, mostly): it may
                        # have to wait, so a savepoint keeps its failure from undoing the batch.
                        with session.begin_nested():
                            outcome = handler(ctx)
                except Exception as exc:
                    if row.id in customers or conn.invalidated:
                        raise _EventFailed(row.id) from exc
                    set_aside.append(row.id)
                    continue
                linked |= ctx.linked_ids
                status = EventStatus.IGNORED if outcome.ignored else EventStatus.PROCESSED
                values = _status_values(row, status, now, reason=outcome.note or None)
                if outcome.ignored:
                    done.ignored += 1
                else:
                    done.processed += 1
            statuses.append({"row_id": row.id, **values})
            if row.status == EventStatus.WAITING:
                cleared.append(row.id)
        if statuses:
            session.execute(_STATUS_UPDATE, statuses)
        clear_waits(session, cleared)
    report.processed += done.processed
    report.ignored += done.ignored
    report.skipped += done.skipped
    return deferred, set_aside, linked


def _claimable_in_order(session: Session, ids: Sequence[int]) -> Sequence[Any]:
    """The claimable events among ``ids`` (id, type, customer), in Stripe creation order, without claiming them."""
    return session.execute(
        select(StripeEvent.id, StripeEvent.type, StripeEvent.customer_id)
        .where(StripeEvent.id.in_(ids), StripeEvent.status.in_(CLAIMABLE))
        .order_by(StripeEvent.created, StripeEvent.id)
    ).all()


def _process_chunk(ids: Sequence[int], gateway: StripeReader | None, report: BatchReport) -> list[int]:
    """Process a chunk in Stripe creation order; return the waiting events its grants unblocked.

    The chunk goes in groups of :data:`TRANSACTION_EVENTS`, each in one transaction (see :func:`_apply_batch`),
    short enough that a worker waiting for a customer another one holds does not wait long. Events of a busy
    customer move on to the next group (all of that customer's events together, so their order holds); the
    last group waits for their accounts. An event that raises is set aside and its group runs again without
    it. Set-aside events, and a group that still fails, get a transaction per event, where a failure is
    recorded on its event alone.
    """
    with get_engine().connect() as conn, _async_commits(conn):
        order = list(dict.fromkeys(ids))
        if len(order) > TRANSACTION_EVENTS:
            # Groups follow Stripe creation order (one group is ordered by its claim, and counts its skips).
            with _transaction(conn) as session:
                rows = _claimable_in_order(session, ids)
                # New customers' accounts, opened up front for the whole chunk (see _open_accounts), rather
                # than by each group that meets one and then runs again.
                ledger_accounts.open_accounts(
                    session, [r.customer_id for r in rows if r.customer_id and handler_for(r.type) is not None]
                )
            order = [r.id for r in rows]
            report.skipped += len(set(ids)) - len(order)
        linked: set[str] = set()
        one_by_one: list[int] = []
        carried: list[int] = []
        while order or carried:
            group, order = carried + order[:TRANSACTION_EVENTS], order[TRANSACTION_EVENTS:]
            wait = not order  # the last group waits for busy customers instead of carrying them on
            carried = []
            for _ in range(BATCH_PASSES):
                try:
                    try:
                        carried, failed_alone, got = _apply_batch(conn, group, gateway, report, wait=wait)
                    except _AccountsMissing as missing:  # nothing was applied yet: open them, then go again
                        _open_accounts(conn, missing.customer_ids)
                        carried, failed_alone, got = _apply_batch(conn, group, gateway, report, wait=wait)
                except _EventFailed as failed:
                    if conn.invalidated:
                        raise  # the connection is gone: the task retries the batch
                    one_by_one.append(failed.event_row_id)
                    group = [i for i in group if i != failed.event_row_id]
                    continue
                except Exception as exc:
                    if conn.invalidated:
                        raise
                    log.debug("batch_rolled_back", events=len(group), error=f"{type(exc).__name__}: {exc}")
                    one_by_one += group
                    break
                linked |= got
                one_by_one += failed_alone
                break
            else:
                one_by_one += group
            if wait:
                one_by_one += carried
                carried = []
        if one_by_one:
            linked |= _one_by_one(conn, one_by_one, gateway, report)
        if not linked:
            return []
        with _transaction(conn) as session:
            return events_waiting_for(session, linked)


def _one_by_one(conn: Connection, ids: Sequence[int], gateway: StripeReader | None, report: BatchReport) -> set[str]:
    """Apply events each in its own transaction, recording each failure on its event."""
    with _transaction(conn) as session:
        order = _claimable_in_order(session, ids)
    report.skipped += len(set(ids)) - len(order)
    without_handler = [row.id for row in order if handler_for(row.type) is None]
    if without_handler:
        _ignore_all(conn, without_handler, report)
    linked: set[str] = set()
    for row in order:
        if handler_for(row.type) is None:
            continue
        try:
            linked |= _apply_one(conn, row.id, gateway, report)
        except Exception as exc:
            if conn.invalidated:
                raise  # the connection is gone: the task retries the batch
            _record_failure(conn, row.id, exc, report)
    return linked


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
