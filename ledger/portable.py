"""The portable consumption: SQLAlchemy Core statements that run on every backend (SQLite, and PostgreSQL when
the ledger functions are switched off). The PostgreSQL functions (:mod:`ledger.pgfast`) apply the same rules in
one round trip; the property tests run both on the same histories.

Also the draw-down that holds share: :func:`debit`, :func:`find_original`, :func:`insert_usage`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Table, insert, select
from sqlalchemy.orm import Session

from ledger.access import policy_key, refusal_reason
from ledger.consumption import ConsumeResult, Consumption, usage_row
from ledger.errors import AccessRefused, IdempotencyConflict, InsufficientCredits
from ledger.models import EntryKind, UsageRecord
from ledger.outbox import note_balance
from ledger.posting import (
    ENTRIES,
    LockedAccount,
    check_access,
    drawable_grants,
    entry_movements,
    expire_lapsed,
    insert_entry,
    lock_account,
    move_grant_units,
    plan_draw,
    save_account,
)
from ledger.pricing import UsageInput

USAGE: Table = UsageRecord.__table__  # type: ignore[assignment]


def insert_usage(
    session: Session, account_id: int, request_id: str, usage: UsageInput, units: int, now: datetime
) -> int:
    """Record one usage event; return its id."""
    usage_id: int = session.execute(
        insert(USAGE).values(usage_row(account_id, request_id, usage, units, now)).returning(USAGE.c.id)
    ).scalar_one()
    return usage_id


def find_original(session: Session, key: str) -> Any:
    """The entry written under an idempotency key, if any."""
    return session.execute(
        select(
            ENTRIES.c.id,
            ENTRIES.c.units,
            ENTRIES.c.debt_delta,
            ENTRIES.c.grant_id,
            ENTRIES.c.balance_after,
            ENTRIES.c.usage_id,
            ENTRIES.c.request_hash,
        ).where(ENTRIES.c.idempotency_key == key)
    ).one_or_none()


def replayed_result(session: Session, request: Consumption, original: Any) -> ConsumeResult:
    """The original result of a consumption, for a retry of it."""
    if original.request_hash != request.digest:
        raise IdempotencyConflict(f"request id {request.request_id!r} was used with other parameters")
    funded = entry_movements(session, original.id, original.grant_id, original.units, original.debt_delta)
    return ConsumeResult(
        request_id=request.request_id,
        customer_id=request.customer_id,
        units=-original.units,
        balance_after=original.balance_after,
        entry_id=original.id,
        usage_id=original.usage_id,
        replayed=True,
        funded_by=tuple((g, -u) for g, u in funded),
    )


def debit(
    session: Session,
    account: LockedAccount,
    units: int,
    now: datetime,
    *,
    partial: bool = False,
    sources: frozenset[str] | None = None,
) -> tuple[int, list[tuple[int, int]], int]:
    """Draw ``units`` from the account's grants (expiring lapsed ones first); return (drawn, funded, new debt).

    Refuses with InsufficientCredits (nothing written) when the balance plus overdraft cannot cover ``units``;
    with ``partial`` it draws what it can instead. What no grant covers within the overdraft becomes debt.
    """
    if units == 0:
        return 0, [], 0
    eligible, lapsed = drawable_grants(session, account.id, now)
    available = max(0, account.balance - sum(g.remaining for g in lapsed) + account.overdraft_limit)
    if sources is not None:
        # The access policy limits the draw to some grant sources: what they hold, no overdraft, no new debt.
        everything = available
        eligible = [g for g in eligible if g.source in sources]
        available = max(0, min(sum(g.remaining for g in eligible), account.balance - sum(g.remaining for g in lapsed)))
        if available < units and not partial and everything >= units:
            key = policy_key(account.access_state, account.grace_until, now)
            raise AccessRefused(account.customer_id, account.access_state.value, refusal_reason(key, sources))
    if available < units:
        if not partial:
            raise InsufficientCredits(account.customer_id, units, available)
        units = available
    if lapsed:
        expire_lapsed(session, account, lapsed, now)
    funded, uncovered = plan_draw(eligible, units)
    move_grant_units(session, account, [(g, -u) for g, u in funded])
    return units, funded, uncovered


def consume(session: Session, request: Consumption) -> ConsumeResult:
    """Apply a priced consumption in the session's transaction: lock, replay, access, draw, usage, entry."""
    account = lock_account(session, request.customer_id)
    original = find_original(session, request.key)
    if original is not None:
        return replayed_result(session, request, original)
    sources = check_access(account, request.now)
    drawn, funded, uncovered = debit(session, account, request.charge, request.now, sources=sources)
    usage_id = (
        insert_usage(session, account.id, request.request_id, request.usage, request.charge, request.now)
        if request.usage is not None
        else None
    )
    entry_id, balance_after = insert_entry(
        session,
        account,
        kind=EntryKind.CONSUME,
        units=-drawn,
        debt_delta=uncovered,
        key=request.key,
        request_hash=request.digest,
        usage_id=usage_id,
        actor=request.actor,
        reason=request.reason,
        allocations=[(g, -u) for g, u in funded],
    )
    save_account(session, account)
    if drawn:
        # balance.low / balance.depleted when this consumption crossed the line (as ledger_consume does).
        note_balance(
            session,
            account_id=account.id,
            customer_id=account.customer_id,
            before=max(0, balance_after + drawn + account.overdraft_limit),
            after=max(0, balance_after + account.overdraft_limit),
            cause="usage",
        )
    return ConsumeResult(
        request_id=request.request_id,
        customer_id=request.customer_id,
        units=drawn,
        balance_after=balance_after,
        entry_id=entry_id,
        usage_id=usage_id,
        replayed=False,
        funded_by=tuple(funded),
    )
