"""Grants: idempotent credit, validation, lookup by payment, expiry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from factories import account_state, grant_remaining, make_account, make_consume, make_grant
from sqlalchemy import Engine, select

from ledger.check import check_ledger
from ledger.db import unit_of_work
from ledger.errors import IdempotencyConflict, InvalidRequest
from ledger.grants import expire_grants, find_grants_for_payment, grant_credits
from ledger.models import Entry, EntryKind, GrantSource

NOW = datetime.now(UTC)


class TestGrantCredits:
    def test_opens_the_account_and_credits_it(self, engine: Engine) -> None:
        result = make_grant(customer_id="cus_new", units=250, source=GrantSource.PROMOTION)

        assert (result.customer_id, result.units, result.balance_after, result.replayed) == ("cus_new", 250, 250, False)
        assert account_state("cus_new") == (250, 0, 0, 1)
        assert grant_remaining(result.grant_id) == (250, 0)

    def test_same_key_returns_the_original_grant(self, engine: Engine) -> None:
        customer = make_account()
        first = make_grant(customer_id=customer, units=100, key="pi_123")
        make_consume(customer_id=customer, units=10)

        again = make_grant(customer_id=customer, units=100, key="pi_123")

        assert again.replayed and (again.grant_id, again.balance_after) == (first.grant_id, 100)
        assert account_state(customer)[:3] == (90, 0, 0)

    @pytest.mark.parametrize("change", [{"units": 101}, {"customer_id": "cus_other"}, {"priority": 3}])
    def test_same_key_with_other_parameters_conflicts(self, engine: Engine, change: dict[str, object]) -> None:
        make_grant(customer_id="cus_k", units=100, key="pi_conflict")
        params: dict[str, object] = {"customer_id": "cus_k", "units": 100, "key": "pi_conflict"} | change

        with pytest.raises(IdempotencyConflict):
            make_grant(**params)  # type: ignore[arg-type]

    @pytest.mark.parametrize("units", [0, -5])
    def test_non_positive_units_are_refused(self, engine: Engine, units: int) -> None:
        with pytest.raises(InvalidRequest):
            make_grant(units=units)

    def test_naive_expiry_is_refused(self, engine: Engine) -> None:
        with pytest.raises(InvalidRequest), unit_of_work() as session:
            grant_credits(
                session,
                "cus_x",
                units=1,
                source=GrantSource.TOP_UP,
                idempotency_key="k-naive",
                expires_at=datetime(2030, 1, 1),  # noqa: DTZ001 (the point of the test)
            )

    def test_records_the_payment(self, engine: Engine) -> None:
        with unit_of_work() as session:
            result = grant_credits(
                session,
                "cus_pay",
                units=1000,
                source=GrantSource.TOP_UP,
                idempotency_key="cs_1",
                stripe_object_id="pi_abc",
                stripe_object_type="payment_intent",
                amount_minor=1000,
                currency="USD",
            )
        with unit_of_work() as session:
            grants = find_grants_for_payment(session, "pi_abc")
            assert [(g.id, g.amount_minor, g.currency) for g in grants] == [(result.grant_id, 1000, "usd")]
            assert find_grants_for_payment(session, "pi_other") == []


class TestExpireGrants:
    def test_expires_lapsed_units_with_an_entry(self, engine: Engine) -> None:
        customer = make_account()
        lapsing = make_grant(customer_id=customer, units=50, expires_at=NOW + timedelta(hours=1))
        lasting = make_grant(customer_id=customer, units=20)
        make_consume(customer_id=customer, units=10)  # from the lapsing grant (earliest expiry)

        with unit_of_work() as session:
            expired = expire_grants(session, now=NOW + timedelta(hours=2))

        assert expired == 1
        assert grant_remaining(lapsing.grant_id) == (0, 0) and grant_remaining(lasting.grant_id) == (20, 0)
        assert account_state(customer)[:3] == (20, 0, 0)
        with unit_of_work() as session:
            entry = session.scalars(select(Entry).where(Entry.kind == EntryKind.EXPIRE)).one()
            assert (entry.units, entry.balance_after, entry.grant_id) == (-40, 20, lapsing.grant_id)
            assert check_ledger(session, customer) == []

    def test_running_again_changes_nothing(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=50, expires_at=NOW + timedelta(hours=1))
        with unit_of_work() as session:
            expire_grants(session, now=NOW + timedelta(hours=2))
        before = account_state(customer)

        with unit_of_work() as session:
            assert expire_grants(session, now=NOW + timedelta(hours=2)) == 0
        assert account_state(customer) == before

    def test_leaves_unexpired_grants_alone(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=50, expires_at=NOW + timedelta(days=1))

        with unit_of_work() as session:
            assert expire_grants(session, now=NOW) == 0
        assert account_state(customer)[0] == 50
