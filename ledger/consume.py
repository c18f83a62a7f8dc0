"""Consumption: atomic, idempotent spending of credits, with the usage that caused it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Table, insert, select
from sqlalchemy.orm import Session

from ledger import pgfast
from ledger.config import get_billing_config
from ledger.db import get_engine, unit_of_work
from ledger.errors import IdempotencyConflict, InsufficientCredits, InvalidRequest
from ledger.models import EntryKind, UsageRecord
from ledger.posting import (
    ENTRIES,
    LockedAccount,
    as_utc,
    check_access,
    drawable_grants,
    entry_movements,
    expire_lapsed,
    insert_entry,
    lock_account,
    move_grant_units,
    plan_draw,
    request_hash,
    require_key,
    require_positive,
    save_account,
    utcnow,
)
from ledger.pricing import UsageInput, price_usage, provider_cost

__all__ = ["ConsumeResult", "UsageInput", "consume", "consume_standalone", "price_usage"]

USAGE: Table = UsageRecord.__table__  # type: ignore[assignment]


@dataclass(frozen=True)
class ConsumeResult:
    request_id: str
    customer_id: str
    units: int
    balance_after: int
    entry_id: int | None
    usage_id: int | None
    replayed: bool
    funded_by: tuple[tuple[int, int], ...]  # (grant_id, units drawn), in draw order


@dataclass(frozen=True, slots=True)
class Consumption:
    """A consumption request, checked and priced: what each way of applying it (Python, the function) takes."""

    customer_id: str
    request_id: str
    charge: int
    digest: str
    usage: UsageInput | None
    actor: str
    reason: str
    now: datetime


def price_consumption(
    customer_id: str, *, request_id: str, units: int | None, usage: UsageInput | None, actor: str, reason: str
) -> Consumption:
    """Check a consumption request and price it (units given, else the usage's price), at the current time."""
    require_key("request_id", request_id)
    return Consumption(
        customer_id=customer_id,
        request_id=request_id,
        charge=charge_for(units, usage),
        digest=consume_digest(customer_id, units, usage),
        usage=usage,
        actor=actor,
        reason=reason,
        now=utcnow(),
    )


def consume_key(request_id: str) -> str:
    """The entry idempotency key of a consumption."""
    return f"consume:{request_id}"


def charge_for(units: int | None, usage: UsageInput | None) -> int:
    """The units a request charges: given units, else the usage's price; test/internal usage charges 0."""
    if usage is not None:
        usage.validate()
    if units is not None:
        require_positive("units", units, allow_zero=True)
        return units if usage is None or usage.charges else 0
    if usage is None:
        raise InvalidRequest("give units or a usage to price")
    return price_usage(usage, get_billing_config())


def consume_digest(customer_id: str, units: int | None, usage: UsageInput | None) -> str:
    """The digest that tells a retry of this consumption from a reuse of its request id."""
    return request_hash(
        customer_id=customer_id,
        units=units,
        usage=dataclasses.asdict(usage) if usage is not None else None,
    )


def usage_row(account_id: int, request_id: str, usage: UsageInput, units: int, now: datetime) -> dict[str, object]:
    """The usage_records row for ``usage`` charged ``units``."""
    return {
        "account_id": account_id,
        "request_id": request_id,
        "user_id": usage.user_id,
        "workspace": usage.workspace,
        "feature": usage.feature,
        "provider": usage.provider,
        "model": usage.model,
        "operation": usage.operation,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cached_tokens": usage.cached_tokens,
        "provider_cost_usd": provider_cost(usage, get_billing_config()),
        "units": units,
        "billable": usage.billable,
        "environment": usage.environment,
        "occurred_at": as_utc(usage.occurred_at) or now,
    }


def insert_usage(
    session: Session, account_id: int, request_id: str, usage: UsageInput, units: int, now: datetime
) -> int:
    """Record one usage event; return its id."""
    usage_id: int = session.execute(
        insert(USAGE).values(usage_row(account_id, request_id, usage, units, now)).returning(USAGE.c.id)
    ).scalar_one()
    return usage_id


def consume(
    session: Session,
    customer_id: str,
    *,
    request_id: str,
    units: int | None = None,
    usage: UsageInput | None = None,
    actor: str = "api",
    reason: str = "",
) -> ConsumeResult:
    """Spend credits once per request id, drawing grants in order; refuse what the balance cannot cover.

    Replaying a request id with the same parameters returns the original result (``replayed=True``) and
    charges nothing; with other parameters it raises IdempotencyConflict.
    """
    request = price_consumption(
        customer_id, request_id=request_id, units=units, usage=usage, actor=actor, reason=reason
    )
    return consume_priced(session, request)


def consume_standalone(
    customer_id: str,
    *,
    request_id: str,
    units: int | None = None,
    usage: UsageInput | None = None,
    actor: str = "api",
    reason: str = "",
) -> ConsumeResult:
    """:func:`consume` as a whole unit of work of its own, committed when it returns.

    For an edge whose unit of work is this one consumption (the usage API, the CLI); same results and errors.
    On PostgreSQL it is one statement in autocommit on a pooled connection, without a session: one round trip
    where a unit of work takes three (BEGIN, the call, COMMIT). Elsewhere, ``consume`` in a ``unit_of_work``.
    Never call it inside another unit of work: it commits on a connection of its own (and would wait forever for
    an account lock that unit holds); there, call ``consume(session, ...)``.
    """
    request = price_consumption(
        customer_id, request_id=request_id, units=units, usage=usage, actor=actor, reason=reason
    )
    engine = get_engine()
    if pgfast.enabled_for(engine):
        return pgfast.consume_autocommit(engine, request)
    with unit_of_work() as session:
        return consume_priced(session, request)


def consume_priced(session: Session, request: Consumption) -> ConsumeResult:
    """A checked and priced consumption, through the PostgreSQL function when installed, else in Python."""
    return (pgfast.consume if pgfast.enabled(session) else consume_in_python)(session, request)


def replayed_result(session: Session, customer_id: str, request_id: str, digest: str, original: Any) -> ConsumeResult:
    """The original result of a consumption, for a retry of it."""
    if original.request_hash != digest:
        raise IdempotencyConflict(f"request id {request_id!r} was used with other parameters")
    funded = entry_movements(session, original.id, original.grant_id, original.units, original.debt_delta)
    return ConsumeResult(
        request_id=request_id,
        customer_id=customer_id,
        units=-original.units,
        balance_after=original.balance_after,
        entry_id=original.id,
        usage_id=original.usage_id,
        replayed=True,
        funded_by=tuple((g, -u) for g, u in funded),
    )


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


def debit(
    session: Session, account: LockedAccount, units: int, now: datetime, *, partial: bool = False
) -> tuple[int, list[tuple[int, int]], int]:
    """Draw ``units`` from the account's grants (expiring lapsed ones first); return (drawn, funded, new debt).

    Refuses with InsufficientCredits (nothing written) when the balance plus overdraft cannot cover ``units``;
    with ``partial`` it draws what it can instead. What no grant covers within the overdraft becomes debt.
    """
    if units == 0:
        return 0, [], 0
    eligible, lapsed = drawable_grants(session, account.id, now)
    available = max(0, account.balance - sum(g.remaining for g in lapsed) + account.overdraft_limit)
    if available < units:
        if not partial:
            raise InsufficientCredits(account.customer_id, units, available)
        units = available
    if lapsed:
        expire_lapsed(session, account, lapsed, now)
    funded, uncovered = plan_draw(eligible, units)
    move_grant_units(session, account, [(g, -u) for g, u in funded])
    return units, funded, uncovered


def consume_in_python(session: Session, request: Consumption) -> ConsumeResult:
    """The portable consumption (SQLite, and PostgreSQL when the fast path is off): Core statements only."""
    customer_id, request_id, charge, usage, now = (
        request.customer_id, request.request_id, request.charge, request.usage, request.now
    )  # fmt: skip
    account = lock_account(session, customer_id)
    key = consume_key(request_id)
    original = find_original(session, key)
    if original is not None:
        return replayed_result(session, customer_id, request_id, request.digest, original)
    check_access(account, now)
    drawn, funded, uncovered = debit(session, account, charge, now)
    usage_id = insert_usage(session, account.id, request_id, usage, charge, now) if usage is not None else None
    entry_id, balance_after = insert_entry(
        session,
        account,
        kind=EntryKind.CONSUME,
        units=-drawn,
        debt_delta=uncovered,
        key=key,
        request_hash=request.digest,
        usage_id=usage_id,
        actor=request.actor,
        reason=request.reason,
        allocations=[(g, -u) for g, u in funded],
    )
    save_account(session, account)
    return ConsumeResult(
        request_id=request_id,
        customer_id=customer_id,
        units=drawn,
        balance_after=balance_after,
        entry_id=entry_id,
        usage_id=usage_id,
        replayed=False,
        funded_by=tuple(funded),
    )
