"""Typed errors of the ledger. Each edge (CLI, HTTP) maps them to an exit code or status."""

from __future__ import annotations


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
