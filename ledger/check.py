"""The invariant check: proves, account by account, that the projections agree with the entries."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import Date, and_, cast, func, literal, or_, select, union_all
from sqlalchemy.orm import Session

from ledger.models import (
    Account,
    Allocation,
    Entry,
    Grant,
    Hold,
    HoldStatus,
    UsageDaily,
    UsageRecord,
    usd_as_integer,
)


@dataclass(frozen=True)
class Violation:
    customer_id: str
    invariant: str
    detail: str


def _scoped(stmt: Any, account_column: Any, account_id: int | None) -> Any:
    return stmt if account_id is None else stmt.where(account_column == account_id)


def check_ledger(session: Session, customer_id: str | None = None) -> list[Violation]:
    """Every broken invariant, for one customer or all; an empty list means the ledger is consistent."""
    account_id: int | None = None
    if customer_id is not None:
        account_id = session.execute(select(Account.id).where(Account.customer_id == customer_id)).scalar_one_or_none()
        if account_id is None:
            return []
    names: dict[int, str] = dict(
        session.execute(_scoped(select(Account.id, Account.customer_id), Account.id, account_id)).all()
    )
    found: list[Violation] = []

    def add(acct: int, invariant: str, detail: str) -> None:
        found.append(Violation(names.get(acct, f"account#{acct}"), invariant, detail))

    entry_sums = (
        select(
            Entry.account_id,
            func.sum(Entry.units).label("units"),
            func.sum(Entry.debt_delta).label("debt"),
        )
        .group_by(Entry.account_id)
        .subquery()
    )
    grant_sums = (
        select(Grant.account_id, func.sum(Grant.remaining).label("remaining")).group_by(Grant.account_id).subquery()
    )
    hold_sums = (
        select(Hold.account_id, func.sum(Hold.units - Hold.captured_units).label("held"))
        .where(Hold.status == HoldStatus.OPEN)
        .group_by(Hold.account_id)
        .subquery()
    )
    accounts = session.execute(
        _scoped(
            select(
                Account.id,
                Account.balance,
                Account.debt,
                Account.held,
                func.coalesce(entry_sums.c.units, 0),
                func.coalesce(entry_sums.c.debt, 0),
                func.coalesce(grant_sums.c.remaining, 0),
                func.coalesce(hold_sums.c.held, 0),
            )
            .outerjoin(entry_sums, entry_sums.c.account_id == Account.id)
            .outerjoin(grant_sums, grant_sums.c.account_id == Account.id)
            .outerjoin(hold_sums, hold_sums.c.account_id == Account.id)
            .order_by(Account.id),
            Account.id,
            account_id,
        )
    ).all()
    for acct, balance, debt, held, entry_units, entry_debt, remaining, open_held in accounts:
        if balance != entry_units:
            add(acct, "balance_equals_entries", f"balance {balance} != sum of entries {entry_units}")
        if debt != entry_debt:
            add(acct, "debt_equals_entries", f"debt {debt} != sum of entries' debt deltas {entry_debt}")
        if balance != remaining - debt:
            add(acct, "balance_equals_grants", f"balance {balance} != sum of remaining {remaining} - debt {debt}")
        if held != open_held:
            add(acct, "held_equals_open_holds", f"held {held} != units of open holds {open_held}")
        if debt < 0:
            add(acct, "debt_not_negative", f"debt {debt} < 0")
        if held < 0:
            add(acct, "held_not_negative", f"held {held} < 0")

    alloc_sums = (
        select(Allocation.grant_id, func.sum(Allocation.units).label("units")).group_by(Allocation.grant_id).subquery()
    )
    # An entry without allocation rows moved all its units (units + debt_delta) in its one grant.
    has_rows = select(Allocation.id).where(Allocation.entry_id == Entry.id).exists()
    single_sums = (
        select(Entry.grant_id, func.sum(Entry.units + Entry.debt_delta).label("units"))
        .where(Entry.grant_id.is_not(None), ~has_rows)
        .group_by(Entry.grant_id)
        .subquery()
    )
    frozen_sums = (
        select(Entry.grant_id, func.sum(Entry.frozen_delta).label("frozen"))
        .where(Entry.grant_id.is_not(None))
        .group_by(Entry.grant_id)
        .subquery()
    )
    grants = session.execute(
        _scoped(
            select(
                Grant.id,
                Grant.account_id,
                Grant.units,
                Grant.remaining,
                Grant.frozen,
                Grant.clawed_back,
                func.coalesce(alloc_sums.c.units, 0) + func.coalesce(single_sums.c.units, 0),
                func.coalesce(frozen_sums.c.frozen, 0),
            )
            .outerjoin(alloc_sums, alloc_sums.c.grant_id == Grant.id)
            .outerjoin(single_sums, single_sums.c.grant_id == Grant.id)
            .outerjoin(frozen_sums, frozen_sums.c.grant_id == Grant.id)
            .order_by(Grant.id),
            Grant.account_id,
            account_id,
        )
    ).all()
    for gid, acct, units, remaining, frozen, clawed, allocated, frozen_moves in grants:
        if remaining < 0:
            add(acct, "grant_remaining_not_negative", f"grant {gid}: remaining {remaining} < 0")
        if frozen < 0:
            add(acct, "grant_frozen_not_negative", f"grant {gid}: frozen {frozen} < 0")
        if remaining != allocated:
            add(acct, "grant_remaining_equals_allocations", f"grant {gid}: remaining {remaining} != {allocated}")
        if frozen != frozen_moves:
            add(acct, "grant_frozen_equals_entries", f"grant {gid}: frozen {frozen} != entries' {frozen_moves}")
        if clawed > units:
            add(acct, "grant_clawback_within_units", f"grant {gid}: clawed back {clawed} > granted {units}")

    # Each entry's allocations account for its units: what moved in grants = units + debt recorded; an entry
    # with neither allocations nor a grant moved nothing in grants.
    entry_allocs = (
        select(Allocation.entry_id, func.sum(Allocation.units).label("units")).group_by(Allocation.entry_id).subquery()
    )
    mismatched = session.execute(
        _scoped(
            select(Entry.id, Entry.account_id, Entry.units, Entry.debt_delta, func.coalesce(entry_allocs.c.units, 0))
            .outerjoin(entry_allocs, entry_allocs.c.entry_id == Entry.id)
            .where(
                or_(
                    and_(entry_allocs.c.units.is_not(None), Entry.units + Entry.debt_delta != entry_allocs.c.units),
                    and_(entry_allocs.c.units.is_(None), Entry.grant_id.is_(None), Entry.units + Entry.debt_delta != 0),
                )
            )
            .order_by(Entry.id),
            Entry.account_id,
            account_id,
        )
    ).all()
    for eid, acct, units, debt_delta, allocated in mismatched:
        add(acct, "entry_allocations", f"entry {eid}: units {units} + debt {debt_delta} != allocated {allocated}")

    # The balance_after chain: every entry's balance_after is the running sum of the account's entries.
    running = select(
        Entry.id,
        Entry.account_id,
        Entry.balance_after,
        func.sum(Entry.units).over(partition_by=Entry.account_id, order_by=Entry.id).label("running"),
    ).subquery()
    broken_chain = session.execute(
        _scoped(
            select(running.c.id, running.c.account_id, running.c.balance_after, running.c.running)
            .where(running.c.balance_after != running.c.running)
            .order_by(running.c.id),
            running.c.account_id,
            account_id,
        )
    ).all()
    for eid, acct, after, total in broken_chain:
        add(acct, "balance_after_chain", f"entry {eid}: balance_after {after} != running sum {total}")

    for model, label in ((Entry, "entries"), (Grant, "grants")):
        dupes = session.execute(
            _scoped(
                select(func.min(model.account_id), model.idempotency_key, func.count())
                .group_by(model.idempotency_key)
                .having(func.count() > 1),
                model.account_id,
                account_id,
            )
        ).all()
        for acct, key, count in dupes:
            add(acct, "idempotency_key_unique", f"{label}: key {key!r} used {count} times")

    for acct, detail in _usage_daily_differences(session, account_id):
        add(acct, "usage_daily_equals_usage", detail)
    return found


_USAGE_KEY = ("provider", "model", "workspace", "feature", "environment", "billable")
_USAGE_SUMS = ("input_tokens", "output_tokens", "cached_tokens", "units", "provider_cost_usd")


def _usage_daily_differences(session: Session, account_id: int | None) -> list[tuple[int, str]]:
    """Each usage_daily key whose sums differ from its usage rows' (a missing row on either side included).

    The usage rows count positively and the roll-up rows negatively in one GROUP BY, which groups NULLs
    together as the roll-up's key does.
    """
    U, D = UsageRecord, UsageDaily
    day: Any
    if session.get_bind().dialect.name == "postgresql":
        day = cast(func.timezone("UTC", U.occurred_at), Date)
    else:
        day = func.date(U.occurred_at)
    # Costs compared in the roll-up's unit, integer 10^-10 USD.
    cost = usd_as_integer(U.provider_cost_usd, session.get_bind().dialect.name).label("provider_cost_usd")
    rows = select(
        U.account_id,
        day.label("day"),
        *(getattr(U, c) for c in _USAGE_KEY),
        literal(1).label("requests"),
        *(cost if c == "provider_cost_usd" else getattr(U, c) for c in _USAGE_SUMS),
    )
    rolled = select(
        D.account_id,
        D.day,
        *(getattr(D, c) for c in _USAGE_KEY),
        -D.requests,
        *(-getattr(D, c) for c in _USAGE_SUMS),
    )
    if account_id is not None:
        rows, rolled = rows.where(U.account_id == account_id), rolled.where(D.account_id == account_id)
    both = union_all(rows, rolled).subquery()
    sums = [func.sum(both.c[c]) for c in ("requests", *_USAGE_SUMS)]
    stmt = (
        select(both.c.account_id, both.c.day, *(both.c[c] for c in _USAGE_KEY), *sums)
        .group_by(both.c.account_id, both.c.day, *(both.c[c] for c in _USAGE_KEY))
        .having(or_(*(s != 0 for s in sums)))
        .order_by(both.c.account_id, both.c.day)
    )
    out = []
    for row in session.execute(stmt):
        acct, day_value, *rest = row
        key, diffs = rest[: len(_USAGE_KEY)], rest[len(_USAGE_KEY) :]
        what = ", ".join(
            f"{name} {d:+f}" if isinstance(d, Decimal) else f"{name} {d:+}"
            for name, d in zip(("requests", *_USAGE_SUMS), diffs, strict=True)
            if d
        )
        out.append((acct, f"usage on {day_value} {'/'.join(str(k) for k in key)}: rows minus roll-up: {what}"))
    return out
