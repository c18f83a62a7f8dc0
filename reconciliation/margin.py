"""Margin per customer, feature and model for a window: what the credits used were sold for, against what the
provider charged for the calls.

Revenue prices each credit at what the customer paid for their credits (the sum of paid grants' money over
their units, in USD); only billed production usage counts as revenue, every call counts as cost. Usage is read
from the daily roll-up for whole days (see :mod:`reconciliation.usage`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session

from ledger.models import Account, Grant, GrantSource, UsageEnvironment
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
    revenue_usd: Decimal
    cost_usd: Decimal

    @property
    def margin_usd(self) -> Decimal:
        """Revenue minus provider cost."""
        return self.revenue_usd - self.cost_usd

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view (Decimals as strings)."""
        return {
            "customer_id": self.customer_id,
            "feature": self.feature,
            "model": self.model,
            "requests": self.requests,
            "units": self.units,
            "revenue_usd": str(self.revenue_usd),
            "cost_usd": str(self.cost_usd),
            "margin_usd": str(self.margin_usd),
        }


def margin_rows(
    session: Session, *, since: datetime, until: datetime, customer_id: str | None = None
) -> Iterator[MarginRow]:
    """Margin per customer, feature and model for [since, until), streamed in customer order."""
    account_id: int | None = None
    if customer_id is not None:
        account_id = session.scalar(select(Account.id).where(Account.customer_id == customer_id))
        if account_id is None:
            return
    W = usage_in_window(session, since, until, account_id=account_id)
    billed = and_(W.c.billable.is_(True), W.c.environment == UsageEnvironment.PRODUCTION)
    paid = (
        select(
            Grant.account_id.label("account_id"),
            func.sum(Grant.amount_minor).label("minor"),
            func.sum(Grant.units).label("units"),
        )
        .where(
            Grant.source.in_((GrantSource.TOP_UP, GrantSource.RENEWAL)),
            Grant.amount_minor.is_not(None),
            func.lower(Grant.currency) == "usd",
        )
        .group_by(Grant.account_id)
        .subquery()
    )
    stmt = (
        select(
            Account.customer_id,
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
        .group_by(Account.customer_id, W.c.feature, W.c.model)
        .order_by(Account.customer_id, W.c.feature, W.c.model)
        .execution_options(yield_per=1000)
    )
    for customer, feature, model, n, units, cost, minor, paid_units in session.execute(stmt):
        units = int(units or 0)
        revenue = Decimal(0)
        if paid_units:
            revenue = (Decimal(units) * Decimal(int(minor or 0)) / Decimal(int(paid_units)) / 100).quantize(TEN_DIGITS)
        yield MarginRow(
            customer_id=customer,
            feature=feature,
            model=model,
            requests=int(n),
            units=units,
            revenue_usd=revenue,
            cost_usd=Decimal(cost or 0),
        )
