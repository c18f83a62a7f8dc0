"""Margin per customer, feature and model (and per plan) for a window: what the credits used were sold for,
against what the provider charged for the calls. A customer's plan is its best subscription's (active first).

Revenue is in the Stripe account's settlement currency (``reconciliation.settlement_currency``): a credit is worth
what its own grant was paid, converted by the charge's balance transaction when paid in another currency (see
:mod:`reconciliation.funding`). Free credits (promotions, trials, $0 invoices) bring no revenue. Credits paid in
another currency whose settlement is not known yet are left out of revenue and named in ``note``, never counted
as zero. Only billed production usage counts as revenue, every call counts as cost (USD). Usage is read from the
daily roll-up for whole days (see :mod:`reconciliation.usage`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session

from ledger.config import BillingConfig, get_billing_config
from ledger.models import Account, Subscription, UsageEnvironment
from ledger.money import format_credits, to_major
from reconciliation.funding import Funding, consumption_funding, paid_grants
from reconciliation.staging import SUBSCRIPTION_RANK
from reconciliation.usage import usage_in_window

TEN_DIGITS = Decimal("0.0000000001")


@dataclass(frozen=True)
class MarginRow:
    """One customer, feature and model over the window."""

    customer_id: str
    feature: str | None
    model: str | None
    requests: int
    units: int
    revenue: Decimal  # settlement currency, major units
    currency: str
    cost_usd: Decimal
    # Revenue after Stripe's fees and refunds (each paid grant's balance transaction net less what its refunds took
    # from the balance, over the credits kept: see reconciliation.funding); gross where no fee is known yet.
    revenue_net: Decimal = Decimal(0)
    note: str = ""
    # Some credits used were paid in another currency whose settlement is not known: revenue is incomplete.
    unpriced: bool = False
    # The customer's plan: its best subscription's (active first), named as in the billing config; None when
    # the customer has no subscription (prepaid credits only).
    plan: str | None = None

    @property
    def comparable(self) -> bool:
        """Revenue is in USD, like the costs."""
        return self.currency == "usd"

    @property
    def revenue_usd(self) -> Decimal | None:
        """Revenue when the settlement currency is USD."""
        return self.revenue if self.comparable else None

    @property
    def margin_usd(self) -> Decimal | None:
        """Revenue minus provider cost; None when revenue is not in USD (no rate to compare) or incomplete."""
        return self.revenue - self.cost_usd if self.comparable and not self.unpriced else None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view (Decimals as strings)."""
        margin = self.margin_usd
        return {
            "customer_id": self.customer_id,
            "plan": self.plan,
            "feature": self.feature,
            "model": self.model,
            "requests": self.requests,
            "units": self.units,
            "revenue": str(self.revenue),
            "revenue_currency": self.currency,
            "revenue_usd": str(self.revenue) if self.comparable else None,
            "revenue_net": str(self.revenue_net),
            "net_margin_usd": None if margin is None else str(self.revenue_net - self.cost_usd),
            "cost_usd": str(self.cost_usd),
            "margin_usd": None if margin is None else str(margin),
            "note": self.note,
            "unpriced": self.unpriced,
        }


def _price(funding: Funding | None, minor: int, paid_units: int, currency: str) -> tuple[Decimal, Decimal, str]:
    """(revenue per billed credit, the same after fees and refunds, in settlement major units; note)."""
    if funding is not None and funding.total_units > 0:
        per_credit = to_major(funding.paid_value_minor, currency) / funding.total_units
        net_per_credit = to_major(funding.paid_net_minor, currency) / funding.total_units
        notes = []
        if funding.free_units:
            notes.append(f"{format_credits(funding.free_units)} free credits used (no revenue)")
        if funding.unknown_units:
            notes.append(
                f"{format_credits(funding.unknown_units)} credits paid in "
                f"{', '.join(sorted(funding.unknown_currencies)).upper()} have no known {currency.upper()} "
                "settlement yet (run reconcile): left out of revenue"
            )
        if funding.fee_unknown_units:
            notes.append(
                f"net revenue may be high: Stripe's fee or what a refund or dispute took back is not known yet for "
                f"{format_credits(funding.fee_unknown_units)} credits (no balance transaction seen: run reconcile)"
            )
        return per_credit, net_per_credit, "; ".join(notes)
    # Nothing drawn from grants in the window: the customer's average price of what they bought (gross).
    if paid_units:
        average = to_major(minor, currency) / paid_units
        return average, average, "fees not known for credits bought outside the window"
    return Decimal(0), Decimal(0), "no paid credits"


def account_plans(session: Session, account_ids: Iterable[int], config: BillingConfig) -> dict[int, str]:
    """Each account's plan: the plan (config name, else its price) of its best subscription by status."""
    ids = sorted(set(account_ids))
    best: dict[int, tuple[int, str]] = {}
    for start in range(0, len(ids), 1000):
        stmt = select(Subscription.account_id, Subscription.status, Subscription.price).where(
            Subscription.account_id.in_(ids[start : start + 1000]), Subscription.price.is_not(None)
        )
        for account_id, status, price in session.execute(stmt.order_by(Subscription.subscription_id)):
            rank = SUBSCRIPTION_RANK.get(str(status), len(SUBSCRIPTION_RANK))
            if account_id not in best or rank < best[account_id][0]:
                plan = config.plan_for_price(price)
                best[account_id] = (rank, (plan.name or plan.price) if plan is not None else str(price))
    return {account_id: name for account_id, (_, name) in best.items()}


@dataclass
class PlanMargin:
    """Margin rows of the customers on one plan, summed."""

    plan: str | None
    currency: str
    customers: set[str]
    units: int = 0
    revenue: Decimal = Decimal(0)
    revenue_net: Decimal = Decimal(0)
    cost_usd: Decimal = Decimal(0)
    comparable: bool = True

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view (Decimals as strings)."""
        return {
            "plan": self.plan,
            "customers": len(self.customers),
            "units": self.units,
            "revenue": str(self.revenue),
            "revenue_net": str(self.revenue_net),
            "revenue_currency": self.currency,
            "cost_usd": str(self.cost_usd),
            "margin_usd": str(self.revenue - self.cost_usd) if self.comparable else None,
            "net_margin_usd": str(self.revenue_net - self.cost_usd) if self.comparable else None,
        }


def margin_by_plan(rows: Iterable[MarginRow]) -> list[PlanMargin]:
    """The rows summed per plan (customers without a subscription under None), in plan order."""
    out: dict[str | None, PlanMargin] = {}
    for r in rows:
        m = out.setdefault(r.plan, PlanMargin(plan=r.plan, currency=r.currency, customers=set()))
        m.customers.add(r.customer_id)
        m.units += r.units
        m.revenue += r.revenue
        m.revenue_net += r.revenue_net
        m.cost_usd += r.cost_usd
        m.comparable = m.comparable and r.comparable and not r.unpriced
    return sorted(out.values(), key=lambda m: (m.plan is None, m.plan or ""))


def margin_rows(
    session: Session,
    *,
    since: datetime,
    until: datetime,
    customer_id: str | None = None,
    config: BillingConfig | None = None,
) -> Iterator[MarginRow]:
    """Margin per customer, feature and model for [since, until), streamed in customer order."""
    config = config or get_billing_config()
    currency = config.reconciliation.settlement_currency
    account_id: int | None = None
    if customer_id is not None:
        account_id = session.scalar(select(Account.id).where(Account.customer_id == customer_id))
        if account_id is None:
            return
    W = usage_in_window(session, since, until, account_id=account_id)
    billed = and_(W.c.billable.is_(True), W.c.environment == UsageEnvironment.PRODUCTION)
    paid = paid_grants(currency)
    stmt = (
        select(
            Account.customer_id,
            W.c.account_id,
            W.c.feature,
            W.c.model,
            func.sum(W.c.requests),
            func.sum(case((billed, W.c.units), else_=0)),
            func.sum(W.c.provider_cost_usd),
            func.max(paid.c.minor),
            func.max(paid.c.units),
        )
        .join(Account, Account.id == W.c.account_id)
        .outerjoin(paid, paid.c.account_id == W.c.account_id)
        .group_by(Account.customer_id, W.c.account_id, W.c.feature, W.c.model)
        .order_by(Account.customer_id, W.c.feature, W.c.model)
    )
    rows = list(session.execute(stmt))
    funding = consumption_funding(
        session, since=since, until=until, account_ids={r.account_id for r in rows}, config=config
    )
    plans = account_plans(session, {r.account_id for r in rows}, config)
    for customer, account, feature, model, n, units, cost, minor, paid_units in rows:
        units = int(units or 0)
        per_credit, net_per_credit, note = _price(funding.get(account), int(minor or 0), int(paid_units or 0), currency)
        if currency != "usd":
            note = "; ".join(x for x in (note, f"revenue in {currency.upper()}, costs in USD: no rate to compare") if x)
        yield MarginRow(
            customer_id=customer,
            feature=feature,
            model=model,
            requests=int(n),
            units=units,
            revenue=(Decimal(units) * per_credit).quantize(TEN_DIGITS),
            revenue_net=(Decimal(units) * net_per_credit).quantize(TEN_DIGITS),
            currency=currency,
            cost_usd=Decimal(cost or 0),
            note=note,
            unpriced=bool(funding.get(account) and funding[account].unknown_units),
            plan=plans.get(account),
        )
