"""Top-ups: a paid one-off payment becomes one credit grant, however many events describe it.

Checkout sends ``checkout.session.completed`` (and ``async_payment_succeeded`` for delayed methods); direct
integrations send ``payment_intent.succeeded``. All of them key the grant on the payment intent id, so the
second event for one payment finds the grant made by the first.

Every field of the grant is the same whatever the order: the reason names only the payment, and an expiring
pack counts its days from the payment's earliest known moment (the checkout session's or the payment intent's
``created``, whichever is earlier): the event that makes the grant records the moment it knows as the grant's
``period_start``, and a later event that knows an earlier one moves the start and the expiry back together.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from decimal import ROUND_FLOOR, Decimal
from typing import Any

from sqlalchemy import select, update

from ledger import grants as ledger_grants
from ledger.models import Grant, GrantSource
from ledger.posting import as_utc
from worker.handlers.base import (
    EventContext,
    Outcome,
    PermanentEventError,
    as_int,
    metadata,
    stripe_id,
    timestamp,
)
from worker.payments import find_funded_grant, link_payment

# Metadata keys an integration may set on the session or payment intent to say what was bought.
CREDITS_KEYS = ("credits",)
PRICE_KEYS = ("price_id", "price", "pack", "credit_pack")


def _credits_from_metadata(ctx: EventContext, meta: Mapping[str, Any]) -> tuple[int, int | None, int | None] | None:
    """(credits, priority, expires_after_days) named by metadata, if any."""
    for key in CREDITS_KEYS:
        if key in meta:
            units = as_int(meta[key])
            if units <= 0:
                raise PermanentEventError(f"metadata.{key} must be a positive integer, got {meta[key]!r}")
            return units, None, None
    for key in PRICE_KEYS:
        price = meta.get(key)
        if isinstance(price, str):
            pack = ctx.config.pack_for_price(price)
            if pack is None:
                raise PermanentEventError(f"metadata.{key}={price!r} is not a credit pack in the billing config")
            quantity = max(1, as_int(meta.get("quantity"), 1))
            return pack.credits * quantity, pack.priority, pack.expires_after_days
    return None


def _line_item_price(item: Mapping[str, Any]) -> str | None:
    price = item.get("price")
    if isinstance(price, Mapping):
        return stripe_id(price) or (price.get("lookup_key") if isinstance(price.get("lookup_key"), str) else None)
    pricing = item.get("pricing")
    if isinstance(pricing, Mapping):
        details = pricing.get("price_details")
        if isinstance(details, Mapping):
            return stripe_id(details.get("price"))
    return stripe_id(price)


def _credits_from_line_items(
    ctx: EventContext, items: list[dict[str, Any]]
) -> tuple[int, int | None, int | None] | None:
    units = 0
    priority: int | None = None
    expiry_days: int | None = None
    for item in items:
        price_obj = item.get("price")
        candidates = [_line_item_price(item)]
        if isinstance(price_obj, Mapping) and isinstance(price_obj.get("lookup_key"), str):
            candidates.append(price_obj["lookup_key"])
        pack = next((p for p in (ctx.config.pack_for_price(c) for c in candidates) if p), None)
        if pack is None:
            continue
        units += pack.credits * max(1, as_int(item.get("quantity"), 1))
        priority = pack.priority if priority is None else max(priority, pack.priority)
        if pack.expires_after_days is not None:
            expiry_days = pack.expires_after_days if expiry_days is None else min(expiry_days, pack.expires_after_days)
    return (units, priority, expiry_days) if units > 0 else None


def _fallback_credits(ctx: EventContext, amount_minor: int) -> tuple[int, int | None, int | None]:
    rate = ctx.config.credits.fallback_credits_per_minor_unit
    units = int((Decimal(amount_minor) * rate).to_integral_value(rounding=ROUND_FLOOR))
    return units, None, None


def _grant_topup(
    ctx: EventContext,
    *,
    payment_key: str,
    payment_type: str,
    customer_id: str | None,
    amount_minor: int,
    currency: str | None,
    paid_at: datetime,
    linked: list[str | None],
    credits: tuple[int, int | None, int | None],
) -> Outcome:
    units, priority, expiry_days = credits
    if customer_id is None:
        raise PermanentEventError(f"payment {payment_key} has no Stripe customer, so no account to credit")
    if units <= 0:
        return Outcome.ignore(f"payment {payment_key} of {amount_minor} minor units buys no credits")
    result = ledger_grants.grant_credits(
        ctx.session,
        customer_id,
        units=units,
        source=GrantSource.TOP_UP,
        idempotency_key=f"topup:{payment_key}",
        reason=f"top-up {payment_key}",
        priority=priority if priority is not None else ctx.config.credits.topup_priority,
        expires_at=paid_at + timedelta(days=expiry_days) if expiry_days else None,
        stripe_object_id=payment_key,
        stripe_object_type=payment_type,
        amount_minor=amount_minor,
        currency=currency.lower() if currency else None,
        period_start=paid_at,
    )
    ctx.linked_ids |= link_payment(ctx.session, result.grant_id, customer_id, [payment_key, *linked])
    verb = "already granted" if result.replayed else "granted"
    return Outcome.processed(f"{verb} {result.units} units to {customer_id} for {payment_key}")


def _existing(ctx: EventContext, customer_id: str | None, ids: list[str | None], paid_at: datetime) -> Outcome | None:
    """When another event of this payment already made its grant, link the ids this one adds, and move the
    grant's start (and expiry) back when this event knows an earlier moment of the payment."""
    # Only the worker's own links: a top-up grant is always made (and linked) here.
    grant = find_funded_grant(ctx.session, ids, unlinked=False)
    if grant is None:
        return None
    ctx.linked_ids |= link_payment(ctx.session, grant.id, customer_id or "", ids)
    start, expires = ctx.session.execute(select(Grant.period_start, Grant.expires_at).where(Grant.id == grant.id)).one()
    start, expires = as_utc(start), as_utc(expires)
    if start is not None and paid_at < start:
        shift = start - paid_at
        ctx.session.execute(
            update(Grant)
            .where(Grant.id == grant.id)
            .values(period_start=paid_at, expires_at=expires - shift if expires is not None else None)
            .execution_options(synchronize_session=False)
        )
        return Outcome.processed(f"payment already granted (grant {grant.id}); its start moved back to {paid_at}")
    return Outcome.processed(f"payment already granted (grant {grant.id}); nothing new")


def _charge_ids(obj: Mapping[str, Any]) -> list[str | None]:
    ids: list[str | None] = [stripe_id(obj.get("latest_charge"))]
    charges = obj.get("charges")
    if isinstance(charges, Mapping) and isinstance(charges.get("data"), list):
        ids.extend(stripe_id(c) for c in charges["data"])
    return ids


def handle_checkout_session_paid(ctx: EventContext) -> Outcome:
    """checkout.session.completed / async_payment_succeeded: grant the pack bought, once per payment."""
    session = ctx.obj
    session_id = stripe_id(session.get("id"))
    if session.get("mode") != "payment":
        return Outcome.ignore(f"checkout mode {session.get('mode')!r}: subscriptions are credited by invoice.paid")
    if session.get("payment_status") not in ("paid", "no_payment_required"):
        return Outcome.ignore(
            f"payment_status {session.get('payment_status')!r}: credited when "
            "checkout.session.async_payment_succeeded arrives"
        )
    if session_id is None:
        raise PermanentEventError("checkout session has no id")
    payment_intent = stripe_id(session.get("payment_intent"))
    customer_id = stripe_id(session.get("customer")) or _customer_from_metadata(session)
    payment_key = payment_intent or session_id
    ids: list[str | None] = [payment_intent, session_id, stripe_id(session.get("invoice"))]
    paid_at = timestamp(session.get("created")) or ctx.created
    done = _existing(ctx, customer_id, ids, paid_at)
    if done is not None:
        return done
    amount = as_int(session.get("amount_total"))
    credits = _credits_from_metadata(ctx, metadata(session))
    if credits is None:
        gateway = ctx.require_gateway(f"read the line items of {session_id}")
        credits = _credits_from_line_items(ctx, gateway.retrieve_checkout_session_line_items(session_id))
    if credits is None:
        credits = _fallback_credits(ctx, amount)
    return _grant_topup(
        ctx,
        payment_key=payment_key,
        payment_type="payment_intent" if payment_intent else "checkout_session",
        customer_id=customer_id,
        amount_minor=amount,
        currency=session.get("currency"),
        paid_at=paid_at,
        linked=ids,
        credits=credits,
    )


def _customer_from_metadata(obj: Mapping[str, Any]) -> str | None:
    value = metadata(obj).get("customer_id")
    return value if isinstance(value, str) and value.startswith("cus_") else None


def handle_payment_intent_succeeded(ctx: EventContext) -> Outcome:
    """payment_intent.succeeded: a top-up for integrations without Checkout (or the same Checkout payment)."""
    pi = ctx.obj
    pi_id = stripe_id(pi.get("id"))
    if pi_id is None:
        raise PermanentEventError("payment intent has no id")
    raw_description = pi.get("description")
    description = raw_description if isinstance(raw_description, str) else ""
    if stripe_id(pi.get("invoice")) or description.startswith("Subscription"):
        return Outcome.ignore("payment of an invoice: credited by invoice.paid")
    customer_id = stripe_id(pi.get("customer")) or _customer_from_metadata(pi)
    ids: list[str | None] = [pi_id, *_charge_ids(pi)]
    paid_at = timestamp(pi.get("created")) or ctx.created
    done = _existing(ctx, customer_id, ids, paid_at)
    if done is not None:
        return done
    amount = as_int(pi.get("amount_received", pi.get("amount")))
    credits = _credits_from_metadata(ctx, metadata(pi))
    if credits is None and ctx.gateway is not None:
        # A Checkout payment: price it from the session's line items, exactly as its session event would.
        session = next(iter(ctx.gateway.list_checkout_sessions(payment_intent=pi_id)), None)
        if session is not None:
            ids.append(stripe_id(session.get("id")))
            customer_id = customer_id or stripe_id(session.get("customer"))
            credits = _credits_from_metadata(ctx, metadata(session))
            session_id = stripe_id(session.get("id"))
            paid_at = min(paid_at, timestamp(session.get("created")) or paid_at)
            if credits is None and session_id:
                credits = _credits_from_line_items(ctx, ctx.gateway.retrieve_checkout_session_line_items(session_id))
    if credits is None:
        credits = _fallback_credits(ctx, amount)
    return _grant_topup(
        ctx,
        payment_key=pi_id,
        payment_type="payment_intent",
        customer_id=customer_id,
        amount_minor=amount,
        currency=pi.get("currency"),
        paid_at=paid_at,
        linked=ids,
        credits=credits,
    )


def handle_charge_succeeded(ctx: EventContext) -> Outcome:
    """charge.succeeded: a top-up only for a charge made without a PaymentIntent (the older Charges API);
    every other charge is credited by its payment intent's, session's or invoice's event."""
    charge = ctx.obj
    charge_id = stripe_id(charge.get("id"))
    if charge_id is None:
        raise PermanentEventError("charge has no id")
    if stripe_id(charge.get("payment_intent")):
        return Outcome.ignore("the payment's payment_intent.succeeded or checkout.session.completed grants the credits")
    raw_description = charge.get("description")
    description = raw_description if isinstance(raw_description, str) else ""
    if stripe_id(charge.get("invoice")) or description.startswith("Subscription"):
        return Outcome.ignore("payment of an invoice: credited by invoice.paid")
    if not ctx.config.credits.grant_charges_without_payment_intent:
        return Outcome.ignore(
            "credits.grant_charges_without_payment_intent is off: reconciliation reports it as payment_without_grant"
        )
    customer_id = stripe_id(charge.get("customer")) or _customer_from_metadata(charge)
    paid_at = timestamp(charge.get("created")) or ctx.created
    done = _existing(ctx, customer_id, [charge_id], paid_at)
    if done is not None:
        return done
    amount = as_int(charge.get("amount_captured") or charge.get("amount"))
    credits = _credits_from_metadata(ctx, metadata(charge)) or _fallback_credits(ctx, amount)
    return _grant_topup(
        ctx,
        payment_key=charge_id,
        payment_type="charge",
        customer_id=customer_id,
        amount_minor=amount,
        currency=charge.get("currency"),
        paid_at=paid_at,
        linked=[charge_id],
        credits=credits,
    )
