"""Read-only queries behind the customer page: the account, its grants, debts, ledger, usage and events.

Every list is bounded: the ledger pages by entry id (keyset, newest first) so the millionth entry costs what
the first does, and usage is summed over a window on ``(account_id, occurred_at)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session

from ledger.config import BillingConfig
from ledger.consumption import consume_key
from ledger.inbox import StripeEvent
from ledger.models import Account, Entry, EntryKind, Grant, GrantSource, Hold, UsageRecord
from ledger.subscriptions import SubscriptionView, subscriptions_of

LEDGER_PAGE_SIZE = 50
GRANTS_SHOWN = 200
EVENTS_SHOWN = 25
DEBT_ENTRIES_SHOWN = 50

UsageDimension = Literal["model", "feature", "user"]
DIMENSIONS: tuple[UsageDimension, ...] = ("model", "feature", "user")
# How ledger/holds.py keys a hold's entries by request id (consume's key comes from ledger.consume.consume_key).
REQUEST_KEY_PREFIXES = ("hold", "capture", "release", "capture-release")
# Entries that move a grant itself (not consumption drawn from it).
GRANT_ENTRY_KINDS = (
    EntryKind.GRANT,
    EntryKind.CLAWBACK,
    EntryKind.FREEZE,
    EntryKind.UNFREEZE,
    EntryKind.EXPIRE,
    EntryKind.DEBT_SETTLEMENT,
)


@dataclass(frozen=True, slots=True)
class LedgerLine:
    """One ledger entry with what explains it: the usage behind a charge, the grant it touched."""

    entry: Entry
    hold_request_id: str | None
    usage: UsageRecord | None
    grant_source: str | None
    grant_stripe_object_id: str | None


@dataclass(frozen=True, slots=True)
class LedgerPage:
    """A page of the ledger, newest first, with the cursors around it."""

    lines: list[LedgerLine]
    next_before_id: int | None  # older entries: ?before=<id>
    newer_exist: bool


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Usage summed under one key (a model, a feature or a user) over the window."""

    key: str
    requests: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    credits: int
    provider_cost_usd: Decimal
    revenue_usd: Decimal
    margin_usd: Decimal

    @property
    def margin_ratio(self) -> Decimal | None:
        """Margin as a share of revenue, or None when nothing was sold."""
        return (self.margin_usd / self.revenue_usd).quantize(Decimal("0.001")) if self.revenue_usd else None


@dataclass(frozen=True, slots=True)
class CustomerOverview:
    """The account's state and what it holds."""

    account: Account
    available: int
    grants: list[Grant]
    grant_count: int
    active_grant_units: int
    debt_entries: list[Entry]
    events: list[StripeEvent]
    subscriptions: list[SubscriptionView]


def find_account(session: Session, customer_id: str) -> Account | None:
    """The account for a Stripe customer id, or for an external (our product's) id."""
    account = session.scalars(select(Account).where(Account.customer_id == customer_id)).one_or_none()
    if account is None:
        account = session.scalars(select(Account).where(Account.external_id == customer_id).limit(1)).first()
    return account


def customer_events(session: Session, customer_id: str, limit: int = EVENTS_SHOWN) -> list[StripeEvent]:
    """The newest stored Stripe events naming a customer."""
    return list(
        session.scalars(
            select(StripeEvent)
            .where(StripeEvent.customer_id == customer_id)
            .order_by(StripeEvent.created.desc(), StripeEvent.id.desc())
            .limit(limit)
        )
    )


def customer_overview(session: Session, account: Account) -> CustomerOverview:
    """Balance, grants (newest first), the entries that changed debt, and recent Stripe events."""
    grants = list(
        session.scalars(
            select(Grant).where(Grant.account_id == account.id).order_by(Grant.id.desc()).limit(GRANTS_SHOWN)
        )
    )
    grant_count, active_units = session.execute(
        select(func.count(Grant.id), func.coalesce(func.sum(Grant.remaining), 0)).where(Grant.account_id == account.id)
    ).one()
    debt_entries = list(
        session.scalars(
            select(Entry)
            .where(Entry.account_id == account.id, Entry.debt_delta != 0)
            .order_by(Entry.id.desc())
            .limit(DEBT_ENTRIES_SHOWN)
        )
    )
    events = customer_events(session, account.customer_id)
    return CustomerOverview(
        account=account,
        available=account.balance + account.overdraft_limit,
        grants=grants,
        grant_count=int(grant_count),
        active_grant_units=int(active_units),
        debt_entries=debt_entries,
        events=events,
        subscriptions=subscriptions_of(session, account.customer_id),
    )


def _ledger_select(account_id: int) -> Select[Entry, str, UsageRecord, GrantSource, str | None]:
    return (
        select(Entry, Hold.request_id, UsageRecord, Grant.source, Grant.stripe_object_id)
        .outerjoin(Hold, Hold.id == Entry.hold_id)
        .outerjoin(UsageRecord, UsageRecord.id == func.coalesce(Entry.usage_id, Hold.usage_id))
        .outerjoin(Grant, Grant.id == Entry.grant_id)
        .where(Entry.account_id == account_id)
    )


def ledger_page(
    session: Session,
    account: Account,
    *,
    before_id: int | None = None,
    kind: EntryKind | None = None,
    search: str | None = None,
    limit: int = LEDGER_PAGE_SIZE,
) -> LedgerPage:
    """A page of the account's entries, newest first, older than ``before_id``.

    ``search`` finds the entries behind one request or Stripe object: an idempotency key, a Stripe object id
    (payment, refund, dispute), or the request id of a charge or hold.
    """
    stmt = _ledger_select(account.id)
    if kind is not None:
        stmt = stmt.where(Entry.kind == kind)
    if search:
        # Each arm walks an index: entry keys (the ledger keys a request's entries by its request id), the
        # Stripe object id, and grant-side entries by (account_id, kind). entries.usage_id has no index.
        keys = [search, consume_key(search), *(f"{prefix}:{search}" for prefix in REQUEST_KEY_PREFIXES)]
        object_ids = related_stripe_ids(session, search)
        grant_ids = select(Grant.id).where(Grant.account_id == account.id, Grant.stripe_object_id.in_(object_ids))
        stmt = stmt.where(
            or_(
                Entry.idempotency_key.in_(keys),
                Entry.stripe_object_id.in_(object_ids),
                and_(Entry.kind.in_(GRANT_ENTRY_KINDS), Entry.grant_id.in_(grant_ids)),
            )
        )
    newer_exist = False
    if before_id is not None:
        stmt = stmt.where(Entry.id < before_id)
        newer_exist = True
    rows = session.execute(stmt.order_by(Entry.id.desc()).limit(limit + 1)).all()
    lines = [
        LedgerLine(
            entry=entry,
            hold_request_id=hold_request_id,
            usage=usage,
            grant_source=str(grant_source) if grant_source is not None else None,
            grant_stripe_object_id=grant_object,
        )
        for entry, hold_request_id, usage, grant_source, grant_object in rows[:limit]
    ]
    next_before = lines[-1].entry.id if len(rows) > limit else None
    return LedgerPage(lines=lines, next_before_id=next_before, newer_exist=newer_exist)


# Fields of a Stripe object that name the other objects of the same payment.
_PAYMENT_LINKS = ("payment_intent", "latest_charge", "charge", "invoice", "checkout_session")


def related_stripe_ids(session: Session, object_id: str) -> list[str]:
    """``object_id`` and the ids of the same payment's other objects, as the stored events show them.

    A grant may carry the checkout session, the invoice or the payment intent while a customer quotes the
    charge id from their receipt: the stored events of that object say which payment it belongs to.
    """
    ids = [object_id]
    payloads = session.scalars(
        select(StripeEvent.payload).where(StripeEvent.object_id == object_id).order_by(StripeEvent.id.desc()).limit(5)
    )
    for payload in payloads:
        try:
            obj = json.loads(payload).get("data", {}).get("object", {})
        except (ValueError, AttributeError):
            continue
        for name in _PAYMENT_LINKS:
            value = obj.get(name) if isinstance(obj, dict) else None
            value = value.get("id") if isinstance(value, dict) else value
            if isinstance(value, str) and value and value not in ids:
                ids.append(value)
    return ids


def credit_value_usd(config: BillingConfig) -> Decimal:
    """What one credit sells for, in USD, by the config's fallback rate (credits per cent)."""
    rate = config.credits.fallback_credits_per_minor_unit
    return Decimal(1) / rate / 100 if rate else Decimal(0)


@dataclass
class _UsageSums:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    credits: int = 0
    provider_cost_usd: Decimal = Decimal(0)

    def add(self, values: Sequence[Any]) -> None:
        requests, tin, tout, tcached, credits, cost = values
        self.requests += int(requests)
        self.input_tokens += int(tin or 0)
        self.output_tokens += int(tout or 0)
        self.cached_tokens += int(tcached or 0)
        self.credits += int(credits or 0)
        self.provider_cost_usd += Decimal(str(cost or 0))

    def row(self, key: str, credit_value: Decimal) -> UsageRow:
        revenue = (Decimal(self.credits) * credit_value).quantize(Decimal("0.0001"))
        return UsageRow(
            key=key,
            requests=self.requests,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cached_tokens=self.cached_tokens,
            credits=self.credits,
            provider_cost_usd=self.provider_cost_usd,
            revenue_usd=revenue,
            margin_usd=revenue - self.provider_cost_usd,
        )


def usage_breakdown(
    session: Session,
    account: Account,
    *,
    since: datetime,
    until: datetime,
    credit_value: Decimal,
    limit: int = 50,
) -> dict[UsageDimension, list[UsageRow]]:
    """Usage in [since, until) by model, by feature and by user, biggest provider cost first.

    One GROUP BY over (provider, model, feature, user) in the database, rolled up three ways here: one pass
    over the window's rows, where GROUPING SETS or three GROUP BYs cost two to three.
    """
    stmt = (
        select(
            UsageRecord.provider,
            UsageRecord.model,
            UsageRecord.feature,
            UsageRecord.user_id,
            func.count(UsageRecord.id),
            func.sum(UsageRecord.input_tokens),
            func.sum(UsageRecord.output_tokens),
            func.sum(UsageRecord.cached_tokens),
            func.sum(UsageRecord.units),
            func.sum(UsageRecord.provider_cost_usd),
        )
        .where(
            UsageRecord.account_id == account.id,
            UsageRecord.occurred_at >= since,
            UsageRecord.occurred_at < until,
        )
        .group_by(UsageRecord.provider, UsageRecord.model, UsageRecord.feature, UsageRecord.user_id)
    )
    sums: dict[UsageDimension, dict[str, _UsageSums]] = {d: {} for d in DIMENSIONS}
    for provider, model, feature, user_id, *values in session.execute(stmt):
        keys: dict[UsageDimension, str] = {
            "model": f"{provider or '?'}/{model or '?'}",
            "feature": feature or "(none)",
            "user": user_id or "(none)",
        }
        for dimension, key in keys.items():
            sums[dimension].setdefault(key, _UsageSums()).add(values)
    out: dict[UsageDimension, list[UsageRow]] = {}
    for dimension in DIMENSIONS:
        rows = [s.row(key, credit_value) for key, s in sums[dimension].items()]
        out[dimension] = sorted(rows, key=lambda r: (-r.provider_cost_usd, r.key))[:limit]
    return out
