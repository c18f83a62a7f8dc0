"""AI usage metered as a product's backend would: AI calls through the official SDKs wrapped by the client.

Two parts. Live usage: real ``openai.OpenAI`` and ``anthropic.Anthropic`` clients, wrapped with
``Billing.wrap_openai``/``wrap_anthropic`` and pointed at the demo's own provider (``worker.demo.provider``), make
calls for several customers, models, features and users (plain and streamed, a follow-up read from the prompt
cache); each is held before, and captured with what the provider reported; a refused customer's call never reaches
the provider. Beside them, through the same client: a usage record retried with the same request id, an image
metered with ``billing.metered``, a hold whose call never settles (its time-to-live releases it) and an oversized
request refused. Then usage dated on the days of the sample provider reports, made to match them except for a few
deliberate discrepancies, so that the provider reconciliation has something true to confirm and something to find.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

from ledger.config import BillingConfig
from webhooks.client import Billing, BillingError, Capture, Charge, Hold
from worker.demo.provider import ROUTES, Served, SyntheticProvider

# Which demo customer's product made the calls a provider report bills, by provider and project/workspace.
FEATURES = {
    ("openai", "gpt-4o-2024-08-06"): "chat",
    ("openai", "gpt-4o-mini-2024-07-18"): "search",
    ("anthropic", "claude-sonnet-4-20250514"): "assistant",
    ("anthropic", "claude-3-5-haiku-20241022"): "summaries",
}
REQUESTS_PER_GROUP = 3
# Calls of the live part that must succeed (the refusals are meant to fail).
MUST_SUCCEED = ("retry", "ai_call", "image", "hold_timeout")
GPT4O, MINI = "gpt-4o-2024-08-06", "gpt-4o-mini-2024-07-18"
SONNET, HAIKU = "claude-sonnet-4-20250514", "claude-3-5-haiku-20241022"


@dataclass
class Call:
    """One call of the demo to the usage API (or an AI call's settlement), and what it answered."""

    label: str
    method: str
    path: str
    status: int
    body: dict[str, Any]
    idempotency_key: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "label": self.label,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "idempotency_key": self.idempotency_key,
            "body": self.body,
        }


@dataclass
class AICall:
    """One AI call made through a wrapped SDK client: who it was for, and the usage the provider reported."""

    customer_id: str
    user_id: str
    feature: str
    provider: str
    model: str
    stream: bool
    provider_request_id: str
    client_request_id: str | None  # the id the wrapper sent (OpenAI's X-Client-Request-Id): the hold's request id
    reported: dict[str, Any]  # the provider's usage object, as it sent it

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return dict(self.__dict__)


@dataclass
class UsageLog:
    """Every call made, in order, and the AI calls the provider served."""

    calls: list[Call] = field(default_factory=list)
    ai_calls: list[AICall] = field(default_factory=list)

    def by_label(self, label: str) -> list[Call]:
        """The calls made under ``label``."""
        return [c for c in self.calls if c.label == label]


def _error_call(label: str, method: str, path: str, exc: BillingError, key: str | None = None) -> Call:
    body = {"error": {"code": exc.code, "message": exc.message, **exc.details}}
    return Call(label, method, path, exc.status, body, key)


def _result_call(label: str, method: str, path: str, result: Charge | Hold | Capture, key: str | None) -> Call:
    status = 200 if result.replayed else 201
    return Call(label, method, path, status, result.model_dump(mode="json", exclude={"replayed"}), key)


class DemoClient:
    """The product's backend of the demo: ``webhooks.client.Billing``, and the SDK clients it wraps."""

    def __init__(self, base_url: str, token: str, provider: SyntheticProvider, provider_url: str, log: UsageLog):
        try:
            import anthropic
            import openai
        except ImportError as exc:
            from worker.demo.environment import DemoError

            raise DemoError(
                f"the demo meters AI calls through the official SDKs ({exc.name} is not installed): "
                "pip install 'billing-reconciler[demo]'"
            ) from None
        self.billing = Billing(base_url, token, retries=3)
        self.provider = provider
        # No SDK retries: the demo's provider answers every call, and a retry would be a second call.
        self.openai = openai.OpenAI(base_url=f"{provider_url}/v1", api_key="sk-demo", max_retries=0)
        self.anthropic = anthropic.Anthropic(base_url=provider_url, api_key="sk-ant-demo", max_retries=0)
        self.log = log

    def close(self) -> None:
        """Close the connection pools (after every metered call is settled)."""
        self.billing.close()
        self.openai.close()
        self.anthropic.close()

    # --- AI calls through the wrapped SDKs --------------------------------------------------------------------

    def ai_call(
        self,
        label: str,
        customer: str,
        *,
        user: str,
        feature: str,
        provider: str,
        model: str,
        messages: list[dict[str, Any]],
        max_tokens: int,
        stream: bool = False,
        system: str | None = None,
    ) -> Call:
        """One AI call through the wrapped SDK client (held, made, captured); a refusal is logged, not raised."""
        route = "chat" if provider == "openai" else "messages"
        path = ROUTES[route]
        served_before = len(self.provider.log)
        try:
            if provider == "openai":
                client = self.billing.wrap_openai(self.openai, customer_id=customer, user_id=user, feature=feature)
                answer: Any = client.chat.completions.create(
                    model=model, messages=messages, max_tokens=max_tokens, stream=stream
                )
            else:
                client = self.billing.wrap_anthropic(
                    self.anthropic, customer_id=customer, user_id=user, feature=feature
                )
                extra = {"system": system} if system else {}
                answer = client.messages.create(
                    model=model, messages=messages, max_tokens=max_tokens, stream=stream, **extra
                )
            if stream:
                with answer:
                    for _ in answer:  # read to the end: the stream is settled when it ends
                        pass
        except BillingError as exc:
            call = _error_call(label, "POST", path, exc)
            self.log.calls.append(call)
            return call
        served: Served = self.provider.log[served_before]
        assert served.usage is not None, "the demo's provider reports usage on every call it serves"
        client_id = next((v for k, v in served.headers.items() if k.lower() == "x-client-request-id"), None)
        self.log.ai_calls.append(
            AICall(customer, user, feature, provider, model, stream, served.request_id, client_id, served.usage)
        )
        call = Call(label, "POST", path, 200, {"provider_request_id": served.request_id, "usage": served.usage})
        self.log.calls.append(call)
        return call

    # --- the usage API through the client -----------------------------------------------------------------------

    def record_usage(
        self, label: str, customer: str, *, request_id: str, units: int | None = None, **usage: Any
    ) -> Call:
        """Billing.record_usage, logged; a refusal is logged, not raised."""
        try:
            charge = self.billing.record_usage(customer, request_id=request_id, units=units, **usage)
        except BillingError as exc:
            call = _error_call(label, "POST", "/v1/usage", exc, request_id)
        else:
            call = _result_call(label, "POST", "/v1/usage", charge, request_id)
        self.log.calls.append(call)
        return call

    def place_hold(
        self, label: str, customer: str, *, request_id: str, units: int, ttl_seconds: int, **usage: Any
    ) -> Call:
        """Billing.place_hold, logged."""
        try:
            hold = self.billing.place_hold(
                customer, request_id=request_id, units=units, ttl_seconds=ttl_seconds, **usage
            )
        except BillingError as exc:
            call = _error_call(label, "POST", "/v1/holds", exc, request_id)
        else:
            call = _result_call(label, "POST", "/v1/holds", hold, request_id)
        self.log.calls.append(call)
        return call

    def metered_operation(self, label: str, customer: str, *, operation: str, estimate_units: int, **who: Any) -> Call:
        """A call that is not an SDK's (an image), metered with ``billing.metered``: held, then captured."""
        request_id = _key(label)
        try:
            with self.billing.metered(customer, estimate_units=estimate_units, request_id=request_id, **who) as call:
                call.record(operation=operation)
        except BillingError as exc:
            logged = _error_call(label, "POST", "/v1/holds", exc, request_id)
        else:
            assert isinstance(call.outcome, Capture | Charge)
            logged = _result_call(label, "POST", f"/v1/holds/{request_id}/capture", call.outcome, request_id)
        self.log.calls.append(logged)
        return logged


def _key(prefix: str) -> str:
    return f"demo-{prefix}-{uuid.uuid4().hex[:12]}"


def document(topic: str, tokens: int) -> str:
    """A prompt of about ``tokens`` tokens (four characters each), the same on every run."""
    line = f"{topic}: 12 GPU-hours, 3 seats, one invoice line. "
    return (line * (tokens * 4 // len(line) + 1))[: tokens * 4]


def ask(topic: str, tokens: int, question: str = "Summarise it.") -> list[dict[str, Any]]:
    """One user message: a document of about ``tokens`` tokens and a question about it."""
    return [{"role": "user", "content": document(topic, tokens)}, {"role": "user", "content": question}]


# --- live usage ---------------------------------------------------------------------------------------------------


@dataclass
class LiveOutcome:
    """What the live part showed, for the summary and the test."""

    retry_first: Call
    retry_second: Call
    expired_hold_id: str
    refused_access: Call
    refused_credits: Call


def meter_live(client: DemoClient, ids: dict[str, str]) -> LiveOutcome:
    """Usage at the present time: wrapped AI calls for several models, features and users; a retry; refusals."""
    ada, ben, cleo, dan, eve, fay = (ids[k] for k in ("ada", "ben", "cleo", "dan", "eve", "fay"))
    oa, an = "openai", "anthropic"

    # A usage record retried: the backend timed out and sent it again with the same request id (charged once).
    retry_key = _key("ada-chat")
    usage: dict[str, Any] = {
        "provider": oa, "model": GPT4O, "user_id": "ada-u1", "feature": "chat",
        "input_tokens": 42_000, "output_tokens": 18_000, "cached_tokens": 6_000,
    }  # fmt: skip
    first = client.record_usage("retry", ada, request_id=retry_key, **usage)
    second = client.record_usage("retry", ada, request_id=retry_key, **usage)

    # AI calls through the wrapped SDKs: each held, made against the demo's provider, captured at what it reported.
    for customer, user, feature, provider, model, prompt, limit, stream in (
        (ada, "ada-u2", "search", oa, MINI, ask("search index", 120_000), 30_000, True),
        (ada, "ada-u1", "summaries", an, HAIKU, ask("meeting notes", 60_000), 12_000, False),
        (ben, "ben-u1", "assistant", an, SONNET, ask("support ticket", 35_000), 9_000, True),
        (cleo, "cleo-u1", "chat", oa, GPT4O, ask("contract", 80_000), 20_000, False),
        # The same contract again with another question: the provider reads the document from its prompt cache.
        (cleo, "cleo-u1", "chat", oa, GPT4O, ask("contract", 80_000, "List the renewal dates."), 2_000, False),
        (cleo, "cleo-u2", "assistant", an, SONNET, ask("design review", 50_000), 15_000, False),
        (cleo, "cleo-u3", "search", oa, MINI, ask("product catalogue", 200_000), 40_000, True),
        (dan, "dan-u1", "chat", oa, GPT4O, ask("quarterly report", 100_000), 25_000, False),
        (ben, "ben-u2", "assistant", an, SONNET, ask("release notes", 40_000), 20_000, True),
        # Eve spends most of her small pack (two long generations) before her dispute.
        (eve, "eve-u1", "chat", oa, GPT4O, [{"role": "user", "content": "Write the long report."}], 200_000, False),
        (eve, "eve-u1", "chat", oa, GPT4O, [{"role": "user", "content": "Write the appendix."}], 200_000, False),
    ):
        client.ai_call(
            "ai_call", customer, user=user, feature=feature, provider=provider, model=model, messages=prompt,
            max_tokens=limit, stream=stream,
        )  # fmt: skip
    client.metered_operation(
        "image", cleo, operation="image", estimate_units=20, user_id="cleo-u2", feature="illustrations"
    )

    # A hold whose call never settles (its process died): it expires after a second and the expiry sweep releases it.
    expiring_key = _key("ben-timeout")
    client.place_hold(
        "hold_timeout", ben, request_id=expiring_key, units=250, ttl_seconds=1, feature="assistant", user_id="ben-u1"
    )

    # Fay's plan was canceled: the wrapper's hold is refused, and the provider is never called.
    refused_access = client.ai_call(
        "refused_access", fay, user="fay-u1", feature="search", provider=oa, model=MINI,
        messages=ask("search index", 1_000), max_tokens=500,
    )  # fmt: skip
    refused_credits = client.record_usage(
        "refused_credits", dan, request_id=_key("dan-big"), units=1_000_000, user_id="dan-u1", feature="batch-export"
    )
    return LiveOutcome(first, second, expiring_key, refused_access, refused_credits)


def settled_ai_calls(session: Any, log: UsageLog) -> list[dict[str, Any]]:
    """Each AI call beside its hold as the ledger keeps it (a customer's wrapped calls are held in order)."""
    from sqlalchemy import select

    from ledger.models import Account, Hold

    by_customer: dict[str, Iterator[Any]] = {}
    rows = []
    for ai in log.ai_calls:
        if ai.customer_id not in by_customer:
            holds = session.execute(
                select(Hold.request_id, Hold.status, Hold.captured_units)
                .join(Account, Account.id == Hold.account_id)
                .where(Account.customer_id == ai.customer_id, Hold.request_id.like("call\\_%", escape="\\"))
                .order_by(Hold.id)
            ).all()
            by_customer[ai.customer_id] = iter(holds)
        request_id, status, captured = next(by_customer[ai.customer_id])
        rows.append(
            {**ai.as_dict(), "hold": request_id, "hold_status": getattr(status, "value", status), "charged": captured}
        )
    return rows


# --- usage on the provider reports' days --------------------------------------------------------------------------


@dataclass(frozen=True)
class ProviderGroup:
    """What a provider billed for one day, model and project/workspace: cost and tokens."""

    provider: str
    day: date
    model: str | None
    scope: str | None
    cost_usd: Decimal
    input_tokens: int
    output_tokens: int
    cached_tokens: int

    @property
    def ident(self) -> str:
        """The same identity reconciliation gives the group."""
        return f"{self.provider}|{self.day.isoformat()}|{self.model}|{self.scope}"


@dataclass
class ProviderPlan:
    """The groups of the reports, what the demo records for each, and the discrepancies it introduces."""

    reports: list[Path]
    groups: list[ProviderGroup]
    since: datetime
    until: datetime
    metered: list[dict[str, Any]] = field(default_factory=list)
    discrepancies: list[dict[str, Any]] = field(default_factory=list)


def read_provider_groups(paths: Sequence[Path]) -> list[ProviderGroup]:
    """Sum the reports into groups by provider, day, model and scope (one cost report per provider-day)."""
    from reconciliation.providers import ReportKind, parse_reports

    costs: dict[tuple[str, date, str | None, str | None], Decimal] = {}
    usage: dict[tuple[str, date, str | None, str | None], list[int]] = {}
    covered: set[tuple[str, ReportKind, date]] = set()
    for report in parse_reports(list(paths)):
        fresh = {d for d in report.days if (report.provider, report.kind, d) not in covered}
        covered |= {(report.provider, report.kind, d) for d in fresh}
        for row in report.rows:
            if row.day not in fresh:
                continue
            key = (row.provider, row.day, row.model, row.scope)
            if report.kind is ReportKind.COST:
                costs[key] = costs.get(key, Decimal(0)) + row.cost_usd
            else:
                counts = usage.setdefault(key, [0, 0, 0])
                counts[0] += row.input_tokens
                counts[1] += row.output_tokens
                counts[2] += row.cached_tokens
    groups = []
    for key in sorted(set(costs) | set(usage), key=lambda k: (k[0], k[1], k[2] or "", k[3] or "")):
        inp, out, cached = usage.get(key, [0, 0, 0])
        groups.append(ProviderGroup(*key, costs.get(key, Decimal(0)), inp, out, cached))
    return groups


def provider_reports(directory: Path) -> list[Path]:
    """The sample reports (every constructed OpenAI and Anthropic file; the OpenAPI excerpt is not a report)."""
    return sorted(p for p in directory.glob("*/*.constructed.*") if p.suffix in (".json", ".csv"))


def plan_provider_usage(directory: Path, config: BillingConfig) -> ProviderPlan:
    """Read the reports and decide what to record: the same as billed, except three deliberate discrepancies."""
    paths = provider_reports(directory)
    groups = read_provider_groups(paths)
    days = sorted({g.day for g in groups})
    plan = ProviderPlan(
        paths,
        groups,
        since=datetime.combine(days[0], time(), tzinfo=UTC),
        until=datetime.combine(days[-1] + timedelta(days=1), time(), tzinfo=UTC),
    )
    last_day = days[-1]
    under_recorded_done = False
    for g in groups:
        if g.model is not None and config.model_price(g.model, g.provider) is None:
            plan.discrepancies.append(
                {
                    "label": "unmetered_model",
                    "why": f"{g.model} is not in the billing config, so the product never metered it",
                    "ident": g.ident,
                    "kinds": ["provider_cost_drift"],
                }
            )
            continue
        if g.provider == "anthropic" and g.day == last_day:
            plan.discrepancies.append(
                {
                    "label": "missing_day",
                    "why": f"no {g.provider} usage recorded on {g.day} (a metering outage)",
                    "ident": g.ident,
                    "kinds": ["provider_cost_drift", "provider_usage_drift"]
                    if g.input_tokens
                    else ["provider_cost_drift"],
                }
            )
            continue
        share = Decimal(1)
        if not under_recorded_done and g.provider == "openai" and g.model and "mini" in g.model:
            # One in five calls of this model was never metered (a code path that skipped the usage API).
            share = Decimal("0.8")
            under_recorded_done = True
            plan.discrepancies.append(
                {
                    "label": "under_recorded",
                    "why": f"{g.model} on {g.day}: a fifth of its usage was never recorded",
                    "ident": g.ident,
                    "kinds": ["provider_cost_drift", "provider_usage_drift"],
                }
            )
        plan.metered.append({"group": g, "share": share})
    return plan


def _split(total: int, n: int) -> list[int]:
    base, rest = divmod(total, n)
    return [base + (1 if i < rest else 0) for i in range(n)]


def _split_money(total: Decimal, n: int) -> list[Decimal]:
    part = (total / n).quantize(Decimal("1e-10"))
    return [part] * (n - 1) + [total - part * (n - 1)]


def meter_provider_days(client: DemoClient, plan: ProviderPlan, owners: dict[tuple[str, str | None], str]) -> int:
    """Record the planned usage, dated on the reports' days; return how many calls were made."""
    calls = 0
    for item in plan.metered:
        g: ProviderGroup = item["group"]
        share: Decimal = item["share"]
        customer = owners.get((g.provider, g.scope)) or owners[(g.provider, None)]
        inp = int(g.input_tokens * share)
        out = int(g.output_tokens * share)
        cached = int(g.cached_tokens * share)
        cost = g.cost_usd * share
        feature = FEATURES.get((g.provider, g.model or ""), "tools")
        if g.model is None:
            # A priced extra with no tokens (web search): charged in credits at cost, one call.
            units = int((cost * 100).to_integral_value(rounding=ROUND_CEILING))
            web: dict[str, Any] = {"workspace": g.scope} if g.scope is not None else {}
            client.record_usage(
                "provider_day", customer, request_id=_key("web"), units=units, provider=g.provider,
                operation="web_search", user_id=f"{customer}-tools", feature="web-search", cost_usd=cost,
                occurred_at=datetime.combine(g.day, time(12), tzinfo=UTC), **web,
            )  # fmt: skip
            calls += 1
            continue
        n = REQUESTS_PER_GROUP
        for i, (a, b, c, money) in enumerate(
            zip(_split(inp, n), _split(out, n), _split(cached, n), _split_money(cost, n), strict=True)
        ):
            scope: dict[str, Any] = {"workspace": g.scope} if g.scope is not None else {}
            call = client.record_usage(
                "provider_day", customer, request_id=_key("day"), provider=g.provider, model=g.model,
                user_id=f"{customer.removeprefix('cus_demo').lower()}-u{i + 1}", feature=feature,
                input_tokens=a, output_tokens=b, cached_tokens=c, cost_usd=money,
                occurred_at=datetime.combine(g.day, time(9 + 3 * i), tzinfo=UTC), **scope,
            )  # fmt: skip
            if call.status not in (200, 201):
                raise RuntimeError(f"the usage API refused provider-day usage: {call.status} {call.body}")
            calls += 1
    return calls
