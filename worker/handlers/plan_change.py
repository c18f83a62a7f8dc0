"""Applying a plan change's effect: a grant keyed by what paid for it, linked to its invoice, or a reduction."""

from __future__ import annotations

from datetime import datetime

from ledger import grants as ledger_grants
from ledger import subscriptions as ledger_subscriptions
from ledger.config import PeriodEnd
from ledger.errors import IdempotencyConflict
from ledger.models import GrantSource
from ledger.plan_changes import ChangeAction, ChangeEffect
from worker.handlers.base import EventContext
from worker.payments import find_funded_grant, link_payment


def apply_change(
    ctx: EventContext,
    effect: ChangeEffect,
    *,
    key: str,
    customer_id: str,
    subscription_id: str,
    changed_at: datetime,
    invoice_id: str | None,
    amount_minor: int | None,
    currency: str | None,
    payment_ids: list[str | None],
) -> str:
    """Grant or take back what ``effect`` says, once per ``key`` (the invoice, or the event of a free change)."""
    if effect.action is ChangeAction.NONE or effect.units <= 0:
        return f"{subscription_id}: {effect.explanation}; no credits change now"
    if effect.action is ChangeAction.REDUCE:
        ledger_subscriptions.record_reduction(
            ctx.session,
            key,
            subscription_id=subscription_id,
            period_end=effect.period_end,
            effective_at=changed_at,
            units=effect.units,
        )
        taken = ledger_subscriptions.settle_period(ctx.session, customer_id, subscription_id, effect.period_end)
        return f"{subscription_id}: {effect.explanation}: up to {effect.units} unspent credits taken back ({taken} now)"
    plan = effect.plan
    assert plan is not None
    expires = effect.period_end if plan.period_end is PeriodEnd.EXPIRE else None
    try:
        result = ledger_grants.grant_credits(
            ctx.session,
            customer_id,
            units=effect.units,
            source=GrantSource.PLAN_CHANGE,
            idempotency_key=key,
            reason=f"{plan.name or plan.price} {effect.explanation} (subscription {subscription_id})",
            priority=plan.priority,
            expires_at=expires,
            stripe_object_id=invoice_id,
            stripe_object_type="invoice" if invoice_id else None,
            amount_minor=amount_minor,
            currency=currency.lower() if currency else None,
            period_start=effect.period_start,
            period_end=effect.period_end,
        )
        grant_id, replayed = result.grant_id, result.replayed
    except IdempotencyConflict:
        # Granted before under other terms (the config changed since): the change stays granted once.
        existing = find_funded_grant(ctx.session, [invoice_id], unlinked=False) if invoice_id else None
        if existing is None:
            raise
        grant_id, replayed = existing.id, True
    ledger_subscriptions.record_plan_grant(
        ctx.session,
        grant_id,
        subscription_id=subscription_id,
        kind="plan_change",
        period_end=effect.period_end,
        effective_at=changed_at,
        supersedes=effect.action is ChangeAction.FULL,
        invoice_id=invoice_id,
    )
    if invoice_id:
        # Refunds and disputes of the proration charge find this grant through its payment's ids.
        ctx.linked_ids |= link_payment(ctx.session, grant_id, customer_id, [invoice_id, *payment_ids])
    ledger_subscriptions.settle_period(ctx.session, customer_id, subscription_id, effect.period_end)
    verb = "already granted" if replayed else "granted"
    return f"{subscription_id}: {effect.explanation}: {verb} {effect.units} credits"
