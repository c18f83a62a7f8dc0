"""AI usage metered through the usage API over HTTP, as a product's backend would.

Two parts: live usage (several models, features and users; holds captured and timed out; a retried request;
refusals), and usage dated on the days of the sample provider reports, made to match them except for a few
deliberate discrepancies, so that the provider reconciliation has something true to confirm and something to find.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

import httpx

from ledger.config import BillingConfig

# Which demo customer's product made the calls a provider report bills, by provider and project/workspace.
FEATURES = {
    ("openai", "gpt-4o-2024-08-06"): "chat",
    ("openai", "gpt-4o-mini-2024-07-18"): "search",
    ("anthropic", "claude-sonnet-4-20250514"): "assistant",
    ("anthropic", "claude-3-5-haiku-20241022"): "summaries",
}
REQUESTS_PER_GROUP = 3
# Calls of the live part that must succeed (the refusals are meant to fail).
MUST_SUCCEED = ("retry", "usage", "hold", "capture", "hold_timeout")


@dataclass
class Call:
    """One HTTP call of the demo to the usage API, and what it answered."""

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
class UsageLog:
    """Every call made, in order."""

    calls: list[Call] = field(default_factory=list)

    def by_label(self, label: str) -> list[Call]:
        """The calls made under ``label``."""
        return [c for c in self.calls if c.label == label]


class UsageClient:
    """The usage API, with the demo's bearer token."""

    def __init__(self, base_url: str, token: str, log: UsageLog) -> None:
        self.http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30.0)
        self.log = log

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def post(self, label: str, path: str, body: dict[str, Any] | None = None, *, key: str | None = None) -> Call:
        """POST ``body`` (with an Idempotency-Key when given) and record the answer."""
        headers = {"Idempotency-Key": key} if key else {}
        response = self.http.post(path, json=body, headers=headers)
        call = Call(label, "POST", path, response.status_code, _json(response), key)
        self.log.calls.append(call)
        return call

    def get(self, label: str, path: str, **params: Any) -> Call:
        """GET ``path`` and record the answer."""
        response = self.http.get(path, params=params)
        call = Call(label, "GET", path, response.status_code, _json(response))
        self.log.calls.append(call)
        return call


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        return {"text": response.text[:500]}
    return data if isinstance(data, dict) else {"data": data}


def _key(prefix: str) -> str:
    return f"demo-{prefix}-{uuid.uuid4().hex[:12]}"


def tokens(
    customer: str,
    provider: str,
    model: str,
    *,
    user: str,
    feature: str,
    inp: int = 0,
    out: int = 0,
    cached: int = 0,
    workspace: str | None = None,
    occurred_at: datetime | None = None,
    cost: Decimal | None = None,
) -> dict[str, Any]:
    """A usage body for a token-priced call (money as a decimal string, never a float)."""
    body: dict[str, Any] = {
        "customer_id": customer,
        "provider": provider,
        "model": model,
        "user_id": user,
        "feature": feature,
        "input_tokens": inp,
        "output_tokens": out,
        "cached_tokens": cached,
    }
    if workspace is not None:
        body["workspace"] = workspace
    if occurred_at is not None:
        body["occurred_at"] = occurred_at.isoformat()
    if cost is not None:
        body["provider_cost_usd"] = str(cost)
    return body


# --- live usage ---------------------------------------------------------------------------------------------------


@dataclass
class LiveOutcome:
    """What the live part showed, for the summary and the test."""

    retry_first: Call
    retry_second: Call
    expired_hold_id: str
    captured_hold: Call | None
    refused_access: Call
    refused_credits: Call


def meter_live(client: UsageClient, ids: dict[str, str]) -> LiveOutcome:
    """Usage at the present time: several models, features and users; holds; a retry; two refusals."""
    ada, ben, cleo, dan, eve, fay = (ids[k] for k in ("ada", "ben", "cleo", "dan", "eve", "fay"))
    oa, an = "openai", "anthropic"
    gpt4o, mini = "gpt-4o-2024-08-06", "gpt-4o-mini-2024-07-18"
    sonnet, haiku = "claude-sonnet-4-20250514", "claude-3-5-haiku-20241022"

    # A retried request: the client timed out and sent the same call again with the same Idempotency-Key.
    retry_key = _key("ada-chat")
    body = tokens(ada, oa, gpt4o, user="ada-u1", feature="chat", inp=42_000, out=18_000, cached=6_000)
    first = client.post("retry", "/v1/usage", body, key=retry_key)
    second = client.post("retry", "/v1/usage", body, key=retry_key)

    for body in (
        tokens(ada, oa, mini, user="ada-u2", feature="search", inp=120_000, out=30_000),
        tokens(ada, an, haiku, user="ada-u1", feature="summaries", inp=60_000, out=12_000),
        tokens(ben, an, sonnet, user="ben-u1", feature="assistant", inp=35_000, out=9_000),
        tokens(cleo, oa, gpt4o, user="cleo-u1", feature="chat", inp=80_000, out=20_000),
        tokens(cleo, an, sonnet, user="cleo-u2", feature="assistant", inp=50_000, out=15_000),
        tokens(cleo, oa, mini, user="cleo-u3", feature="search", inp=200_000, out=40_000),
        tokens(dan, oa, gpt4o, user="dan-u1", feature="chat", inp=100_000, out=25_000),
        # Eve spends most of her small pack (two long generations of 800 credits in all) before her dispute.
        tokens(eve, oa, gpt4o, user="eve-u1", feature="chat", out=200_000),
        tokens(eve, oa, gpt4o, user="eve-u1", feature="chat", out=200_000),
    ):
        client.post("usage", "/v1/usage", body, key=_key("usage"))
    client.post(
        "usage",
        "/v1/usage",
        {"customer_id": cleo, "operation": "image", "user_id": "cleo-u2", "feature": "illustrations"},
        key=_key("image"),
    )

    # A hold for a call in flight, captured with what the call used: the rest goes back.
    hold_key = _key("ben-hold")
    client.post(
        "hold",
        "/v1/holds",
        {"customer_id": ben, "units": 300, "ttl_seconds": 600, "feature": "assistant", "user_id": "ben-u2"},
        key=hold_key,
    )
    captured = client.post(
        "capture",
        f"/v1/holds/{hold_key}/capture",
        {"provider": an, "model": sonnet, "input_tokens": 40_000, "output_tokens": 20_000, "user_id": "ben-u2"},
    )

    # A hold whose call never comes back: it expires after a second and the expiry sweep releases it.
    expiring_key = _key("ben-timeout")
    client.post(
        "hold_timeout",
        "/v1/holds",
        {"customer_id": ben, "units": 250, "ttl_seconds": 1, "feature": "assistant", "user_id": "ben-u1"},
        key=expiring_key,
    )

    refused_access = client.post(
        "refused_access", "/v1/usage", tokens(fay, oa, mini, user="fay-u1", feature="search", inp=1000), key=_key("fay")
    )
    refused_credits = client.post(
        "refused_credits",
        "/v1/usage",
        {"customer_id": dan, "units": 1_000_000, "user_id": "dan-u1", "feature": "batch-export"},
        key=_key("dan-big"),
    )
    return LiveOutcome(first, second, expiring_key, captured, refused_access, refused_credits)


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


def meter_provider_days(client: UsageClient, plan: ProviderPlan, owners: dict[tuple[str, str | None], str]) -> int:
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
            body = {
                "customer_id": customer,
                "provider": g.provider,
                "operation": "web_search",
                "units": units,
                "user_id": f"{customer}-tools",
                "feature": "web-search",
                "provider_cost_usd": str(cost),
                "occurred_at": datetime.combine(g.day, time(12), tzinfo=UTC).isoformat(),
            }
            if g.scope is not None:
                body["workspace"] = g.scope
            client.post("provider_day", "/v1/usage", body, key=_key("web"))
            calls += 1
            continue
        n = REQUESTS_PER_GROUP
        for i, (a, b, c, money) in enumerate(
            zip(_split(inp, n), _split(out, n), _split(cached, n), _split_money(cost, n), strict=True)
        ):
            body = tokens(
                customer,
                g.provider,
                g.model,
                user=f"{customer.removeprefix('cus_demo').lower()}-u{i + 1}",
                feature=feature,
                inp=a,
                out=b,
                cached=c,
                workspace=g.scope,
                occurred_at=datetime.combine(g.day, time(9 + 3 * i), tzinfo=UTC),
                cost=money,
            )
            call = client.post("provider_day", "/v1/usage", body, key=_key("day"))
            if call.status not in (200, 201):
                raise RuntimeError(f"the usage API refused provider-day usage: {call.status} {call.body}")
            calls += 1
    return calls
