"""Every invariant ``check_ledger`` claims, broken alone by tampering with the tables, is found alone.

The invariants overlap (balance = sum of entries, debt = sum of debt deltas, and balance = remaining - debt
together imply the third from the other two when every movement stays inside its account), so a tamper that
breaks exactly one of them has to keep the others true: several move units into another account's grant, the
one way the identities part. Each tamper runs inside a transaction that is rolled back (constraints that would
refuse it are dropped in that transaction on PostgreSQL, or not enforced for that connection on SQLite).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from factories import make_account, make_consume, make_grant, make_hold, make_usage
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ledger.check import check_ledger

# The invariants ledger/check.py names (each must have a tamper below).
CLAIMED = {
    "balance_equals_entries",
    "debt_equals_entries",
    "balance_equals_grants",
    "held_equals_open_holds",
    "debt_not_negative",
    "held_not_negative",
    "grant_remaining_not_negative",
    "grant_frozen_not_negative",
    "grant_remaining_equals_allocations",
    "grant_frozen_equals_entries",
    "grant_clawback_within_units",
    "entry_allocations",
    "balance_after_chain",
    "idempotency_key_unique",
    "usage_daily_equals_usage",
}


@dataclass
class World:
    """Two accounts: A with three grants, two consumes across grants, a priced usage and an open hold; B with one."""

    a: str
    b: str
    ga: int  # A's large grant, priority 0
    ga2: int  # A's grant of 20, priority 1 (drawn first by the first consume)
    ga3: int  # A's grant of 5, priority 2 (drawn first by the second consume)
    gb: int  # B's grant
    e1: int  # consume 30: ga2 20 + ga 10 (allocation rows)
    e2: int  # consume 10: ga3 5 + ga 5 (allocation rows)
    hold: str


@pytest.fixture
def world(engine: Engine) -> World:
    a, b = make_account(), make_account()
    ga = make_grant(customer_id=a, units=100).grant_id
    ga2 = make_grant(customer_id=a, units=20, priority=1).grant_id
    e1 = make_consume(customer_id=a, units=30)
    ga3 = make_grant(customer_id=a, units=5, priority=2).grant_id
    e2 = make_consume(customer_id=a, units=10)
    assert dict(e1.funded_by) == {ga2: 20, ga: 10} and dict(e2.funded_by) == {ga3: 5, ga: 5}
    make_consume(customer_id=a, units=3, usage=make_usage(input_tokens=100, output_tokens=10))
    hold = make_hold(customer_id=a, units=10).request_id
    gb = make_grant(customer_id=b, units=100).grant_id
    assert e1.entry_id is not None and e2.entry_id is not None
    return World(a, b, ga, ga2, ga3, gb, e1.entry_id, e2.entry_id, hold)


@contextmanager
def tampering(engine: Engine) -> Iterator[Session]:
    """A session whose changes are rolled back, with CHECK constraints off for its transaction."""
    with Session(engine) as session:
        if engine.dialect.name == "sqlite":
            session.execute(text("PRAGMA ignore_check_constraints = ON"))
        else:
            checks = session.execute(
                text(
                    "SELECT conrelid::regclass::text, conname FROM pg_constraint WHERE contype = 'c'"
                    " AND conrelid IN ('accounts'::regclass, 'grants'::regclass, 'holds'::regclass)"
                )
            ).all()
            for table, name in checks:
                session.execute(text(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"'))
        try:
            yield session
        finally:
            session.rollback()
            if engine.dialect.name == "sqlite":
                session.execute(text("PRAGMA ignore_check_constraints = OFF"))


def sql(session: Session, statement: str, **params: Any) -> Any:
    return session.execute(text(statement), params)


def account_id(session: Session, customer: str) -> int:
    return int(sql(session, "SELECT id FROM accounts WHERE customer_id = :c", c=customer).scalar_one())


def add_entry(session: Session, customer: str, *, units: int = 0, debt: int = 0, frozen: int = 0,
              grant: int | None = None, key: str) -> int:  # fmt: skip
    """Append an entry to the customer's chain (its balance_after the running sum, so the chain stays whole)."""
    acct = account_id(session, customer)
    last = sql(session, "SELECT coalesce(sum(units), 0) FROM entries WHERE account_id = :a", a=acct).scalar_one()
    sql(
        session,
        "INSERT INTO entries (account_id, kind, units, balance_after, debt_delta, frozen_delta, idempotency_key,"
        " grant_id, actor, reason, created_at) VALUES (:a, 'adjustment', :u, :after, :d, :f, :k, :g, 'test', 'tamper',"
        " CURRENT_TIMESTAMP)",
        a=acct, u=units, after=last + units, d=debt, f=frozen, k=key, g=grant,
    )  # fmt: skip
    return int(sql(session, "SELECT max(id) FROM entries WHERE idempotency_key = :k", k=key).scalar_one())


def move_account(session: Session, customer: str, *, balance: int = 0, debt: int = 0, held: int = 0) -> None:
    sql(
        session,
        "UPDATE accounts SET balance = balance + :b, debt = debt + :d, held = held + :h WHERE customer_id = :c",
        b=balance, d=debt, h=held, c=customer,
    )  # fmt: skip


def move_grant(session: Session, grant: int, *, remaining: int = 0, frozen: int = 0, clawed: int = 0) -> None:
    sql(
        session,
        "UPDATE grants SET remaining = remaining + :r, frozen = frozen + :f, clawed_back = clawed_back + :c"
        " WHERE id = :g",
        r=remaining, f=frozen, c=clawed, g=grant,
    )  # fmt: skip


def _balance_equals_entries(s: Session, w: World) -> None:
    # A's new entry of +5 moves 5 units into B's grant: A's entries no longer sum to its balance, and B's
    # balance (raised with its grant) no longer equals B's entries; every other identity holds.
    add_entry(s, w.a, units=5, grant=w.gb, key="t-bal")
    move_grant(s, w.gb, remaining=5)
    move_account(s, w.b, balance=5)


def _debt_equals_entries(s: Session, w: World) -> None:
    # A records 5 of debt moved into B's grant; B carries the debt instead of A.
    add_entry(s, w.a, debt=5, grant=w.gb, key="t-debt")
    move_grant(s, w.gb, remaining=5)
    move_account(s, w.b, debt=5)


def _balance_equals_grants(s: Session, w: World) -> None:
    # One entry of 0 units moves 5 from A's grant to B's: allocations and entries agree, the accounts' grants not.
    entry = add_entry(s, w.a, key="t-grants")
    sql(s, "INSERT INTO allocations (entry_id, grant_id, units) VALUES (:e, :g, -5)", e=entry, g=w.ga)
    sql(s, "INSERT INTO allocations (entry_id, grant_id, units) VALUES (:e, :g, 5)", e=entry, g=w.gb)
    move_grant(s, w.ga, remaining=-5)
    move_grant(s, w.gb, remaining=5)


def _held_equals_open_holds(s: Session, w: World) -> None:
    move_account(s, w.a, held=-7)


def _debt_not_negative(s: Session, w: World) -> None:
    # An entry that cancels 5 of debt A never had, with the 5 units it "paid" back: debt -5, all else agreeing.
    add_entry(s, w.a, units=5, debt=-5, key="t-negdebt")
    move_account(s, w.a, balance=5, debt=-5)


def _held_not_negative(s: Session, w: World) -> None:
    # The open hold says it captured more than it holds, and the account's held agrees with it.
    sql(s, "UPDATE holds SET captured_units = units + 3 WHERE request_id = :r", r=w.hold)
    move_account(s, w.a, held=-13)


def _grant_remaining_not_negative(s: Session, w: World) -> None:
    # A draws 75 more than its large grant holds, through an entry that names the grant.
    left = sql(s, "SELECT remaining FROM grants WHERE id = :g", g=w.ga).scalar_one()
    add_entry(s, w.a, units=-(left + 5), grant=w.ga, key="t-negrem")
    move_grant(s, w.ga, remaining=-(left + 5))
    move_account(s, w.a, balance=-(left + 5))


def _grant_frozen_not_negative(s: Session, w: World) -> None:
    add_entry(s, w.a, frozen=-5, grant=w.ga, key="t-negfrozen")
    move_grant(s, w.ga, frozen=-5)


def _grant_remaining_equals_allocations(s: Session, w: World) -> None:
    # 5 units moved between two of A's grants with no entry saying so: the account's sums still agree.
    move_grant(s, w.ga, remaining=-5)
    move_grant(s, w.ga2, remaining=5)


def _grant_frozen_equals_entries(s: Session, w: World) -> None:
    move_grant(s, w.ga, frozen=5)


def _grant_clawback_within_units(s: Session, w: World) -> None:
    move_grant(s, w.ga3, clawed=6)


def _entry_allocations(s: Session, w: World) -> None:
    # One allocation row of the first consume moved to the second: each grant's sum unchanged, both entries off.
    row = sql(s, "SELECT id FROM allocations WHERE entry_id = :e AND grant_id = :g", e=w.e1, g=w.ga).scalar_one()
    sql(s, "UPDATE allocations SET entry_id = :e WHERE id = :id", e=w.e2, id=row)


def _balance_after_chain(s: Session, w: World) -> None:
    sql(s, "UPDATE entries SET balance_after = balance_after + 1 WHERE id = :e", e=w.e1)


def _idempotency_key_unique(s: Session, w: World) -> None:
    # A second entry under the first consume's key, moving nothing.
    key = sql(s, "SELECT idempotency_key FROM entries WHERE id = :e", e=w.e1).scalar_one()
    if s.get_bind().dialect.name == "postgresql":
        names = sql(
            s,
            "SELECT conname FROM pg_constraint WHERE conrelid = 'entries'::regclass AND contype = 'u'",
        ).scalars()
        for name in list(names):
            sql(s, f'ALTER TABLE entries DROP CONSTRAINT "{name}"')
        indexes = sql(
            s,
            "SELECT indexname FROM pg_indexes WHERE tablename = 'entries' AND indexdef LIKE '%UNIQUE%'"
            " AND indexdef LIKE '%idempotency_key%'",
        ).scalars()
        for name in list(indexes):
            sql(s, f'DROP INDEX "{name}"')
    add_entry(s, w.a, key=key)


def _usage_daily_equals_usage(s: Session, w: World) -> None:
    sql(s, "UPDATE usage_daily SET input_tokens = input_tokens + 1")


TAMPERS: dict[str, Callable[[Session, World], None]] = {
    "balance_equals_entries": _balance_equals_entries,
    "debt_equals_entries": _debt_equals_entries,
    "balance_equals_grants": _balance_equals_grants,
    "held_equals_open_holds": _held_equals_open_holds,
    "debt_not_negative": _debt_not_negative,
    "held_not_negative": _held_not_negative,
    "grant_remaining_not_negative": _grant_remaining_not_negative,
    "grant_frozen_not_negative": _grant_frozen_not_negative,
    "grant_remaining_equals_allocations": _grant_remaining_equals_allocations,
    "grant_frozen_equals_entries": _grant_frozen_equals_entries,
    "grant_clawback_within_units": _grant_clawback_within_units,
    "entry_allocations": _entry_allocations,
    "balance_after_chain": _balance_after_chain,
    "idempotency_key_unique": _idempotency_key_unique,
    "usage_daily_equals_usage": _usage_daily_equals_usage,
}


class TestEveryInvariantAlone:
    def test_every_claimed_invariant_has_a_tamper(self) -> None:
        import inspect

        import ledger.check

        source = inspect.getsource(ledger.check)
        named = {name for name in CLAIMED if f'"{name}"' in source}
        assert named == CLAIMED, CLAIMED - named  # the list above is what the checker says it checks
        assert set(TAMPERS) == CLAIMED

    @pytest.mark.parametrize("invariant", sorted(CLAIMED))
    def test_tamper_is_found_alone(self, engine: Engine, world: World, invariant: str) -> None:
        with tampering(engine) as session:
            assert check_ledger(session) == []
            if invariant == "idempotency_key_unique" and engine.dialect.name == "sqlite":
                # SQLite cannot drop the unique index inside a transaction: the database itself refuses it.
                with pytest.raises(IntegrityError):
                    TAMPERS[invariant](session, world)
                return
            TAMPERS[invariant](session, world)
            found = {v.invariant for v in check_ledger(session)}
        assert found == {invariant}
