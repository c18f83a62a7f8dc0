"""The emulator's subscription item changes (with proration invoices, in both invoice shapes), cancel at period
end, pause, resume and pause_collection, applied by the worker: the credits Stripe's proration arithmetic gives,
each subscription's state, and no failed event."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from stripe_emulator import Clock, EmulatorServer, Store

from ledger.check import check_ledger
from ledger.db import unit_of_work
from ledger.inbox import EventStatus, StripeEvent
from ledger.models import AccessState, Account, Grant, GrantSource
from ledger.subscriptions import subscriptions_of
from tests.worker.conftest import store as store_event
from worker.gateway import StripeGateway
from worker.processing import process_events

CONFIG = """
[[plans]]
price = "price_pro_monthly"
name = "Pro"
credits_per_period = 2000

[[plans]]
price = "price_team_monthly"
name = "Team"
credits_per_period = 12000

[plan_changes]
on_upgrade = "prorate"
"""
START = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture(params=["2024-06-20", "2025-03-31.basil"])
def emulator(request: pytest.FixtureRequest) -> Iterator[EmulatorServer]:
    server = EmulatorServer(Store(clock=Clock(START), api_version=request.param, events_retention_days=None)).start()
    yield server
    server.stop()


def apply_new(server: EmulatorServer, seen: set[str]) -> None:
    gateway = StripeGateway(api_key="sk_test_subs", api_base=server.url, max_attempts=1)
    fresh = [e for e in server.store.events() if e["id"] not in seen]
    seen.update(e["id"] for e in fresh)
    process_events([store_event(e) for e in fresh], gateway=gateway)


class TestEmulatedLifecycle:
    def test_upgrade_cancel_at_period_end_pause_and_resume(
        self, engine: Engine, emulator: EmulatorServer, billing_config_file: Callable[[str], Path]
    ) -> None:
        billing_config_file(CONFIG)
        store = emulator.store
        customer = store.create_customer(email="subs@example.com").id
        first = store.create_subscription(customer, "price_pro_monthly")
        store.advance(days=10)  # 2026-03-11: 21 of the period's 31 days left
        invoice = store.change_subscription(first, price="price_team_monthly")
        assert invoice is not None and invoice.billing_reason == "subscription_update"
        # Stripe's lines: -round(2000 x 21/31) = -1355 unused Pro, +round(9900 x 21/31) = 6706 remaining Team.
        assert [line.amount for line in invoice.lines] == [-1355, 6706] and invoice.amount_paid == 5351
        store.advance(minutes=5)
        second = store.create_subscription(customer, "price_pro_monthly")
        store.advance(minutes=5)
        store.pause_subscription(second)
        store.advance(minutes=5)
        store.resume_subscription(second)
        store.advance(minutes=5)
        store.pause_collection(second, "void")
        store.advance(minutes=5)
        store.cancel_subscription(first, at_period_end=True)
        seen: set[str] = set()
        apply_new(emulator, seen)

        with unit_of_work() as session:
            failed = session.scalars(select(StripeEvent.type).where(StripeEvent.status == EventStatus.FAILED)).all()
            assert failed == []
            [change] = session.scalars(select(Grant).where(Grant.source == GrantSource.PLAN_CHANGE)).all()
            # (12000 - 2000) x 1814400 // 2678400 = 18144000000 // 2678400 = 6774
            assert (change.units, change.stripe_object_id) == (6774, invoice.id)
            subs = {s.subscription_id: s for s in subscriptions_of(session, customer)}
            assert subs[first.id].cancel_at_period_end and subs[first.id].access_state is AccessState.ACTIVE
            assert subs[first.id].price == "price_team_monthly"
            assert (subs[second.id].status, subs[second.id].pause_collection) == ("active", "void")
            assert check_ledger(session) == []

        store.advance(days=25)  # both periods end: the first ends (cancel at period end), the second renews
        apply_new(emulator, seen)
        with unit_of_work() as session:
            subs = {s.subscription_id: s for s in subscriptions_of(session, customer)}
            state = session.scalars(select(Account.access_state).where(Account.customer_id == customer)).one()
        assert subs[first.id].access_state is AccessState.CANCELED
        assert subs[second.id].access_state is AccessState.ACTIVE and state is AccessState.ACTIVE
