"""The invariant check finds every kind of inconsistency it claims to."""

from __future__ import annotations

from factories import make_account, make_consume, make_grant, make_hold
from sqlalchemy import Engine, text, update

from ledger.check import check_ledger
from ledger.db import unit_of_work
from ledger.models import Account, Grant


def _invariants(customer: str | None = None) -> set[str]:
    with unit_of_work() as session:
        return {v.invariant for v in check_ledger(session, customer)}


class TestCheckLedger:
    def test_consistent_ledger_has_no_violation(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)
        make_consume(customer_id=customer, units=10)
        make_hold(customer_id=customer, units=10)

        assert _invariants() == set()
        assert _invariants(customer) == set()
        assert _invariants("cus_unknown") == set()

    def test_tampered_balance_is_found(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)
        with unit_of_work() as session:
            session.execute(update(Account).where(Account.customer_id == customer).values(balance=101))

        assert {"balance_equals_entries", "balance_equals_grants"} <= _invariants(customer)

    def test_tampered_grant_is_found(self, engine: Engine) -> None:
        customer = make_account()
        grant = make_grant(customer_id=customer, units=100)
        with unit_of_work() as session:
            session.execute(update(Grant).where(Grant.id == grant.grant_id).values(remaining=90))

        assert {"balance_equals_grants", "grant_remaining_equals_allocations"} <= _invariants(customer)

    def test_tampered_held_is_found(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)
        make_hold(customer_id=customer, units=10)
        with unit_of_work() as session:
            session.execute(update(Account).where(Account.customer_id == customer).values(held=3))

        assert _invariants(customer) == {"held_equals_open_holds"}

    def test_broken_balance_after_chain_is_found(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)
        result = make_consume(customer_id=customer, units=10)
        with unit_of_work() as session:
            session.execute(text("UPDATE entries SET balance_after = 1 WHERE id = :id"), {"id": result.entry_id})

        assert _invariants(customer) == {"balance_after_chain"}

    def test_violations_name_the_customer(self, engine: Engine) -> None:
        good, bad = make_account(), make_account()
        make_grant(customer_id=good, units=5)
        make_grant(customer_id=bad, units=5)
        with unit_of_work() as session:
            session.execute(update(Account).where(Account.customer_id == bad).values(debt=2))
            violations = check_ledger(session)

        assert {v.customer_id for v in violations} == {bad}
