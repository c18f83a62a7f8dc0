"""``billing.metered(...)``: hold credits before an AI call, capture what it used after, release if it failed.

    with billing.metered("cus_123", user_id="u_42", feature="chat", estimate_units=500) as call:
        answer = provider_call()
        call.record(provider="openai", model="gpt-4o-2024-08-06", input_tokens=1200, output_tokens=350)

On entry a hold is placed under the call's request id; on exit the hold is captured with what was recorded (an
exception raised after ``record`` still captures it: the provider served the call), or released when nothing was
recorded (an exception before any output). A capture is retried with the same key, so it charges once; a hold
that expired before its capture is charged directly under the same request id. If the process dies in between,
the hold's time-to-live (``ttl_seconds``) releases it: nothing is charged twice, and nothing stays reserved.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Any

from webhooks.client.errors import BillingError, HoldNotOpen, InvalidRequest, SettlementFailed
from webhooks.client.models import Capture, Charge, Hold, UsageFields

if TYPE_CHECKING:
    from webhooks.client.aio import AsyncBilling
    from webhooks.client.sync import Billing

log = logging.getLogger("webhooks.client")


class UnpricedModels:
    """Served model names the usage API could not price, remembered so that later calls skip the failing capture.

    OpenAI answers a request for ``gpt-4o`` as ``gpt-4o-2024-08-06``; a config that prices only the name requested
    refuses a capture under the served name, and the wrapper captures again under the requested one. Without
    memory that is a third round trip on every call. A name is remembered for ``ttl_seconds`` (a price added to
    the config meanwhile is used after that).
    """

    def __init__(self, ttl_seconds: float = 300.0) -> None:
        self.ttl_seconds = ttl_seconds
        self._until: dict[tuple[str | None, str], float] = {}

    def __contains__(self, key: tuple[str | None, str | None]) -> bool:
        provider, model = key
        if model is None:
            return False
        until = self._until.get((provider, model))
        return until is not None and until > time.monotonic()

    def add(self, provider: str | None, model: str | None) -> None:
        """Remember that ``model`` (as the provider served it) has no price."""
        if model is not None:
            self._until[(provider, model)] = time.monotonic() + self.ttl_seconds


def new_request_id() -> str:
    """A fresh idempotency key for one call."""
    return f"call_{uuid.uuid4().hex}"


@dataclass(frozen=True)
class ReleaseNote:
    """Why a hold is released, and the provider call it stood for."""

    reason: str
    provider: str | None = None
    model: str | None = None
    provider_request_id: str | None = None


@dataclass
class Call:
    """One metered call: its request id, its hold, what it recorded and how it was settled."""

    customer_id: str
    request_id: str
    user_id: str | None = None
    feature: str | None = None
    hold: Hold | None = None
    units: int | None = None
    usage: UsageFields = field(default_factory=lambda: UsageFields())
    note: str = ""
    recorded: bool = False
    release_note: ReleaseNote | None = None
    outcome: Capture | Charge | Hold | None = None
    # The model to price with if the recorded one (the provider's name for what served) has no configured price.
    fallback_model: str | None = None

    def record(
        self,
        *,
        provider: str | None = None,
        model: str | None = None,
        operation: str | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cached_tokens: int = 0,
        cost_usd: Decimal | str | None = None,
        units: int | None = None,
        note: str = "",
    ) -> None:
        """What the call used: tokens (priced by the model's configured prices) or ``units``; the cost in USD.

        ``input_tokens`` are the uncached ones, ``cached_tokens`` those read from the provider's cache. ``note``
        goes into the capture's ledger entry (e.g. that the units were estimated).
        """
        if units is None and model is None and operation is None:
            raise ValueError("record units, or a model (or operation) with its tokens, to price the call")
        if isinstance(cost_usd, float):
            raise TypeError("cost_usd: give a Decimal or a decimal string, never a float")
        usage: dict[str, Any] = {
            "provider": provider,
            "model": model,
            "operation": operation,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cached_tokens": cached_tokens,
            "cost_usd": Decimal(cost_usd) if cost_usd is not None else None,
        }
        self.usage = UsageFields(**{k: v for k, v in usage.items() if v is not None})  # type: ignore[typeddict-item]
        self.units = units
        self.note = note
        self.recorded = True

    def release_because(
        self,
        reason: str,
        *,
        provider: str | None = None,
        model: str | None = None,
        provider_request_id: str | None = None,
    ) -> None:
        """Say why the hold is to be released (kept on the hold, e.g. ``provider_timeout``), if nothing is recorded."""
        self.release_note = ReleaseNote(reason, provider, model, provider_request_id)

    def _attribution(self) -> UsageFields:
        fields = UsageFields()
        if self.user_id is not None:
            fields["user_id"] = self.user_id
        if self.feature is not None:
            fields["feature"] = self.feature
        return fields

    def _hold_args(self, estimate_units: int | None, estimate: UsageFields | None, ttl: int) -> dict[str, Any]:
        if estimate_units is None and not estimate:
            raise ValueError("give estimate_units, or an estimate of the usage to price the hold")
        return {
            "request_id": self.request_id,
            "units": estimate_units,
            "ttl_seconds": ttl,
            **self._attribution(),
            **(estimate or {}),
        }

    def _release_args(self, failed: bool) -> dict[str, Any]:
        note = self.release_note or ReleaseNote("provider_error" if failed else "nothing_recorded")
        return {
            "reason": note.reason,
            "provider": note.provider,
            "model": note.model,
            "provider_request_id": note.provider_request_id,
        }

    def _capture_args(self) -> dict[str, Any]:
        return {"units": self.units, "note": self.note, **self._attribution(), **self.usage}

    def _with_fallback_model(self) -> bool:
        """Price with the requested model from now on, if the served one differs; whether anything changed."""
        if self.fallback_model is None or self.usage.get("model") in (None, self.fallback_model):
            return False
        self.usage["model"] = self.fallback_model
        return True

    def _served_model(self) -> tuple[str | None, str | None]:
        return self.usage.get("provider"), self.usage.get("model")

    def _charge_args(self) -> dict[str, Any]:
        # A hold that expired before its capture: the same charge, straight, under the same request id.
        return {
            "request_id": self.request_id,
            "units": self.units,
            "reason": self.note,
            **self._attribution(),
            **self.usage,
        }


def _settle_failed(call: Call, exc: BaseException, failed: bool) -> None:
    if failed:
        # The caller's own exception matters more; the hold's time-to-live releases it.
        log.error("metering: settling call %s failed: %r", call.request_id, exc)
        return
    raise SettlementFailed(
        f"call {call.request_id}: the charge could not be recorded ({exc})", request_id=call.request_id, cause=exc
    ) from exc


class Metered:
    """The context manager of ``Billing.metered``: hold on entry, capture or release on exit."""

    def __init__(
        self,
        billing: Billing,
        customer_id: str,
        *,
        user_id: str | None,
        feature: str | None,
        estimate_units: int | None,
        estimate: UsageFields | None,
        ttl_seconds: int,
        request_id: str | None,
    ) -> None:
        self.billing = billing
        self.call = Call(customer_id, request_id or new_request_id(), user_id, feature)
        self._hold_args = self.call._hold_args(estimate_units, estimate, ttl_seconds)

    def __enter__(self) -> Call:
        self.call.hold = self.billing.place_hold(self.call.customer_id, **self._hold_args)
        return self.call

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.settle(failed=exc is not None)

    def settle(self, *, failed: bool) -> None:
        """Capture what was recorded, or release; raise SettlementFailed if a served call could not be charged."""
        call = self.call
        if not call.recorded:
            try:
                call.outcome = self.billing.release_hold(call.request_id, **call._release_args(failed))
            except BillingError as exc:
                log.warning("metering: releasing hold %s failed (its time-to-live will): %r", call.request_id, exc)
            return
        unpriced = self.billing.unpriced_models
        if call._served_model() in unpriced:
            call._with_fallback_model()  # known to be refused under the served name: no failing round trip
        try:
            try:
                try:
                    call.outcome = self.billing.capture_hold(call.request_id, **call._capture_args())
                except InvalidRequest:
                    served = call._served_model()
                    if not call._with_fallback_model():
                        raise
                    call.outcome = self.billing.capture_hold(call.request_id, **call._capture_args())
                    unpriced.add(*served)
            except HoldNotOpen:
                call.outcome = self.billing.record_usage(call.customer_id, **call._charge_args())
        except BillingError as exc:
            _settle_failed(call, exc, failed)


class AsyncMetered:
    """The async context manager of ``AsyncBilling.metered``: hold on entry, capture or release on exit."""

    def __init__(
        self,
        billing: AsyncBilling,
        customer_id: str,
        *,
        user_id: str | None,
        feature: str | None,
        estimate_units: int | None,
        estimate: UsageFields | None,
        ttl_seconds: int,
        request_id: str | None,
    ) -> None:
        self.billing = billing
        self.call = Call(customer_id, request_id or new_request_id(), user_id, feature)
        self._hold_args = self.call._hold_args(estimate_units, estimate, ttl_seconds)

    async def __aenter__(self) -> Call:
        self.call.hold = await self.billing.place_hold(self.call.customer_id, **self._hold_args)
        return self.call

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.settle(failed=exc is not None)

    async def settle(self, *, failed: bool) -> None:
        """Capture what was recorded, or release; raise SettlementFailed if a served call could not be charged."""
        call = self.call
        if not call.recorded:
            try:
                call.outcome = await self.billing.release_hold(call.request_id, **call._release_args(failed))
            except BillingError as exc:
                log.warning("metering: releasing hold %s failed (its time-to-live will): %r", call.request_id, exc)
            return
        unpriced = self.billing.unpriced_models
        if call._served_model() in unpriced:
            call._with_fallback_model()  # known to be refused under the served name: no failing round trip
        try:
            try:
                try:
                    call.outcome = await self.billing.capture_hold(call.request_id, **call._capture_args())
                except InvalidRequest:
                    served = call._served_model()
                    if not call._with_fallback_model():
                        raise
                    call.outcome = await self.billing.capture_hold(call.request_id, **call._capture_args())
                    unpriced.add(*served)
            except HoldNotOpen:
                call.outcome = await self.billing.record_usage(call.customer_id, **call._charge_args())
        except BillingError as exc:
            _settle_failed(call, exc, failed)
