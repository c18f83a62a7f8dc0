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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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


class Plan(_Strict):
    """A subscription price: each paid period grants ``credits_per_period``."""

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

    @model_validator(mode="after")
    def _unique_keys(self) -> BillingConfig:
        for label, keys in (
            ("packs.price", [p.price for p in self.packs]),
            ("plans.price", [p.price for p in self.plans]),
            ("models", [f"{m.provider}/{m.model}" for m in self.models]),
        ):
            dupes = sorted({k for k in keys if keys.count(k) > 1})
            if dupes:
                raise ValueError(f"{label}: duplicate entries {dupes}")
        for op, units in self.operations.items():
            if units < 0:
                raise ValueError(f"operations.{op}: must be >= 0")
        return self

    def pack_for_price(self, price: str | None) -> CreditPack | None:
        """The credit pack sold under a Stripe price id or lookup key."""
        return next((p for p in self.packs if price is not None and p.price == price), None)

    def plan_for_price(self, price: str | None) -> Plan | None:
        """The plan sold under a Stripe price id or lookup key."""
        return next((p for p in self.plans if price is not None and p.price == price), None)

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
