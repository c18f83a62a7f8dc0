"""Entitlements and the pre-flight check (/v1): what the product asks before an AI call.

``GET /v1/customers/{id}/entitlements`` answers in one call: access state, balance, plans and their periods, each
limit with used / remaining / reset time, and what the plans allow. ``POST /v1/check`` answers whether one call
would be allowed now and why not, consuming nothing. Thin handlers: parse, one unit of work, one ledger call.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from ledger.db import unit_of_work
from ledger.entitlements import check_call, overview
from ledger.errors import LimitExceeded
from ledger.limits import LimitStatus, customer_plans
from ledger.models import AccessState
from ledger.outbox import set_low_balance_threshold
from ledger.pricing import UsageInput
from webhooks.api import ERRORS, CustomerId, Name, Units, UsageFields, require_token

router = APIRouter(prefix="/v1", tags=["entitlements"], dependencies=[Depends(require_token)])

Amount = Annotated[int | str, Field(description="An integer, or a decimal string for USD")]


def _amount(value: int | Decimal) -> int | str:
    return format(value.normalize(), "f") if isinstance(value, Decimal) else int(value)


class LimitOut(BaseModel):
    name: str
    scope: str
    scope_value: str
    window: str
    measure: str
    used: Amount
    maximum: Amount
    remaining: Amount
    window_start: datetime
    reset_at: datetime
    filters: dict[str, str]


def _limit(status: LimitStatus) -> LimitOut:
    return LimitOut(
        name=status.limit,
        scope=status.scope.value,
        scope_value=status.scope_value,
        window=status.window.value,
        measure=status.measure.value,
        used=_amount(status.used),
        maximum=_amount(status.maximum),
        remaining=_amount(status.remaining),
        window_start=status.window_start,
        reset_at=status.reset_at,
        filters=status.filters,
    )


class BalanceOut(BaseModel):
    balance: int
    available: int
    held: int
    debt: int
    overdraft_limit: int


class PlanOut(BaseModel):
    price: str
    name: str
    current_period_start: datetime | None
    current_period_end: datetime | None


class SuspensionOut(BaseModel):
    reason: str
    since: datetime
    review_item_id: int | None


class EntitlementsOut(BaseModel):
    operations: list[str] | None = Field(description="Allowed operations (globs); null: all")
    features: list[str] | None
    models: list[str] | None


class EntitlementsResponse(BaseModel):
    customer_id: str
    access_state: AccessState
    grace_until: datetime | None
    usage_allowed: bool
    suspended: SuspensionOut | None
    balance: BalanceOut
    subscriptions: list[PlanOut]
    limits: list[LimitOut]
    entitlements: EntitlementsOut
    low_balance_threshold: int | None


@router.get(
    "/customers/{customer_id}/entitlements",
    response_model=EntitlementsResponse,
    responses=ERRORS,
    summary="Access, balance, subscriptions, limits (used / remaining / reset) and entitlements in one call",
)
def get_entitlements(
    customer_id: CustomerId,
    user_id: Annotated[Name | None, Query(description="Show per-user limits for this user")] = None,
    workspace: Annotated[Name | None, Query(description="Show per-workspace limits for this workspace")] = None,
) -> EntitlementsResponse:
    with unit_of_work() as session:
        view = overview(session, customer_id, now=datetime.now(UTC), user_id=user_id, workspace=workspace)
    b = view.balance
    return EntitlementsResponse(
        customer_id=b.customer_id,
        access_state=b.access_state,
        grace_until=b.grace_until,
        usage_allowed=view.usage_allowed,
        suspended=SuspensionOut(**view.suspended) if view.suspended else None,
        balance=BalanceOut(
            balance=b.balance, available=b.available, held=b.held, debt=b.debt, overdraft_limit=b.overdraft_limit
        ),
        subscriptions=[PlanOut(**vars(p)) for p in view.plans],
        limits=[_limit(s) for s in view.limits],
        entitlements=EntitlementsOut(**view.entitlements),
        low_balance_threshold=view.low_balance_threshold,
    )


class CheckRequest(UsageFields):
    """A call the product is about to make: would it be allowed now?"""

    customer_id: Name
    units: Units | None = Field(default=None, description="Estimated credits; omitted: priced from the usage")


class CheckResponse(BaseModel):
    allowed: bool
    code: str | None = Field(description="Why not: the error code the call would get (limit_exceeded, ...)")
    reason: str | None
    units: int
    limit: str | None = None
    reset_at: datetime | None = None
    used: Amount | None = None
    maximum: Amount | None = None
    limits: list[LimitOut]


@router.post("/check", response_model=CheckResponse, responses=ERRORS, summary="Would this call be allowed now?")
def post_check(body: CheckRequest) -> CheckResponse:
    usage = body.usage_input()
    with unit_of_work() as session:
        verdict, units = check_call(
            session, body.customer_id, usage or UsageInput(), units=body.units, now=datetime.now(UTC)
        )
    extra: dict[str, Any] = {}
    if isinstance(verdict.error, LimitExceeded):
        error = verdict.error
        extra = {
            "limit": error.limit,
            "reset_at": error.reset_at,
            "used": _amount(error.used),
            "maximum": _amount(error.maximum),
        }
    return CheckResponse(
        allowed=verdict.allowed,
        code=verdict.code,
        reason=verdict.reason,
        units=units,
        limits=[_limit(s) for s in verdict.limits],
        **extra,
    )


class ThresholdRequest(BaseModel):
    """A customer's own low-balance threshold in units; null goes back to the plan's."""

    units: Annotated[int, Field(strict=True, ge=0, le=10**15)] | None


class ThresholdResponse(BaseModel):
    customer_id: str
    low_balance_threshold: int | None = Field(description="The threshold in force (the customer's, else the plan's)")


@router.put(
    "/customers/{customer_id}/low-balance-threshold",
    response_model=ThresholdResponse,
    responses=ERRORS,
    summary="Set a customer's low-balance threshold (balance.low fires when the balance falls below it)",
)
def put_threshold(customer_id: CustomerId, body: ThresholdRequest) -> ThresholdResponse:
    with unit_of_work() as session:
        plans = customer_plans(session, customer_id, datetime.now(UTC)).plans
        effective = set_low_balance_threshold(session, customer_id, body.units, plans=plans)
    return ThresholdResponse(customer_id=customer_id, low_balance_threshold=effective)
