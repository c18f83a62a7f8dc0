"""Metamorphic test: however Stripe delivers a stream (once in order, or each event one to three times,
shuffled), the ledger ends the same: balances, grants, debts and access states."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, delete, select
from stripe_emulator import Clock, EmulatorServer, Store

from ledger.check import check_ledger
from ledger.db import Base, unit_of_work
from ledger.inbox import EventStatus, StripeEvent
from ledger.models import Account, Grant
from tests.worker.conftest import store
from tests.worker.streams import EXPECTED_ACCESS, emulator_ties, generate_stream, same_second_ties
from worker.gateway import StripeGateway
from worker.processing import process_events

CUSTOMERS = 50


def _aware(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def snapshot() -> dict[str, Any]:
    """Everything the ledger says about each customer, independent of row ids and processing times."""
    with unit_of_work() as session:
        assert check_ledger(session) == []
        statuses = {s for s in session.scalars(select(StripeEvent.status))}
        accounts = {
            a.customer_id: (a.balance, a.debt, a.held, a.access_state.value, _aware(a.grace_until))
            for a in session.scalars(select(Account))
        }
        grants: dict[str, list[tuple[Any, ...]]] = {}
        for g, customer in session.execute(select(Grant, Account.customer_id).join(Account)).all():
            grants.setdefault(customer, []).append(
                (
                    g.source.value,
                    g.stripe_object_id,
                    g.units,
                    g.remaining,
                    g.frozen,
                    g.clawed_back,
                    g.priority,
                    _aware(g.period_end),
                    _aware(g.expires_at) if g.source.value == "renewal" else None,
                    g.amount_minor,
                )
            )
    return {"statuses": statuses, "accounts": accounts, "grants": {k: sorted(v) for k, v in grants.items()}}


def wipe(engine: Engine) -> None:
    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            if engine.dialect.has_table(conn, table.name):
                conn.execute(delete(table))


def deliver_in_order(events: list[dict[str, Any]], gateway: StripeGateway | None = None) -> None:
    for start in range(0, len(events), 25):
        ids = [store(e) for e in events[start : start + 25]]
        process_events(ids, gateway=gateway)


def deliver_shuffled_with_duplicates(
    events: list[dict[str, Any]], rng: random.Random, gateway: StripeGateway | None = None
) -> int:
    deliveries = [e for e in events for _ in range(rng.randint(1, 3))]
    rng.shuffle(deliveries)
    position = 0
    while position < len(deliveries):
        size = rng.randint(1, 40)
        ids = [store(e) for e in deliveries[position : position + size]]
        process_events(ids, gateway=gateway)
        position += size
    return len(deliveries)


def expected_clawbacks(events: list[dict[str, Any]]) -> dict[str, int]:
    """Per payment intent: the units a correct ledger claws back, worked out from the stream itself."""
    paid: dict[str, tuple[int, int]] = {}  # pi -> (units granted, amount paid)
    returned: dict[str, int] = {}
    for event in events:
        obj = event["data"]["object"]
        if event["type"] == "payment_intent.succeeded":
            units = 1000 if obj["metadata"].get("price_id") else obj["amount_received"]
            paid[obj["id"]] = (units, obj["amount_received"])
        elif event["type"] == "charge.refunded":
            returned[obj["payment_intent"]] = max(returned.get(obj["payment_intent"], 0), obj["amount_refunded"])
        elif event["type"] == "charge.dispute.closed" and obj["status"] == "lost":
            returned[obj["payment_intent"]] = obj["amount"]
    return {pi: paid[pi][0] * amount // paid[pi][1] for pi, amount in returned.items()}


class TestDeliveryOrderDoesNotMatter:
    @pytest.mark.slow
    def test_in_order_once_equals_shuffled_with_duplicates(self, db: Engine) -> None:
        events = generate_stream(customers=CUSTOMERS, seed=7)
        assert len(events) >= 500
        assert len({e["data"]["object"].get("customer") for e in events} - {None}) >= CUSTOMERS

        deliver_in_order(events)
        in_order = snapshot()
        assert in_order["statuses"] <= {EventStatus.PROCESSED, EventStatus.IGNORED}

        wipe(db)
        deliveries = deliver_shuffled_with_duplicates(events, random.Random(11))
        assert deliveries > len(events)
        shuffled = snapshot()

        assert shuffled["statuses"] <= {EventStatus.PROCESSED, EventStatus.IGNORED}
        assert shuffled["accounts"] == in_order["accounts"]
        assert shuffled["grants"] == in_order["grants"]
        # The stream really moved money: grants, clawbacks, freezes, and every access state it drives.
        all_grants = [g for gs in in_order["grants"].values() for g in gs]
        clawed = {g[1]: g[5] for g in all_grants if g[0] == "top_up"}
        expected = expected_clawbacks(events)
        assert expected and {pi: clawed[pi] for pi in expected} == expected
        assert sum(clawed.values()) == sum(expected.values())
        states = {a[3] for a in in_order["accounts"].values()}
        assert {"active", "canceled"} <= states


class TestSameSecondTies:
    def test_ties_settle_on_stripes_object_whatever_the_delivery(self, db: Engine) -> None:
        """Several events of one subscription in one second, made by the emulator: delivered in order, or
        shuffled with duplicates, the worker asks the emulator which is the truth, and ends on Stripe's state."""
        emulator = Store(clock=Clock(datetime.now(UTC) - timedelta(days=40)))
        server = EmulatorServer(emulator).start()
        try:
            gateway = StripeGateway(api_base=server.url, wait_initial=0.01, wait_max=0.05)
            ties, live = emulator_ties(emulator, customers=3)
            assert same_second_ties(ties) >= 3 and set(live.values()) == {"active", "past_due", "canceled"}
            # Stable sort: within one second, the emulator's order (the Events API's).
            events = sorted(generate_stream(customers=4, seed=13) + ties, key=lambda e: e["created"])

            deliver_in_order(events, gateway)
            in_order = snapshot()
            wipe(db)
            deliver_shuffled_with_duplicates(events, random.Random(17), gateway)
            shuffled = snapshot()
        finally:
            server.stop()

        assert in_order["statuses"] <= {EventStatus.PROCESSED, EventStatus.IGNORED}
        assert shuffled["statuses"] <= {EventStatus.PROCESSED, EventStatus.IGNORED}
        assert shuffled["accounts"] == in_order["accounts"]
        assert shuffled["grants"] == in_order["grants"]
        expected = {customer: EXPECTED_ACCESS[status] for customer, status in live.items()}
        assert {c: in_order["accounts"][c][3] for c in live} == expected
