"""A request id another customer's call already recorded is a 409 conflict on every path, never a database error.

A consumption's id is taken by another customer's consumption (an entry's key) or by another customer's captured
hold (its usage record's request id). The single call inside a unit of work, the standalone call and the batch
each answer IdempotencyConflict, and nothing of the refused call is written.
"""

from __future__ import annotations

import pytest
from factories import unique
from sqlalchemy import Engine, select

from ledger.accounts import open_account
from ledger.consume import ConsumeInput, consume, consume_batch, consume_standalone
from ledger.db import unit_of_work
from ledger.errors import IdempotencyConflict
from ledger.grants import grant_credits
from ledger.holds import capture_hold_standalone, place_hold_standalone
from ledger.models import Account, GrantSource
from ledger.pricing import UsageInput

USAGE = UsageInput(feature="chat", model="gpt-4o")


def _customers(prefix: str) -> tuple[str, str]:
    first, second = f"{prefix}-a", f"{prefix}-b"
    with unit_of_work() as session:
        for customer in (first, second):
            open_account(session, customer)
            grant_credits(session, customer, units=100, source=GrantSource.TOP_UP, idempotency_key=f"{customer}-g")
    return first, second


def _balance(customer: str) -> int:
    with unit_of_work() as session:
        return session.execute(select(Account.balance).where(Account.customer_id == customer)).scalar_one()


def _taken_by_a_capture(prefix: str) -> tuple[str, str]:
    first, second = _customers(prefix)
    place_hold_standalone(first, request_id=f"{prefix}-x", units=5, ttl_seconds=60, usage=USAGE)
    capture_hold_standalone(f"{prefix}-x", units=3, usage=USAGE)
    return second, f"{prefix}-x"


def _in_a_unit_of_work(customer: str, request_id: str) -> None:
    with unit_of_work() as session:
        consume(session, customer, request_id=request_id, units=2, usage=USAGE)


def _standalone(customer: str, request_id: str) -> None:
    consume_standalone(customer, request_id=request_id, units=2, usage=USAGE)


def _in_a_batch(customer: str, request_id: str) -> None:
    (outcome,) = consume_batch([ConsumeInput(customer, request_id, 2, USAGE)])
    if isinstance(outcome, Exception):
        raise outcome


@pytest.mark.parametrize("call", [_in_a_unit_of_work, _standalone, _in_a_batch])
def test_an_id_taken_by_another_customers_capture_is_a_conflict(ledger_engine: Engine, call: object) -> None:
    customer, request_id = _taken_by_a_capture(unique("cap"))
    with pytest.raises(IdempotencyConflict):
        call(customer, request_id)  # type: ignore[operator]
    assert _balance(customer) == 100  # nothing of the refused call was written


@pytest.mark.parametrize("call", [_in_a_unit_of_work, _standalone, _in_a_batch])
def test_an_id_taken_by_another_customers_consumption_is_a_conflict(ledger_engine: Engine, call: object) -> None:
    first, second = _customers(unique("con"))
    consume_standalone(first, request_id=f"{first}-shared", units=1)
    with pytest.raises(IdempotencyConflict):
        call(second, f"{first}-shared")  # type: ignore[operator]
    assert _balance(second) == 100
