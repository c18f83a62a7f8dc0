"""What a product needs to know before an AI call, in one read: access, balance, plans, limits, entitlements;
and whether one given call would be allowed now (and why not), without consuming anything."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ledger.config import BillingConfig, get_billing_config
from ledger.errors import InsufficientCredits, InvalidRequest
from ledger.limits import (
    CheckResult,
    LimitStatus,
    active_suspension,
    check_request,
    customer_plans,
    entitlements,
    limit_request,
    limit_usage,
)
from ledger.models import BalanceThreshold
from ledger.posting import ACCOUNTS
from ledger.pricing import UsageInput, list_price
from ledger.queries import BalanceSummary, balance_summary


@dataclass(frozen=True)
class PlanPeriod:
    price: str
    name: str
    current_period_start: datetime | None
    current_period_end: datetime | None


@dataclass(frozen=True)
class Overview:
    """A customer's entitlements now (``GET /v1/customers/{id}/entitlements``)."""

    balance: BalanceSummary
    usage_allowed: bool
    suspended: dict[str, Any] | None
    plans: list[PlanPeriod]
    limits: list[LimitStatus]
    entitlements: dict[str, list[str] | None]
    low_balance_threshold: int | None


def overview(
    session: Session,
    customer_id: str,
    *,
    now: datetime,
    user_id: str | None = None,
    workspace: str | None = None,
    config: BillingConfig | None = None,
) -> Overview:
    """Access state, balance, plans and their periods, each limit's used/remaining/reset, the entitlements."""
    config = config or get_billing_config()
    balance = balance_summary(session, customer_id)
    plans = customer_plans(session, customer_id, now, config=config)
    suspension = active_suspension(session, customer_id)
    suspended = (
        {"reason": suspension.reason, "since": suspension.created_at, "review_item_id": suspension.review_item_id}
        if suspension is not None
        else None
    )
    periods = []
    for price in plans.plans:
        plan = config.plan_for_price(price)
        start, end = plans.period if plans.period is not None and price == plans.plans[0] else (None, None)
        periods.append(PlanPeriod(price, plan.name if plan else "", start, end))
    threshold = session.execute(
        select(BalanceThreshold.effective_units)
        .join(ACCOUNTS, ACCOUNTS.c.id == BalanceThreshold.account_id)
        .where(ACCOUNTS.c.customer_id == customer_id)
    ).scalar_one_or_none()
    return Overview(
        balance=balance,
        usage_allowed=balance.usage_allowed and suspended is None,
        suspended=suspended,
        plans=periods,
        limits=limit_usage(
            session, customer_id, now=now, user_id=user_id, workspace=workspace, plans=plans, config=config
        ),
        entitlements=entitlements(config, plans.plans),
        low_balance_threshold=threshold,
    )


def check_call(
    session: Session,
    customer_id: str,
    usage: UsageInput,
    *,
    units: int | None,
    now: datetime,
    config: BillingConfig | None = None,
) -> tuple[CheckResult, int]:
    """Would this call be allowed now? Access state, suspension, entitlements, every applicable limit and the
    balance, in the order consumption checks them. Reads only. Returns the verdict and the units it assumed
    (given, else priced from the usage as consumption would, else 0)."""
    config = config or get_billing_config()
    usage.validate()
    balance = balance_summary(session, customer_id)  # UnknownCustomer for an unknown customer
    if units is None:
        try:
            units = list_price(usage, config) if usage.charges else 0
        except InvalidRequest:
            units = 0  # nothing to price from: only the request itself counts
    request = limit_request(usage, units=units, config=config)
    verdict = check_request(session, customer_id, request, now=now, config=config)
    if not balance.usage_allowed:
        reason = f"{customer_id}: access state {balance.access_state.value!r} does not allow usage"
        return CheckResult(False, "access_refused", reason, verdict.limits), units
    if not verdict.allowed:
        return verdict, units
    if units > balance.available:
        exc = InsufficientCredits(customer_id, units, balance.available)
        return CheckResult(False, exc.code, str(exc), verdict.limits, exc), units
    return verdict, units
