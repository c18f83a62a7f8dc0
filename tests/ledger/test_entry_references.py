"""An entry's account and grant must exist, on both backends (PostgreSQL checks them once per INSERT statement)."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, delete, insert, select
from sqlalchemy.exc import IntegrityError

from ledger.db import unit_of_work
from ledger.models import Account, Entry, EntryKind, Grant
from tests.ledger.factories import make_consume, make_grant, unique


def _account_id(customer_id: str) -> int:
    with unit_of_work() as session:
        return session.scalars(select(Account.id).where(Account.customer_id == customer_id)).one()


def _entry(account_id: int, grant_id: int | None) -> dict[str, object]:
    return {
        "account_id": account_id, "kind": EntryKind.ADJUSTMENT, "units": 0, "balance_after": 0,
        "idempotency_key": unique("key"), "grant_id": grant_id, "actor": "test", "reason": "",
    }  # fmt: skip


def _entry_count() -> int:
    with unit_of_work() as session:
        return len(session.scalars(select(Entry.id)).all())


class TestEntryReferences:
    def test_entries_of_an_existing_account_and_grant_are_written(self, engine: Engine) -> None:
        grant = make_grant(units=10)
        account = _account_id(grant.customer_id)
        before = _entry_count()
        with unit_of_work() as session:
            session.execute(insert(Entry).values([_entry(account, grant.grant_id), _entry(account, None)]))
        assert _entry_count() == before + 2

    @pytest.mark.parametrize("missing", ["account", "grant"])
    def test_one_row_naming_a_missing_row_refuses_the_whole_insert(self, engine: Engine, missing: str) -> None:
        grant = make_grant(units=10)
        account = _account_id(grant.customer_id)
        bad = _entry(account + 1000, None) if missing == "account" else _entry(account, grant.grant_id + 1000)
        before = _entry_count()
        with pytest.raises(IntegrityError), unit_of_work() as session:
            # One INSERT of three rows (a VALUES list): on PostgreSQL one statement, checked once at its end.
            session.execute(insert(Entry).values([_entry(account, grant.grant_id), bad, _entry(account, None)]))
        assert _entry_count() == before

    def test_an_account_or_grant_that_entries_refer_to_is_not_deleted(self, engine: Engine) -> None:
        grant = make_grant(units=10)
        make_consume(customer_id=grant.customer_id, units=3)
        for statement in (
            delete(Grant).where(Grant.id == grant.grant_id),
            delete(Account).where(Account.customer_id == grant.customer_id),
        ):
            with pytest.raises(IntegrityError), unit_of_work() as session:
                session.execute(statement)
        assert _account_id(grant.customer_id) > 0

    def test_rows_nothing_refers_to_are_deleted(self, engine: Engine) -> None:
        # What a test's wipe does: the entries first, then what they referred to.
        grant = make_grant(units=10)
        with unit_of_work() as session:
            session.execute(delete(Entry))
            session.execute(delete(Grant).where(Grant.id == grant.grant_id))
            session.execute(delete(Account).where(Account.customer_id == grant.customer_id))
        with unit_of_work() as session:
            assert session.scalars(select(Account.id).where(Account.customer_id == grant.customer_id)).first() is None
