"""The read side: balances, entries and usage reports."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import Date, cast, func, or_, select
from sqlalchemy.orm import Session

from ledger.accounts import get_account
from ledger.config import get_billing_config
from ledger.errors import InvalidRequest
from ledger.models import AccessState, Entry, Grant, GrantSource, UsageRecord
from ledger.posting import as_utc, utcnow
from ledger.subscriptions import SubscriptionView, subscriptions_of


@dataclass(frozen=True)
class GrantSummary:
    grant_id: int
    source: GrantSource
    units: int
    remaining: int
    frozen: int
    clawed_back: int
    priority: int
    expires_at: datetime | None
    stripe_object_id: str | None


@dataclass(frozen=True)
class BalanceSummary:
    customer_id: str
    external_id: str | None
    balance: int  # spendable units: sum(grant remaining) - debt, holds already taken out
    held: int  # units reserved by open holds
    debt: int  # units spent that no grant covers any more (clawbacks, overdraft)
    overdraft_limit: int
    available: int  # what a consumption may take now: balance + overdraft, never below 0
    access_state: AccessState
    grace_until: datetime | None
    usage_allowed: bool
    grants: tuple[GrantSummary, ...]  # grants with units left or frozen, in draw order
    # Each subscription (best access first): id, plan, status, current period, cancel_at_period_end.
    subscriptions: tuple[SubscriptionView, ...] = ()


@dataclass(frozen=True)
class UsageRow:
    key: str
    requests: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    credits: int
    provider_cost_usd: Decimal
    margin: Decimal | None  # credits' list value in USD minus the provider's cost; None when credits have no price


def balance_summary(session: Session, customer_id: str) -> BalanceSummary:
    """The customer's balance, holds, debt, access state and live grants."""
    account = get_account(session, customer_id)
    grants = session.scalars(
        select(Grant)
        .where(Grant.account_id == account.id, or_(Grant.remaining > 0, Grant.frozen > 0))
        .order_by(Grant.priority.desc(), Grant.expires_at.is_(None), Grant.expires_at, Grant.id)
        .execution_options(populate_existing=True)
    ).all()
    state = AccessState(account.access_state)
    grace_until = as_utc(account.grace_until)
    allowed = state in (AccessState.ACTIVE, AccessState.TRIALING) or (
        state is AccessState.PAST_DUE and (grace_until is None or utcnow() < grace_until)
    )
    return BalanceSummary(
        customer_id=account.customer_id,
        external_id=account.external_id,
        balance=account.balance,
        held=account.held,
        debt=account.debt,
        overdraft_limit=account.overdraft_limit,
        available=max(0, account.balance + account.overdraft_limit),
        access_state=state,
        grace_until=grace_until,
        usage_allowed=allowed,
        grants=tuple(
            GrantSummary(
                grant_id=g.id,
                source=GrantSource(g.source),
                units=g.units,
                remaining=g.remaining,
                frozen=g.frozen,
                clawed_back=g.clawed_back,
                priority=g.priority,
                expires_at=as_utc(g.expires_at),
                stripe_object_id=g.stripe_object_id,
            )
            for g in grants
        ),
        subscriptions=tuple(subscriptions_of(session, customer_id)),
    )


def list_entries(session: Session, customer_id: str, *, limit: int = 50, before_id: int | None = None) -> list[Entry]:
    """The customer's entries, newest first; pass the last id seen as ``before_id`` for the next page."""
    if limit <= 0 or limit > 10_000:
        raise InvalidRequest("limit must be between 1 and 10000")
    account = get_account(session, customer_id)
    stmt = select(Entry).where(Entry.account_id == account.id)
    if before_id is not None:
        stmt = stmt.where(Entry.id < before_id)
    return list(session.scalars(stmt.order_by(Entry.id.desc()).limit(limit)).all())


def usage_summary(
    session: Session,
    customer_id: str,
    *,
    since: datetime | None,
    until: datetime | None,
    group_by: Literal["day", "feature", "model", "user"],
) -> list[UsageRow]:
    """Usage of a customer in [since, until), grouped by day, feature, model or user, with cost and margin."""
    account = get_account(session, customer_id)
    u = UsageRecord
    key: Any
    if group_by == "day":
        is_sqlite = session.get_bind().dialect.name == "sqlite"
        key = func.date(u.occurred_at) if is_sqlite else cast(u.occurred_at, Date)
    elif group_by == "feature":
        key = u.feature
    elif group_by == "model":
        key = u.model
    elif group_by == "user":
        key = u.user_id
    else:
        raise InvalidRequest(f"cannot group usage by {group_by!r}")
    stmt = select(
        key.label("key"),
        func.count(u.id),
        func.coalesce(func.sum(u.input_tokens), 0),
        func.coalesce(func.sum(u.output_tokens), 0),
        func.coalesce(func.sum(u.cached_tokens), 0),
        func.coalesce(func.sum(u.units), 0),
        func.coalesce(func.sum(u.provider_cost_usd), 0),
    ).where(u.account_id == account.id)
    if since is not None:
        stmt = stmt.where(u.occurred_at >= as_utc(since))
    if until is not None:
        stmt = stmt.where(u.occurred_at < as_utc(until))
    credits_per_minor = get_billing_config().credits.fallback_credits_per_minor_unit
    rows = []
    for k, requests, inp, out, cached, credits, cost in session.execute(stmt.group_by(key).order_by(key)).all():
        # PostgreSQL sums NUMERIC exactly; SQLite sums it as REAL, so round back to the column's scale.
        cost_usd = Decimal(str(cost)).quantize(Decimal("1e-10"))
        value = Decimal(credits) / credits_per_minor / 100 if credits_per_minor else None
        rows.append(
            UsageRow(
                key="" if k is None else str(k),
                requests=int(requests),
                input_tokens=int(inp),
                output_tokens=int(out),
                cached_tokens=int(cached),
                credits=int(credits),
                provider_cost_usd=cost_usd,
                margin=None if value is None else value - cost_usd,
            )
        )
    return rows
