"""Two months of Stripe activity for six customers, made with the emulator's Store and Clock in a second.

Nothing here talks to our code: it only makes what Stripe would hold and send. Two pieces of activity are kept
from the receiver on purpose (an endpoint that was down when Stripe gave up), so that reconciliation has real
discrepancies to find.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

DAY = 86400


@dataclass(frozen=True)
class DemoCustomer:
    key: str
    customer_id: str
    name: str
    story: str


@dataclass
class StripeStory:
    """What the script made: customers, the window, and the events withheld from the receiver."""

    customers: list[DemoCustomer]
    since: datetime
    until: datetime
    withheld: dict[str, list[str]] = field(default_factory=dict)  # why -> event ids never delivered
    withheld_objects: dict[str, str] = field(default_factory=dict)  # why -> the Stripe object concerned
    objects: dict[str, str] = field(default_factory=dict)  # names of notable Stripe objects -> ids
    late_events: list[str] = field(default_factory=list)  # made after usage was metered (phase 2)

    def customer(self, key: str) -> DemoCustomer:
        """The customer with this short key (ada, ben, ...)."""
        return next(c for c in self.customers if c.key == key)

    @property
    def withheld_ids(self) -> set[str]:
        """Every event id the receiver never got."""
        return {e for ids in self.withheld.values() for e in ids}


CUSTOMERS = (
    ("ada", "Ada Lovelace", "small and large credit packs; a dispute on the small pack, won"),
    ("ben", "Ben Okafor", "Pro plan, renewed twice; the first renewal fails and recovers two days later"),
    ("cleo", "Cleo Park", "Team plan (credits roll over); a top-up the receiver never got"),
    ("dan", "Dan Novak", "large pack partly refunded; a small pack refunded in full, refund events lost"),
    ("eve", "Eve Martin", "small pack, spent, then a dispute lost: the spent credits become debt"),
    ("fay", "Fay Dubois", "Pro plan, canceled after two weeks"),
)


def _topup(store: Any, customer: str, price: str) -> Any:
    # Many Checkout integrations name the pack in the session's metadata (Stripe copies it to the payment
    # intent). It also lets a payment_intent.succeeded that arrives before its session event be priced: the
    # emulator's checkout-session list filtered by payment_intent misses sessions completed after creation.
    return store.topup(customer, price, metadata={"price_id": price})


def _new_events(store: Any, before: set[str]) -> list[str]:
    return [e.id for e in store.event_records() if e.id not in before]


def _event_ids(store: Any) -> set[str]:
    return {e.id for e in store.event_records()}


def make_story(emulator: Any, *, now: datetime, seed: int = 7) -> tuple[Any, StripeStory]:
    """Build a Store holding two months of activity ending half a day before ``now``; return it and the story."""
    start = (now - timedelta(days=64)).replace(hour=9, minute=0, second=0, microsecond=0)
    store = emulator.Store(clock=emulator.Clock(start), seed=seed)
    clock = store.clock
    story = StripeStory(customers=[], since=start, until=now)

    def at_day(day: float, fail: Callable[[Any], bool] | None = None) -> None:
        target = int(start.timestamp() + day * DAY)
        if target > clock.now():
            store.advance(seconds=target - clock.now(), fail=fail)

    ids: dict[str, str] = {}
    for key, name, text in CUSTOMERS:
        first = name.split()[0].lower()
        customer = store.create_customer(
            id=f"cus_demo{key.capitalize()}", email=f"{first}@example.com", name=name, metadata={"demo": "true"}
        )
        ids[key] = customer.id
        story.customers.append(DemoCustomer(key, customer.id, name, text))
        clock.advance(minutes=3)

    at_day(1)
    ada_small = _topup(store, ids["ada"], "price_credits_small")
    ben_sub = store.create_subscription(ids["ben"], "price_pro_monthly", via_checkout=True)
    at_day(3)
    store.create_subscription(ids["cleo"], "price_team_monthly")
    at_day(5)
    dan_large = _topup(store, ids["dan"], "price_credits_large")
    at_day(10)
    _topup(store, ids["ada"], "price_credits_large")
    at_day(12)
    ada_dispute = store.create_dispute(ada_small, reason="product_not_received")
    at_day(15)
    store.refund(dan_large, 2500, reason="requested_by_customer")  # $25 of $100: a quarter of the credits
    at_day(20)
    store.close_dispute(ada_dispute, won=True)

    failed_once: set[str] = set()

    def ben_fails_once(sub: Any) -> bool:
        # Ben's card is declined at his first renewal only.
        if sub.id == ben_sub.id and sub.id not in failed_once:
            failed_once.add(sub.id)
            return True
        return False

    at_day(33, fail=ben_fails_once)
    if failed_once:
        store.recover_subscription(ben_sub)  # Smart Retries succeed two days later: past_due -> active
    at_day(35, fail=ben_fails_once)
    fay_sub = store.create_subscription(ids["fay"], "price_pro_monthly")
    at_day(40, fail=ben_fails_once)
    _topup(store, ids["eve"], "price_credits_small")

    at_day(45, fail=ben_fails_once)
    before = _event_ids(store)
    cleo_topup = _topup(store, ids["cleo"], "price_credits_small")
    story.withheld["cleo_topup"] = _new_events(store, before)
    story.withheld_objects["cleo_topup"] = cleo_topup.payment_intent

    at_day(50, fail=ben_fails_once)
    store.cancel_subscription(fay_sub)
    at_day(52, fail=ben_fails_once)
    dan_small = _topup(store, ids["dan"], "price_credits_small")
    at_day(55, fail=ben_fails_once)
    before = _event_ids(store)
    dan_refund = store.refund(dan_small, reason="requested_by_customer")
    story.withheld["dan_refund"] = _new_events(store, before)
    story.withheld_objects["dan_refund"] = dan_refund.id

    # On to half a day before now: Ben's second renewal (and Cleo's, if due) happen on the way.
    end = int((now - timedelta(hours=12)).timestamp())
    store.advance(seconds=max(0, end - clock.now()), fail=ben_fails_once)
    story.objects.update(
        ada_small_session=ada_small.id,
        ben_subscription=ben_sub.id,
        dan_large_session=dan_large.id,
        fay_subscription=fay_sub.id,
    )
    eve_sessions = [s for s in store.iter_records("checkout.session") if s.customer == ids["eve"]]
    story.objects["eve_session"] = eve_sessions[0].id
    return store, story


def eve_loses_a_dispute(store: Any, story: StripeStory, *, now: datetime) -> list[str]:
    """After Eve spent her credits: her bank disputes the payment and she loses. Returns the new event ids."""
    before = _event_ids(store)
    clock = store.clock
    clock.set(max(clock.now(), int((now - timedelta(hours=6)).timestamp())))
    dispute = store.create_dispute(story.objects["eve_session"], reason="fraudulent")
    clock.advance(hours=5)
    store.close_dispute(dispute, won=False)
    story.objects["eve_dispute"] = dispute.id
    new = _new_events(store, before)
    story.late_events = new
    return new


def window_end(now: datetime) -> datetime:
    """The end of the Stripe reconciliation window: the next whole minute after ``now``."""
    return (now + timedelta(minutes=1)).replace(second=0, microsecond=0).astimezone(UTC)
