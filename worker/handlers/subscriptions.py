"""Subscription events: each subscription's state and access (newest Stripe state wins, per subscription), its
trial credits, and plan changes Stripe charges nothing for at once.

Stripe statuses: https://docs.stripe.com/billing/subscriptions/overview#subscription-statuses
Cancel at period end: https://docs.stripe.com/billing/subscriptions/cancel
Pause: https://docs.stripe.com/billing/subscriptions/pause-payment
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from ledger import grants as ledger_grants
from ledger import subscriptions as ledger_subscriptions
from ledger.errors import IdempotencyConflict
from ledger.models import AccessState, GrantSource
from ledger.plan_changes import Item, PlanNotConfigured, change_effect
from ledger.subscriptions import SubscriptionFacts
from worker.handlers.base import EventContext, Outcome, PermanentEventError, as_int, stripe_id, timestamp
from worker.handlers.plan_change import apply_change
from worker.ordering import Freshness, claim_version, record_version

ACCESS_BY_STATUS: dict[str, AccessState] = {
    "active": AccessState.ACTIVE,
    "trialing": AccessState.TRIALING,
    "past_due": AccessState.PAST_DUE,
    # unpaid: retries are exhausted and invoices stay open; paused: a trial ended without a payment method.
    "unpaid": AccessState.SUSPENDED,
    "paused": AccessState.SUSPENDED,
    # incomplete: the first payment has not succeeded (it has 23 hours to).
    "incomplete": AccessState.SUSPENDED,
    "incomplete_expired": AccessState.CANCELED,
    "canceled": AccessState.CANCELED,
}


def _items(sub: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    raw = sub.get("items")
    data = raw.get("data") if isinstance(raw, Mapping) else None
    return [i for i in data if isinstance(i, Mapping)] if isinstance(data, list) else []


def _item_price(item: Mapping[str, Any]) -> str | None:
    return stripe_id(item.get("price")) or stripe_id(item.get("plan"))


def _plan_items(sub: Mapping[str, Any]) -> list[Item]:
    items = [Item(_item_price(i), max(0, as_int(i.get("quantity"), 1))) for i in _items(sub)]
    if not items and (stripe_id(sub.get("plan")) or stripe_id(sub.get("price"))):
        items = [Item(stripe_id(sub.get("plan")) or stripe_id(sub.get("price")), as_int(sub.get("quantity"), 1))]
    return items


def _period(sub: Mapping[str, Any]) -> tuple[datetime | None, datetime | None]:
    """The current period: top-level before basil, on each item from basil on (the first item's)."""
    start, end = timestamp(sub.get("current_period_start")), timestamp(sub.get("current_period_end"))
    if start is None or end is None:
        for item in _items(sub):
            start = start or timestamp(item.get("current_period_start"))
            end = end or timestamp(item.get("current_period_end"))
    return start, end


def _facts(sub_id: str, sub: Mapping[str, Any], status: str) -> SubscriptionFacts:
    items = _plan_items(sub)
    start, end = _period(sub)
    pause = sub.get("pause_collection")
    return SubscriptionFacts(
        subscription_id=sub_id,
        status=status,
        price=items[0].price if items else None,
        quantity=sum(i.quantity for i in items) if items else 1,
        current_period_start=start,
        current_period_end=end,
        cancel_at_period_end=sub.get("cancel_at_period_end") is True,
        cancel_at=timestamp(sub.get("cancel_at")),
        pause_collection=str(pause.get("behavior")) if isinstance(pause, Mapping) else None,
        trial_end=timestamp(sub.get("trial_end")),
    )


def handle_subscription_changed(ctx: EventContext) -> Outcome:
    """customer.subscription.created|updated|deleted|paused|resumed: the subscription's state, trial and change."""
    sub = ctx.obj
    sub_id = stripe_id(sub.get("id"))
    customer_id = stripe_id(sub.get("customer"))
    status = sub.get("status")
    if sub_id is None or customer_id is None:
        raise PermanentEventError("subscription has no id or no customer")
    if ctx.row.type == "customer.subscription.deleted":
        status = "canceled"
    if not isinstance(status, str) or status not in ACCESS_BY_STATUS:
        raise PermanentEventError(f"unknown subscription status {status!r}")
    # Trial credits and a change Stripe charged nothing for are owed whatever order the events come in.
    notes = [
        _apply_state(ctx, sub_id, customer_id, sub, status),
        _trial_credits(ctx, sub_id, customer_id, sub, status),
        _free_change(ctx, sub_id, customer_id, sub),
    ]
    return Outcome.processed("; ".join(n for n in notes if n))


def _apply_state(ctx: EventContext, sub_id: str, customer_id: str, sub: Mapping[str, Any], status: str) -> str:
    as_of = ctx.created
    # Recorded as the subscription's applied version at once when newer (the state change below commits with it).
    fresh, _ = claim_version(ctx.session, sub_id, "subscription", created=as_of, event_id=ctx.event_id, state=status)
    if fresh in (Freshness.OLDER, Freshness.SAME_EVENT):
        return f"{sub_id}: a state as new or newer is already applied; unchanged"
    if fresh is Freshness.TIE:
        # Two events of one second: Stripe's current object decides which of them is the truth.
        gateway = ctx.require_gateway(f"break a timestamp tie on {sub_id}")
        live = gateway.retrieve("subscription", sub_id)
        if live.get("status") != status:
            return f"{sub_id}: tie at {as_of.isoformat()}, Stripe says {live.get('status')!r}"
        as_of = as_of + timedelta(microseconds=1)
        record_version(ctx.session, sub_id, created=as_of, event_id=ctx.event_id, state=status)
    state = ACCESS_BY_STATUS[status]
    # The grace period runs from the event's own time: a tie settled above records as_of a microsecond on, and
    # the deadline must not depend on whether the event came before or after its same-second twin.
    grace_until = ctx.created + timedelta(days=ctx.config.access.grace_days) if state is AccessState.PAST_DUE else None
    _, applied = ledger_subscriptions.record_subscription(
        ctx.session,
        customer_id,
        _facts(sub_id, sub, status),
        access=state,
        as_of=as_of,
        source=f"{ctx.row.type}:{sub_id}",
        grace_until=grace_until,
    )
    ending = " (cancels at period end)" if sub.get("cancel_at_period_end") is True else ""
    if not applied:
        return f"{sub_id} {status}{ending}: a newer access state of {sub_id} is applied; access unchanged"
    return f"{sub_id} {status}{ending}: access {state.value}"


def _trial_credits(ctx: EventContext, sub_id: str, customer_id: str, sub: Mapping[str, Any], status: str) -> str | None:
    """A trialing subscription's plan may grant ``trial_credits``, once per subscription, until the trial ends."""
    if status != "trialing":
        return None
    items = _plan_items(sub)
    plan = ctx.config.plan_for_price(items[0].price) if items else None
    if plan is None or plan.trial_credits <= 0:
        return None
    trial_end = timestamp(sub.get("trial_end"))
    try:
        result = ledger_grants.grant_credits(
            ctx.session,
            customer_id,
            units=plan.trial_credits,
            source=GrantSource.TRIAL,
            idempotency_key=f"trial:{sub_id}",
            reason=f"{plan.name or plan.price} trial of subscription {sub_id}",
            priority=plan.priority,
            expires_at=trial_end,
            stripe_object_id=sub_id,
            stripe_object_type="subscription",
        )
    except IdempotencyConflict:
        return f"trial credits of {sub_id} already granted"
    if result.replayed:
        return f"trial credits of {sub_id} already granted"
    ledger_subscriptions.record_plan_grant(
        ctx.session,
        result.grant_id,
        subscription_id=sub_id,
        kind="trial",
        period_end=trial_end,
        effective_at=timestamp(sub.get("trial_start")) or ctx.created,
    )
    return f"granted {plan.trial_credits} trial credits for {sub_id}"


def _old_items(sub: Mapping[str, Any], previous: Mapping[str, Any]) -> list[Item] | None:
    """The items before this update, from ``previous_attributes`` (None when the items did not change)."""
    if isinstance(previous.get("items"), Mapping):
        return _plan_items({"items": previous["items"]})
    if "plan" in previous or "price" in previous or "quantity" in previous:
        current = _plan_items(sub)
        price = (
            stripe_id(previous.get("plan"))
            or stripe_id(previous.get("price"))
            or (current[0].price if current else None)
        )
        quantity = as_int(previous.get("quantity"), current[0].quantity if current else 1)
        return [Item(price, quantity)]
    return None


def _free_change(ctx: EventContext, sub_id: str, customer_id: str, sub: Mapping[str, Any]) -> str | None:
    """An item change with no invoice to pay now (no new ``latest_invoice``): apply the policy at once."""
    if ctx.row.type != "customer.subscription.updated":
        return None
    previous = ctx.previous_attributes
    old = _old_items(sub, previous)
    if old is None:
        return None
    if "latest_invoice" in previous:
        return f"{sub_id}: plan change invoiced as {stripe_id(sub.get('latest_invoice'))}; credited when it is paid"
    if isinstance(sub.get("pending_update"), Mapping):
        return f"{sub_id}: plan change pending payment; credited when its invoice is paid"
    new = _plan_items(sub)
    start, end = _period(sub)
    if end is None:
        raise PermanentEventError(f"{sub_id}: plan change without a current period")
    try:
        effect = change_effect(ctx.config, old=old, new=new, changed_at=ctx.created, period_end=end, period_start=start)
    except PlanNotConfigured as exc:
        raise PermanentEventError(f"{sub_id} plan change: {exc}") from exc
    return apply_change(
        ctx,
        effect,
        key=f"plan_change:{ctx.event_id}",
        customer_id=customer_id,
        subscription_id=sub_id,
        changed_at=ctx.created,
        invoice_id=None,
        amount_minor=None,
        currency=None,
        payment_ids=[],
    )
