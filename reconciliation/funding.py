"""What paid for the credits an account spent in a window, and what that makes its margin.

Every consumption says which grant funded it (the entry's grant, or its allocation rows), so the credits spent in
a window split exactly into:

- paid credits whose money is known in the settlement currency: the grant was paid in that currency, or its
  charge's balance transaction (kept in ``grant_settlements`` by reconciliation) says what it settled as;
- paid credits whose money is not known in it (paid in another currency, no balance transaction seen yet):
  reported as such, never counted as zero;
- free credits (promotions, adjustments, trials and $0 invoices): no revenue; their provider cost is reported
  apart, per plan, against the billing config's allowance.

Gross revenue of a paid credit is its grant's own price: the grant's settled money over its units. Net revenue is
what the grant's money left in the Stripe balance after Stripe's fee and its refunds (each refund's balance
transaction, a fee Stripe returned included), spread over the credits the customer kept: the grant's units less
those clawed back unused. A refund of credits already spent (recorded as debt) lowers the price of the credits
that were spent; a refund that took back unused credits leaves the others' price alone but for the fee, which
Stripe keeps (https://docs.stripe.com/refunds#fees). Refunds are known from ``refund_settlements`` (kept by
reconciliation); a grant with credits clawed back and no refund settlement seen (a refund not reconciled yet,
or a lost dispute, whose money is not counted here) is named as not known, its net counted without it.
Provider cost (USD) is shared among the three in proportion to the credits each funded.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, case, func, or_, select, union_all
from sqlalchemy.orm import Session

from ledger.config import BillingConfig
from ledger.models import (
    PLAN_SOURCES,
    Allocation,
    Entry,
    EntryKind,
    Grant,
    GrantSettlement,
    GrantSource,
    RefundSettlement,
)
from ledger.money import to_major

# Grants bought with money: top-ups, renewals and paid changes of plan (a $0 one counts as free).
PAID_SOURCES = (GrantSource.TOP_UP, GrantSource.RENEWAL, GrantSource.PLAN_CHANGE)
# Entries that spend credits (or give a hold's unspent part back): their grant movements net to what was spent.
SPENDING_KINDS = (EntryKind.CONSUME, EntryKind.HOLD, EntryKind.CAPTURE, EntryKind.RELEASE)
TEN_DIGITS = Decimal("0.0000000001")


@dataclass
class FreeBucket:
    """Free credits of one plan (or source) spent in the window."""

    label: str
    units: int = 0
    allowance_per_credit_usd: Decimal = Decimal(0)

    @property
    def allowance_usd(self) -> Decimal:
        """Provider cost these free credits may run up."""
        return self.units * self.allowance_per_credit_usd


@dataclass
class Funding:
    """How one account's spending in a window was funded."""

    paid_units: int = 0
    paid_value_minor: Decimal = Decimal(0)  # settlement currency minor units, exact
    # The same credits after Stripe's fees and refunds (see the module doc); credits whose fee or refund is not
    # known yet (no balance transaction seen) count at their gross value and are counted in ``fee_unknown_units``.
    paid_net_minor: Decimal = Decimal(0)
    fee_unknown_units: int = 0
    unknown_units: int = 0
    unknown_currencies: set[str] = field(default_factory=set)
    free: dict[str, FreeBucket] = field(default_factory=dict)

    @property
    def free_units(self) -> int:
        """Free credits spent."""
        return sum(b.units for b in self.free.values())

    @property
    def total_units(self) -> int:
        """Credits spent from grants of any kind."""
        return self.paid_units + self.unknown_units + self.free_units


def is_free(source: GrantSource, amount_minor: int | None) -> bool:
    """Credits nobody paid for: promotions, adjustments, and grants of a payment of nothing (trials, $0)."""
    return source not in PAID_SOURCES or not amount_minor


def free_label(source: GrantSource, reason: str | None, config: BillingConfig) -> tuple[str, Decimal]:
    """(plan name or grant source, allowance per credit in USD) of a free grant."""
    plan = config.plan_named_by(reason) if source in PLAN_SOURCES else None
    label = (plan.name or plan.price) if plan is not None else source.value
    return label, config.free_credit_allowance(plan)


def paid_grants(settlement_currency: str) -> Any:
    """A subquery per account of its paid grants: money known in the settlement currency (``minor``) and the
    credits it bought (``units``), and how many grants are free (``free_grants``) or priced in another
    currency without a known settlement (``unknown_grants``)."""
    S = GrantSettlement
    paid = and_(Grant.source.in_(PAID_SOURCES), Grant.amount_minor.is_not(None), Grant.amount_minor != 0)
    own = and_(paid, func.lower(Grant.currency) == settlement_currency)
    settled = and_(paid, ~own, func.lower(S.settlement_currency) == settlement_currency)
    known = or_(own, settled)
    return (
        select(
            Grant.account_id.label("account_id"),
            func.sum(case((own, Grant.amount_minor), (settled, S.settlement_minor), else_=0)).label("minor"),
            func.sum(case((known, Grant.units), else_=0)).label("units"),
            func.sum(case((paid, 0), else_=1)).label("free_grants"),
            func.sum(case((and_(paid, ~known), 1), else_=0)).label("unknown_grants"),
        )
        .outerjoin(S, S.grant_id == Grant.id)
        .group_by(Grant.account_id)
        .subquery("paid")
    )


def grant_value_minor(
    currency: str | None, amount_minor: int | None, settled_currency: str | None, settled_minor: int | None, to: str
) -> int | None:
    """A paid grant's money in currency ``to``: its own amount when paid in it, else what its charge settled as
    there; None when unknown."""
    if amount_minor is not None and (currency or "").lower() == to:
        return int(amount_minor)
    if settled_minor is not None and (settled_currency or "").lower() == to:
        return int(settled_minor)
    return None


def net_per_credit(net_minor: int, refunds_out_minor: int, units: int, clawed_unused: int) -> Decimal:
    """A paid grant's net revenue per credit kept: what its charge left after Stripe's fee (``net_minor``), less
    what its refunds took from the balance, over its units less those clawed back unused (minor units)."""
    kept = int(units) - int(clawed_unused)
    if kept <= 0:
        return Decimal(0)  # refunded in full before any credit was spent: nothing kept, nothing to price
    return Decimal(int(net_minor) - int(refunds_out_minor)) / Decimal(kept)


def consumption_funding(
    session: Session, *, since: datetime, until: datetime, account_ids: Iterable[int], config: BillingConfig
) -> dict[int, Funding]:
    """Per account: the credits spent in [since, until) by how they were funded (see the module doc)."""
    ids = sorted(set(account_ids))
    if not ids:
        return {}
    currency = config.reconciliation.settlement_currency
    E, A = Entry, Allocation
    window = and_(E.kind.in_(SPENDING_KINDS), E.created_at >= since, E.created_at < until, E.account_id.in_(ids))
    # An entry with a grant moved units + debt_delta in it; one without has an allocation row per grant.
    single = select(
        E.account_id.label("account_id"), E.grant_id.label("grant_id"), (-(E.units + E.debt_delta)).label("spent")
    ).where(window, E.grant_id.is_not(None))
    spread = (
        select(E.account_id.label("account_id"), A.grant_id.label("grant_id"), (-A.units).label("spent"))
        .join(A, A.entry_id == E.id)
        .where(window, E.grant_id.is_(None))
    )
    moved = union_all(single, spread).subquery("moved")
    per_grant = (
        select(moved.c.account_id, moved.c.grant_id, func.sum(moved.c.spent).label("spent"))
        .group_by(moved.c.account_id, moved.c.grant_id)
        .subquery("per_grant")
    )
    S = GrantSettlement
    R = RefundSettlement
    # What each refund took from the balance: its amount, plus its fee (negative when Stripe returned some).
    refunds = (
        select(
            R.grant_id.label("grant_id"),
            func.sum(case((func.lower(R.settlement_currency) == currency, R.settlement_minor + R.fee_minor),
                          else_=0)).label("out"),
            func.sum(case((func.lower(R.settlement_currency) == currency, 0), else_=1)).label("foreign"),
        )
        .group_by(R.grant_id)
        .subquery("refunds")
    )  # fmt: skip
    # Credits clawed back unused (from remaining or frozen): a clawback's debt part was spent, so it is not here.
    clawed = (
        select(
            E.grant_id.label("grant_id"),
            func.sum(-(E.units + E.debt_delta) - E.frozen_delta).label("unused"),
        )
        .where(E.kind == EntryKind.CLAWBACK, E.account_id.in_(ids), E.grant_id.is_not(None))
        .group_by(E.grant_id)
        .subquery("clawed")
    )
    stmt = (
        select(
            per_grant.c.account_id,
            per_grant.c.spent,
            Grant.source,
            Grant.units,
            Grant.amount_minor,
            Grant.currency,
            Grant.reason,
            S.settlement_minor,
            S.settlement_currency,
            S.net_minor,
            Grant.clawed_back,
            refunds.c.out,
            refunds.c.foreign,
            clawed.c.unused,
        )
        .join(Grant, Grant.id == per_grant.c.grant_id)
        .outerjoin(S, S.grant_id == Grant.id)
        .outerjoin(refunds, refunds.c.grant_id == Grant.id)
        .outerjoin(clawed, clawed.c.grant_id == Grant.id)
        .where(per_grant.c.spent != 0)
        .order_by(per_grant.c.account_id, Grant.id)
    )
    out: dict[int, Funding] = defaultdict(Funding)
    for (
        account_id,
        spent,
        source,
        units,
        amount,
        grant_currency,
        reason,
        settled,
        settled_currency,
        net,
        clawed_back,
        refunds_out,
        foreign_refunds,
        clawed_unused,
    ) in session.execute(stmt):
        f = out[account_id]
        spent = int(spent or 0)
        if is_free(source, amount):
            label, allowance = free_label(source, reason, config)
            bucket = f.free.setdefault(label, FreeBucket(label=label, allowance_per_credit_usd=allowance))
            bucket.units += spent
            continue
        value = grant_value_minor(grant_currency, amount, settled_currency, settled, currency)
        if value is None:
            f.unknown_units += spent
            f.unknown_currencies.add((grant_currency or "?").lower())
            continue
        f.paid_units += spent
        f.paid_value_minor += Decimal(spent) * Decimal(value) / Decimal(int(units))
        net_known = net is not None and (settled_currency or "").lower() == currency
        # Credits were clawed back (a refund or lost dispute the ledger applied) but no refund settlement was
        # seen, or one settled in another currency: what left the balance is not known yet.
        refund_unknown = bool(foreign_refunds) or (int(clawed_back or 0) > 0 and refunds_out is None)
        if not net_known or refund_unknown:
            f.fee_unknown_units += spent
        if net_known:
            per_credit = net_per_credit(int(net), int(refunds_out or 0), int(units), int(clawed_unused or 0))
        else:
            per_credit = Decimal(value) / Decimal(int(units))
        f.paid_net_minor += Decimal(spent) * per_credit
    return dict(out)


@dataclass(frozen=True)
class MarginSplit:
    """An account's window: revenue from paid credits against the provider cost of what they funded, the cost
    of free credits against their allowance, and what could not be priced."""

    currency: str
    revenue: Decimal  # settlement currency, major units
    revenue_net: Decimal  # the same after Stripe's fees and refunds
    paid_cost_usd: Decimal
    free_cost_usd: Decimal
    unknown_cost_usd: Decimal
    free_allowance_usd: Decimal
    funding: Funding

    @property
    def comparable(self) -> bool:
        """Revenue and cost are in the same currency (costs are USD)."""
        return self.currency == "usd"

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view (Decimals as strings)."""
        f = self.funding
        return {
            "currency": self.currency,
            "revenue": str(self.revenue),
            "revenue_net": str(self.revenue_net),
            "fee_unknown_credits": f.fee_unknown_units,
            "paid_credits": f.paid_units,
            "paid_cost_usd": str(self.paid_cost_usd),
            "free_credits": {b.label: b.units for b in f.free.values()},
            "free_cost_usd": str(self.free_cost_usd),
            "free_allowance_usd": str(self.free_allowance_usd),
            "unpriced_credits": f.unknown_units,
            "unpriced_currencies": sorted(f.unknown_currencies),
            "unpriced_cost_usd": str(self.unknown_cost_usd),
        }


def split_margin(funding: Funding, cost_usd: Decimal, config: BillingConfig) -> MarginSplit:
    """Share the window's provider cost among paid, unpriced and free credits by the credits each funded."""
    currency = config.reconciliation.settlement_currency
    total = funding.total_units
    if total <= 0:
        # Nothing was drawn from grants (usage on debt, or no credits charged): all of it is unpaid cost.
        paid_cost, free_cost, unknown_cost = cost_usd, Decimal(0), Decimal(0)
    else:
        free_cost = (cost_usd * funding.free_units / total).quantize(TEN_DIGITS)
        unknown_cost = (cost_usd * funding.unknown_units / total).quantize(TEN_DIGITS)
        paid_cost = cost_usd - free_cost - unknown_cost
    return MarginSplit(
        currency=currency,
        revenue=to_major(funding.paid_value_minor, currency).quantize(TEN_DIGITS),
        revenue_net=to_major(funding.paid_net_minor, currency).quantize(TEN_DIGITS),
        paid_cost_usd=paid_cost,
        free_cost_usd=free_cost,
        unknown_cost_usd=unknown_cost,
        free_allowance_usd=sum((b.allowance_usd for b in funding.free.values()), Decimal(0)),
        funding=funding,
    )
