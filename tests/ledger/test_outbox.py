"""The transactional outbox: each event type written once per cause, in the cause's transaction, on both backends."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select

from ledger.accounts import open_account, set_access_state
from ledger.clawback import clawback, freeze_grant
from ledger.config import BillingConfig, get_billing_config
from ledger.db import unit_of_work
from ledger.grants import expire_grants, grant_credits
from ledger.models import AccessState, GrantSource, OutboxEvent
from ledger.outbox import emit, note_balance, set_low_balance_threshold, spendable
from tests.ledger.factories import make_grant, unique


def events(customer_id: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    with unit_of_work() as session:
        query = select(OutboxEvent).order_by(OutboxEvent.id)
        if customer_id is not None:
            query = query.where(OutboxEvent.customer_id == customer_id)
        return [(row.type, row.data) for row in session.scalars(query)]


def types(customer_id: str | None = None) -> list[str]:
    return [t for t, _ in events(customer_id)]


class TestEmittedOncePerCause:
    def test_grant_and_its_replay(self, engine: Engine) -> None:
        customer = unique("cus")
        result = make_grant(customer_id=customer, units=120, key="g-1")
        make_grant(customer_id=customer, units=120, key="g-1")  # a redelivery: same grant, nothing new
        ((kind, data),) = events(customer)
        assert kind == "credits.granted"
        assert (data["grant_id"], data["units"], data["balance_after"], data["source"]) == (
            result.grant_id,
            120,
            120,
            "top_up",
        )

    def test_clawback_freeze_and_replay(self, engine: Engine) -> None:
        customer = unique("cus")
        grant = make_grant(customer_id=customer, units=100)
        with unit_of_work() as session:
            clawback(session, grant.grant_id, units=30, idempotency_key="r1", reason="refund")
            clawback(session, grant.grant_id, units=30, idempotency_key="r1", reason="refund")
        with unit_of_work() as session:
            freeze_grant(session, grant.grant_id, idempotency_key="d1", reason="dispute")  # not a clawback
        claw = [d for t, d in events(customer) if t == "credits.clawed_back"]
        assert [(d["units"], d["debt"], d["balance_after"]) for d in claw] == [(30, 0, 70)]

    def test_expiry(self, engine: Engine) -> None:
        customer = unique("cus")
        now = datetime.now(UTC)
        make_grant(customer_id=customer, units=40, expires_at=now + timedelta(hours=1))
        make_grant(customer_id=customer, units=10)
        with unit_of_work() as session:
            assert expire_grants(session, now=now + timedelta(hours=2)) == 1
        with unit_of_work() as session:
            assert expire_grants(session, now=now + timedelta(hours=3)) == 0
        expired = [d for t, d in events(customer) if t == "credits.expired"]
        assert [(d["units"], d["balance_after"]) for d in expired] == [(40, 10)]

    def test_access_changed_only_when_the_state_changes(self, engine: Engine) -> None:
        customer = unique("cus")
        t0 = datetime(2026, 12, 1, tzinfo=UTC)
        with unit_of_work() as session:
            open_account(session, customer)
            set_access_state(session, customer, AccessState.ACTIVE, as_of=t0, source="a")  # already active
            set_access_state(session, customer, AccessState.SUSPENDED, as_of=t0 + timedelta(1), source="b")
            set_access_state(session, customer, AccessState.SUSPENDED, as_of=t0 + timedelta(2), source="c")
            set_access_state(session, customer, AccessState.ACTIVE, as_of=t0, source="stale")  # older: not applied
            set_access_state(session, customer, AccessState.ACTIVE, as_of=t0 + timedelta(3), source="d")
        changes = [(d["previous"], d["access_state"], d["source"]) for t, d in events(customer)]
        assert changes == [("active", "suspended", "b"), ("suspended", "active", "d")]

    def test_nothing_for_a_rolled_back_transaction(self, engine: Engine) -> None:
        customer = unique("cus")
        with pytest.raises(RuntimeError), unit_of_work() as session:
            grant_credits(session, customer, units=5, source=GrantSource.TOP_UP, idempotency_key=unique("g"))
            emit(session, "balance.low", customer, {"balance": 1})
            raise RuntimeError("the cause failed")
        assert events() == []


def low_config(body: str) -> BillingConfig:
    return BillingConfig.model_validate(tomllib.loads(body))


class TestBalanceCrossing:
    def test_once_per_crossing_hand_worked(self, engine: Engine) -> None:
        customer = unique("cus")
        make_grant(customer_id=customer, units=1)
        with unit_of_work() as session:
            account_id, _ = spendable(session, customer) or (0, 0)
            set_low_balance_threshold(session, customer, 100)
        # (before, after) of successive movements, and what a person expects to hear.
        steps = [
            ((500, 150), []),
            ((150, 100), []),  # at the threshold is not below it
            ((100, 99), ["balance.low"]),
            ((99, 20), []),  # still below: nothing per consume
            ((20, 0), ["balance.depleted"]),
            ((0, 0), []),
            ((0, 400), []),  # a grant: back above
            ((400, 0), ["balance.low", "balance.depleted"]),  # one movement across both lines
            ((0, 50), []),
            ((50, 10), []),  # was never back above 100: no second low
        ]
        for (before, after), expected in steps:
            with unit_of_work() as session:
                crossing = note_balance(
                    session, account_id=account_id, customer_id=customer, before=before, after=after, cause="test"
                )
            assert list(crossing.emitted) == expected, (before, after)
        crossings = ["balance.low", "balance.depleted"]
        assert types(customer) == ["credits.granted", *crossings, *crossings]

    def test_share_of_the_last_grant_and_a_clawback_crossing(
        self, engine: Engine, billing_config_file: Any
    ) -> None:
        billing_config_file(
            '[[plans]]\nprice = "price_pro"\nname = "Pro"\ncredits_per_period = 2000\nlow_balance_share = "0.25"\n'
        )
        assert get_billing_config().plans[0].low_balance_share is not None
        customer = unique("cus")
        now = datetime.now(UTC)
        with unit_of_work() as session:
            grant = grant_credits(
                session, customer, units=2000, source=GrantSource.RENEWAL, idempotency_key=unique("r"),
                reason="Pro subscription_cycle in_1", period_start=now - timedelta(days=1),
                period_end=now + timedelta(days=29),
            )  # fmt: skip
        with unit_of_work() as session:
            clawback(session, grant.grant_id, units=1400, idempotency_key="c1", reason="refund")  # 2000 -> 600
            clawback(session, grant.grant_id, units=200, idempotency_key="c2", reason="refund")  # 600 -> 400: at 500
        low = [d for t, d in events(customer) if t == "balance.low"]
        assert [(d["balance_before"], d["balance"], d["threshold"]) for d in low] == [(600, 400, 500)]


@pytest.mark.postgres
class TestBalanceNoticeInSql:
    def test_same_crossings_as_note_balance(self, pg_engine: Engine) -> None:
        """balance_notice (for consumptions written in SQL) against the same hand-worked steps."""
        from sqlalchemy import text

        customer = unique("cus")
        make_grant(customer_id=customer, units=1)
        with unit_of_work() as session:
            account_id, _ = spendable(session, customer) or (0, 0)
            set_low_balance_threshold(session, customer, 100)
        steps = [((500, 150), 0), ((100, 99), 1), ((99, 20), 0), ((20, 0), 1), ((0, 400), 0), ((400, 0), 2)]
        for (before, after), expected in steps:
            with unit_of_work() as session:
                emitted = session.execute(
                    text("SELECT balance_notice(:a, :c, :b, :f, 'test')"),
                    {"a": account_id, "c": customer, "b": before, "f": after},
                ).scalar_one()
            assert emitted == expected, (before, after)
        crossing_types = [t for t, _ in events(customer) if t.startswith("balance.")]
        assert crossing_types == ["balance.low", "balance.depleted", "balance.low", "balance.depleted"]
        low = next(d for t, d in events(customer) if t == "balance.low")
        assert low == {"balance_before": 100, "balance": 99, "cause": "test", "threshold": 100}
