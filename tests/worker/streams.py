"""Generated streams of real-shaped Stripe events, built from the shared fixtures with fresh ids, amounts and
times: top-ups (Checkout and payment intents), subscription starts and renewals in both invoice shapes, failed
renewals, refunds full and partial, disputes won and lost, cancellations."""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

from tests.conftest import STRIPE_EVENTS

PLAN_PRICE_OLD = "price_1IDQm5JDPojXS6LNM31hxKzp"  # Pro, expires at period end
PLAN_PRICE_BASIL = "price_1234"  # Team, rolls over
PACK_PRICE = "price_credits_small"  # 1000 credits


@cache
def _template(name: str) -> str:
    return (STRIPE_EVENTS / name).read_text(encoding="utf-8")


def template(name: str) -> dict[str, Any]:
    return copy.deepcopy(json.loads(_template(name)))


@dataclass
class StreamBuilder:
    rng: random.Random
    start: datetime
    clock: int = 0
    seq: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)

    def _id(self, prefix: str) -> str:
        self.seq += 1
        return f"{prefix}_gen{self.seq:06d}{self.rng.randrange(16**6):06x}"

    def _tick(self) -> int:
        # Strictly increasing, distinct Stripe times: order is well defined.
        self.clock += self.rng.randint(30, 600)
        return int(self.start.timestamp()) + self.clock

    def _emit(self, name: str, event_type: str | None, obj_update: dict[str, Any], **envelope: Any) -> dict[str, Any]:
        event = template(name)
        event["id"] = self._id("evt")
        event["created"] = self._tick()
        if event_type:
            event["type"] = event_type
        event["data"]["object"].update(obj_update)
        event["data"].pop("previous_attributes", None)
        event.update(envelope)
        self.events.append(event)
        return event

    # --- top-ups ---------------------------------------------------------------------------------------------

    def top_up(self, customer: str, *, via_checkout: bool) -> tuple[str, str, int]:
        pi, charge = self._id("pi"), self._id("ch")
        amount = self.rng.choice([500, 1000, 2000, 4999])
        meta = {"price_id": PACK_PRICE} if via_checkout else {}
        if via_checkout:
            self._emit(
                "checkout.session.completed.mode_payment.srm.json",
                None,
                {
                    "id": self._id("cs_test"),
                    "customer": customer,
                    "payment_intent": pi,
                    "amount_total": amount,
                    "amount_subtotal": amount,
                    "metadata": meta,
                },
            )
        self._emit(
            "payment_intent.succeeded.srm.json",
            None,
            {
                "id": pi,
                "customer": customer,
                "amount": amount,
                "amount_received": amount,
                "metadata": meta,
                "latest_charge": charge,
                "charges": {"object": "list", "data": [{"id": charge, "object": "charge", "amount": amount}]},
            },
        )
        self._emit(
            "charge.succeeded.srm.json",
            None,
            {"id": charge, "customer": customer, "payment_intent": pi, "amount": amount, "amount_captured": amount},
        )
        return pi, charge, amount

    def refund(self, customer: str, pi: str, charge: str, amount: int, *, partial: bool) -> None:
        parts = [amount // 3, amount // 4] if partial else [amount]
        refunded = 0
        listed: list[dict[str, Any]] = []
        for part in parts:
            refund_id = self._id("re")
            refunded += part
            listed.append({"id": refund_id, "object": "refund", "amount": part, "status": "succeeded"})
            self._emit(
                "refund.created.sse.json",
                None,
                {"id": refund_id, "amount": part, "charge": charge, "payment_intent": pi, "status": "succeeded"},
            )
            # Half the time the newer shape: no refunds list on the charge, only the cumulative amount.
            charge_obj: dict[str, Any] = {
                "id": charge,
                "customer": customer,
                "payment_intent": pi,
                "invoice": None,
                "amount": amount,
                "amount_captured": amount,
                "amount_refunded": refunded,
                "refunded": refunded == amount,
            }
            charge_obj["refunds"] = (
                {"object": "list", "data": copy.deepcopy(listed), "has_more": False}
                if self.rng.random() < 0.5
                else None
            )
            self._emit("charge.refunded.full.sse.json", None, charge_obj)

    def dispute(self, pi: str, charge: str, amount: int, *, lost: bool) -> None:
        dispute_id = self._id("du")
        common = {"id": dispute_id, "charge": charge, "payment_intent": pi, "amount": amount}
        self._emit("charge.dispute.created.dahlia.zulip.json", None, {**common, "status": "needs_response"})
        closed = {**common, "status": "lost" if lost else "won"}
        self._emit("charge.dispute.closed.lost.dahlia.zulip.json", None, closed)

    # --- subscriptions ----------------------------------------------------------------------------------------

    def _subscription_event(self, name: str, event_type: str, sub: str, customer: str, status: str) -> None:
        self._emit(name, event_type, {"id": sub, "customer": customer, "status": status})

    def _invoice_paid(self, customer: str, sub: str, reason: str, period: tuple[int, int], basil: bool) -> None:
        invoice_id = self._id("in")
        if basil:
            event = self._emit(
                "invoice.paid.subscription_cycle.basil.derived.json",
                None,
                {"id": invoice_id, "customer": customer, "billing_reason": reason, "amount_paid": 24900},
            )
            obj = event["data"]["object"]
            obj["parent"]["subscription_details"]["subscription"] = sub
            line = obj["lines"]["data"][0]
            line["parent"]["subscription_item_details"]["subscription"] = sub
        else:
            event = self._emit(
                "invoice.paid.subscription_cycle.sse.json",
                None,
                {
                    "id": invoice_id,
                    "customer": customer,
                    "billing_reason": reason,
                    "subscription": sub,
                    "amount_paid": 1900,
                    "charge": self._id("ch"),
                    "payment_intent": self._id("pi"),
                },
            )
            line = event["data"]["object"]["lines"]["data"][0]
        line["period"] = {"start": period[0], "end": period[1]}

    def _invoice_failed(self, customer: str, sub: str) -> None:
        event = self._emit(
            "invoice.payment_failed.subscription_cycle.basil.payrails.wrapped.json",
            None,
            {"id": self._id("in"), "customer": customer},
        )
        event["data"]["object"]["parent"]["subscription_details"]["subscription"] = sub

    def subscription_life(self, customer: str, *, basil: bool, renewals: int, fail_once: bool, cancel: bool) -> None:
        sub = self._id("sub")
        created_name = "customer.subscription.created.active.dahlia.zulip.json"
        updated_name = "customer.subscription.updated.active.srm.json"
        self._subscription_event(created_name, "customer.subscription.created", sub, customer, "active")
        period_start = int((self.start + timedelta(days=1)).timestamp())
        month = 30 * 86400
        self._invoice_paid(customer, sub, "subscription_create", (period_start, period_start + month), basil)
        for n in range(1, renewals + 1):
            begin = period_start + n * month
            if fail_once and n == 1:
                self._invoice_failed(customer, sub)
                self._subscription_event(updated_name, "customer.subscription.updated", sub, customer, "past_due")
            self._invoice_paid(customer, sub, "subscription_cycle", (begin, begin + month), basil)
            if fail_once and n == 1:
                self._subscription_event(updated_name, "customer.subscription.updated", sub, customer, "active")
        if cancel:
            self._subscription_event(
                "customer.subscription.deleted.canceled.dahlia.zulip.json",
                "customer.subscription.deleted",
                sub,
                customer,
                "canceled",
            )


def generate_stream(*, customers: int, seed: int, start: datetime | None = None) -> list[dict[str, Any]]:
    """A stream in Stripe creation order: every customer's life, interleaved."""
    rng = random.Random(seed)
    builder = StreamBuilder(rng=rng, start=start or datetime.now(UTC) - timedelta(days=20))
    lives: list[list[dict[str, Any]]] = []
    for i in range(customers):
        builder.events = []
        builder.clock = rng.randint(0, 3600)  # lives overlap in time: the stream interleaves customers
        customer = f"cus_gen{seed:04d}{i:05d}"
        builder.subscription_life(
            customer,
            basil=i % 2 == 0,
            renewals=rng.randint(1, 2),
            fail_once=i % 3 == 0,
            cancel=i % 4 == 0,
        )
        pi, charge, amount = builder.top_up(customer, via_checkout=True)
        if i % 5 == 1:
            builder.refund(customer, pi, charge, amount, partial=False)
        elif i % 5 == 2:
            builder.refund(customer, pi, charge, amount, partial=True)
        elif i % 5 == 3:
            builder.dispute(pi, charge, amount, lost=i % 2 == 0)
        elif i % 5 == 4:
            builder.dispute(pi, charge, amount, lost=i % 2 == 1)
        pi2, charge2, amount2 = builder.top_up(customer, via_checkout=False)
        if i % 7 == 0:
            builder.refund(customer, pi2, charge2, amount2, partial=True)
        lives.append(builder.events)
    events = [e for life in lives for e in life]
    events.sort(key=lambda e: e["created"])
    return events


# What each subscription status means for access, written out here (not taken from the worker's table): the
# oracle for streams whose ties only Stripe's current object can settle.
EXPECTED_ACCESS = {"active": "active", "past_due": "past_due", "unpaid": "suspended", "canceled": "canceled"}


def emulator_ties(
    store: Any, *, customers: int, start: datetime | None = None
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Subscription lives made by the Stripe emulator with several events of one subscription in one second.

    Each customer subscribes; at the renewal the emulator itself records, in the renewal's second, the
    subscription's new period and (the payment failing) its turn to ``past_due``; then, by customer, in that
    same second too: the payment recovered (``active`` again), or retries exhausted then the subscription
    canceled, or nothing more. Which of a second's events is the truth only Stripe's current object can say.
    Returns the events (oldest first, as the Events API lists them) and each customer's subscription status
    at the end, as the emulator holds it. Give it a store whose clock starts a month or more ago
    (``Store(clock=Clock(...))``): the renewals come a month after the starts.
    """
    subs = []
    for _ in range(customers):
        customer = store.create_customer()
        store.clock.advance(minutes=3)
        subs.append((customer.id, store.create_subscription(customer, "price_pro_monthly")))
        store.clock.advance(minutes=3)
    for n, (_customer, sub) in enumerate(subs):
        store.renew_subscription(sub, fail=True)  # the clock jumps to the period's end: new period + past_due
        if n % 3 == 0:
            store.recover_subscription(sub)  # same second: paid, active again
        elif n % 3 == 1:
            store.mark_subscription_unpaid(sub)  # same second: unpaid...
            store.cancel_subscription(sub)  # ... and canceled
    status = {customer: store.get(sub.id).status for customer, sub in subs}
    ours = {customer for customer, _ in subs}
    events = [e for e in store.events() if _customer_of(e) in ours]
    return events, status


def _customer_of(event: dict[str, Any]) -> str | None:
    obj = event["data"]["object"]
    customer = obj.get("customer") if obj.get("object") != "customer" else obj.get("id")
    return customer if isinstance(customer, str) else None


def same_second_ties(events: list[dict[str, Any]]) -> int:
    """How many (subscription, second) pairs carry more than one subscription event."""
    seen: dict[tuple[str, int], int] = {}
    for e in events:
        if e["type"].startswith("customer.subscription."):
            key = (e["data"]["object"]["id"], e["created"])
            seen[key] = seen.get(key, 0) + 1
    return sum(1 for n in seen.values() if n > 1)
