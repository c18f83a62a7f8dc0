"""Clawbacks (refunds, lost disputes) and freezes (open disputes)."""

from __future__ import annotations

import pytest
from factories import account_state, grant_remaining, make_account, make_consume, make_grant, unique
from sqlalchemy import Engine

from ledger.check import check_ledger
from ledger.clawback import clawback, freeze_grant, unfreeze_grant
from ledger.db import unit_of_work
from ledger.errors import IdempotencyConflict, InsufficientCredits, InvalidRequest


def assert_consistent(customer_id: str) -> None:
    with unit_of_work() as session:
        assert check_ledger(session, customer_id) == []


class TestClawback:
    def test_takes_remaining_units_of_the_grant(self, engine: Engine) -> None:
        customer = make_account()
        grant = make_grant(customer_id=customer, units=100)

        with unit_of_work() as session:
            result = clawback(session, grant.grant_id, units=100, idempotency_key=unique("refund"), reason="refund")

        assert (result.requested, result.clawed, result.debt, result.replayed) == (100, 100, 0, False)
        assert account_state(customer)[:3] == (0, 0, 0)
        assert_consistent(customer)

    def test_spent_units_become_recorded_debt(self, engine: Engine) -> None:
        customer = make_account()
        grant = make_grant(customer_id=customer, units=100)
        other = make_grant(customer_id=customer, units=50)
        make_consume(customer_id=customer, units=80)  # drawn from the older grant

        with unit_of_work() as session:
            result = clawback(session, grant.grant_id, units=100, idempotency_key=unique("refund"), reason="refund")

        assert (result.clawed, result.debt) == (20, 80)
        assert account_state(customer)[:3] == (-30, 0, 80)
        assert grant_remaining(grant.grant_id) == (0, 0) and grant_remaining(other.grant_id) == (50, 0)
        with pytest.raises(InsufficientCredits):
            make_consume(customer_id=customer, units=1)
        assert_consistent(customer)

    def test_new_grant_settles_the_debt_first(self, engine: Engine) -> None:
        customer = make_account()
        grant = make_grant(customer_id=customer, units=100)
        make_consume(customer_id=customer, units=100)
        with unit_of_work() as session:
            clawback(session, grant.grant_id, units=60, idempotency_key=unique("refund"), reason="partial refund")
        assert account_state(customer)[:3] == (-60, 0, 60)

        top_up = make_grant(customer_id=customer, units=100)

        assert top_up.balance_after == 40
        assert account_state(customer)[:3] == (40, 0, 0)
        assert grant_remaining(top_up.grant_id) == (40, 0)
        assert_consistent(customer)

    def test_repeated_clawback_changes_nothing(self, engine: Engine) -> None:
        customer = make_account()
        grant = make_grant(customer_id=customer, units=100)
        make_consume(customer_id=customer, units=30)
        with unit_of_work() as session:
            first = clawback(session, grant.grant_id, units=50, idempotency_key="re_1", reason="refund")
        before = account_state(customer)

        with unit_of_work() as session:
            again = clawback(session, grant.grant_id, units=50, idempotency_key="re_1", reason="refund")

        assert again.replayed and (again.clawed, again.debt) == (first.clawed, first.debt) == (50, 0)
        assert account_state(customer) == before

    def test_repeated_key_with_other_units_conflicts(self, engine: Engine) -> None:
        grant = make_grant(units=100)
        with unit_of_work() as session:
            clawback(session, grant.grant_id, units=50, idempotency_key="re_conflict", reason="refund")

        with pytest.raises(IdempotencyConflict), unit_of_work() as session:
            clawback(session, grant.grant_id, units=60, idempotency_key="re_conflict", reason="refund")

    def test_never_claws_more_than_the_grant_gave(self, engine: Engine) -> None:
        customer = make_account()
        grant = make_grant(customer_id=customer, units=100)
        with unit_of_work() as session:
            clawback(session, grant.grant_id, units=70, idempotency_key=unique("re"), reason="refund 1")
            second = clawback(session, grant.grant_id, units=70, idempotency_key=unique("re"), reason="refund 2")

        assert (second.clawed, second.debt) == (30, 0)
        assert account_state(customer)[:3] == (0, 0, 0)
        assert_consistent(customer)

    def test_frozen_units_are_clawed_before_debt(self, engine: Engine) -> None:
        customer = make_account()
        grant = make_grant(customer_id=customer, units=100)
        make_consume(customer_id=customer, units=40)
        with unit_of_work() as session:
            assert freeze_grant(session, grant.grant_id, idempotency_key=unique("dp"), reason="dispute") == 60

        with unit_of_work() as session:
            result = clawback(session, grant.grant_id, units=100, idempotency_key=unique("dp"), reason="dispute lost")

        assert (result.clawed, result.debt) == (60, 40)
        assert grant_remaining(grant.grant_id) == (0, 0)
        assert account_state(customer)[:3] == (-40, 0, 40)
        assert_consistent(customer)

    def test_unknown_grant_is_refused(self, engine: Engine) -> None:
        with pytest.raises(InvalidRequest), unit_of_work() as session:
            clawback(session, 999_999, units=1, idempotency_key=unique("re"), reason="refund")


class TestFreezeGrant:
    def test_sets_remaining_units_aside(self, engine: Engine) -> None:
        customer = make_account()
        grant = make_grant(customer_id=customer, units=100)
        make_consume(customer_id=customer, units=30)

        with unit_of_work() as session:
            frozen = freeze_grant(session, grant.grant_id, idempotency_key="dp_1", reason="dispute opened")
        with unit_of_work() as session:
            again = freeze_grant(session, grant.grant_id, idempotency_key="dp_1", reason="dispute opened")

        assert frozen == again == 70
        assert grant_remaining(grant.grant_id) == (0, 70)
        assert account_state(customer)[:3] == (0, 0, 0)
        assert_consistent(customer)


class TestUnfreezeGrant:
    def test_dispute_won_gives_units_back(self, engine: Engine) -> None:
        customer = make_account()
        grant = make_grant(customer_id=customer, units=100)
        with unit_of_work() as session:
            freeze_grant(session, grant.grant_id, idempotency_key="dp_2", reason="dispute opened")

        with unit_of_work() as session:
            given = unfreeze_grant(session, grant.grant_id, idempotency_key="dp_2_won", reason="dispute won")
        with unit_of_work() as session:
            again = unfreeze_grant(session, grant.grant_id, idempotency_key="dp_2_won", reason="dispute won")

        assert given == again == 100
        assert grant_remaining(grant.grant_id) == (100, 0)
        assert account_state(customer)[:3] == (100, 0, 0)
        assert_consistent(customer)
