"""What reconciliation needs from Stripe, as a small Protocol.

``reconciliation.gateway.StripeGateway`` satisfies it; tests may pass the same gateway pointed at the local
emulator. Lists are lazy iterators of plain dicts, paged by the source, so nothing here holds a whole window in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any, Protocol


class StripeSource(Protocol):
    """Stripe's read side: retrieve one object, and iterate lists filtered by ``created`` (gte, lt)."""

    def retrieve(self, object_type: str, object_id: str) -> dict[str, Any]: ...

    def retrieve_checkout_session_line_items(self, session_id: str) -> list[dict[str, Any]]: ...

    def list_events(
        self, *, created_gte: datetime | None = None, created_lt: datetime | None = None, **filters: Any
    ) -> Iterator[dict[str, Any]]: ...

    def list_charges(
        self, *, created_gte: datetime | None = None, created_lt: datetime | None = None, **filters: Any
    ) -> Iterator[dict[str, Any]]: ...

    def list_refunds(
        self, *, created_gte: datetime | None = None, created_lt: datetime | None = None, **filters: Any
    ) -> Iterator[dict[str, Any]]: ...

    def list_invoices(
        self, *, created_gte: datetime | None = None, created_lt: datetime | None = None, **filters: Any
    ) -> Iterator[dict[str, Any]]: ...

    def list_disputes(
        self, *, created_gte: datetime | None = None, created_lt: datetime | None = None, **filters: Any
    ) -> Iterator[dict[str, Any]]: ...

    def list_subscriptions(
        self, *, created_gte: datetime | None = None, created_lt: datetime | None = None, **filters: Any
    ) -> Iterator[dict[str, Any]]: ...

    def list_checkout_sessions(
        self, *, created_gte: datetime | None = None, created_lt: datetime | None = None, **filters: Any
    ) -> Iterator[dict[str, Any]]: ...

    def list_payouts(
        self, *, created_gte: datetime | None = None, created_lt: datetime | None = None, **filters: Any
    ) -> Iterator[dict[str, Any]]: ...

    def list_balance_transactions(self, **filters: Any) -> Iterator[dict[str, Any]]: ...


# Stripe id prefixes -> the object type ``retrieve`` takes.
OBJECT_TYPE_BY_PREFIX = {
    "cs_": "checkout_session",
    "pi_": "payment_intent",
    "ch_": "charge",
    "py_": "charge",
    "in_": "invoice",
    "re_": "refund",
    "dp_": "dispute",
    "du_": "dispute",
    "sub_": "subscription",
    "po_": "payout",
}


def object_type_of(stripe_id: str) -> str | None:
    """The Stripe object type an id names, from its prefix; None when the prefix is unknown."""
    for prefix, object_type in OBJECT_TYPE_BY_PREFIX.items():
        if stripe_id.startswith(prefix):
            return object_type
    return None


def is_not_found(exc: BaseException) -> bool:
    """True when a Stripe call failed because the object does not exist (HTTP 404 / resource_missing)."""
    status = getattr(exc, "http_status", None)
    code = getattr(exc, "code", None)
    return status == 404 or code == "resource_missing"


def stripe_id(value: Any) -> str | None:
    """The id of an expandable field: a plain id, an expanded object's ``id``, or None."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        found = value.get("id")
        return found if isinstance(found, str) else None
    return None


def is_source_error(exc: BaseException) -> bool:
    """True when a Stripe call failed for a reason of Stripe's side or access (a missing permission, 404, 5xx
    after the gateway's retries, the network), as opposed to a bug or a database error."""
    import stripe  # the client library the gateway uses; imported here so the Protocol stays free of it

    return isinstance(exc, stripe.StripeError)


def describe_source_error(exc: BaseException) -> str:
    """One line naming what Stripe answered."""
    status = getattr(exc, "http_status", None)
    message = str(getattr(exc, "user_message", None) or exc).splitlines()[0] if str(exc) else ""
    where = f" (HTTP {status})" if status else ""
    return f"{type(exc).__name__}{where}: {message}"[:500]
