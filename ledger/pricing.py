"""Usage and its price in credits, from the billing config."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from decimal import ROUND_CEILING, Decimal

from ledger.config import BillingConfig
from ledger.errors import InvalidRequest
from ledger.models import UsageEnvironment

MILLION = Decimal(1_000_000)


@dataclass(frozen=True)
class UsageInput:
    """What an AI call did, for pricing and attribution.

    ``input_tokens`` are the uncached input tokens; ``cached_tokens`` the input tokens read from the provider's
    cache (Anthropic reports them apart; for OpenAI subtract ``cached_tokens`` from ``prompt_tokens``).
    """

    user_id: str | None = None
    workspace: str | None = None
    feature: str | None = None
    provider: str | None = None
    model: str | None = None
    operation: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    provider_cost_usd: Decimal | None = None
    billable: bool = True
    environment: UsageEnvironment = UsageEnvironment.PRODUCTION
    occurred_at: datetime | None = None

    def validate(self) -> None:
        """Refuse negative token counts, float money and unknown environments."""
        for name in ("input_tokens", "output_tokens", "cached_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidRequest(f"usage.{name} must be an integer >= 0")
        if self.provider_cost_usd is not None and (
            not isinstance(self.provider_cost_usd, Decimal) or self.provider_cost_usd < 0
        ):
            raise InvalidRequest("usage.provider_cost_usd must be a Decimal >= 0 (never a float)")
        try:
            UsageEnvironment(self.environment)
        except ValueError as exc:
            raise InvalidRequest(f"usage.environment {self.environment!r} is unknown") from exc

    @property
    def charges(self) -> bool:
        """Whether this usage costs credits at all (test and internal usage, or non-billable, do not)."""
        return self.billable and UsageEnvironment(self.environment) is UsageEnvironment.PRODUCTION

    def as_dict(self) -> dict[str, object]:
        """The fields by name, in declaration order: ``dataclasses.asdict`` without its deep copy (every field is
        a plain value), which cost ~25 µs of a consumption's ~30 µs of pricing."""
        return {name: getattr(self, name) for name in _USAGE_FIELDS}


_USAGE_FIELDS = tuple(field.name for field in fields(UsageInput))


def list_price(usage: UsageInput, config: BillingConfig) -> int:
    """The credits the usage would cost in production: an operation's flat price, else its model's token price."""
    if usage.operation is not None:
        if usage.operation in config.operations:
            return config.operations[usage.operation]
        if usage.model is None:
            raise InvalidRequest(f"operation {usage.operation!r} has no price in the billing config")
    if usage.model is None:
        raise InvalidRequest("usage needs an operation or a model to be priced (or give units)")
    price = config.model_price(usage.model, usage.provider)
    if price is None:
        raise InvalidRequest(f"model {usage.model!r} has no price in the billing config")
    credits = (
        usage.input_tokens * price.credits_per_million_input
        + usage.output_tokens * price.credits_per_million_output
        + usage.cached_tokens * price.credits_per_million_cached
    ) / MILLION
    # A fraction of a credit is still a credit charged: round up, exactly, in Decimal.
    return int(credits.to_integral_value(rounding=ROUND_CEILING))


def price_usage(usage: UsageInput, config: BillingConfig) -> int:
    """Credits to charge for ``usage``: 0 for test, internal or non-billable usage."""
    usage.validate()
    price = list_price(usage, config)
    return price if usage.charges else 0


def provider_cost(usage: UsageInput, config: BillingConfig) -> Decimal:
    """The provider's cost in USD: as reported, else estimated from the config's list prices (0 if unknown)."""
    if usage.provider_cost_usd is not None:
        return usage.provider_cost_usd
    if usage.model is None:
        return Decimal(0)
    price = config.model_price(usage.model, usage.provider)
    if price is None:
        return Decimal(0)
    return (
        usage.input_tokens * price.cost_per_million_input_usd
        + usage.output_tokens * price.cost_per_million_output_usd
        + usage.cached_tokens * price.cost_per_million_cached_usd
    ) / MILLION
