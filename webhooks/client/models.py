"""Typed results of the usage API, and the usage fields a request may carry.

The models mirror the server's response schemas (named in ``openapi_schema``; a test compares them with
``/openapi.json`` so the two cannot drift). They ignore fields they do not know, so a newer server does not break
an older client. Money is ``Decimal`` (sent and received as decimal strings), units are integers; open sets of
values (a hold's status, an access state, an entry's kind) are plain strings so that a new value is not an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from webhooks.client.errors import BillingError


class Result(BaseModel):
    """A response body of the usage API."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    # The server's schema this model mirrors, and fields only the client has (from headers, not the body).
    openapi_schema: ClassVar[str] = ""
    client_only: ClassVar[frozenset[str]] = frozenset()


class Funding(Result):
    """Units of one grant that paid for a charge."""

    openapi_schema = "Funding"
    grant_id: int
    units: int


class Charge(Result):
    """A recorded usage and what it charged (``replayed``: the request id was seen before; nothing new charged)."""

    openapi_schema = "ConsumeResponse"
    client_only = frozenset({"replayed"})
    request_id: str
    customer_id: str
    units: int
    balance_after: int
    entry_id: int | None
    usage_id: int | None
    funded_by: list[Funding]
    replayed: bool = False


class Hold(Result):
    """Credits held for a call in progress (status ``open``, then ``captured``, ``released`` or ``expired``)."""

    openapi_schema = "HoldResponse"
    client_only = frozenset({"replayed"})
    request_id: str
    customer_id: str
    units: int
    status: str
    expires_at: datetime
    balance_after: int
    replayed: bool = False


class Capture(Result):
    """A captured hold: ``captured`` charged, ``released`` given back, ``shortfall`` asked beyond the balance."""

    openapi_schema = "CaptureResponse"
    client_only = frozenset({"replayed"})
    request_id: str
    customer_id: str
    held: int
    captured: int
    released: int
    shortfall: int
    balance_after: int
    replayed: bool = False


class Grant(Result):
    """A grant of credits and what is left of it."""

    openapi_schema = "GrantOut"
    grant_id: int
    source: str
    units: int
    remaining: int
    frozen: int
    clawed_back: int
    priority: int
    expires_at: datetime | None
    stripe_object_id: str | None


class Subscription(Result):
    """One Stripe subscription of the customer, as the ledger follows it."""

    openapi_schema = "SubscriptionOut"
    subscription_id: str
    status: str | None
    price: str | None
    plan: str | None
    quantity: int
    current_period_start: datetime | None
    current_period_end: datetime | None
    cancel_at_period_end: bool
    cancel_at: datetime | None
    pause_collection: str | None
    trial_end: datetime | None
    access_state: str
    grace_until: datetime | None


class Balance(Result):
    """A customer's balance, holds, debt, access state and grants."""

    openapi_schema = "BalanceResponse"
    customer_id: str
    external_id: str | None
    balance: int
    held: int
    debt: int
    overdraft_limit: int
    available: int
    access_state: str
    grace_until: datetime | None
    usage_allowed: bool
    grants: list[Grant]
    subscriptions: list[Subscription] = []


class Entry(Result):
    """One ledger entry (append-only)."""

    openapi_schema = "EntryOut"
    id: int
    kind: str
    units: int
    balance_after: int
    debt_delta: int
    frozen_delta: int
    grant_id: int | None
    hold_id: int | None
    usage_id: int | None
    stripe_object_id: str | None
    actor: str
    reason: str
    created_at: datetime


class EntriesPage(Result):
    """A page of entries, newest first; pass ``next_cursor`` as ``before`` for the next one."""

    openapi_schema = "EntriesPage"
    data: list[Entry]
    has_more: bool
    next_cursor: int | None


class UsageRow(Result):
    """Usage of one group (day, feature, model or user)."""

    openapi_schema = "UsageRowOut"
    key: str
    requests: int
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    credits: int
    provider_cost_usd: Decimal
    margin: Decimal | None


class UsageReport(Result):
    """A customer's usage grouped by day, feature, model or user."""

    openapi_schema = "UsageReport"
    customer_id: str
    group_by: str
    since: datetime | None
    until: datetime | None
    rows: list[UsageRow]


class Limit(Result):
    """A usage limit as it stands for the customer (or one user or workspace) in its current window."""

    openapi_schema = "LimitOut"
    name: str
    scope: str
    scope_value: str
    window: str
    measure: str
    # Counts are integers; a cost limit's figures are decimal strings of USD (never floats).
    used: int | str
    maximum: int | str
    remaining: int | str
    window_start: datetime
    reset_at: datetime
    filters: dict[str, str]


class Spendable(Result):
    """The balance figures of an entitlements answer."""

    openapi_schema = "BalanceOut"
    balance: int
    available: int
    held: int
    debt: int
    overdraft_limit: int


class PlanPeriod(Result):
    """A plan the customer is on, and its current period."""

    openapi_schema = "PlanOut"
    price: str
    name: str
    current_period_start: datetime | None
    current_period_end: datetime | None


class Suspension(Result):
    """Usage suspended (a usage spike on a plan that suspends), until a reviewer lifts it."""

    openapi_schema = "SuspensionOut"
    reason: str
    since: datetime
    review_item_id: int | None


class Allowed(Result):
    """What the customer's plans allow: operations, features and models (None: everything)."""

    openapi_schema = "EntitlementsOut"
    operations: list[str] | None
    features: list[str] | None
    models: list[str] | None


class Entitlements(Result):
    """What the product needs before a call: access, balance, plans, limits and entitlements."""

    openapi_schema = "EntitlementsResponse"
    customer_id: str
    access_state: str
    grace_until: datetime | None
    usage_allowed: bool
    suspended: Suspension | None
    balance: Spendable
    subscriptions: list[PlanPeriod]
    limits: list[Limit]
    entitlements: Allowed
    low_balance_threshold: int | None


class CheckResult(Result):
    """Whether a call would be allowed now, and why not (the error code it would get)."""

    openapi_schema = "CheckResponse"
    allowed: bool
    code: str | None
    reason: str | None
    units: int
    limit: str | None = None
    reset_at: datetime | None = None
    used: int | str | None = None
    maximum: int | str | None = None
    limits: list[Limit]


class Threshold(Result):
    """A customer's low-balance threshold in force."""

    openapi_schema = "ThresholdResponse"
    customer_id: str
    low_balance_threshold: int | None


RESULT_MODELS: tuple[type[Result], ...] = (
    Funding,
    Charge,
    Hold,
    Capture,
    Grant,
    Balance,
    Entry,
    EntriesPage,
    UsageRow,
    UsageReport,
    Subscription,
    Limit,
    Spendable,
    PlanPeriod,
    Suspension,
    Allowed,
    Entitlements,
    CheckResult,
    Threshold,
)


@dataclass(frozen=True)
class BatchResult:
    """One event's outcome in a batch: its status and either the charge or the error it would have raised."""

    status: int
    charge: Charge | None = None
    error: BillingError | None = None

    @property
    def ok(self) -> bool:
        """Whether the event was charged (201) or was a replay of an earlier charge (200)."""
        return self.error is None


class UsageFields(TypedDict, total=False):
    """What an AI call did: attribution, tokens and cost (``cost_usd`` a Decimal, never a float).

    ``input_tokens`` are the uncached input tokens; ``cached_tokens`` those read from the provider's cache.
    """

    user_id: str
    workspace: str
    feature: str
    provider: str
    model: str
    operation: str
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    cost_usd: Decimal
    billable: bool
    environment: str
    occurred_at: datetime


class UsageEvent(UsageFields, total=False):
    """One event of a batch: a customer, its own request id, and units or usage fields."""

    customer_id: str
    request_id: str
    units: int
    reason: str


# The wire names of the usage fields (the client says cost_usd; the API says provider_cost_usd).
WIRE_NAMES = {"cost_usd": "provider_cost_usd"}


def usage_body(fields: dict[str, Any]) -> dict[str, Any]:
    """The API's JSON fields for usage fields: money as a decimal string, times in ISO 8601; None left out."""
    body: dict[str, Any] = {}
    for name, value in fields.items():
        if value is None:
            continue
        if isinstance(value, float):
            raise TypeError(f"{name}: give money as a Decimal or a decimal string, never a float")
        if isinstance(value, Decimal):
            value = str(value)
        elif isinstance(value, datetime):
            value = value.isoformat()
        body[WIRE_NAMES.get(name, name)] = value
    return body
