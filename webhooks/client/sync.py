"""``Billing``: the usage API over HTTP, synchronous."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Unpack

import httpx
from tenacity import Retrying

from webhooks.client import _wire
from webhooks.client._base import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    Request,
    Requests,
    TransientError,
    check,
    headers,
    retry_policy,
    unavailable,
)
from webhooks.client.metering import Metered, UnpricedModels
from webhooks.client.models import (
    Balance,
    BatchResult,
    Capture,
    Charge,
    CheckResult,
    Entitlements,
    EntriesPage,
    Entry,
    Hold,
    Threshold,
    UsageEvent,
    UsageFields,
    UsageReport,
)

if TYPE_CHECKING:
    from webhooks.client.wrappers import AbandonedStreamPolicy, SettleMode

T = TypeVar("T")
log = logging.getLogger("webhooks.client")
# Threads that settle metered calls in the background (settle="background"): captures are independent.
SETTLER_THREADS = 4


class Billing:
    """A client of the usage API: one method per endpoint, typed results, errors as exceptions.

    Writes are retried (connection errors, an overloaded server's 429, 5xx) with backoff, always with the same
    idempotency key, so a retried write is charged once. ``retries`` is the number of attempts after the first.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        http: httpx.Client | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self._retry_policy = retry_policy(retries)
        self._owns_http = http is None
        # Its own connections: the lean keep-alive pool (webhooks.client._wire), where it does what httpx would.
        self._wire = (
            _wire.Wire(self.base_url, headers(token), timeout=timeout)
            if http is None and _wire.suits(self.base_url)
            else None
        )
        self._http = http or httpx.Client(
            base_url=self.base_url,
            headers=headers(token),
            timeout=timeout,
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=100),
        )
        if http is not None:
            self._http.headers.update(headers(token))
        self._settler: ThreadPoolExecutor | None = None
        self._pending: set[Future[None]] = set()
        # Served model names the API could not price (a capture then goes under the requested name at once).
        self.unpriced_models = UnpricedModels()

    def __enter__(self) -> Billing:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Finish settling calls in the background, then close the connection pool (when this client made it)."""
        self.flush()
        if self._settler is not None:
            self._settler.shutdown()
        if self._wire is not None:
            self._wire.close()
        if self._owns_http:
            self._http.close()

    def settle_later(self, settle: Callable[[], None]) -> None:
        """Run ``settle`` off the caller's path (a metered call's capture); its failure is logged."""
        if self._settler is None:
            # Not daemon threads: at interpreter exit, pending settlements still finish.
            self._settler = ThreadPoolExecutor(SETTLER_THREADS, thread_name_prefix="billing-settle")

        def run() -> None:
            try:
                settle()
            except Exception:
                log.exception("metering: settling a call in the background failed (its hold's time-to-live will)")

        future = self._settler.submit(run)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    def flush(self) -> None:
        """Wait until every call settling in the background is settled."""
        while self._pending:
            wait(list(self._pending))

    def send(self, request: Request[T]) -> T:
        """Send one request, retrying what is transient; return its parsed result or raise its error."""
        try:
            for attempt in Retrying(**self._retry_policy):
                with attempt:
                    if self._wire is not None:
                        response = self._wire.request(
                            request.method,
                            request.path,
                            json_body=request.json,
                            params=request.params,
                            headers=request.headers,
                        )
                    else:
                        response = self._http.request(
                            request.method,
                            request.path,
                            json=request.json,
                            params=request.params,
                            headers=request.headers,
                        )
                    return request.parse(check(response))
        except (TransientError, httpx.TransportError) as exc:
            raise unavailable(exc, request) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # --- writes ----------------------------------------------------------------------------------------------

    def record_usage(
        self,
        customer_id: str,
        *,
        request_id: str,
        units: int | None = None,
        reason: str = "",
        **usage: Unpack[UsageFields],
    ) -> Charge:
        """Charge a customer for one call, once per ``request_id``: ``units``, or priced from the usage fields."""
        return self.send(Requests.record_usage(customer_id, request_id, units=units, reason=reason, usage=usage))

    def record_usage_batch(self, events: Sequence[UsageEvent]) -> list[BatchResult]:
        """Charge up to 1,000 events in one request; one result per event, in order (each its own idempotent unit)."""
        return self.send(Requests.record_usage_batch(events))

    def place_hold(
        self,
        customer_id: str,
        *,
        request_id: str,
        units: int | None = None,
        ttl_seconds: int = 600,
        **usage: Unpack[UsageFields],
    ) -> Hold:
        """Hold credits for a call in progress: ``units``, or priced from the usage fields (an estimate)."""
        return self.send(
            Requests.place_hold(customer_id, request_id, units=units, ttl_seconds=ttl_seconds, usage=usage)
        )

    def capture_hold(
        self, hold_id: str, *, units: int | None = None, note: str = "", **usage: Unpack[UsageFields]
    ) -> Capture:
        """Charge what the call used (units, or priced from usage; neither: all held); give back the rest."""
        return self.send(Requests.capture_hold(hold_id, units=units, note=note, usage=usage))

    def release_hold(
        self,
        hold_id: str,
        *,
        reason: str | None = None,
        provider: str | None = None,
        model: str | None = None,
        provider_request_id: str | None = None,
    ) -> Hold:
        """Give a hold back, saying why (``provider_timeout`` with the provider call's id and model is kept)."""
        return self.send(
            Requests.release_hold(
                hold_id, reason=reason, provider=provider, model=model, provider_request_id=provider_request_id
            )
        )

    # --- reads -----------------------------------------------------------------------------------------------

    def balance(self, customer_id: str) -> Balance:
        """The customer's balance, holds, debt, access state and grants."""
        return self.send(Requests.balance(customer_id))

    def entries(self, customer_id: str, *, limit: int = 50, before: int | None = None) -> EntriesPage:
        """One page of ledger entries, newest first."""
        return self.send(Requests.entries(customer_id, limit=limit, before=before))

    def iter_entries(self, customer_id: str, *, page_size: int = 200) -> Iterator[Entry]:
        """Every ledger entry of the customer, newest first, page by page."""
        before: int | None = None
        while True:
            page = self.entries(customer_id, limit=page_size, before=before)
            yield from page.data
            if not page.has_more:
                return
            before = page.next_cursor

    def usage_report(
        self,
        customer_id: str,
        *,
        group_by: Literal["day", "feature", "model", "user"] = "day",
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> UsageReport:
        """Usage grouped by day, feature, model or user: tokens, credits, provider cost and margin."""
        return self.send(Requests.usage_report(customer_id, group_by=group_by, since=since, until=until))

    def entitlements(
        self, customer_id: str, *, user_id: str | None = None, workspace: str | None = None
    ) -> Entitlements:
        """Access, balance, plans, each limit (used / remaining / reset) and the entitlements, in one call."""
        return self.send(Requests.entitlements(customer_id, user_id=user_id, workspace=workspace))

    def check(self, customer_id: str, *, units: int | None = None, **usage: Unpack[UsageFields]) -> CheckResult:
        """Whether a call (``units``, or priced from the usage fields) would be allowed now; consumes nothing."""
        return self.send(Requests.check(customer_id, units=units, usage=usage))

    def set_low_balance_threshold(self, customer_id: str, units: int | None) -> Threshold:
        """The customer's own low-balance threshold in units (None: back to the plan's)."""
        return self.send(Requests.set_low_balance_threshold(customer_id, units))

    # --- metering --------------------------------------------------------------------------------------------

    def metered(
        self,
        customer_id: str,
        *,
        user_id: str | None = None,
        feature: str | None = None,
        estimate_units: int | None = None,
        estimate: UsageFields | None = None,
        ttl_seconds: int = 600,
        request_id: str | None = None,
    ) -> Metered:
        """Hold credits for one call, then capture what ``call.record(...)`` reports (see ``Metered``)."""
        return Metered(
            self,
            customer_id,
            user_id=user_id,
            feature=feature,
            estimate_units=estimate_units,
            estimate=estimate,
            ttl_seconds=ttl_seconds,
            request_id=request_id,
        )

    def wrap_openai(
        self,
        client: Any,
        *,
        customer_id: str,
        user_id: str | None = None,
        feature: str | None = None,
        ttl_seconds: int = 600,
        on_abandoned_stream: AbandonedStreamPolicy = "estimate",
        default_max_output_tokens: int = 4096,
        settle: SettleMode = "inline",
    ) -> Any:
        """An ``openai.OpenAI`` whose chat.completions.create and responses.create are metered for the customer."""
        from webhooks.client.wrappers import MeteringOptions, wrap_openai

        options = MeteringOptions(
            customer_id, user_id, feature, ttl_seconds, on_abandoned_stream, default_max_output_tokens, settle
        )
        return wrap_openai(self, client, options)

    def wrap_anthropic(
        self,
        client: Any,
        *,
        customer_id: str,
        user_id: str | None = None,
        feature: str | None = None,
        ttl_seconds: int = 600,
        on_abandoned_stream: AbandonedStreamPolicy = "estimate",
        default_max_output_tokens: int = 4096,
        settle: SettleMode = "inline",
    ) -> Any:
        """An ``anthropic.Anthropic`` whose messages.create is metered for the customer."""
        from webhooks.client.wrappers import MeteringOptions, wrap_anthropic

        options = MeteringOptions(
            customer_id, user_id, feature, ttl_seconds, on_abandoned_stream, default_max_output_tokens, settle
        )
        return wrap_anthropic(self, client, options)
