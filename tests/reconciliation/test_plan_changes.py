"""plan_change_not_applied: a paid change of plan whose credits the ledger lacks is found, and nothing else is."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from ledger.db import session_factory
from ledger.inbox import EventStatus, StripeEvent
from reconciliation.engine import RunSummary, reconcile
from reconciliation.models import Mismatch, MismatchKind
from tests.reconciliation import builders as b
from tests.reconciliation.conftest import Emulator
from worker.processing import process_events

pytestmark = pytest.mark.usefixtures("test_config")


def _run(emu: Emulator) -> RunSummary:
    until = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(days=1)
    return reconcile(session_factory(), emu.gateway, since=emu.start, until=until, provider_reports=[], actor="test")


def _upgrade(emu: Emulator) -> tuple[str, str, int]:
    """Pro (10000 credits) upgraded to Team (50000) three days into the period, paid at once; the worker applies
    the Stripe events, except (``skip_change``) the change's invoice.paid, left processed by a worker that
    ignored it. Returns (customer, proration invoice, the credits the prorate policy owes)."""
    store = emu.store
    customer = store.create_customer(email="upgrade@example.com").id
    sub = store.create_subscription(customer, "price_pro_monthly")
    store.clock.advance(days=3)
    invoice = store.change_subscription(sub, price="price_team_monthly")
    assert invoice is not None
    store.clock.advance(minutes=5)
    record = store.get(sub.id)
    # (50000 - 10000) x seconds left // period seconds, from the emulator's own period and change time.
    owed = (
        40000
        * (record.current_period_end - invoice.created)
        // (record.current_period_end - record.current_period_start)
    )
    return customer, invoice.id, owed


def _apply(emu: Emulator, *, skip: str | None) -> None:
    with session_factory().begin() as s:
        b.store_all_events(s, emu.store.events(), status=EventStatus.PENDING)
        if skip is not None:
            s.execute(
                update(StripeEvent)
                .where(StripeEvent.type == "invoice.paid", StripeEvent.object_id == skip)
                .values(status=EventStatus.PROCESSED)
            )
        pending = list(s.scalars(select(StripeEvent.id).where(StripeEvent.status == EventStatus.PENDING)))
    report = process_events(pending, gateway=emu.gateway)
    assert report.retry == []
    with Session(session_factory().kw["bind"]) as s:
        assert s.scalars(select(StripeEvent).where(StripeEvent.status == EventStatus.FAILED)).all() == []


class TestPlanChangeNotApplied:
    def test_an_applied_plan_change_is_consistent(self, engine: Engine, emulator: Emulator) -> None:
        _upgrade(emulator)
        _apply(emulator, skip=None)
        summary = _run(emulator)
        assert summary.counts == {}

    def test_missing_plan_change_credits_are_found_and_nothing_else(self, engine: Engine, emulator: Emulator) -> None:
        customer, invoice_id, owed = _upgrade(emulator)
        _apply(emulator, skip=invoice_id)
        summary = _run(emulator)
        assert summary.counts == {"plan_change_not_applied": 1}
        with Session(engine) as s:
            m = s.scalars(select(Mismatch)).one()
        assert (m.kind, m.fingerprint) == (
            MismatchKind.PLAN_CHANGE_NOT_APPLIED,
            b.fingerprint(MismatchKind.PLAN_CHANGE_NOT_APPLIED, invoice_id),
        )
        assert (m.customer_id, m.expected_amount, m.actual_amount) == (customer, owed, 0)
        assert m.evidence["stripe"]["action"] == "grant" and m.evidence["stripe"]["invoice"] == invoice_id
        assert m.evidence["stripe"]["new_items"] == [["price_team_monthly", 1]]
        assert m.evidence["ledger"]["grants"] == []
        assert any(e["type"] == "invoice.paid" for e in m.evidence["ledger"]["stored_events"])


class TestAccessPerSubscription:
    def test_a_subscription_whose_end_the_ledger_missed_is_named_and_nothing_else(
        self, engine: Engine, emulator: Emulator
    ) -> None:
        store = emulator.store
        customer = store.create_customer(email="two@example.com").id
        kept = store.create_subscription(customer, "price_pro_monthly")
        store.clock.advance(minutes=5)
        ended = store.create_subscription(customer, "price_team_monthly")
        store.clock.advance(hours=1)
        store.cancel_subscription(ended)
        store.clock.advance(minutes=5)
        deleted = [e["id"] for e in store.events() if e["type"] == "customer.subscription.deleted"]
        with session_factory().begin() as s:
            b.store_all_events(s, store.events(), status=EventStatus.PENDING)
            # The deletion was received but lost by a worker bug: left processed, never applied.
            s.execute(update(StripeEvent).where(StripeEvent.event_id.in_(deleted)).values(status=EventStatus.PROCESSED))
            pending = list(s.scalars(select(StripeEvent.id).where(StripeEvent.status == EventStatus.PENDING)))
        process_events(pending, gateway=emulator.gateway)
        summary = _run(emulator)
        # The customer's access (the best of the two) is right; the ended subscription's is not.
        assert summary.counts == {"access_state_drift": 1}
        with Session(engine) as s:
            m = s.scalars(select(Mismatch)).one()
        assert m.fingerprint == b.fingerprint(MismatchKind.ACCESS_STATE_DRIFT, ended.id)
        assert (m.evidence["stripe"]["status"], m.evidence["ledger"]["access_state"]) == ("canceled", "active")
        assert kept.id not in m.summary
