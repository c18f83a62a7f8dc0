"""The one door to Stripe: a small gateway around ``stripe.StripeClient``.

Configured once from settings (the API base points at the local emulator in tests and the demo). Each single
call is retried by tenacity on 429, 5xx and connection errors; Celery owns task-level retries. Every write
carries an idempotency key derived from our own ids, so a retried write never happens twice at Stripe.
Methods return plain dicts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any, Protocol, TypeVar

import stripe
from tenacity import (
    RetryCallState,
    retry,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from ledger.config import ConfigError
from ledger.settings import STRIPE_LIVE_API_BASE, get_settings

T = TypeVar("T")

# The object types retrieve() knows, and where each lives on the client.
_RETRIEVABLE = {
    "charge": ("charges",),
    "payment_intent": ("payment_intents",),
    "invoice": ("invoices",),
    "subscription": ("subscriptions",),
    "dispute": ("disputes",),
    "refund": ("refunds",),
    "customer": ("customers",),
    "checkout_session": ("checkout", "sessions"),
    "credit_note": ("credit_notes",),
    "event": ("events",),
    "payout": ("payouts",),
}

# Stripe keeps events retrievable through the Events API for 30 days.
EVENTS_RETENTION_DAYS = 30


STRIPE_KEY_MISSING = (
    "STRIPE_API_KEY is not set and this command reads from Stripe: set STRIPE_API_KEY to a restricted read key "
    "(README: Pointing it at a real Stripe account), or STRIPE_API_BASE to a local emulator"
)


class StripeKeyMissing(ConfigError):
    """No STRIPE_API_KEY while the gateway points at Stripe itself: nothing is sent."""


def is_transient_stripe_error(exc: BaseException) -> bool:
    """True for failures worth retrying: rate limits, Stripe's 5xx, and network errors."""
    if isinstance(exc, stripe.RateLimitError | stripe.APIConnectionError):
        return True
    if isinstance(exc, stripe.StripeError):
        status = exc.http_status
        return status is not None and (status == 429 or status >= 500)
    return False


class StripeReader(Protocol):
    """What event handlers need from Stripe (a fake or the emulator stands in for tests)."""

    def retrieve(self, object_type: str, object_id: str) -> dict[str, Any]: ...

    def retrieve_checkout_session_line_items(self, session_id: str) -> list[dict[str, Any]]: ...

    def list_checkout_sessions(
        self, *, created_gte: datetime | None = None, created_lt: datetime | None = None, **filters: Any
    ) -> Iterator[dict[str, Any]]: ...


def _before_sleep(state: RetryCallState) -> None:
    # Visible in the worker log: a retried Stripe call is a hint of rate limits or an outage.
    exc = state.outcome.exception() if state.outcome else None
    import structlog

    structlog.get_logger("reconciliation.gateway").warning(
        "stripe_call_retry", attempt=state.attempt_number, error=repr(exc)
    )


def _to_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, stripe.StripeObject):
        return obj.to_dict()
    return dict(obj)


def _created_filter(created_gte: datetime | None, created_lt: datetime | None) -> dict[str, int]:
    created: dict[str, int] = {}
    if created_gte is not None:
        created["gte"] = int(created_gte.timestamp())
    if created_lt is not None:
        created["lt"] = int(created_lt.timestamp())
    return created


class StripeGateway:
    """Stripe behind one small interface: retried reads and lists, idempotent writes, plain dicts out."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        api_base: str | None = None,
        max_attempts: int | None = None,
        wait_initial: float = 0.25,
        wait_max: float = 8.0,
        client: stripe.StripeClient | None = None,
    ) -> None:
        settings = get_settings()
        base = (api_base or settings.stripe_api_base).rstrip("/")
        self.api_base = base
        key = api_key or (settings.stripe_api_key.get_secret_value() if settings.stripe_api_key else None)
        # Without a key, Stripe itself is never called (every call raises StripeKeyMissing first); a local
        # server (the emulator, a test double) needs no real key.
        self._missing_key = key is None and client is None and base == STRIPE_LIVE_API_BASE
        # The SDK's own retries are off: tenacity owns them, so there is one policy and one log line per retry.
        self._client = client or stripe.StripeClient(
            key or "sk_test_local",
            base_addresses={"api": base, "files": base, "connect": base},
            max_network_retries=0,
        )
        attempts = max_attempts if max_attempts is not None else settings.stripe_max_retries + 1
        self._retrying = retry(
            retry=retry_if_exception(is_transient_stripe_error),
            stop=stop_after_attempt(max(1, attempts)),
            wait=wait_exponential_jitter(multiplier=wait_initial, max=wait_max, jitter=wait_initial),
            before_sleep=_before_sleep,
            reraise=True,
        )

    def _call(self, fn: Callable[[], T]) -> T:
        if self._missing_key:
            raise StripeKeyMissing(STRIPE_KEY_MISSING)
        return self._retrying(fn)()

    def require_key(self) -> None:
        """Raise StripeKeyMissing now (before any work) when calls would go to Stripe without a key."""
        if self._missing_key:
            raise StripeKeyMissing(STRIPE_KEY_MISSING)

    def _service(self, path: tuple[str, ...]) -> Any:
        service: Any = self._client.v1
        for part in path:
            service = getattr(service, part)
        return service

    # --- reads -------------------------------------------------------------------------------------------

    def retrieve(self, object_type: str, object_id: str) -> dict[str, Any]:
        """Fetch one object (charge, payment_intent, invoice, subscription, dispute, refund, customer...)."""
        try:
            path = _RETRIEVABLE[object_type]
        except KeyError:
            raise ValueError(f"cannot retrieve Stripe objects of type {object_type!r}") from None
        service = self._service(path)
        return _to_dict(self._call(lambda: service.retrieve(object_id)))

    def retrieve_checkout_session_line_items(self, session_id: str) -> list[dict[str, Any]]:
        """Every line item of a Checkout Session (price ids and quantities)."""
        service = self._client.v1.checkout.sessions.line_items
        items: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 100}
        while True:
            page = self._call(lambda p=dict(params): service.list(session_id, p))  # type: ignore[misc]
            data = [_to_dict(item) for item in page.data]
            items.extend(data)
            if not page.has_more or not data:
                return items
            params["starting_after"] = data[-1]["id"]

    # --- lazy, auto-paged lists --------------------------------------------------------------------------

    def _iterate(self, path: tuple[str, ...], params: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        # Paged by hand rather than with auto_paging_iter(), so that each page fetch is retried on its own.
        service = self._service(path)
        query: dict[str, Any] = {"limit": 100, **{k: v for k, v in params.items() if v is not None}}
        while True:
            page = self._call(lambda q=dict(query): service.list(q))  # type: ignore[misc]
            data = [_to_dict(item) for item in page.data]
            yield from data
            if not page.has_more or not data:
                return
            query["starting_after"] = data[-1]["id"]

    def _list(
        self,
        path: tuple[str, ...],
        created_gte: datetime | None,
        created_lt: datetime | None,
        filters: Mapping[str, Any],
    ) -> Iterator[dict[str, Any]]:
        created = _created_filter(created_gte, created_lt)
        params = dict(filters)
        if created:
            params["created"] = created
        return self._iterate(path, params)

    def list_events(
        self, *, created_gte: datetime | None = None, created_lt: datetime | None = None, **filters: Any
    ) -> Iterator[dict[str, Any]]:
        """Events, newest first, as Stripe's Events API returns them (30 days of history at most)."""
        return self._list(("events",), created_gte, created_lt, filters)

    def list_charges(
        self, *, created_gte: datetime | None = None, created_lt: datetime | None = None, **filters: Any
    ) -> Iterator[dict[str, Any]]:
        """Charges created in the window."""
        return self._list(("charges",), created_gte, created_lt, filters)

    def list_refunds(
        self, *, created_gte: datetime | None = None, created_lt: datetime | None = None, **filters: Any
    ) -> Iterator[dict[str, Any]]:
        """Refunds created in the window."""
        return self._list(("refunds",), created_gte, created_lt, filters)

    def list_invoices(
        self, *, created_gte: datetime | None = None, created_lt: datetime | None = None, **filters: Any
    ) -> Iterator[dict[str, Any]]:
        """Invoices created in the window."""
        return self._list(("invoices",), created_gte, created_lt, filters)

    def list_disputes(
        self, *, created_gte: datetime | None = None, created_lt: datetime | None = None, **filters: Any
    ) -> Iterator[dict[str, Any]]:
        """Disputes created in the window."""
        return self._list(("disputes",), created_gte, created_lt, filters)

    def list_subscriptions(
        self, *, created_gte: datetime | None = None, created_lt: datetime | None = None, **filters: Any
    ) -> Iterator[dict[str, Any]]:
        """Subscriptions created in the window (pass status="all" to include canceled ones)."""
        return self._list(("subscriptions",), created_gte, created_lt, filters)

    def list_checkout_sessions(
        self, *, created_gte: datetime | None = None, created_lt: datetime | None = None, **filters: Any
    ) -> Iterator[dict[str, Any]]:
        """Checkout Sessions created in the window (filter by payment_intent=... to find a payment's session)."""
        return self._list(("checkout", "sessions"), created_gte, created_lt, filters)

    def list_credit_notes(
        self, *, created_gte: datetime | None = None, created_lt: datetime | None = None, **filters: Any
    ) -> Iterator[dict[str, Any]]:
        """Credit notes created in the window."""
        return self._list(("credit_notes",), created_gte, created_lt, filters)

    def list_payouts(
        self, *, created_gte: datetime | None = None, created_lt: datetime | None = None, **filters: Any
    ) -> Iterator[dict[str, Any]]:
        """Payouts created in the window."""
        return self._list(("payouts",), created_gte, created_lt, filters)

    def list_balance_transactions(self, **filters: Any) -> Iterator[dict[str, Any]]:
        """Balance transactions (``payout=po_...``: the ones a payout paid out)."""
        return self._list(("balance_transactions",), None, None, filters)

    # --- writes ------------------------------------------------------------------------------------------

    def create_refund(
        self, *, payment_intent: str, amount: int | None, idempotency_key: str, reason: str | None = None
    ) -> dict[str, Any]:
        """Refund a payment (all of it when amount is None); the key comes from our ids, so a retry is one refund."""
        params: dict[str, Any] = {"payment_intent": payment_intent}
        if amount is not None:
            params["amount"] = amount
        if reason:
            params["reason"] = reason
        service: Any = self._client.v1.refunds
        return _to_dict(self._call(lambda: service.create(params, {"idempotency_key": idempotency_key})))


@lru_cache(maxsize=1)
def get_gateway() -> StripeGateway:
    """The process-wide gateway, configured from settings on first use."""
    return StripeGateway()
