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


class Plan(_Strict):
    """A subscription price: each paid period grants ``credits_per_period``."""

    price: str = Field(min_length=1)
    name: str = ""
    credits_per_period: int = Field(gt=0)
    period_end: PeriodEnd = PeriodEnd.EXPIRE
    priority: int = 10
    # Provider cost (USD) each free credit of this plan (trial, $0 invoice) may run up before reconciliation
    # flags it; unset: the [reconciliation] default.
    free_credit_allowance_usd: NonNegativeDecimal | None = None


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


class Access(_Strict):
    grace_days: int = Field(default=7, ge=0)


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


class BillingConfig(_Strict):
    """The whole billing config file."""

    credits: Credits = Credits()
    packs: list[CreditPack] = []
    plans: list[Plan] = []
    operations: dict[str, int] = {}
    models: list[ModelPrice] = []
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
