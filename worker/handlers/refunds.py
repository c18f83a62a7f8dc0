"""Refunds: claw back credits in proportion to the money returned, from the grant that payment funded.

``charge.refunded`` carries the charge's cumulative ``amount_refunded``; ``refund.created`` one refund;
``credit_note.created`` a credit note that refunds (or settles out of band) part of a paid invoice. One refund
can reach us through all three, so amounts are counted by refund id and the charge's total, never summed twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worker.handlers.base import EventContext, Outcome, PermanentEventError, PrerequisiteMissing, as_int, stripe_id
from worker.payments import FundedGrant, RefundApplied, find_funded_grant, record_refund
from worker.review import flag_debt


def funded_grant(ctx: EventContext, ids: list[str | None], *, charge_id: str | None, what: str) -> FundedGrant:
    """The grant the payment behind these ids funded; wait for it when it has not been granted yet."""
    grant = find_funded_grant(ctx.session, ids)
    if grant is None and charge_id and ctx.gateway is not None and not any(i and i.startswith("pi_") for i in ids):
        # The event names only the charge (older shapes): ask Stripe which payment intent or invoice it paid.
        charge = ctx.gateway.retrieve("charge", charge_id)
        ids = [*ids, stripe_id(charge.get("payment_intent")), stripe_id(charge.get("invoice"))]
        grant = find_funded_grant(ctx.session, ids)
    if grant is None:
        awaited = [i for i in ids if i]
        raise PrerequisiteMissing(f"{what}: the payment {', '.join(awaited)} has not been granted yet", awaited)
    return grant


def _combine(steps: list[RefundApplied]) -> RefundApplied:
    last = steps[-1]
    return RefundApplied(
        refunded_minor=last.refunded_minor,
        paid_minor=last.paid_minor,
        clawed_now=sum(s.clawed_now for s in steps),
        clawed_total=last.clawed_total,
        debt=sum(s.debt for s in steps),
    )


def _outcome(ctx: EventContext, grant: FundedGrant, applied: RefundApplied, what: str) -> Outcome:
    if applied.debt:
        flag_debt(ctx, grant, units=applied.debt, what=what)
    note = f"{what}: refunded {applied.refunded_minor} of {applied.paid_minor}; clawed {applied.clawed_now} units"
    return Outcome.processed(note + (f" ({applied.debt} already spent, recorded as debt)" if applied.debt else ""))


def handle_charge_refunded(ctx: EventContext) -> Outcome:
    """charge.refunded: count the charge's cumulative refunded amount (and each listed refund)."""
    charge = ctx.obj
    charge_id = stripe_id(charge.get("id"))
    if charge_id is None:
        raise PermanentEventError("charge has no id")
    ids = [stripe_id(charge.get("payment_intent")), charge_id, stripe_id(charge.get("invoice"))]
    grant = funded_grant(ctx, ids, charge_id=charge_id, what=f"refund of {charge_id}")
    refunds = charge.get("refunds")
    listed = refunds.get("data") if isinstance(refunds, Mapping) else None
    steps: list[RefundApplied] = []
    for refund in listed if isinstance(listed, list) else []:
        if isinstance(refund, Mapping) and refund.get("status") in ("succeeded", "pending", None):
            refund_id = stripe_id(refund.get("id"))
            if refund_id:
                steps.append(
                    record_refund(
                        ctx.session,
                        grant,
                        refund_key=refund_id,
                        kind="refund",
                        amount_minor=as_int(refund.get("amount")),
                        reason=f"refund {refund_id} of {charge_id}",
                        stripe_object_id=refund_id,
                    )
                )
    steps.append(
        record_refund(
            ctx.session,
            grant,
            refund_key=f"charge:{charge_id}",
            kind="charge",
            amount_minor=as_int(charge.get("amount_refunded")),
            reason=f"refund of {charge_id} (charge.refunded {ctx.event_id})",
            stripe_object_id=charge_id,
        )
    )
    return _outcome(ctx, grant, _combine(steps), f"refund of {charge_id}")


def handle_refund_created(ctx: EventContext) -> Outcome:
    """refund.created (and charge.refund.updated to succeeded): count one refund by its id."""
    refund = ctx.obj
    refund_id = stripe_id(refund.get("id"))
    if refund_id is None:
        raise PermanentEventError("refund has no id")
    if refund.get("status") in ("failed", "canceled"):
        return Outcome.ignore(f"refund {refund_id} is {refund.get('status')}: no money returned")
    charge_id = stripe_id(refund.get("charge"))
    ids = [stripe_id(refund.get("payment_intent")), charge_id]
    grant = funded_grant(ctx, ids, charge_id=charge_id, what=f"refund {refund_id}")
    applied = record_refund(
        ctx.session,
        grant,
        refund_key=refund_id,
        kind="refund",
        amount_minor=as_int(refund.get("amount")),
        reason=f"refund {refund_id} ({ctx.row.type} {ctx.event_id})",
        stripe_object_id=refund_id,
    )
    return _outcome(ctx, grant, applied, f"refund {refund_id}")


def _credit_note_refunds(note: Mapping[str, Any]) -> list[tuple[str, int]]:
    found: list[tuple[str, int]] = []
    refunds = note.get("refunds")
    if isinstance(refunds, list):  # 2025+: [{refund, amount_refunded}]
        for item in refunds:
            if isinstance(item, Mapping) and stripe_id(item.get("refund")):
                found.append((str(stripe_id(item.get("refund"))), as_int(item.get("amount_refunded"))))
    single = stripe_id(note.get("refund"))
    if single and not found:
        found.append((single, as_int(note.get("refund_amount"), as_int(note.get("amount")))))
    return found


def handle_credit_note_created(ctx: EventContext) -> Outcome:
    """credit_note.created after payment: claw back for what it refunds or settles out of band."""
    note = ctx.obj
    note_id = stripe_id(note.get("id"))
    invoice_id = stripe_id(note.get("invoice"))
    if note_id is None or invoice_id is None:
        raise PermanentEventError("credit note has no id or no invoice")
    if note.get("type") == "pre_payment":
        return Outcome.ignore("pre_payment credit note lowers what an unpaid invoice asks for; nothing to claw back")
    if note.get("status") == "void":
        return Outcome.ignore(f"credit note {note_id} is void")
    refunds = _credit_note_refunds(note)
    out_of_band = as_int(note.get("out_of_band_amount"))
    refund_amount = as_int(note.get("refund_amount"))
    if not refunds and refund_amount:
        # No refund id to match with refund.created: count it under the note's own key.
        out_of_band += refund_amount
    if not refunds and not out_of_band:
        return Outcome.ignore(f"credit note {note_id} returns no money (customer balance credit only)")
    grant = funded_grant(ctx, [invoice_id], charge_id=None, what=f"credit note {note_id}")
    steps: list[RefundApplied] = []
    for refund_id, amount in refunds:
        steps.append(
            record_refund(
                ctx.session,
                grant,
                refund_key=refund_id,
                kind="refund",
                amount_minor=amount,
                reason=f"credit note {note_id} refund {refund_id}",
                stripe_object_id=refund_id,
            )
        )
    if out_of_band:
        steps.append(
            record_refund(
                ctx.session,
                grant,
                refund_key=f"credit_note:{note_id}",
                kind="credit_note",
                amount_minor=out_of_band,
                reason=f"credit note {note_id}",
                stripe_object_id=note_id,
            )
        )
    return _outcome(ctx, grant, _combine(steps), f"credit note {note_id}")
