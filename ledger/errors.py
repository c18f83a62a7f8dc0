"""Typed errors of the ledger. Each edge (CLI, HTTP) maps them to an exit code or status."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class LedgerError(Exception):
    """Base class: a request the ledger refused, with nothing written."""

    code = "ledger_error"


class UnknownCustomer(LedgerError):
    code = "unknown_customer"

    def __init__(self, customer_id: str) -> None:
        super().__init__(f"unknown customer {customer_id!r}")
        self.customer_id = customer_id


class UnknownHold(LedgerError):
    code = "unknown_hold"

    def __init__(self, request_id: str) -> None:
        super().__init__(f"unknown hold {request_id!r}")
        self.request_id = request_id


class InsufficientCredits(LedgerError):
    code = "insufficient_credits"

    def __init__(self, customer_id: str, requested: int, available: int) -> None:
        super().__init__(f"{customer_id}: {requested} units requested, {available} available")
        self.customer_id = customer_id
        self.requested = requested
        self.available = available


class AccessRefused(LedgerError):
    code = "access_refused"

    def __init__(self, customer_id: str, state: str, reason: str | None = None) -> None:
        super().__init__(
            f"{customer_id}: access state {state!r} does not allow usage" + (f": {reason}" if reason else "")
        )
        self.customer_id = customer_id
        self.state = state
        self.reason = reason


class IdempotencyConflict(LedgerError):
    """The idempotency key was used before with different parameters."""

    code = "idempotency_conflict"


class InvalidRequest(LedgerError):
    """The request is malformed (a negative amount, an unknown operation or model)."""

    code = "invalid_request"


class HoldNotOpen(LedgerError):
    """The hold was already captured, released or expired and cannot take this action."""

    code = "hold_not_open"


class LimitExceeded(LedgerError):
    """A usage limit of the billing config is reached for its window: nothing was consumed."""

    code = "limit_exceeded"

    def __init__(
        self, customer_id: str, limit: str, *, scope_value: str, used: Any, maximum: Any, requested: Any, reset_at: Any
    ) -> None:
        super().__init__(
            f"{customer_id}: limit {limit!r} reached for {scope_value} ({used} used of {maximum}, {requested} "
            f"requested); resets at {reset_at.isoformat()}"
        )
        self.customer_id = customer_id
        self.limit = limit
        self.scope_value = scope_value
        self.used = used
        self.maximum = maximum
        self.requested = requested
        self.reset_at = reset_at


class NotEntitled(LedgerError):
    """The customer's plan does not include this operation, feature or model."""

    code = "not_entitled"

    def __init__(self, customer_id: str, *, what: str, value: str, plans: Sequence[str]) -> None:
        on = f"plan {', '.join(plans)}" if plans else "no plan"
        super().__init__(f"{customer_id}: {what} {value!r} is not included in {on}")
        self.customer_id = customer_id
        self.what = what
        self.value = value
        self.plans = tuple(plans)
