"""Margin per customer, feature and model for a window: what the credits used were sold for, against what the
provider charged for the calls.

Revenue is in the Stripe account's settlement currency (``reconciliation.settlement_currency``): a credit is worth
what its own grant was paid, converted by the charge's balance transaction when paid in another currency (see
:mod:`reconciliation.funding`). Free credits (promotions, trials, $0 invoices) bring no revenue. Credits paid in
another currency whose settlement is not known yet are left out of revenue and named in ``note``, never counted
as zero. Only billed production usage counts as revenue, every call counts as cost (USD). Usage is read from the
daily roll-up for whole days (see :mod:`reconciliation.usage`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session

from ledger.config import BillingConfig, get_billing_config
from ledger.models import Account, UsageEnvironment
from ledger.money import format_credits, to_major
from reconciliation.funding import Funding, consumption_funding, paid_grants
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
                f"Stripe's fee or refunds not known yet for {format_credits(funding.fee_unknown_units)} credits "
                "(counted at gross)"
            )
        return per_credit, net_per_credit, "; ".join(notes)
    # Nothing drawn from grants in the window: the customer's average price of what they bought (gross).
    if paid_units:
        average = to_major(minor, currency) / paid_units
        return average, average, "fees not known for credits bought outside the window"
    return Decimal(0), Decimal(0), "no paid credits"


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
        )
