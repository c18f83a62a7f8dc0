"""Drop-in metering for the official ``openai`` and ``anthropic`` clients, sync and async, streams included.

``billing.wrap_openai(OpenAI(), customer_id="cus_123")`` returns an object with the client's surface, whose
``chat.completions.create`` and ``responses.create`` (``messages.create`` for Anthropic) are metered:

1. a hold priced by the billing config from the request (the prompt estimated at four characters a token, plus
   ``max_tokens``/``max_output_tokens``, or ``default_max_output_tokens``); a model without a price is refused
   (``InvalidRequest``) before the provider is called, and so is a customer without credits;
2. the call; for an OpenAI chat stream ``stream_options.include_usage`` is set unless the caller set it;
3. the capture of the provider's own usage fields (``webhooks.client.providers``), attributed to the customer,
   user and feature; the provider's cost is priced by the server from the configured model cost;
4. on a provider error before any output, a release (``provider_error``); on a timeout with no answer, a release
   that records the model and the request id (``provider_timeout``: the call may have been served, which
   reconciliation can then see); on a stream closed or cut before the provider reported its usage, what the
   provider did report, else ``on_abandoned_stream``: ``"estimate"`` (the default: the prompt estimate plus the
   text received, marked as estimated in the ledger) or ``"release"``.

With ``settle="background"`` the capture runs off the caller's path (the call returns after the provider
answered; ``Billing.close()``/``flush()`` wait for pending captures; a failure is logged, not raised).
Close a stream you stop reading (``with`` or ``.close()``): that is when it is settled. A stream dropped
unclosed, or a process that dies mid-call, leaves the hold to its time-to-live, which releases it.
Other methods (``parse``, ``with_raw_response``, the stream helpers) pass through unmetered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from webhooks.client.errors import SettlementFailed
from webhooks.client.metering import AsyncMetered, Call, Metered
from webhooks.client.models import UsageFields
from webhooks.client.providers import (
    Endpoint,
    StreamTracker,
    Tokens,
    estimate_tokens,
    max_output_tokens,
    prompt_chars,
    response_model,
    response_usage,
)

if TYPE_CHECKING:
    from webhooks.client.aio import AsyncBilling
    from webhooks.client.sync import Billing

AbandonedStreamPolicy = Literal["estimate", "release"]
# "inline": the call returns after its capture; "background": the capture runs off the caller's path (on the
# Billing's settling threads or the event loop), its failure logged; Billing.close() waits for pending ones.
SettleMode = Literal["inline", "background"]
log = logging.getLogger("webhooks.client")


@dataclass(frozen=True)
class MeteringOptions:
    """Who the wrapped client's calls are charged to, and how."""

    customer_id: str
    user_id: str | None = None
    feature: str | None = None
    ttl_seconds: int = 600
    on_abandoned_stream: AbandonedStreamPolicy = "estimate"
    default_max_output_tokens: int = 4096
    settle: SettleMode = "inline"

    def __post_init__(self) -> None:
        if self.on_abandoned_stream not in ("estimate", "release"):
            raise ValueError('on_abandoned_stream must be "estimate" or "release"')
        if self.settle not in ("inline", "background"):
            raise ValueError('settle must be "inline" or "background"')


@dataclass
class Plan:
    """One wrapped call: the provider, endpoint and request, and what its hold estimated."""

    provider: str
    endpoint: Endpoint
    model: str
    prompt_tokens: int
    max_output: int
    stream: bool
    sent_request_id: str | None = None

    @classmethod
    def of(cls, provider: str, endpoint: Endpoint, request: dict[str, Any], options: MeteringOptions) -> Plan:
        model = request.get("model")
        if not isinstance(model, str):
            raise TypeError("a metered call needs model= (a string)")
        return cls(
            provider,
            endpoint,
            model,
            estimate_tokens(prompt_chars(endpoint, request)),
            max_output_tokens(endpoint, request, options.default_max_output_tokens),
            request.get("stream") is True,
        )

    def estimate(self) -> UsageFields:
        """The hold's usage: the prompt estimate and the most output the request allows."""
        return UsageFields(
            provider=self.provider, model=self.model, input_tokens=self.prompt_tokens, output_tokens=self.max_output
        )

    def prepare(self, request: dict[str, Any], request_id: str) -> dict[str, Any]:
        """The request as sent: usage asked for in chat streams, our request id in a header the provider logs."""
        request = dict(request)
        if self.endpoint == "chat" and self.stream:
            stream_options = dict(request.get("stream_options") or {})
            stream_options.setdefault("include_usage", True)
            request["stream_options"] = stream_options
        if self.provider == "openai":
            # OpenAI logs X-Client-Request-Id with the call (a timed-out call included), so it can be found later;
            # a caller's own id stands.
            headers = {"X-Client-Request-Id": request_id, **(request.get("extra_headers") or {})}
            request["extra_headers"] = headers
            sent = next((v for k, v in headers.items() if k.lower() == "x-client-request-id"), None)
            self.sent_request_id = sent if isinstance(sent, str) else None
        return request

    def provider_request_id(self, call: Call) -> str | None:
        """The id the provider knows the call by before it answers (OpenAI: the one sent with it)."""
        return self.sent_request_id

    def record(self, call: Call, tokens: Tokens, model: str | None, note: str = "") -> None:
        """Record the tokens served, under the served model's name."""
        call.record(
            provider=self.provider,
            model=model or self.model,
            input_tokens=max(0, tokens.input_tokens),
            output_tokens=max(0, tokens.output_tokens),
            cached_tokens=max(0, tokens.cached_tokens),
            note=note,
        )
        call.fallback_model = self.model

    def record_failure(self, call: Call, exc: BaseException) -> None:
        """Why the hold is released: a timeout (maybe served anyway) or an error answer."""
        if _is_timeout(exc):
            call.release_because(
                "provider_timeout",
                provider=self.provider,
                model=self.model,
                provider_request_id=self.provider_request_id(call),
            )
        else:
            answered_id = getattr(exc, "request_id", None)
            call.release_because(
                "provider_error",
                provider=self.provider,
                model=self.model,
                provider_request_id=answered_id if isinstance(answered_id, str) else None,
            )

    def record_response(self, call: Call, response: Any) -> None:
        """Record a complete answer's usage (the hold's estimate, marked, if it has none)."""
        tokens = response_usage(self.endpoint, response)
        if tokens is None:
            self.record(call, Tokens(self.prompt_tokens, self.max_output), None, "estimated: the answer had no usage")
        else:
            self.record(call, tokens, response_model(response))

    def record_stream_end(self, call: Call, tracker: StreamTracker, policy: AbandonedStreamPolicy, how: str) -> None:
        """Settle what a stream showed: its final usage, else what it reported plus the policy's estimate."""
        if tracker.final and tracker.usage is not None:
            self.record(call, tracker.usage, tracker.model)
            return
        if not tracker.received_anything:
            call.release_because(f"stream_{how}_before_output", provider=self.provider, model=self.model)
            return
        reported = tracker.usage
        if policy == "release":
            if reported is None:
                call.release_because(f"stream_{how}", provider=self.provider, model=self.model)
            else:
                self.record(call, reported, tracker.model, f"partial: stream {how} before the final usage")
            return
        text_tokens = estimate_tokens(tracker.chars)
        tokens = Tokens(
            reported.input_tokens if reported else self.prompt_tokens,
            max(text_tokens, reported.output_tokens if reported else 0),
            reported.cached_tokens if reported else 0,
        )
        self.record(call, tokens, tracker.model, f"estimated: stream {how} before the provider reported usage")


def _is_timeout(exc: BaseException) -> bool:
    # openai.APITimeoutError and anthropic.APITimeoutError, without importing either SDK here.
    return any(cls.__name__ == "APITimeoutError" for cls in type(exc).__mro__)


def _attach(exc: SettlementFailed, response: Any) -> SettlementFailed:
    exc.response = response
    return exc


# --- sync ----------------------------------------------------------------------------------------------------------


class MeteredStream:
    """A provider stream that settles its hold when it ends, is closed, or breaks."""

    def __init__(self, stream: Any, metered: Metered, plan: Plan, options: MeteringOptions) -> None:
        self._stream = stream
        self._metered = metered
        self._plan = plan
        self._options = options
        self._iterator = iter(stream)
        self.tracker = StreamTracker(plan.endpoint)
        self._settled = False

    def __iter__(self) -> MeteredStream:
        return self

    def __next__(self) -> Any:
        try:
            item = next(self._iterator)
        except StopIteration:
            self._settle("ended", failed=False)
            raise
        except BaseException as exc:
            self._settle("cut", failed=True, error=exc)
            raise
        self.tracker.feed(item)
        return item

    def _settle(self, how: str, *, failed: bool, error: BaseException | None = None) -> None:
        if self._settled:
            return
        self._settled = True
        call = self._metered.call
        if error is not None and not self.tracker.received_anything:
            self._plan.record_failure(call, error)
        else:
            self._plan.record_stream_end(call, self.tracker, self._options.on_abandoned_stream, how)
        if self._options.settle == "background" and error is None:
            self._metered.billing.settle_later(lambda: self._metered.settle(failed=failed))
            return
        try:
            self._metered.settle(failed=failed)
        except SettlementFailed as exc:
            raise _attach(exc, self._stream) from exc.cause

    def close(self) -> None:
        """Stop reading: the provider's connection is closed and the call settled with what it showed."""
        try:
            self._stream.close()
        finally:
            self._settle("abandoned", failed=False)

    def __enter__(self) -> MeteredStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _Method:
    """A metered ``create``."""

    def __init__(
        self, billing: Billing, create: Callable[..., Any], provider: str, endpoint: Endpoint, options: MeteringOptions
    ) -> None:
        self._billing = billing
        self._create = create
        self._provider = provider
        self._endpoint = endpoint
        self._options = options

    def __call__(self, **request: Any) -> Any:
        options = self._options
        plan = Plan.of(self._provider, self._endpoint, request, options)
        metered = self._billing.metered(
            options.customer_id,
            user_id=options.user_id,
            feature=options.feature,
            estimate=plan.estimate(),
            ttl_seconds=options.ttl_seconds,
        )
        call = metered.__enter__()  # the hold: refused here, before the provider is called
        try:
            response = self._create(**plan.prepare(request, call.request_id))
        except BaseException as exc:
            plan.record_failure(call, exc)
            metered.settle(failed=True)
            raise
        if plan.stream:
            return MeteredStream(response, metered, plan, options)
        plan.record_response(call, response)
        if options.settle == "background":
            self._billing.settle_later(lambda: metered.settle(failed=False))
            return response
        try:
            metered.settle(failed=False)
        except SettlementFailed as exc:
            raise _attach(exc, response) from exc.cause
        return response


# --- async ---------------------------------------------------------------------------------------------------------


class AsyncMeteredStream:
    """An async provider stream that settles its hold when it ends, is closed, or breaks."""

    def __init__(self, stream: Any, metered: AsyncMetered, plan: Plan, options: MeteringOptions) -> None:
        self._stream = stream
        self._metered = metered
        self._plan = plan
        self._options = options
        self._iterator = stream.__aiter__()
        self.tracker = StreamTracker(plan.endpoint)
        self._settled = False

    def __aiter__(self) -> AsyncMeteredStream:
        return self

    async def __anext__(self) -> Any:
        try:
            item = await self._iterator.__anext__()
        except StopAsyncIteration:
            await self._settle("ended", failed=False)
            raise
        except BaseException as exc:
            await self._settle("cut", failed=True, error=exc)
            raise
        self.tracker.feed(item)
        return item

    async def _settle(self, how: str, *, failed: bool, error: BaseException | None = None) -> None:
        if self._settled:
            return
        self._settled = True
        call = self._metered.call
        if error is not None and not self.tracker.received_anything:
            self._plan.record_failure(call, error)
        else:
            self._plan.record_stream_end(call, self.tracker, self._options.on_abandoned_stream, how)
        if self._options.settle == "background" and error is None:
            self._metered.billing.settle_later(self._metered.settle(failed=failed))
            return
        try:
            await self._metered.settle(failed=failed)
        except SettlementFailed as exc:
            raise _attach(exc, self._stream) from exc.cause

    async def close(self) -> None:
        """Stop reading: the provider's connection is closed and the call settled with what it showed."""
        try:
            await self._stream.close()
        finally:
            await self._settle("abandoned", failed=False)

    async def __aenter__(self) -> AsyncMeteredStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _AsyncMethod:
    """A metered async ``create``."""

    def __init__(
        self,
        billing: AsyncBilling,
        create: Callable[..., Any],
        provider: str,
        endpoint: Endpoint,
        options: MeteringOptions,
    ) -> None:
        self._billing = billing
        self._create = create
        self._provider = provider
        self._endpoint = endpoint
        self._options = options

    async def __call__(self, **request: Any) -> Any:
        options = self._options
        plan = Plan.of(self._provider, self._endpoint, request, options)
        metered = self._billing.metered(
            options.customer_id,
            user_id=options.user_id,
            feature=options.feature,
            estimate=plan.estimate(),
            ttl_seconds=options.ttl_seconds,
        )
        call = await metered.__aenter__()
        try:
            response = await self._create(**plan.prepare(request, call.request_id))
        except BaseException as exc:
            plan.record_failure(call, exc)
            await metered.settle(failed=True)
            raise
        if plan.stream:
            return AsyncMeteredStream(response, metered, plan, options)
        plan.record_response(call, response)
        if options.settle == "background":
            self._billing.settle_later(metered.settle(failed=False))
            return response
        try:
            await metered.settle(failed=False)
        except SettlementFailed as exc:
            raise _attach(exc, response) from exc.cause
        return response


# --- the client proxies --------------------------------------------------------------------------------------------


class _Proxy:
    """An object with ``target``'s surface, some attributes replaced."""

    def __init__(self, target: Any, **replaced: Any) -> None:
        self._target = target
        self._replaced = replaced

    def __getattr__(self, name: str) -> Any:
        replaced = self.__dict__.get("_replaced", {})
        if name in replaced:
            return replaced[name]
        return getattr(self._target, name)

    def __repr__(self) -> str:
        return f"<metered {self._target!r}>"


def _is_async(client: Any) -> bool:
    return type(client).__name__.startswith("Async")


def _method(
    billing: Any, create: Callable[..., Any], provider: str, endpoint: Endpoint, options: MeteringOptions
) -> Any:
    from webhooks.client.aio import AsyncBilling

    if _is_async(create.__self__) != isinstance(billing, AsyncBilling):  # type: ignore[attr-defined]
        raise TypeError(
            "wrap an async provider client (AsyncOpenAI, AsyncAnthropic) with AsyncBilling, a sync one with Billing"
        )
    if isinstance(billing, AsyncBilling):
        return _AsyncMethod(billing, create, provider, endpoint, options)
    return _Method(billing, create, provider, endpoint, options)


def _copies(wrap: Callable[[Any], Any], client: Any) -> dict[str, Any]:
    # client.with_options(...) (and its alias copy) makes a new client: it must be metered too.
    return {
        name: (lambda *args, _m=getattr(client, name), **kwargs: wrap(_m(*args, **kwargs)))
        for name in ("with_options", "copy")
        if callable(getattr(client, name, None))
    }


def wrap_openai(billing: Billing | AsyncBilling, client: Any, options: MeteringOptions) -> Any:
    """``client`` (openai.OpenAI or AsyncOpenAI) with chat.completions.create and responses.create metered."""
    completions = client.chat.completions
    chat = _Proxy(
        client.chat,
        completions=_Proxy(completions, create=_method(billing, completions.create, "openai", "chat", options)),
    )
    responses = _Proxy(
        client.responses, create=_method(billing, client.responses.create, "openai", "responses", options)
    )
    copies = _copies(lambda copy: wrap_openai(billing, copy, options), client)
    return _Proxy(client, chat=chat, responses=responses, **copies)


def wrap_anthropic(billing: Billing | AsyncBilling, client: Any, options: MeteringOptions) -> Any:
    """``client`` (anthropic.Anthropic or AsyncAnthropic) with messages.create metered."""
    messages = _Proxy(
        client.messages, create=_method(billing, client.messages.create, "anthropic", "messages", options)
    )
    copies = _copies(lambda copy: wrap_anthropic(billing, copy, options), client)
    return _Proxy(client, messages=messages, **copies)
