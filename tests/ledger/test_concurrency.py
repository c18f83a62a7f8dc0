"""Concurrent consumers on PostgreSQL never overdraw an account and never charge a request twice."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from factories import make_grant
from sqlalchemy import Engine, func, select

from ledger import pgfast
from ledger.check import check_ledger
from ledger.consume import ConsumeResult, consume, consume_standalone
from ledger.db import unit_of_work
from ledger.errors import HoldNotOpen, InsufficientCredits
from ledger.holds import capture_hold, place_hold, release_hold
from ledger.models import Account, Entry, EntryKind

THREADS = 32
BALANCE = 1_000
DISTINCT_REQUESTS = 1_400  # 400 more than the balance can pay for
REPEATS = 700  # a third of all calls repeat an earlier request id


@dataclass(frozen=True)
class Outcome:
    request_id: str
    result: ConsumeResult | None  # None: refused for insufficient credits


@pytest.mark.postgres
@pytest.mark.slow
class TestConcurrentConsume:
    # function / python: consume() in a unit of work, through ledger_consume or the portable path;
    # standalone: consume_standalone(), ledger_consume in autocommit on a pooled connection.
    @pytest.mark.parametrize("path", ["function", "python", "standalone"])
    def test_many_threads_consume_exactly_the_balance(self, pg_engine: Engine, path: str) -> None:
        customer = "cus_hot"
        make_grant(customer_id=customer, units=BALANCE)
        calls = [f"req-{i}" for i in range(DISTINCT_REQUESTS)]
        rng = random.Random(7)
        for original in rng.sample(range(DISTINCT_REQUESTS), REPEATS):
            # Repeat an earlier request id somewhere after it was first sent.
            calls.insert(rng.randint(original + 1, len(calls)), f"req-{original}")
        assert len(calls) == DISTINCT_REQUESTS + REPEATS >= 2_000

        def call(request_id: str) -> Outcome:
            pgfast.use_function(path != "python")
            try:
                if path == "standalone":
                    return Outcome(request_id, consume_standalone(customer, request_id=request_id, units=1))
                with unit_of_work() as session:
                    return Outcome(request_id, consume(session, customer, request_id=request_id, units=1))
            except InsufficientCredits:
                return Outcome(request_id, None)

        with ThreadPoolExecutor(max_workers=THREADS) as pool:
            outcomes = list(pool.map(call, calls))

        charged = [o for o in outcomes if o.result is not None and not o.result.replayed]
        assert len(charged) == BALANCE
        assert len({o.request_id for o in charged}) == BALANCE  # no request charged twice
        first_by_request = {o.request_id: o.result for o in charged}
        for outcome in outcomes:
            if outcome.result is not None and outcome.result.replayed:
                # Every repeat of a charged request returns its original result.
                original = first_by_request[outcome.request_id]
                assert original is not None
                assert (outcome.result.entry_id, outcome.result.balance_after, outcome.result.funded_by) == (
                    original.entry_id,
                    original.balance_after,
                    original.funded_by,
                )
            if outcome.result is None:
                assert outcome.request_id not in first_by_request  # a refused request was never charged
        with unit_of_work() as session:
            balance = session.execute(select(Account.balance).where(Account.customer_id == customer)).scalar_one()
            consumed = session.execute(
                select(func.count(), func.sum(Entry.units)).where(Entry.kind == EntryKind.CONSUME)
            ).one()
            lowest = session.execute(select(func.min(Entry.balance_after))).scalar_one()
            assert check_ledger(session) == []
        assert balance == 0
        assert tuple(consumed) == (BALANCE, -BALANCE)
        assert lowest == 0  # the balance never went below zero, at any entry
        assert sorted(o.result.balance_after for o in charged if o.result) == list(range(BALANCE))


class TestConcurrentHoldSettlement:
    @pytest.mark.postgres
    def test_racing_captures_and_releases_settle_a_hold_once(self, pg_engine: Engine) -> None:
        customer = "cus_race"
        make_grant(customer_id=customer, units=100)
        with unit_of_work() as session:
            place_hold(session, customer, request_id="race-hold", units=40)

        def settle(index: int) -> str:
            try:
                with unit_of_work() as session:
                    if index % 2:
                        capture_hold(session, "race-hold", units=25)
                        return "captured"
                    release_hold(session, "race-hold")
                    return "released"
            except HoldNotOpen:
                return "refused"

        with ThreadPoolExecutor(max_workers=16) as pool:
            outcomes = list(pool.map(settle, range(32)))

        with unit_of_work() as session:
            account = session.execute(select(Account).where(Account.customer_id == customer)).scalar_one()
            settled = session.execute(
                select(func.count()).where(Entry.kind.in_([EntryKind.CAPTURE, EntryKind.RELEASE]))
            ).scalar_one()
            assert check_ledger(session) == []
        assert account.held == 0
        # Either the capture won (25 charged, 15 released: two entries) or the release did (one entry);
        # every other call was refused or replayed, and nothing was settled twice.
        assert (account.balance, settled) in ((75, 2), (100, 1))
        winner = "captured" if account.balance == 75 else "released"
        # The winner's repeats replay it; every call of the other kind is refused as the hold is settled.
        assert set(outcomes) == {winner, "refused"} and outcomes.count("refused") == 16


class TestConcurrentConsumeOnSqlite:
    @pytest.mark.parametrize("standalone", [False, True], ids=["unit_of_work", "standalone"])
    def test_threads_never_overdraw_the_embedded_default(self, sqlite_engine: Engine, standalone: bool) -> None:
        customer = "cus_sqlite_hot"
        make_grant(customer_id=customer, units=100)

        def call(index: int) -> bool:
            request_id = f"sq-{index % 150}"
            try:
                if standalone:
                    consume_standalone(customer, request_id=request_id, units=1)
                    return True
                with unit_of_work() as session:
                    consume(session, customer, request_id=request_id, units=1)
                return True
            except InsufficientCredits:
                return False

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(call, range(200)))

        with unit_of_work() as session:
            balance = session.execute(select(Account.balance).where(Account.customer_id == customer)).scalar_one()
            charged = session.execute(select(func.count()).where(Entry.kind == EntryKind.CONSUME)).scalar_one()
            lowest = session.execute(select(func.min(Entry.balance_after))).scalar_one()
            assert check_ledger(session) == []
        assert (balance, charged, lowest) == (0, 100, 0)
