"""The billing config file: credit packs, plans, operation and model prices.

Read once at start-up from the TOML file named by ``BILLING_CONFIG`` (or the shipped example) and validated;
a bad file raises :class:`ConfigError` naming the field.
"""

from __future__ import annotations

import tomllib
from decimal import Decimal
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ledger.settings import get_settings

EXAMPLE_CONFIG_PATH = Path(__file__).with_name("billing.example.toml")

NonNegativeDecimal = Annotated[Decimal, Field(ge=0)]


class ConfigError(Exception):
    """The billing config file is missing or invalid; the message names the file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CreditPack(_Strict):
    """A one-off top-up: paying this Stripe price grants ``credits``."""

    price: str = Field(min_length=1, description="Stripe price id (price_...) or lookup key")
    credits: int = Field(gt=0)
    priority: int = 0
    expires_after_days: int | None = Field(default=None, gt=0)


class PeriodEnd(StrEnum):
    EXPIRE = "expire"
    ROLLOVER = "rollover"


class Interval(StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    YEAR = "year"


class OnSpike(StrEnum):
    REPORT = "report"
    SUSPEND = "suspend"


class Plan(_Strict):
    """A subscription price: each paid period grants ``credits_per_period``.

    Entitlements: ``allow_operations``, ``allow_features`` and ``allow_models`` list what the plan may use
    (exact names or globs such as ``"gpt-4o*"``); a list left out allows everything. Low balance: a
    ``balance.low`` notification when the balance falls below ``low_balance_units``, or below
    ``low_balance_share`` of the customer's last grant. ``on_spike = "suspend"`` stops usage on a usage spike
    until a reviewer resolves it.
    """

    price: str = Field(min_length=1)
    name: str = ""
    credits_per_period: int = Field(gt=0)
    period_end: PeriodEnd = PeriodEnd.EXPIRE
    priority: int = 10
    # The price's billing interval, as Stripe bills it: a proration's fraction of the period needs the period's
    # length, and not every invoice shape carries the price's recurring interval.
    interval: Interval = Interval.MONTH
    interval_count: int = Field(default=1, gt=0)
    # Credits granted once per subscription when it starts with a trial (none when 0).
    trial_credits: int = Field(default=0, ge=0)
    allow_operations: tuple[str, ...] | None = None
    allow_features: tuple[str, ...] | None = None
    allow_models: tuple[str, ...] | None = None
    low_balance_units: int | None = Field(default=None, ge=0)
    low_balance_share: Decimal | None = Field(default=None, gt=0, lt=1)
    on_spike: OnSpike = OnSpike.REPORT
    # Provider cost (USD) each free credit of this plan (trial, $0 invoice) may run up before reconciliation
    # flags it; unset: the [reconciliation] default.
    free_credit_allowance_usd: NonNegativeDecimal | None = None

    @model_validator(mode="after")
    def _one_threshold(self) -> Plan:
        if self.low_balance_units is not None and self.low_balance_share is not None:
            raise ValueError("set at most one of low_balance_units and low_balance_share")
        return self


class OnUpgrade(StrEnum):
    PRORATE = "prorate"
    FULL = "full"
    NEXT_PERIOD = "next_period"


class OnDowngrade(StrEnum):
    NEXT_PERIOD = "next_period"
    PRORATE = "prorate"


class PlanChanges(_Strict):
    """What a change of plan or quantity in the middle of a period does to the period's credits."""

    on_upgrade: OnUpgrade = OnUpgrade.PRORATE
    on_downgrade: OnDowngrade = OnDowngrade.NEXT_PERIOD


class ModelPrice(_Strict):
    """Credits charged per million tokens, and the provider's cost per million (USD) for margin."""

    provider: str = Field(min_length=1)
    model: str = Field(min_length=1)
    credits_per_million_input: NonNegativeDecimal
    credits_per_million_output: NonNegativeDecimal
    credits_per_million_cached: NonNegativeDecimal = Decimal(0)
    cost_per_million_input_usd: NonNegativeDecimal = Decimal(0)
    cost_per_million_output_usd: NonNegativeDecimal = Decimal(0)
    cost_per_million_cached_usd: NonNegativeDecimal = Decimal(0)


class Credits(_Strict):
    """How money becomes credits when no pack matches."""

    fallback_credits_per_minor_unit: NonNegativeDecimal = Decimal(1)
    topup_priority: int = 0
    # Whether a succeeded charge made without a PaymentIntent (the older Charges API) buys credits at the
    # fallback rate. Either way reconciliation sees it: without a grant it is a payment_without_grant.
    grant_charges_without_payment_intent: bool = True


# The access policy's keys: each access state, and past_due once its grace deadline has passed.
ACCESS_POLICY_KEYS = ("active", "trialing", "past_due", "past_due_after_grace", "suspended", "canceled")
GRANT_SOURCES = ("top_up", "renewal", "plan_change", "trial", "promotion", "adjustment")
PAID_SIDE_SOURCES = ["top_up", "promotion", "adjustment"]


def _default_spend() -> dict[str, list[str]]:
    # What was paid for is never taken away: a canceled customer (or one past the grace deadline) keeps spending
    # top-ups, promotions and adjustments, not plan credits; an unpaid (suspended) one spends nothing.
    return {
        "active": ["all"],
        "trialing": ["all"],
        "past_due": ["all"],
        "past_due_after_grace": list(PAID_SIDE_SOURCES),
        "suspended": [],
        "canceled": list(PAID_SIDE_SOURCES),
    }


class Access(_Strict):
    grace_days: int = Field(default=7, ge=0)
    # Per access state: which grant sources consumption and holds may draw ("all", or grant sources).
    spend: dict[str, list[str]] = Field(default_factory=_default_spend)

    @model_validator(mode="after")
    def _known_keys(self) -> Access:
        for key, sources in self.spend.items():
            if key not in ACCESS_POLICY_KEYS:
                raise ValueError(f"spend.{key}: not an access state (one of {', '.join(ACCESS_POLICY_KEYS)})")
            unknown = sorted(set(sources) - {"all", *GRANT_SOURCES})
            if unknown:
                raise ValueError(f"spend.{key}: unknown grant sources {unknown} (all, {', '.join(GRANT_SOURCES)})")
        return self

    def sources_for(self, key: str) -> frozenset[str] | None:
        """The grant sources an access-policy key may spend: None for all of them."""
        sources = self.spend.get(key, _default_spend()[key])
        return None if "all" in sources else frozenset(sources)


class Tolerance(_Strict):
    """Drift below both bounds is noise, not a mismatch."""

    absolute_usd: NonNegativeDecimal = Decimal("0.01")
    relative: NonNegativeDecimal = Decimal("0.01")
    absolute_tokens: int = Field(default=0, ge=0)


class Reconciliation(_Strict):
    unprocessed_event_hours: int = Field(default=1, ge=0)
    provider_tolerance: Tolerance = Tolerance()
    # The Stripe account's settlement currency: margin counts revenue in it (from each charge's balance
    # transaction) against provider costs in USD. https://docs.stripe.com/currencies/conversions
    settlement_currency: str = Field(default="usd", pattern=r"^[a-z]{3}$")
    # Provider cost (USD) a free credit (promotion, adjustment, trial or $0 invoice) may run up before it is
    # flagged as free_credit_cost; a plan may set its own. 0.01: a free credit may cost what a credit sells for
    # at the example config's one credit per cent.
    free_credit_allowance_usd: NonNegativeDecimal = Decimal("0.01")


class LimitScope(StrEnum):
    CUSTOMER = "customer"
    USER = "user"
    WORKSPACE = "workspace"


class LimitWindow(StrEnum):
    HOUR = "hour"
    DAY = "day"
    MONTH = "month"
    BILLING_PERIOD = "billing_period"


class LimitMeasure(StrEnum):
    """What a limit counts: requests, credit units, tokens (input + output + cached) or provider cost in USD."""

    REQUESTS = "requests"
    UNITS = "units"
    TOKENS = "tokens"
    COST_USD = "cost_usd"


class Limit(_Strict):
    """A usage limit: at most ``max_*`` per ``scope`` value per ``window``, for matching usage of some plans."""

    name: str = Field(min_length=1, max_length=100)
    plans: tuple[str, ...] | None = None
    scope: LimitScope = LimitScope.CUSTOMER
    operation: str | None = Field(default=None, min_length=1)
    feature: str | None = Field(default=None, min_length=1)
    provider: str | None = Field(default=None, min_length=1)
    model: str | None = Field(default=None, min_length=1)
    window: LimitWindow
    # Counters are BIGINTs (a cost in 10^-10 USD): a maximum must fit one.
    max_requests: int | None = Field(default=None, ge=0, le=2**63 - 1)
    max_units: int | None = Field(default=None, ge=0, le=2**63 - 1)
    max_tokens: int | None = Field(default=None, ge=0, le=2**63 - 1)
    max_cost_usd: Decimal | None = Field(default=None, ge=0, le=Decimal(900_000_000))

    @field_validator("max_cost_usd", mode="before")
    @classmethod
    def _cost_is_a_string(cls, value: object) -> object:
        # A TOML float (0.1) is already inexact; only a quoted decimal or an integer is a money amount.
        if isinstance(value, float):
            raise ValueError('must be a quoted decimal string such as "12.50", not a float')
        return value

    @model_validator(mode="after")
    def _exactly_one_maximum(self) -> Limit:
        given = [m for m in ("max_requests", "max_units", "max_tokens", "max_cost_usd") if getattr(self, m) is not None]
        if len(given) != 1:
            raise ValueError(
                "exactly one of max_requests, max_units, max_tokens, max_cost_usd is required"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self

    @property
    def measure(self) -> LimitMeasure:
        """What this limit counts."""
        if self.max_requests is not None:
            return LimitMeasure.REQUESTS
        if self.max_units is not None:
            return LimitMeasure.UNITS
        if self.max_tokens is not None:
            return LimitMeasure.TOKENS
        return LimitMeasure.COST_USD

    @property
    def maximum(self) -> int | Decimal:
        """The limit's maximum, in its measure."""
        for value in (self.max_requests, self.max_units, self.max_tokens, self.max_cost_usd):
            if value is not None:
                return value
        raise AssertionError("validated: one maximum is set")


class NotificationEndpoint(_Strict):
    """Where outbound notifications go: a URL, the event types it wants ("*" for all), the secret's env var."""

    url: str = Field(pattern=r"^https?://[^\s]+$")
    events: tuple[str, ...] = ("*",)
    secret_env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    description: str = ""


class Notifications(_Strict):
    endpoints: list[NotificationEndpoint] = []


class Spikes(_Strict):
    """Usage spike detection: the last hour against the same hour of the week over ``baseline_days``."""

    baseline_days: int = Field(default=14, ge=7)
    # A spike is above median + threshold_mads x MAD (MAD floored at mad_floor_share of the median), and at
    # least min_ratio x the median, and at least the minimum volume (so tiny accounts do not flap).
    threshold_mads: Decimal = Field(default=Decimal(6), gt=0)
    min_ratio: Decimal = Field(default=Decimal(3), ge=1)
    mad_floor_share: Decimal = Field(default=Decimal("0.1"), ge=0)
    min_units: int = Field(default=500, ge=0)
    min_cost_usd: Decimal = Field(default=Decimal(5), ge=0)
    # After a spike, the same customer or user is not reported again for this long (one burst, one item).
    quiet_hours: int = Field(default=6, ge=1)


class BillingConfig(_Strict):
    """The whole billing config file."""

    credits: Credits = Credits()
    packs: list[CreditPack] = []
    plans: list[Plan] = []
    operations: dict[str, int] = {}
    models: list[ModelPrice] = []
    plan_changes: PlanChanges = PlanChanges()
    access: Access = Access()
    reconciliation: Reconciliation = Reconciliation()
    limits: list[Limit] = []
    notifications: Notifications = Notifications()
    spikes: Spikes = Spikes()

    @model_validator(mode="after")
    def _unique_keys(self) -> BillingConfig:
        for label, keys in (
            ("packs.price", [p.price for p in self.packs]),
            ("plans.price", [p.price for p in self.plans]),
            ("models", [f"{m.provider}/{m.model}" for m in self.models]),
            ("limits.name", [limit.name for limit in self.limits]),
        ):
            dupes = sorted({k for k in keys if keys.count(k) > 1})
            if dupes:
                raise ValueError(f"{label}: duplicate entries {dupes}")
        for op, units in self.operations.items():
            if units < 0:
                raise ValueError(f"operations.{op}: must be >= 0")
        prices = {p.price for p in self.plans}
        for i, limit in enumerate(self.limits):
            unknown = sorted(set(limit.plans or ()) - prices)
            if unknown:
                raise ValueError(f"limits.{i}.plans: {unknown} are not plans of this config ([[plans]] price)")
        return self

    def pack_for_price(self, price: str | None) -> CreditPack | None:
        """The credit pack sold under a Stripe price id or lookup key."""
        return next((p for p in self.packs if price is not None and p.price == price), None)

    def plan_for_price(self, price: str | None) -> Plan | None:
        """The plan sold under a Stripe price id or lookup key."""
        return next((p for p in self.plans if price is not None and p.price == price), None)

    def plan_named_by(self, reason: str | None) -> Plan | None:
        """The plan a renewal grant's reason starts with (the worker writes "<plan name or price> ...")."""
        text = reason or ""
        return next((p for p in self.plans if text.startswith(f"{p.name or p.price} ")), None)

    def free_credit_allowance(self, plan: Plan | None) -> Decimal:
        """Provider cost in USD one free credit of this plan (or of no plan) may run up."""
        if plan is not None and plan.free_credit_allowance_usd is not None:
            return plan.free_credit_allowance_usd
        return self.reconciliation.free_credit_allowance_usd

    def model_price(self, model: str, provider: str | None = None) -> ModelPrice | None:
        """Prices for a model, matched by name (and provider when given)."""
        for m in self.models:
            if m.model == model and (provider is None or m.provider == provider):
                return m
        return None


def load_billing_config(path: Path | None = None) -> BillingConfig:
    """Read and validate a billing config file; raise ConfigError naming the file and field."""
    path = path or get_settings().billing_config or EXAMPLE_CONFIG_PATH
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"billing config {path}: file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"billing config {path}: not valid TOML: {exc}") from exc
    try:
        return BillingConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"billing config {path}: {problems}") from exc


@lru_cache(maxsize=1)
def get_billing_config() -> BillingConfig:
    """The process-wide billing config, loaded on first use."""
    return load_billing_config()
