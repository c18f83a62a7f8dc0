"""Subscription state to access state, newest Stripe state wins.

Stripe statuses: https://docs.stripe.com/billing/subscriptions/overview#subscription-statuses
"""

from __future__ import annotations

from datetime import timedelta

from ledger import accounts as ledger_accounts
from ledger.models import AccessState
from worker.handlers.base import EventContext, Outcome, PermanentEventError, stripe_id
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


def handle_subscription_changed(ctx: EventContext) -> Outcome:
    """customer.subscription.created|updated|deleted|paused|resumed: map the status to access state."""
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
    as_of = ctx.created
    # Recorded as the subscription's applied version at once when newer (the access change below commits with it).
    fresh, _ = claim_version(ctx.session, sub_id, "subscription", created=as_of, event_id=ctx.event_id, state=status)
    if fresh in (Freshness.OLDER, Freshness.SAME_EVENT):
        return Outcome.processed(f"{sub_id}: a state as new or newer is already applied; unchanged")
    if fresh is Freshness.TIE:
        # Two events of one second: Stripe's current object decides which of them is the truth.
        gateway = ctx.require_gateway(f"break a timestamp tie on {sub_id}")
        live = gateway.retrieve("subscription", sub_id)
        if live.get("status") != status:
            return Outcome.processed(f"{sub_id}: tie at {as_of.isoformat()}, Stripe says {live.get('status')!r}")
        as_of = as_of + timedelta(microseconds=1)
        record_version(ctx.session, sub_id, created=as_of, event_id=ctx.event_id, state=status)
    state = ACCESS_BY_STATUS[status]
    # The grace period runs from the event's own time: a tie settled above records as_of a microsecond on, and
    # the deadline must not depend on whether the event came before or after its same-second twin.
    grace_until = ctx.created + timedelta(days=ctx.config.access.grace_days) if state is AccessState.PAST_DUE else None
    applied = ledger_accounts.set_access_state(
        ctx.session, customer_id, state, as_of=as_of, source=f"{ctx.row.type}:{sub_id}", grace_until=grace_until
    )
    if not applied:
        return Outcome.processed(f"{sub_id} {status}: a newer access state of {customer_id} is applied; unchanged")
    return Outcome.processed(f"{customer_id} {state.value} ({sub_id} {status})")
