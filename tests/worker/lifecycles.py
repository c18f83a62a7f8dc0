"""Subscription lifecycles rendered as the Stripe events they produce, in either invoice shape.

An independent rendering of Stripe's side for the plan-change tests: periods by calendar month (dateutil),
proration amounts by Stripe's rule (unit amount x quantity x seconds left / period seconds, rounded), the
pre-2025 invoice shape (``subscription``, ``lines[].price``, ``lines[].proration``) or basil's (``parent``,
``pricing.price_details``, ``parent.subscription_item_details.proration``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from dateutil.relativedelta import relativedelta

# Plans of the lifecycles: price -> (credits per month, unit amount in cents).
PLANS: dict[str, tuple[int, int]] = {"price_basic": (1000, 1000), "price_plus": (3000, 2500), "price_max": (5000, 4000)}
TRIAL_CREDITS = 200
PACK_PRICE = "price_credits_large"
PACK_AMOUNT = 10000

LIFECYCLE_CONFIG = """
[credits]
fallback_credits_per_minor_unit = "1"

[[packs]]
price = "price_credits_large"
credits = 12000
expires_after_days = 365

[[plans]]
price = "price_basic"
name = "Basic"
credits_per_period = 1000
trial_credits = 200

[[plans]]
price = "price_plus"
name = "Plus"
credits_per_period = 3000

[[plans]]
price = "price_max"
name = "Max"
credits_per_period = 5000
period_end = "rollover"

[plan_changes]
on_upgrade = "{on_upgrade}"
on_downgrade = "{on_downgrade}"

[access]
grace_days = 7
"""


def ts(moment: datetime) -> int:
    return int(moment.timestamp())


@dataclass
class Sub:
    """What Stripe holds for one subscription while the lifecycle runs."""

    id: str
    customer: str
    price: str
    quantity: int
    anchor: datetime
    period: int = 0
    status: str = "active"
    cancel_at_period_end: bool = False
    latest_invoice: str = ""
    trial: bool = False

    def period_bounds(self, k: int | None = None) -> tuple[datetime, datetime]:
        k = self.period if k is None else k
        return self.anchor + relativedelta(months=k), self.anchor + relativedelta(months=k + 1)


@dataclass
class Renderer:
    """Renders events with strictly increasing ``created`` times (no two events of one second)."""

    now: datetime
    rng: random.Random
    events: list[dict[str, Any]] = field(default_factory=list)
    counter: int = 0

    def next_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}_lc{self.counter:06d}"

    def tick(self, seconds: int = 60) -> int:
        self.now = datetime.fromtimestamp(ts(self.now) + seconds, tz=UTC)
        return ts(self.now)

    def emit(self, event_type: str, obj: dict[str, Any], previous: dict[str, Any] | None = None) -> dict[str, Any]:
        event = {
            "id": self.next_id("evt"),
            "object": "event",
            "api_version": "2025-03-31.basil",
            "created": self.tick(self.rng.randint(30, 3600)),
            "data": {"object": obj} | ({"previous_attributes": previous} if previous is not None else {}),
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": event_type,
        }
        self.events.append(event)
        return event

    # --- subscriptions ------------------------------------------------------------------------------------

    def subscription_object(self, sub: Sub) -> dict[str, Any]:
        start, end = sub.period_bounds()
        item = {
            "id": f"si_{sub.id[4:]}",
            "object": "subscription_item",
            "price": {"id": sub.price, "object": "price", "unit_amount": PLANS[sub.price][1]},
            "quantity": sub.quantity,
            "current_period_start": ts(start),
            "current_period_end": ts(end),
        }
        return {
            "id": sub.id,
            "object": "subscription",
            "customer": sub.customer,
            "status": sub.status,
            "items": {"object": "list", "data": [item]},
            "cancel_at_period_end": sub.cancel_at_period_end,
            "cancel_at": ts(end) if sub.cancel_at_period_end else None,
            "latest_invoice": sub.latest_invoice,
            "pause_collection": None,
            "trial_start": ts(sub.anchor) if sub.trial else None,
            "trial_end": ts(sub.period_bounds(0)[1]) if sub.trial else None,
        }

    def subscription_event(self, event_type: str, sub: Sub, previous: dict[str, Any] | None = None) -> None:
        self.emit(event_type, self.subscription_object(sub), previous)

    # --- invoices -----------------------------------------------------------------------------------------

    def line(
        self,
        sub: Sub,
        price: str,
        quantity: int,
        amount: int,
        period: tuple[int, int],
        proration: bool,
        basil: bool,
        description: str = "",
    ) -> dict[str, Any]:
        line: dict[str, Any] = {
            "id": self.next_id("il"),
            "object": "line_item",
            "amount": amount,
            "currency": "usd",
            "description": description,
            "quantity": quantity,
            "period": {"start": period[0], "end": period[1]},
        }
        if basil:
            line["parent"] = {
                "type": "subscription_item_details",
                "subscription_item_details": {
                    "proration": proration,
                    "subscription": sub.id,
                    "subscription_item": f"si_{sub.id[4:]}",
                },
            }
            line["pricing"] = {"type": "price_details", "price_details": {"price": price, "product": "prod_lc"}}
        else:
            line["type"] = "invoiceitem" if proration else "subscription"
            line["subscription"] = sub.id
            line["proration"] = proration
            line["price"] = {"id": price, "object": "price", "unit_amount": PLANS[price][1]}
        return line

    def invoice_object(
        self, sub: Sub, invoice_id: str, reason: str, lines: list[dict[str, Any]], *, paid: bool, basil: bool
    ) -> dict[str, Any]:
        total = sum(line["amount"] for line in lines)
        invoice: dict[str, Any] = {
            "id": invoice_id,
            "object": "invoice",
            "customer": sub.customer,
            "billing_reason": reason,
            "currency": "usd",
            "status": "paid" if paid else "open",
            "total": total,
            "amount_due": max(0, total),
            "amount_paid": max(0, total) if paid else 0,
            "lines": {"object": "list", "data": lines},
            "period_start": lines[0]["period"]["start"],
            "period_end": lines[0]["period"]["end"],
        }
        if basil:
            invoice["parent"] = {"type": "subscription_details", "subscription_details": {"subscription": sub.id}}
            invoice["payments"] = {
                "data": [{"payment": {"type": "payment_intent", "payment_intent": f"pi_{invoice_id[3:]}"}}]
            }
        else:
            invoice["subscription"] = sub.id
            invoice["payment_intent"] = f"pi_{invoice_id[3:]}"
            invoice["charge"] = f"ch_{invoice_id[3:]}"
        return invoice

    def period_invoice(self, sub: Sub, reason: str, *, paid: bool, basil: bool, invoice_id: str | None = None) -> str:
        start, end = sub.period_bounds()
        invoice_id = invoice_id or self.next_id("in")
        line = self.line(
            sub, sub.price, sub.quantity, PLANS[sub.price][1] * sub.quantity, (ts(start), ts(end)), False, basil
        )
        obj = self.invoice_object(sub, invoice_id, reason, [line], paid=paid, basil=basil)
        self.emit("invoice.paid" if paid else "invoice.payment_failed", obj)
        return invoice_id


def proration_amount(unit_amount: int, quantity: int, changed_at: datetime, start: datetime, end: datetime) -> int:
    """Stripe's proration of one item: its amount for the seconds left of the period, rounded to the cent."""
    left = (end - changed_at).total_seconds()
    return round(unit_amount * quantity * left / (end - start).total_seconds())


def change_plan(r: Renderer, sub: Sub, price: str, quantity: int, *, invoiced: bool, basil: bool) -> None:
    """An item change in the middle of the period: the update, and (invoiced) its paid proration invoice."""
    start, end = sub.period_bounds()
    old_price, old_quantity = sub.price, sub.quantity
    previous_items = r.subscription_object(sub)["items"]
    previous: dict[str, Any] = {"items": previous_items}
    sub.price, sub.quantity = price, quantity
    if invoiced:
        previous["latest_invoice"] = sub.latest_invoice
        sub.latest_invoice = r.next_id("in")
    event = r.emit("customer.subscription.updated", r.subscription_object(sub), previous)
    if not invoiced:
        return
    changed = datetime.fromtimestamp(event["created"], tz=UTC)
    period = (event["created"], ts(end))
    unused = -proration_amount(PLANS[old_price][1], old_quantity, changed, start, end)
    remaining = proration_amount(PLANS[price][1], quantity, changed, start, end)
    lines = [
        r.line(sub, old_price, old_quantity, unused, period, True, basil, "Unused time"),
        r.line(sub, price, quantity, remaining, period, True, basil, "Remaining time"),
    ]
    r.emit(
        "invoice.paid", r.invoice_object(sub, sub.latest_invoice, "subscription_update", lines, paid=True, basil=basil)
    )


def top_up(r: Renderer, customer: str, *, refund: bool) -> None:
    """A Checkout top-up, described by its session and its payment intent (created 40 s apart)."""
    pi, charge, session = r.next_id("pi"), r.next_id("ch"), r.next_id("cs")
    session_created = r.tick(5)
    meta = {"price_id": PACK_PRICE}
    r.emit(
        "checkout.session.completed",
        {
            "id": session,
            "object": "checkout.session",
            "mode": "payment",
            "payment_status": "paid",
            "payment_intent": pi,
            "customer": customer,
            "amount_total": PACK_AMOUNT,
            "currency": "usd",
            "created": session_created,
            "metadata": meta,
        },
    )
    r.emit(
        "payment_intent.succeeded",
        {
            "id": pi,
            "object": "payment_intent",
            "customer": customer,
            "amount": PACK_AMOUNT,
            "amount_received": PACK_AMOUNT,
            "currency": "usd",
            "created": session_created + 40,
            "latest_charge": charge,
            "status": "succeeded",
            "metadata": meta,
        },
    )
    if refund:
        r.emit(
            "charge.refunded",
            {
                "id": charge,
                "object": "charge",
                "customer": customer,
                "payment_intent": pi,
                "amount": PACK_AMOUNT,
                "amount_captured": PACK_AMOUNT,
                "amount_refunded": PACK_AMOUNT // 4,
                "refunded": False,
                "paid": True,
                "status": "succeeded",
                "currency": "usd",
            },
        )


def subscription_life(r: Renderer, customer: str, *, steps: int) -> Iterator[None]:
    """One subscription: create (maybe trialing), then random changes, renewals, failures, pauses, and an end.

    A generator: each ``next()`` renders one step, so several lives of one customer interleave in time.
    """
    rng = r.rng
    sub = Sub(
        id=r.next_id("sub"),
        customer=customer,
        price=rng.choice(list(PLANS)),
        quantity=rng.randint(1, 2),
        anchor=datetime.fromtimestamp(r.tick(), tz=UTC),
        trial=rng.random() < 0.3,
    )
    sub.status = "trialing" if sub.trial else "active"
    sub.latest_invoice = r.next_id("in")
    r.subscription_event("customer.subscription.created", sub)
    if not sub.trial:
        r.period_invoice(sub, "subscription_create", paid=True, basil=rng.random() < 0.5, invoice_id=sub.latest_invoice)
    yield
    for _ in range(steps):
        action = rng.choice(
            ["upgrade", "downgrade", "seats", "free_change", "renew", "fail", "pause", "cancel_at_period_end"]
        )
        if sub.status in ("trialing", "past_due", "paused") or action in ("renew", "fail"):
            _next_period(r, sub, failed=action == "fail")
        elif action in ("upgrade", "downgrade", "seats", "free_change"):
            ranked = sorted(PLANS, key=lambda p: PLANS[p][0])
            position = ranked.index(sub.price)
            price, quantity = sub.price, sub.quantity
            if action == "upgrade" and position + 1 < len(ranked):
                price = ranked[position + 1]
            elif action == "downgrade" and position > 0:
                price = ranked[position - 1]
            else:
                quantity = max(1, sub.quantity + rng.choice([-1, 1, 2]))
            if (price, quantity) != (sub.price, sub.quantity):
                change_plan(r, sub, price, quantity, invoiced=action != "free_change", basil=rng.random() < 0.5)
        elif action == "pause":
            previous = {"status": sub.status}
            sub.status = "paused"
            r.subscription_event("customer.subscription.paused", sub, previous)
        elif action == "cancel_at_period_end" and not sub.cancel_at_period_end:
            sub.cancel_at_period_end = True
            r.subscription_event("customer.subscription.updated", sub, {"cancel_at_period_end": False})
        yield
    if rng.random() < 0.5 or sub.cancel_at_period_end:
        previous = {"status": sub.status}
        sub.status = "canceled"
        r.subscription_event("customer.subscription.deleted", sub, previous)


def _next_period(r: Renderer, sub: Sub, *, failed: bool) -> None:
    """The period ends: a pause resumes, a failed payment's retry succeeds, or the next period is billed."""
    basil = r.rng.random() < 0.5
    if sub.status == "paused":
        sub.status = "active"
        r.subscription_event("customer.subscription.resumed", sub, {"status": "paused"})
        return
    if sub.status == "past_due":
        r.period_invoice(sub, "subscription_cycle", paid=True, basil=basil, invoice_id=sub.latest_invoice)
        sub.status = "active"
        r.subscription_event("customer.subscription.updated", sub, {"status": "past_due"})
        return
    previous = {"status": sub.status, "latest_invoice": sub.latest_invoice}
    sub.period += 1
    start, _ = sub.period_bounds()
    if r.now < start:
        r.now = start
    sub.latest_invoice = r.next_id("in")
    r.period_invoice(sub, "subscription_cycle", paid=not failed, basil=basil, invoice_id=sub.latest_invoice)
    sub.status = "past_due" if failed else "active"
    r.subscription_event("customer.subscription.updated", sub, previous)


def generate_lifecycles(seed: int, *, customers: int = 3) -> list[dict[str, Any]]:
    """Random lifecycles of a few customers (some with two subscriptions at once, top-ups on the side), in order."""
    rng = random.Random(seed)
    r = Renderer(now=datetime(2026, 1, 5, tzinfo=UTC), rng=rng)
    for n in range(customers):
        customer = f"cus_lc{seed % 10000:04d}{n:02d}"
        lives = [subscription_life(r, customer, steps=rng.randint(2, 6)) for _ in range(rng.choice([1, 2]))]
        if rng.random() < 0.7:
            top_up(r, customer, refund=rng.random() < 0.4)
        while lives:
            life = rng.choice(lives)
            if next(life, StopIteration) is StopIteration:
                lives.remove(life)
    return r.events
