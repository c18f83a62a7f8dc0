"""Disputes: opened sets the funded credits aside, lost claws them back, won gives them back.

A dispute's events may arrive in any order; its applied version makes a late ``created`` after ``closed`` a
no-op. https://docs.stripe.com/disputes/how-disputes-work
"""

from __future__ import annotations

from ledger import clawback as ledger_clawback
from worker.handlers.base import EventContext, Outcome, PermanentEventError, as_int, stripe_id
from worker.handlers.refunds import funded_grant
from worker.ordering import Freshness, claim_version
from worker.review import flag_debt

LOST = ("lost",)
WON = ("won", "warning_closed", "prevented")


def _dispute_key(ctx: EventContext) -> tuple[str, str | None]:
    dispute = ctx.obj
    charge_id = stripe_id(dispute.get("charge"))
    # Legacy payloads carry no dispute id; a charge has at most one dispute.
    key = stripe_id(dispute.get("id")) or (f"dispute-of:{charge_id}" if charge_id else None)
    if key is None:
        raise PermanentEventError("dispute has neither an id nor a charge")
    return key, charge_id


def handle_dispute_created(ctx: EventContext) -> Outcome:
    """charge.dispute.created: freeze what remains of the grant the disputed payment funded."""
    key, charge_id = _dispute_key(ctx)
    grant = funded_grant(
        ctx, [stripe_id(ctx.obj.get("payment_intent")), charge_id], charge_id=charge_id, what=f"dispute {key}"
    )
    # Recorded as the dispute's applied version at once when newer (the freeze below commits with it).
    fresh, current = claim_version(
        ctx.session, key, "dispute", created=ctx.created, event_id=ctx.event_id, state=str(ctx.obj.get("status"))
    )
    if fresh is not Freshness.NEWER:
        return Outcome.processed(f"dispute {key}: a newer state is applied ({current.state if current else ''})")
    frozen = ledger_clawback.freeze_grant(
        ctx.session, grant.id, idempotency_key=f"dispute:{key}:freeze", reason=f"dispute {key} opened"
    )
    return Outcome.processed(f"dispute {key}: froze {frozen} units of grant {grant.id}")


def handle_dispute_closed(ctx: EventContext) -> Outcome:
    """charge.dispute.closed: lost claws back the disputed share; won (or lost's remainder) is unfrozen."""
    key, charge_id = _dispute_key(ctx)
    status = ctx.obj.get("status")
    if status not in LOST + WON:
        raise PermanentEventError(f"dispute {key} closed with unknown status {status!r}")
    grant = funded_grant(
        ctx, [stripe_id(ctx.obj.get("payment_intent")), charge_id], charge_id=charge_id, what=f"dispute {key}"
    )
    fresh, current = claim_version(
        ctx.session, key, "dispute", created=ctx.created, event_id=ctx.event_id, state=str(status)
    )
    if fresh is not Freshness.NEWER:
        return Outcome.processed(f"dispute {key}: already closed ({current.state if current else ''})")
    note = ""
    if status in LOST:
        paid = grant.amount_minor or 0
        amount = min(as_int(ctx.obj.get("amount")), paid) if paid else 0
        units = grant.units * amount // paid if paid else grant.units
        if units > 0:
            result = ledger_clawback.clawback(
                ctx.session,
                grant.id,
                units=units,
                idempotency_key=f"dispute:{key}:lost",
                reason=f"dispute {key} lost",
                stripe_object_id=key if key.startswith(("du_", "dp_")) else charge_id,
            )
            if result.debt:
                flag_debt(ctx, grant, units=result.debt, what=f"dispute {key} lost")
            note = f"clawed {result.clawed} units, {result.debt} as debt; "
    released = ledger_clawback.unfreeze_grant(
        ctx.session, grant.id, idempotency_key=f"dispute:{key}:release", reason=f"dispute {key} {status}"
    )
    return Outcome.processed(f"dispute {key} {status}: {note}released {released} frozen units")
