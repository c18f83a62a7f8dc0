"""Activity made by the Stripe emulator (as Stripe would send it) applied through the worker, including a
backfill from its Events API, which returns events newest first: the worst order for prerequisites."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, func, select
from stripe_emulator import EmulatorServer, Store

from ledger.check import check_ledger
from ledger.db import unit_of_work
from ledger.inbox import EventSource, EventStatus, StripeEvent
from ledger.models import AccessState, Account, Grant, GrantSource
from reconciliation.gateway import StripeGateway
from tests.worker.conftest import event_row, store
from worker.backfill import backfill
from worker.processing import process_events


@pytest.fixture
def emulator() -> Iterator[EmulatorServer]:
    server = EmulatorServer(Store(events_retention_days=None)).start()
    yield server
    server.stop()


def make_activity(store: Store) -> dict[str, str]:
    """A month of one customer's billing, and a second customer who cancels."""
    alice = store.create_customer(email="alice@example.com")
    store.clock.advance(minutes=5)
    store.topup(alice, "price_credits_large", metadata={"price_id": "price_credits_large"})
    store.clock.advance(minutes=5)
    direct = store.create_payment(alice.id, 700)
    store.clock.advance(minutes=5)
    sub = store.create_subscription(alice, "price_pro_monthly")
    store.clock.advance(hours=1)
    store.refund(direct, 350)
    store.clock.advance(hours=1)
    disputed = store.create_payment(alice.id, 400)
    store.clock.advance(hours=1)
    dispute = store.create_dispute(disputed)
    store.clock.advance(days=2)
    store.close_dispute(dispute, won=False)
    store.clock.advance(days=30)
    store.renew_subscription(sub, fail=True)
    store.clock.advance(days=1)
    store.recover_subscription(sub)
    bob = store.create_customer(email="bob@example.com")
    store.clock.advance(minutes=1)
    bob_sub = store.create_subscription(bob, "price_pro_monthly")
    store.clock.advance(minutes=1)
    store.cancel_subscription(bob_sub)
    return {"alice": alice.id, "bob": bob.id}


class TestBackfillFromTheEmulator:
    def test_backfill_stores_processes_and_is_idempotent(self, db: Engine, emulator: EmulatorServer) -> None:
        who = make_activity(emulator.store)
        gateway = StripeGateway(api_base=emulator.url, wait_initial=0.01, wait_max=0.05)
        handed: list[int] = []

        def hand_over(ids: Sequence[int]) -> None:
            handed.extend(ids)
            process_events(ids, gateway=gateway, batch_size=7)

        since = datetime.now(UTC) - timedelta(days=1)
        report = backfill(gateway, since=since, hand_over=hand_over)
        total = len(emulator.store.events())
        assert report.seen == total and report.stored == total and len(handed) == total

        with unit_of_work() as session:
            statuses = dict(
                session.execute(select(StripeEvent.status, func.count()).group_by(StripeEvent.status)).all()
            )
            assert set(statuses) <= {EventStatus.PROCESSED, EventStatus.IGNORED}, statuses
            assert session.scalar(select(func.count()).where(StripeEvent.source != EventSource.BACKFILL)) == 0
            grants = [
                (g.source, g.units, g.clawed_back)
                for g in session.scalars(select(Grant).join(Account).where(Account.customer_id == who["alice"]))
            ]
            assert (GrantSource.TOP_UP, 12000, 0) in grants  # the pack, not the fallback rate
            assert (GrantSource.TOP_UP, 700, 350) in grants  # half refunded, half clawed back
            assert (GrantSource.TOP_UP, 400, 400) in grants  # dispute lost
            assert sum(1 for g in grants if g[0] == GrantSource.RENEWAL) == 2  # start + recovered renewal
            alice = session.scalars(select(Account).where(Account.customer_id == who["alice"])).one()
            bob = session.scalars(select(Account).where(Account.customer_id == who["bob"])).one()
            assert alice.access_state == AccessState.ACTIVE
            assert bob.access_state == AccessState.CANCELED
            assert check_ledger(session) == []

        again = backfill(gateway, since=since, hand_over=hand_over)
        assert (again.seen, again.stored) == (total, 0)

    def test_backfill_reaches_back_at_most_30_days(self, db: Engine, emulator: EmulatorServer) -> None:
        gateway = StripeGateway(api_base=emulator.url)
        report = backfill(gateway, since=datetime(2020, 1, 1, tzinfo=UTC), hand_over=lambda ids: None)
        assert report.clamped
        assert report.since >= datetime.now(UTC) - timedelta(days=30, minutes=1)


class TestStripeOutages:
    def test_a_stripe_outage_leaves_the_event_pending_for_a_retry(self, db: Engine, emulator: EmulatorServer) -> None:
        store_ = emulator.store
        customer = store_.create_customer()
        store_.topup(customer, "price_credits_large")  # no metadata: the pack is read from the line items
        [completed] = store_.events(types=["checkout.session.completed"])
        row_id = store(completed)
        gateway = StripeGateway(api_base=emulator.url, max_attempts=2, wait_initial=0.01, wait_max=0.02)
        store_.faults.fail_next(10, status=503)
        report = process_events([row_id], gateway=gateway)
        assert report.retry == [row_id] and report.retry_in > 0
        row = event_row(row_id)
        assert row.status == EventStatus.PENDING and row.next_attempt_at is not None
        assert "503" in (row.last_error or "") or "APIError" in (row.last_error or "")
        with unit_of_work() as session:
            assert session.scalar(select(func.count()).select_from(Grant)) == 0

        store_.faults.clear()
        assert process_events([row_id], gateway=gateway).processed == 1
        with unit_of_work() as session:
            assert [g.units for g in session.scalars(select(Grant))] == [12000]


class TestCheckoutPricing:
    def test_payment_intent_before_its_session_is_priced_from_the_session_line_items(
        self, db: Engine, emulator: EmulatorServer
    ) -> None:
        customer = emulator.store.create_customer()
        emulator.store.topup(customer, "price_credits_large")  # no metadata anywhere
        events = emulator.store.events(types=["payment_intent.succeeded", "checkout.session.completed"])
        assert [e["type"] for e in events] == ["payment_intent.succeeded", "checkout.session.completed"]
        gateway = StripeGateway(api_base=emulator.url)
        for event in events:  # Stripe's order: the payment intent first
            process_events([store(event)], gateway=gateway)
        with unit_of_work() as session:
            # The pack's 12,000 credits (not 10,000 at the fallback rate), granted once for both events.
            assert [g.units for g in session.scalars(select(Grant))] == [12000]
            assert check_ledger(session) == []
