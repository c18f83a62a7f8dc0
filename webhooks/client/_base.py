"""What the sync and async clients share: the requests of each endpoint, parsing answers, and the retry policy."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from tenacity import RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from webhooks.client.errors import BillingUnavailable, error_from_body
from webhooks.client.models import (
    Balance,
    BatchResult,
    Capture,
    Charge,
    CheckResult,
    Entitlements,
    EntriesPage,
    Hold,
    Threshold,
    UsageEvent,
    UsageFields,
    UsageReport,
    usage_body,
)

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0
DEFAULT_RETRIES = 5
# A server's Retry-After is honoured up to this many seconds; longer, we back off as usual.
MAX_RETRY_AFTER = 10.0


class TransientError(Exception):
    """An answer worth retrying with the same idempotency key: no connection, overload (429) or a 5xx."""

    def __init__(self, message: str, *, status: int = 0, retry_after: float | None = None, body: Any = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.body = body


@dataclass(frozen=True)
class Request(Generic[T]):
    """One call of the API: what to send and how to read a success."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: Any = None
    params: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, when.timestamp() - time.time()) if when else None


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def check(response: httpx.Response) -> httpx.Response:
    """Return a success; raise TransientError for what a retry may cure, the API's error otherwise."""
    status = response.status_code
    if status < 400:
        return response
    body = _body(response)
    error = error_from_body(status, body)
    # A 429 is overload unless the API says a usage limit is reached (that answer will not change on retry).
    if status >= 500 or (status == 429 and error.code != "limit_exceeded"):
        raise TransientError(f"HTTP {status}: {error.message}", status=status, retry_after=_retry_after(response))
    raise error


def is_transient(exc: BaseException) -> bool:
    """Whether a retry with the same idempotency key may succeed (a write retried is charged once)."""
    return isinstance(exc, TransientError | httpx.TransportError)


def retry_policy(retries: int) -> dict[str, Any]:
    """tenacity's arguments: ``retries`` more attempts after the first, exponential backoff with jitter."""
    backoff = wait_exponential_jitter(multiplier=0.05, max=2.0, jitter=0.05)

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None and retry_after <= MAX_RETRY_AFTER:
            return float(retry_after)
        return float(backoff(state))

    return {
        "stop": stop_after_attempt(retries + 1),
        "wait": wait,
        "retry": retry_if_exception(is_transient),
        "reraise": True,
    }


def unavailable(exc: BaseException, request: Request[Any]) -> BillingUnavailable:
    """The error raised when every attempt failed transiently."""
    status = getattr(exc, "status", 0)
    return BillingUnavailable(f"{request.method} {request.path}: no answer after retries ({exc})", status=status)


def _replayed(response: httpx.Response) -> dict[str, Any]:
    data = response.json()
    data["replayed"] = response.headers.get("idempotent-replayed") == "true"
    return data


def _charge(response: httpx.Response) -> Charge:
    return Charge.model_validate(_replayed(response))


def _hold(response: httpx.Response) -> Hold:
    return Hold.model_validate(_replayed(response))


def _capture(response: httpx.Response) -> Capture:
    return Capture.model_validate(_replayed(response))


def _batch(response: httpx.Response) -> list[BatchResult]:
    results = []
    for item in response.json()["results"]:
        status, body = int(item["status"]), item["body"]
        if status < 400:
            results.append(BatchResult(status, charge=Charge.model_validate({**body, "replayed": status == 200})))
        else:
            results.append(BatchResult(status, error=error_from_body(status, body)))
    return results


def _segment(value: str) -> str:
    return quote(value, safe="")


class Requests:
    """Builds the request of every endpoint; Billing and AsyncBilling send them."""

    @staticmethod
    def record_usage(
        customer_id: str, request_id: str, *, units: int | None, reason: str, usage: UsageFields
    ) -> Request[Charge]:
        body = usage_body({"customer_id": customer_id, "request_id": request_id, "units": units, **usage})
        if reason:
            body["reason"] = reason
        return Request("POST", "/v1/usage", _charge, json=body)

    @staticmethod
    def record_usage_batch(events: Sequence[UsageEvent]) -> Request[list[BatchResult]]:
        if not events:
            raise ValueError("a batch needs at least one event")
        bodies = []
        for event in events:
            if not event.get("request_id"):
                raise ValueError("every event of a batch needs its own request_id")
            bodies.append(usage_body(dict(event)))
        return Request("POST", "/v1/usage/batch", _batch, json={"events": bodies})

    @staticmethod
    def place_hold(
        customer_id: str, request_id: str, *, units: int | None, ttl_seconds: int, usage: UsageFields
    ) -> Request[Hold]:
        body = usage_body(
            {"customer_id": customer_id, "request_id": request_id, "units": units, "ttl_seconds": ttl_seconds, **usage}
        )
        return Request("POST", "/v1/holds", _hold, json=body)

    @staticmethod
    def capture_hold(hold_id: str, *, units: int | None, note: str, usage: UsageFields) -> Request[Capture]:
        body = usage_body({"units": units, **usage})
        if note:
            body["note"] = note
        return Request("POST", f"/v1/holds/{_segment(hold_id)}/capture", _capture, json=body)

    @staticmethod
    def release_hold(
        hold_id: str,
        *,
        reason: str | None,
        provider: str | None,
        model: str | None,
        provider_request_id: str | None,
    ) -> Request[Hold]:
        body = usage_body(
            {"reason": reason, "provider": provider, "model": model, "provider_request_id": provider_request_id}
        )
        return Request("POST", f"/v1/holds/{_segment(hold_id)}/release", _hold, json=body or None)

    @staticmethod
    def balance(customer_id: str) -> Request[Balance]:
        return Request(
            "GET", f"/v1/customers/{_segment(customer_id)}/balance", lambda r: Balance.model_validate(r.json())
        )

    @staticmethod
    def entries(customer_id: str, *, limit: int, before: int | None) -> Request[EntriesPage]:
        params: dict[str, Any] = {"limit": limit}
        if before is not None:
            params["before"] = before
        return Request(
            "GET",
            f"/v1/customers/{_segment(customer_id)}/entries",
            lambda r: EntriesPage.model_validate(r.json()),
            params=params,
        )

    @staticmethod
    def usage_report(
        customer_id: str, *, group_by: str, since: datetime | None, until: datetime | None
    ) -> Request[UsageReport]:
        params: dict[str, Any] = {"group_by": group_by}
        if since is not None:
            params["since"] = since.isoformat()
        if until is not None:
            params["until"] = until.isoformat()
        return Request(
            "GET",
            f"/v1/customers/{_segment(customer_id)}/usage",
            lambda r: UsageReport.model_validate(r.json()),
            params=params,
        )

    @staticmethod
    def entitlements(customer_id: str, *, user_id: str | None, workspace: str | None) -> Request[Entitlements]:
        params = {k: v for k, v in (("user_id", user_id), ("workspace", workspace)) if v is not None}
        return Request(
            "GET",
            f"/v1/customers/{_segment(customer_id)}/entitlements",
            lambda r: Entitlements.model_validate(r.json()),
            params=params,
        )

    @staticmethod
    def check(customer_id: str, *, units: int | None, usage: UsageFields) -> Request[CheckResult]:
        body = usage_body({"customer_id": customer_id, "units": units, **usage})
        return Request("POST", "/v1/check", lambda r: CheckResult.model_validate(r.json()), json=body)

    @staticmethod
    def set_low_balance_threshold(customer_id: str, units: int | None) -> Request[Threshold]:
        return Request(
            "PUT",
            f"/v1/customers/{_segment(customer_id)}/low-balance-threshold",
            lambda r: Threshold.model_validate(r.json()),
            json={"units": units},
        )


# Every /v1 operation of the API and the client method that calls it (a test holds this to /openapi.json).
ENDPOINTS: dict[tuple[str, str], str] = {
    ("post", "/v1/usage"): "record_usage",
    ("post", "/v1/usage/batch"): "record_usage_batch",
    ("post", "/v1/holds"): "place_hold",
    ("post", "/v1/holds/{hold_id}/capture"): "capture_hold",
    ("post", "/v1/holds/{hold_id}/release"): "release_hold",
    ("get", "/v1/customers/{customer_id}/balance"): "balance",
    ("get", "/v1/customers/{customer_id}/entries"): "entries",
    ("get", "/v1/customers/{customer_id}/usage"): "usage_report",
    ("get", "/v1/customers/{customer_id}/entitlements"): "entitlements",
    ("post", "/v1/check"): "check",
    ("put", "/v1/customers/{customer_id}/low-balance-threshold"): "set_low_balance_threshold",
}


def headers(token: str) -> dict[str, str]:
    """The headers of every request."""
    return {"Authorization": f"Bearer {token}", "User-Agent": "billing-reconciler-client/0.1"}
