"""Errors of the usage API as exceptions, one per error ``code`` of its body ``{"error": {"code", "message", ...}}``."""

from __future__ import annotations

from typing import Any


class BillingError(Exception):
    """A request the usage API refused (or could not answer), with the error body's fields.

    ``code`` is the API's stable error code, ``status`` the HTTP status (0 when no answer came), ``details`` every
    other field of the error body (e.g. ``available`` and ``requested`` of ``insufficient_credits``).
    """

    code = "billing_error"

    def __init__(
        self, message: str, *, status: int = 0, code: str | None = None, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        if code is not None:
            self.code = code
        self.details: dict[str, Any] = dict(details or {})

    def __getattr__(self, name: str) -> Any:
        # The body's extra fields read as attributes: exc.available, exc.access_state.
        details = self.__dict__.get("details", {})
        if name in details:
            return details[name]
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, code={self.code!r}, message={self.message!r})"


class Unauthorized(BillingError):
    """No valid bearer token (401)."""

    code = "unauthorized"


class InsufficientCredits(BillingError):
    """Available credits do not cover the request (402); ``available`` and ``requested`` say by how much."""

    code = "insufficient_credits"


class AccessRefused(BillingError):
    """The customer's access state (``access_state``: suspended, canceled, past grace) refuses usage (403)."""

    code = "access_refused"


class NotEntitled(BillingError):
    """The customer's plan does not include the feature (403)."""

    code = "not_entitled"


class UnknownCustomer(BillingError):
    """No ledger account for this customer id (404)."""

    code = "unknown_customer"


class UnknownHold(BillingError):
    """No hold with this id (404)."""

    code = "unknown_hold"


class IdempotencyConflict(BillingError):
    """The request id was used before with a different body (409): nothing was written."""

    code = "idempotency_conflict"


class HoldNotOpen(BillingError):
    """The hold was already captured, released or expired (409)."""

    code = "hold_not_open"


class InvalidRequest(BillingError):
    """The body is invalid, or names a model or operation without a price in the billing config (422)."""

    code = "invalid_request"


class LimitExceeded(BillingError):
    """A usage limit of the customer is reached (429); not retried, unlike an overloaded server's 429."""

    code = "limit_exceeded"


class BillingUnavailable(BillingError):
    """No usable answer after every retry: connection errors, overload (429) or server errors (5xx)."""

    code = "billing_unavailable"


class SettlementFailed(BillingError):
    """The provider served a call, but charging it failed; ``response`` is the provider's answer, ``cause`` why.

    The hold stays open until its time-to-live releases it, so the customer is never charged twice; the call
    shows in reconciliation as provider usage without a charge.
    """

    code = "settlement_failed"

    def __init__(self, message: str, *, request_id: str, response: Any = None, cause: BaseException | None = None):
        super().__init__(message, status=getattr(cause, "status", 0))
        self.request_id = request_id
        self.response = response
        self.cause = cause


ERRORS_BY_CODE: dict[str, type[BillingError]] = {
    cls.code: cls
    for cls in (
        Unauthorized,
        InsufficientCredits,
        AccessRefused,
        NotEntitled,
        UnknownCustomer,
        UnknownHold,
        IdempotencyConflict,
        HoldNotOpen,
        InvalidRequest,
        LimitExceeded,
    )
}


def error_from_body(status: int, body: Any) -> BillingError:
    """The exception for an error answer: by the body's ``code``, else a plain BillingError with the status."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return BillingError(f"HTTP {status}", status=status, code=f"http_{status}")
    code = str(error.get("code", f"http_{status}"))
    message = str(error.get("message", f"HTTP {status}"))
    details = {k: v for k, v in error.items() if k not in ("code", "message")}
    cls = ERRORS_BY_CODE.get(code, BillingError)
    return cls(message, status=status, code=code, details=details)
