"""Factories for reconciliation tests: Stripe activity in the emulator, and the ledger side mirrored from it the
way the worker applies events (top-ups keyed by payment intent, renewals by invoice, proportional clawbacks,
freezes for open disputes, access state from subscription status), plus provider reports written from usage.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from stripe_emulator import Store

from ledger.accounts import set_access_state
from ledger.clawback import clawback, freeze_grant, unfreeze_grant
from ledger.config import get_billing_config
from ledger.consume import consume
from ledger.grants import grant_credits
from ledger.inbox import EventSource, EventStatus, StripeEvent, parse_envelope, store_events
from ledger.models import AccessState, Grant, GrantSource, UsageRecord
from ledger.pricing import UsageInput
from reconciliation.models import MismatchKind
from reconciliation.services import Finding

# Model credit prices three times the provider's cost, so seeded usage never has a negative margin.
TEST_BILLING_CONFIG = """
[credits]
fallback_credits_per_minor_unit = "1"

[[packs]]
price = "price_credits_small"
credits = 1000

[[packs]]
price = "price_credits_large"
credits = 12000

[[plans]]
price = "price_pro_monthly"
name = "Pro"
credits_per_period = 10000

[[plans]]
price = "price_team_monthly"
name = "Team"
credits_per_period = 50000
period_end = "rollover"

[[models]]
provider = "openai"
model = "gpt-4o-2024-08-06"
credits_per_million_input = "750"
credits_per_million_output = "3000"
credits_per_million_cached = "375"
cost_per_million_input_usd = "2.50"
cost_per_million_output_usd = "10.00"
cost_per_million_cached_usd = "1.25"

[[models]]
provider = "openai"
model = "gpt-4o-mini-2024-07-18"
credits_per_million_input = "45"
credits_per_million_output = "180"
credits_per_million_cached = "24"
cost_per_million_input_usd = "0.15"
cost_per_million_output_usd = "0.60"
cost_per_million_cached_usd = "0.075"

[[models]]
provider = "anthropic"
model = "claude-sonnet-4-20250514"
credits_per_million_input = "900"
credits_per_million_output = "4500"
credits_per_million_cached = "90"
cost_per_million_input_usd = "3.00"
cost_per_million_output_usd = "15.00"
cost_per_million_cached_usd = "0.30"

[[models]]
provider = "anthropic"
model = "claude-3-5-haiku-20241022"
credits_per_million_input = "240"
credits_per_million_output = "1200"
credits_per_million_cached = "24"
cost_per_million_input_usd = "0.80"
cost_per_million_output_usd = "4.00"
cost_per_million_cached_usd = "0.08"

[reconciliation]
unprocessed_event_hours = 1
"""

ACCESS_BY_STATUS = {
    "active": AccessState.ACTIVE,
    "trialing": AccessState.TRIALING,
    "past_due": AccessState.PAST_DUE,
    "unpaid": AccessState.SUSPENDED,
    "paused": AccessState.SUSPENDED,
    "incomplete": AccessState.SUSPENDED,
    "incomplete_expired": AccessState.CANCELED,
    "canceled": AccessState.CANCELED,
}

MODELS = (
    ("openai", "gpt-4o-2024-08-06", "proj_main"),
    ("openai", "gpt-4o-mini-2024-07-18", "proj_main"),
    ("anthropic", "claude-sonnet-4-20250514", "wrkspc_main"),
    ("anthropic", "claude-3-5-haiku-20241022", "wrkspc_main"),
)


def fingerprint(kind: MismatchKind, identity: str) -> str:
    """The fingerprint reconciliation gives a mismatch of this kind and identity."""
    return Finding(kind=kind, identity=identity, summary="").fingerprint


# --- ledger side, as the worker would write it -----------------------------------------------------------------


def grant_topup(
    session: Session,
    store: Store,
    cs_id: str,
    *,
    units: int | None = None,
    amount_minor: int | None = None,
    key: str | None = None,
) -> int:
    """The grant the worker makes for a paid Checkout Session (keyed on its payment intent)."""
    cs = store.render(cs_id)
    pi = cs["payment_intent"]
    if units is None:
        config = get_billing_config()
        units = 0
        for item in store.get(cs_id).line_items:
            pack = config.pack_for_price(item.price)
            assert pack is not None, item.price
            units += pack.credits * item.quantity
    result = grant_credits(
        session,
        cs["customer"],
        units=units,
        source=GrantSource.TOP_UP,
        idempotency_key=key or f"topup:{pi}",
        stripe_object_id=pi,
        stripe_object_type="payment_intent",
        amount_minor=cs["amount_total"] if amount_minor is None else amount_minor,
        currency=cs["currency"],
    )
    return result.grant_id


def grant_renewal(session: Session, store: Store, invoice_id: str) -> int:
    """The grant the worker makes for a paid subscription invoice."""
    inv = store.render(invoice_id)
    record = store.get(invoice_id)
    units = 0
    for line in record.lines:
        plan = get_billing_config().plan_for_price(line.price)
        assert plan is not None, line.price
        units += plan.credits_per_period * line.quantity
    result = grant_credits(
        session,
        inv["customer"],
        units=units,
        source=GrantSource.RENEWAL,
        idempotency_key=f"renewal:{invoice_id}",
        stripe_object_id=invoice_id,
        stripe_object_type="invoice",
        amount_minor=inv["amount_paid"],
        currency=inv["currency"],
    )
    return result.grant_id


def grant_of(session: Session, stripe_object_id: str) -> Grant:
    """The (first) grant naming a Stripe id."""
    return session.scalars(select(Grant).where(Grant.stripe_object_id == stripe_object_id).order_by(Grant.id)).first()  # type: ignore[return-value]


def claw_refund(session: Session, grant: Grant, refunded_minor: int, key: str) -> None:
    """Claw back in proportion to the money refunded, as the worker does."""
    target = grant.units * refunded_minor // (grant.amount_minor or 1)
    if target > grant.clawed_back:
        clawback(session, grant.id, units=target - grant.clawed_back, idempotency_key=key, reason="refund")


def store_all_events(session: Session, events: Iterable[dict[str, Any]], *, status: EventStatus) -> None:
    """Store Stripe events in the inbox, as the receiver would, marked with a processing status."""
    items = []
    for ev in events:
        raw = json.dumps(ev, default=str).encode()
        items.append((raw, parse_envelope(ev)))
    for start in range(0, len(items), 500):
        store_events(session, items[start : start + 500], source=EventSource.WEBHOOK)
    session.execute(update(StripeEvent).values(status=status, processed_at=datetime.now(UTC)))


# --- provider reports ------------------------------------------------------------------------------------------


@dataclass
class UsageGroup:
    cost: Decimal = Decimal(0)
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    line_costs: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))


def usage_groups(session: Session) -> dict[tuple[str, date, str, str], UsageGroup]:
    """The ledger's usage per provider, day, model and workspace, with per-token-type costs."""
    config = get_billing_config()
    groups: dict[tuple[str, date, str, str], UsageGroup] = defaultdict(UsageGroup)
    for u in session.scalars(select(UsageRecord).order_by(UsageRecord.id)):
        at = u.occurred_at if u.occurred_at.tzinfo else u.occurred_at.replace(tzinfo=UTC)
        g = groups[(u.provider or "", at.astimezone(UTC).date(), u.model or "", u.workspace or "")]
        price = config.model_price(u.model or "", u.provider)
        assert price is not None
        g.cost += u.provider_cost_usd
        g.input_tokens += u.input_tokens
        g.output_tokens += u.output_tokens
        g.cached_tokens += u.cached_tokens
        g.line_costs["input"] += u.input_tokens * price.cost_per_million_input_usd / 1_000_000
        g.line_costs["output"] += u.output_tokens * price.cost_per_million_output_usd / 1_000_000
        g.line_costs["cached input"] += u.cached_tokens * price.cost_per_million_cached_usd / 1_000_000
    return groups


_NUMBER = "__number__:"


def _raw_number(value: Decimal) -> str:
    return _NUMBER + format(value, "f")


def _dumps(doc: Any) -> str:
    """JSON with marked Decimals written as bare numbers (the way OpenAI sends dollar amounts)."""
    return re.sub(rf'"{_NUMBER}([-0-9.]+)"', r"\1", json.dumps(doc))


def _epoch(d: date) -> int:
    return int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp())


def write_reports(
    out: Path,
    groups: dict[tuple[str, date, str, str], UsageGroup],
    *,
    cost_drift: dict[tuple[str, date, str, str], Decimal] | None = None,
    usage_drift: dict[tuple[str, date, str, str], int] | None = None,
) -> list[Path]:
    """Write OpenAI Costs + Usage JSON and Anthropic cost_report + usage_report JSON from the ledger's usage,
    adding ``cost_drift`` dollars to a group's input line and ``usage_drift`` output tokens to its usage row."""
    cost_drift = cost_drift or {}
    usage_drift = usage_drift or {}
    by_provider_day: dict[tuple[str, date], list[tuple[tuple[str, date, str, str], UsageGroup]]] = defaultdict(list)
    for key, g in sorted(groups.items()):
        by_provider_day[(key[0], key[1])].append((key, g))
    paths: list[Path] = []

    # OpenAI: amounts are JSON numbers in dollars, written from Decimal text so no float is involved.
    cost_buckets: list[dict[str, Any]] = []
    usage_buckets: list[dict[str, Any]] = []
    for (provider, d), items in sorted(by_provider_day.items()):
        if provider != "openai":
            continue
        cost_results, usage_results = [], []
        for key, g in items:
            _, _, model, scope = key
            for token_type, amount in sorted(g.line_costs.items()):
                if token_type == "input":
                    amount += cost_drift.get(key, Decimal(0))
                cost_results.append(
                    {
                        "object": "organization.costs.result",
                        "amount": {"value": _raw_number(amount), "currency": "usd"},
                        "line_item": f"{model}, {token_type}",
                        "project_id": scope,
                        "api_key_id": None,
                        "quantity": None,
                        "quantity_unit": "tokens",
                    }
                )
            usage_results.append(
                {
                    "object": "organization.usage.completions.result",
                    "input_tokens": g.input_tokens + g.cached_tokens,
                    "input_cached_tokens": g.cached_tokens,
                    "output_tokens": g.output_tokens + usage_drift.get(key, 0),
                    "num_model_requests": 1,
                    "project_id": scope,
                    "model": model,
                }
            )
        start = _epoch(d)
        bounds = {"object": "bucket", "start_time": start, "end_time": start + 86400}
        cost_buckets.append({**bounds, "results": cost_results})
        usage_buckets.append({**bounds, "results": usage_results})
    for name, buckets in (("openai_costs.json", cost_buckets), ("openai_usage.json", usage_buckets)):
        path = out / name
        path.write_text(_dumps({"object": "page", "data": buckets, "has_more": False, "next_page": None}))
        paths.append(path)

    # Anthropic: amounts are decimal strings in cents.
    cost_days, usage_days = [], []
    token_types = {
        "input": "uncached_input_tokens",
        "output": "output_tokens",
        "cached input": "cache_read_input_tokens",
    }
    for (provider, d), items in sorted(by_provider_day.items()):
        if provider != "anthropic":
            continue
        costs, usages = [], []
        for key, g in items:
            _, _, model, scope = key
            for token_type, amount in sorted(g.line_costs.items()):
                if token_type == "input":
                    amount += cost_drift.get(key, Decimal(0))
                costs.append(
                    {
                        "currency": "USD",
                        "amount": format(amount * 100, "f"),
                        "workspace_id": scope,
                        "description": f"{model} {token_type}",
                        "cost_type": "tokens",
                        "model": model,
                        "token_type": token_types[token_type],
                    }
                )
            usages.append(
                {
                    "uncached_input_tokens": g.input_tokens,
                    "cache_creation": {"ephemeral_1h_input_tokens": 0, "ephemeral_5m_input_tokens": 0},
                    "cache_read_input_tokens": g.cached_tokens,
                    "output_tokens": g.output_tokens + usage_drift.get(key, 0),
                    "workspace_id": scope,
                    "model": model,
                }
            )
        bounds = {
            "starting_at": f"{d.isoformat()}T00:00:00Z",
            "ending_at": f"{(d + timedelta(days=1)).isoformat()}T00:00:00Z",
        }
        cost_days.append({**bounds, "results": costs})
        usage_days.append({**bounds, "results": usages})
    path = out / "anthropic_cost.json"
    path.write_text(json.dumps({"data": cost_days, "has_more": False, "next_page": None}))
    paths.append(path)
    path = out / "anthropic_usage.json"
    path.write_text(json.dumps({"data": usage_days, "has_more": False, "next_page": None}))
    paths.append(path)
    return paths


def record_usage(
    session: Session,
    customer_id: str,
    request_id: str,
    *,
    provider: str,
    model: str,
    workspace: str | None,
    at: datetime,
    input_tokens: int,
    output_tokens: int,
    cached_tokens: int = 0,
    billable: bool = True,
    feature: str = "chat",
) -> None:
    """Consume for one AI call with its provider cost computed from list prices."""
    price = get_billing_config().model_price(model, provider)
    assert price is not None
    cost = (
        input_tokens * price.cost_per_million_input_usd
        + output_tokens * price.cost_per_million_output_usd
        + cached_tokens * price.cost_per_million_cached_usd
    ) / 1_000_000
    consume(
        session,
        customer_id,
        request_id=request_id,
        usage=UsageInput(
            user_id="u1",
            workspace=workspace,
            feature=feature,
            provider=provider,
            model=model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_tokens=cached_tokens,
            provider_cost_usd=cost,
            billable=billable,
            occurred_at=at,
        ),
    )


def freeze(session: Session, grant: Grant, key: str) -> None:
    freeze_grant(session, grant.id, idempotency_key=key, reason="dispute opened")


def unfreeze(session: Session, grant: Grant, key: str) -> None:
    unfreeze_grant(session, grant.id, idempotency_key=key, reason="dispute won")


def set_access(session: Session, customer_id: str, state: AccessState, as_of: datetime, source: str) -> None:
    set_access_state(session, customer_id, state, as_of=as_of, source=source)
