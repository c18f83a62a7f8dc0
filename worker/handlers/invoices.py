"""Subscription invoices: a paid period grants the plan's credits; a failed renewal starts the grace period.

Two shapes reach real accounts. Before 2025 the invoice names its subscription in ``invoice.subscription`` and
lines carry ``price``/``plan``; from ``2025-03-31.basil`` on it is ``invoice.parent.subscription_details`` and
lines carry ``pricing.price_details`` and ``parent.subscription_item_details``. Both are read here.
See https://docs.stripe.com/changelog/basil/2025-03-31/adds-new-parent-field-to-invoicing-objects
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ledger import accounts as ledger_accounts
from ledger import grants as ledger_grants
from ledger import subscriptions as ledger_subscriptions
from ledger.config import PeriodEnd, Plan
from ledger.errors import IdempotencyConflict
from ledger.models import AccessState, GrantSource
from ledger.plan_changes import PlanNotConfigured, change_effect, is_proration_line, proration_lines
from worker.handlers.base import EventContext, Outcome, PermanentEventError, as_int, stripe_id, timestamp
from worker.handlers.plan_change import apply_change
from worker.payments import find_funded_grant, link_payment

RENEWAL_REASONS = ("subscription_create", "subscription_cycle")
SUBSCRIPTION_REASONS = (*RENEWAL_REASONS, "subscription_update", "subscription_threshold", "subscription")


def _lines(invoice: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    lines = invoice.get("lines")
    data = lines.get("data") if isinstance(lines, Mapping) else None
    return [line for line in data if isinstance(line, Mapping)] if isinstance(data, list) else []


def subscription_id_of(invoice: Mapping[str, Any]) -> str | None:
    """The invoice's subscription, from the pre-2025 or the basil/dahlia shape."""
    direct = stripe_id(invoice.get("subscription"))
    if direct:
        return direct
    parent = invoice.get("parent")
    if isinstance(parent, Mapping):
        details = parent.get("subscription_details")
        if isinstance(details, Mapping) and stripe_id(details.get("subscription")):
            return stripe_id(details.get("subscription"))
    for line in _lines(invoice):
        sub = stripe_id(line.get("subscription"))
        if sub:
            return sub
        line_parent = line.get("parent")
        if isinstance(line_parent, Mapping):
            item = line_parent.get("subscription_item_details")
            if isinstance(item, Mapping) and stripe_id(item.get("subscription")):
                return stripe_id(item.get("subscription"))
    return None


def _line_price(line: Mapping[str, Any]) -> str | None:
    for key in ("price", "plan"):
        value = line.get(key)
        if value:
            return stripe_id(value)
    pricing = line.get("pricing")
    if isinstance(pricing, Mapping):
        details = pricing.get("price_details")
        if isinstance(details, Mapping):
            return stripe_id(details.get("price"))
    return None


def _is_subscription_line(line: Mapping[str, Any]) -> bool:
    if line.get("type") == "subscription" or line.get("subscription"):
        return True
    parent = line.get("parent")
    return isinstance(parent, Mapping) and parent.get("type") == "subscription_item_details"


@dataclass(frozen=True, slots=True)
class PlanLine:
    plan: Plan
    quantity: int
    period_start: datetime | None
    period_end: datetime | None


def _plan_lines(ctx: EventContext, invoice: Mapping[str, Any]) -> tuple[list[PlanLine], list[str]]:
    found: list[PlanLine] = []
    unknown: list[str] = []
    for line in _lines(invoice):
        if not _is_subscription_line(line) or is_proration_line(line):
            continue
        price = _line_price(line)
        plan = ctx.config.plan_for_price(price)
        if plan is None:
            unknown.append(str(price))
            continue
        raw_period = line.get("period")
        period: Mapping[str, Any] = raw_period if isinstance(raw_period, Mapping) else {}
        found.append(
            PlanLine(
                plan=plan,
                quantity=max(1, as_int(line.get("quantity"), 1)),
                period_start=timestamp(period.get("start")),
                period_end=timestamp(period.get("end")),
            )
        )
    return found, unknown


def _payment_ids(invoice: Mapping[str, Any]) -> list[str | None]:
    ids: list[str | None] = [stripe_id(invoice.get("charge")), stripe_id(invoice.get("payment_intent"))]
    payments = invoice.get("payments")
    data = payments.get("data") if isinstance(payments, Mapping) else None
    for payment in data if isinstance(data, list) else []:
        inner = payment.get("payment") if isinstance(payment, Mapping) else None
        if isinstance(inner, Mapping):
            ids += [stripe_id(inner.get("payment_intent")), stripe_id(inner.get("charge"))]
    return ids


def handle_invoice_paid(ctx: EventContext) -> Outcome:
    """invoice.paid for a subscription's first or next period: grant the plan's credits for that period."""
    invoice = ctx.obj
    invoice_id = stripe_id(invoice.get("id"))
    reason = invoice.get("billing_reason")
    if reason == "subscription_update":
        return _plan_change_paid(ctx, invoice)
    if reason not in RENEWAL_REASONS:
        return Outcome.ignore(f"billing_reason {reason!r} is not a subscription start, renewal or change")
    customer_id = stripe_id(invoice.get("customer"))
    if invoice_id is None or customer_id is None:
        raise PermanentEventError("invoice has no id or no customer")
    subscription = subscription_id_of(invoice)
    ids = [invoice_id, *_payment_ids(invoice)]
    lines, unknown = _plan_lines(ctx, invoice)
    if not lines:
        if (existing := find_funded_grant(ctx.session, [invoice_id], unlinked=False)) is not None:
            return _already_granted(ctx, existing.id, customer_id, ids)
        raise PermanentEventError(
            f"invoice {invoice_id}: no plan in the billing config for prices {sorted(set(unknown)) or 'none'}"
        )
    units = sum(line.plan.credits_per_period * line.quantity for line in lines)
    first = lines[0]
    period_start = first.period_start or timestamp(invoice.get("period_start"))
    period_end = first.period_end or timestamp(invoice.get("period_end"))
    expires = first.plan.period_end == PeriodEnd.EXPIRE and period_end is not None
    try:
        # The grant's key is the invoice: a redelivery finds the period's grant instead of making another.
        result = ledger_grants.grant_credits(
            ctx.session,
            customer_id,
            units=units,
            source=GrantSource.RENEWAL,
            idempotency_key=f"renewal:{invoice_id}",
            reason=f"{first.plan.name or first.plan.price} {reason} {invoice_id} (subscription {subscription})",
            priority=first.plan.priority,
            expires_at=period_end if expires else None,
            stripe_object_id=invoice_id,
            stripe_object_type="invoice",
            amount_minor=as_int(invoice.get("amount_paid")),
            currency=currency.lower() if isinstance(currency := invoice.get("currency"), str) else None,
            period_start=period_start,
            period_end=period_end,
        )
    except IdempotencyConflict:
        # Granted before under other terms (the plan's config changed since): the period stays granted once.
        existing = find_funded_grant(ctx.session, [invoice_id], unlinked=False)
        if existing is None:
            raise
        return _already_granted(ctx, existing.id, customer_id, ids)
    if result.replayed:
        return _already_granted(ctx, result.grant_id, customer_id, ids)
    ctx.linked_ids |= link_payment(ctx.session, result.grant_id, customer_id, ids)
    if subscription is not None:
        # The period's plan grant: a full upgrade or a prorated downgrade of this period may already be applied.
        ledger_subscriptions.record_plan_grant(
            ctx.session,
            result.grant_id,
            subscription_id=subscription,
            kind="period",
            period_end=period_end,
            effective_at=period_start or ctx.created,
            invoice_id=invoice_id,
        )
        ledger_subscriptions.settle_period(ctx.session, customer_id, subscription, period_end)
    _paid_restores_access(ctx, customer_id, subscription, invoice_id)
    return Outcome.processed(f"granted {result.units} units for {invoice_id} to {customer_id}")


def _paid_restores_access(ctx: EventContext, customer_id: str, subscription: str | None, invoice_id: str) -> None:
    # A paid invoice restores access (after a failed attempt, say), unless a newer state is already applied.
    source = f"invoice.paid:{invoice_id}"
    if subscription is not None:
        ledger_subscriptions.set_subscription_access(
            ctx.session, customer_id, subscription, AccessState.ACTIVE, as_of=ctx.created, source=source
        )
    else:
        ledger_accounts.set_access_state(ctx.session, customer_id, AccessState.ACTIVE, as_of=ctx.created, source=source)


def _already_granted(ctx: EventContext, grant_id: int, customer_id: str, ids: list[str | None]) -> Outcome:
    ctx.linked_ids |= link_payment(ctx.session, grant_id, customer_id, ids)
    return Outcome.processed(f"period already granted (grant {grant_id})")


def _plan_change_paid(ctx: EventContext, invoice: Mapping[str, Any]) -> Outcome:
    """invoice.paid of a change of plan or quantity (``subscription_update``): the [plan_changes] policy."""
    invoice_id = stripe_id(invoice.get("id"))
    customer_id = stripe_id(invoice.get("customer"))
    subscription = subscription_id_of(invoice)
    if invoice_id is None or customer_id is None or subscription is None:
        raise PermanentEventError("subscription_update invoice has no id, customer or subscription")
    lines = proration_lines(invoice)
    if lines is None:
        return Outcome.ignore(f"invoice {invoice_id}: subscription_update without proration lines changes no credits")
    try:
        effect = change_effect(ctx.config, old=lines.old, new=lines.new, changed_at=lines.changed_at,
                               period_end=lines.period_end)  # fmt: skip
    except PlanNotConfigured as exc:
        raise PermanentEventError(f"invoice {invoice_id}: {exc}") from exc
    currency = invoice.get("currency")
    note = apply_change(
        ctx,
        effect,
        key=f"plan_change:{invoice_id}",
        customer_id=customer_id,
        subscription_id=subscription,
        changed_at=lines.changed_at,
        invoice_id=invoice_id,
        amount_minor=as_int(invoice.get("amount_paid")),
        currency=currency if isinstance(currency, str) else None,
        payment_ids=_payment_ids(invoice),
    )
    _paid_restores_access(ctx, customer_id, subscription, invoice_id)
    return Outcome.processed(note)


def handle_invoice_payment_failed(ctx: EventContext) -> Outcome:
    """invoice.payment_failed for a subscription: past_due until the grace deadline."""
    invoice = ctx.obj
    reason = invoice.get("billing_reason")
    if reason not in SUBSCRIPTION_REASONS and subscription_id_of(invoice) is None:
        return Outcome.ignore(f"billing_reason {reason!r}: not a subscription invoice, access is unaffected")
    customer_id = stripe_id(invoice.get("customer"))
    if customer_id is None:
        raise PermanentEventError("invoice has no customer")
    grace_until = ctx.created + timedelta(days=ctx.config.access.grace_days)
    source = f"invoice.payment_failed:{stripe_id(invoice.get('id'))}"
    subscription = subscription_id_of(invoice)
    if subscription is not None:
        applied = ledger_subscriptions.set_subscription_access(
            ctx.session, customer_id, subscription, AccessState.PAST_DUE, as_of=ctx.created, source=source,
            grace_until=grace_until,
        )  # fmt: skip
    else:
        applied = ledger_accounts.set_access_state(
            ctx.session, customer_id, AccessState.PAST_DUE, as_of=ctx.created, source=source, grace_until=grace_until
        )
    if not applied:
        return Outcome.processed("a newer access state is already applied; unchanged")
    return Outcome.processed(f"{customer_id} past_due until {grace_until.isoformat()}")
