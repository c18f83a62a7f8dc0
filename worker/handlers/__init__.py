"""Event handlers: one small function per Stripe event type, dispatched from one table."""

from __future__ import annotations

from collections.abc import Callable

from worker.handlers.base import EventContext, Outcome
from worker.handlers.disputes import handle_dispute_closed, handle_dispute_created
from worker.handlers.invoices import handle_invoice_paid, handle_invoice_payment_failed
from worker.handlers.refunds import handle_charge_refunded, handle_credit_note_created, handle_refund_created
from worker.handlers.subscriptions import handle_subscription_changed
from worker.handlers.topups import (
    handle_charge_succeeded,
    handle_checkout_session_paid,
    handle_payment_intent_succeeded,
)

Handler = Callable[[EventContext], Outcome]

HANDLERS: dict[str, Handler] = {
    "checkout.session.completed": handle_checkout_session_paid,
    "checkout.session.async_payment_succeeded": handle_checkout_session_paid,
    "payment_intent.succeeded": handle_payment_intent_succeeded,
    # Only charges without a payment intent (the older Charges API) grant; the others are ignored by it.
    "charge.succeeded": handle_charge_succeeded,
    "invoice.paid": handle_invoice_paid,
    "invoice.payment_failed": handle_invoice_payment_failed,
    "customer.subscription.created": handle_subscription_changed,
    "customer.subscription.updated": handle_subscription_changed,
    "customer.subscription.deleted": handle_subscription_changed,
    "customer.subscription.paused": handle_subscription_changed,
    "customer.subscription.resumed": handle_subscription_changed,
    "charge.refunded": handle_charge_refunded,
    "refund.created": handle_refund_created,
    "credit_note.created": handle_credit_note_created,
    "charge.dispute.created": handle_dispute_created,
    "charge.dispute.closed": handle_dispute_closed,
}

# Types Stripe sends us that change nothing in the ledger, each with the reason a person will read.
IGNORED: dict[str, str] = {
    "customer.created": "the account opens with its first grant or state change",
    "customer.updated": "customer details are not ledger state",
    "charge.captured": "the payment's payment_intent.succeeded grants the credits",
    "charge.refund.updated": "refund amounts are counted from refund.created and charge.refunded",
    "refund.updated": "refund amounts are counted from refund.created and charge.refunded",
    "charge.dispute.updated": "evidence updates change no money; created and closed do",
    "charge.dispute.funds_withdrawn": "the dispute's created/closed events carry its ledger effect",
    "charge.dispute.funds_reinstated": "the dispute's created/closed events carry its ledger effect",
    "payment_intent.created": "nothing is paid yet",
    "payment_intent.payment_failed": "no money was received, so no credits change",
    "payment_intent.canceled": "no money was received, so no credits change",
    "checkout.session.expired": "no money was received",
    "checkout.session.async_payment_failed": "no money was received",
    "invoice.created": "a draft invoice is not a payment; invoice.paid grants",
    "invoice.finalized": "a finalized invoice is not a payment; invoice.paid grants",
    "invoice.updated": "invoice.paid and invoice.payment_failed carry the effect",
    "invoice.payment_succeeded": "duplicate of invoice.paid, which grants the credits",
    "invoice.upcoming": "nothing is paid yet",
    "invoice_payment.paid": "invoice.paid grants the period's credits",
    "customer.subscription.trial_will_end": "a reminder; the status change arrives as customer.subscription.updated",
    "billing.credit_grant.created": "Stripe Billing credits are not used: this ledger keeps its own grants",
    "billing.credit_grant.updated": "Stripe Billing credits are not used: this ledger keeps its own grants",
    "billing.credit_balance_transaction.created": "Stripe Billing credits are not used: this ledger keeps its own",
    "billing.meter.created": "meters are Stripe Billing configuration, not ledger state",
    "v1.billing.meter.error_report_triggered": "a Stripe meter error report (thin event); no ledger effect",
}


def handler_for(event_type: str) -> Handler | None:
    """The handler of an event type, or None when the type is ignored."""
    return HANDLERS.get(event_type)


def ignore_reason(event_type: str) -> str:
    """Why an event type without a handler changes nothing."""
    return IGNORED.get(event_type, f"no handler for event type {event_type!r}")
