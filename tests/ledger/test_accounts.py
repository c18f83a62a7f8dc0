"""Accounts and access state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from factories import make_account
from sqlalchemy import Engine

from ledger.accounts import get_account, open_account, set_access_state
from ledger.db import unit_of_work
from ledger.errors import InvalidRequest, UnknownCustomer
from ledger.models import AccessState

T0 = datetime(2026, 11, 1, tzinfo=UTC)


class TestOpenAccount:
    def test_creates_once(self, engine: Engine) -> None:
        with unit_of_work() as session:
            first = open_account(session, "cus_open", external_id="org_1")
        with unit_of_work() as session:
            again = open_account(session, "cus_open")
            assert (again.id, again.external_id, again.balance) == (first.id, "org_1", 0)
            assert again.access_state == AccessState.ACTIVE

    def test_fills_a_missing_external_id(self, engine: Engine) -> None:
        make_account(customer_id="cus_ext")
        with unit_of_work() as session:
            assert open_account(session, "cus_ext", external_id="org_2").external_id == "org_2"

    def test_empty_customer_id_is_refused(self, engine: Engine) -> None:
        with pytest.raises(InvalidRequest), unit_of_work() as session:
            open_account(session, "")


class TestGetAccount:
    def test_unknown_customer_raises(self, engine: Engine) -> None:
        with pytest.raises(UnknownCustomer), unit_of_work() as session:
            get_account(session, "cus_missing")


class TestSetAccessState:
    def test_applies_a_newer_state_and_opens_the_account(self, engine: Engine) -> None:
        with unit_of_work() as session:
            grace = T0 + timedelta(days=7)
            assert set_access_state(
                session, "cus_state", AccessState.PAST_DUE, as_of=T0, source="evt_1", grace_until=grace
            )
        with unit_of_work() as session:
            account = get_account(session, "cus_state")
            assert account.access_state == AccessState.PAST_DUE and account.access_source == "evt_1"
            assert account.grace_until is not None and account.grace_until.replace(tzinfo=UTC) == grace

    def test_stale_or_equal_state_is_not_applied(self, engine: Engine) -> None:
        with unit_of_work() as session:
            set_access_state(session, "cus_order", AccessState.CANCELED, as_of=T0 + timedelta(hours=1), source="new")
        with unit_of_work() as session:
            stale = set_access_state(session, "cus_order", AccessState.ACTIVE, as_of=T0, source="old")
            equal = set_access_state(
                session, "cus_order", AccessState.ACTIVE, as_of=T0 + timedelta(hours=1), source="same"
            )
        with unit_of_work() as session:
            assert (stale, equal) == (False, False)
            assert get_account(session, "cus_order").access_state == AccessState.CANCELED

    def test_leaving_past_due_clears_the_grace_deadline(self, engine: Engine) -> None:
        with unit_of_work() as session:
            set_access_state(session, "cus_g", AccessState.PAST_DUE, as_of=T0, source="a", grace_until=T0)
            set_access_state(session, "cus_g", AccessState.ACTIVE, as_of=T0 + timedelta(seconds=1), source="b")
        with unit_of_work() as session:
            assert get_account(session, "cus_g").grace_until is None

    def test_naive_time_is_refused(self, engine: Engine) -> None:
        with pytest.raises(InvalidRequest), unit_of_work() as session:
            set_access_state(session, "cus_n", AccessState.ACTIVE, as_of=datetime(2026, 1, 1), source="x")  # noqa: DTZ001
