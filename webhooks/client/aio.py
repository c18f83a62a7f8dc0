"""``AsyncBilling``: the usage API over HTTP, for asyncio."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Unpack

import httpx
from tenacity import AsyncRetrying

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
from webhooks.client.metering import AsyncMetered, UnpricedModels
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


class AsyncBilling:
    """An asyncio client of the usage API: one method per endpoint, typed results, errors as exceptions.

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
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers(token),
            timeout=timeout,
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=100),
        )
        if http is not None:
            self._http.headers.update(headers(token))
        self._pending: set[asyncio.Task[None]] = set()
        # Served model names the API could not price (a capture then goes under the requested name at once).
        self.unpriced_models = UnpricedModels()

    async def __aenter__(self) -> AsyncBilling:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Finish settling calls in the background, then close the connection pool (when this client made it)."""
        await self.flush()
        if self._owns_http:
            await self._http.aclose()

    def settle_later(self, settle: Awaitable[None]) -> None:
        """Run ``settle`` as a task off the caller's path (a metered call's capture); its failure is logged."""

        async def run() -> None:
            try:
                await settle
            except Exception:
                log.exception("metering: settling a call in the background failed (its hold's time-to-live will)")

        task = asyncio.get_running_loop().create_task(run())
        self._pending.add(task)  # a reference, or the task may be collected before it runs
        task.add_done_callback(self._pending.discard)

    async def flush(self) -> None:
        """Wait until every call settling in the background is settled."""
        while self._pending:
            await asyncio.gather(*list(self._pending))

    async def send(self, request: Request[T]) -> T:
        """Send one request, retrying what is transient; return its parsed result or raise its error."""
        try:
            async for attempt in AsyncRetrying(**retry_policy(self.retries)):
                with attempt:
                    response = await self._http.request(
                        request.method, request.path, json=request.json, params=request.params, headers=request.headers
                    )
                    return request.parse(check(response))
        except (TransientError, httpx.TransportError) as exc:
            raise unavailable(exc, request) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # --- writes ----------------------------------------------------------------------------------------------

    async def record_usage(
        self,
        customer_id: str,
        *,
        request_id: str,
        units: int | None = None,
        reason: str = "",
        **usage: Unpack[UsageFields],
    ) -> Charge:
        """Charge a customer for one call, once per ``request_id``: ``units``, or priced from the usage fields."""
        return await self.send(Requests.record_usage(customer_id, request_id, units=units, reason=reason, usage=usage))

    async def record_usage_batch(self, events: Sequence[UsageEvent]) -> list[BatchResult]:
        """Charge up to 1,000 events in one request; one result per event, in order (each its own idempotent unit)."""
        return await self.send(Requests.record_usage_batch(events))

    async def place_hold(
        self,
        customer_id: str,
        *,
        request_id: str,
        units: int | None = None,
        ttl_seconds: int = 600,
        **usage: Unpack[UsageFields],
    ) -> Hold:
        """Hold credits for a call in progress: ``units``, or priced from the usage fields (an estimate)."""
        return await self.send(
            Requests.place_hold(customer_id, request_id, units=units, ttl_seconds=ttl_seconds, usage=usage)
        )

    async def capture_hold(
        self, hold_id: str, *, units: int | None = None, note: str = "", **usage: Unpack[UsageFields]
    ) -> Capture:
        """Charge what the call used (units, or priced from usage; neither: all held); give back the rest."""
        return await self.send(Requests.capture_hold(hold_id, units=units, note=note, usage=usage))

    async def release_hold(
        self,
        hold_id: str,
        *,
        reason: str | None = None,
        provider: str | None = None,
        model: str | None = None,
        provider_request_id: str | None = None,
    ) -> Hold:
        """Give a hold back, saying why (``provider_timeout`` with the provider call's id and model is kept)."""
        return await self.send(
            Requests.release_hold(
                hold_id, reason=reason, provider=provider, model=model, provider_request_id=provider_request_id
            )
        )

    # --- reads -----------------------------------------------------------------------------------------------

    async def balance(self, customer_id: str) -> Balance:
        """The customer's balance, holds, debt, access state and grants."""
        return await self.send(Requests.balance(customer_id))

    async def entries(self, customer_id: str, *, limit: int = 50, before: int | None = None) -> EntriesPage:
        """One page of ledger entries, newest first."""
        return await self.send(Requests.entries(customer_id, limit=limit, before=before))

    async def iter_entries(self, customer_id: str, *, page_size: int = 200) -> AsyncIterator[Entry]:
        """Every ledger entry of the customer, newest first, page by page."""
        before: int | None = None
        while True:
            page = await self.entries(customer_id, limit=page_size, before=before)
            for entry in page.data:
                yield entry
            if not page.has_more:
                return
            before = page.next_cursor

    async def usage_report(
        self,
        customer_id: str,
        *,
        group_by: Literal["day", "feature", "model", "user"] = "day",
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> UsageReport:
        """Usage grouped by day, feature, model or user: tokens, credits, provider cost and margin."""
        return await self.send(Requests.usage_report(customer_id, group_by=group_by, since=since, until=until))

    async def entitlements(
        self, customer_id: str, *, user_id: str | None = None, workspace: str | None = None
    ) -> Entitlements:
        """Access, balance, plans, each limit (used / remaining / reset) and the entitlements, in one call."""
        return await self.send(Requests.entitlements(customer_id, user_id=user_id, workspace=workspace))

    async def check(self, customer_id: str, *, units: int | None = None, **usage: Unpack[UsageFields]) -> CheckResult:
        """Whether a call (``units``, or priced from the usage fields) would be allowed now; consumes nothing."""
        return await self.send(Requests.check(customer_id, units=units, usage=usage))

    async def set_low_balance_threshold(self, customer_id: str, units: int | None) -> Threshold:
        """The customer's own low-balance threshold in units (None: back to the plan's)."""
        return await self.send(Requests.set_low_balance_threshold(customer_id, units))

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
    ) -> AsyncMetered:
        """Hold credits for one call, then capture what ``call.record(...)`` reports (see ``AsyncMetered``)."""
        return AsyncMetered(
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
        """An ``openai.AsyncOpenAI`` whose chat.completions.create and responses.create are metered for the customer."""
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
        """An ``anthropic.AsyncAnthropic`` whose messages.create is metered for the customer."""
        from webhooks.client.wrappers import MeteringOptions, wrap_anthropic

        options = MeteringOptions(
            customer_id, user_id, feature, ttl_seconds, on_abandoned_stream, default_max_output_tokens, settle
        )
        return wrap_anthropic(self, client, options)
