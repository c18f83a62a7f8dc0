"""balance.low / balance.depleted from consumption: once per crossing, in the consumption's own transaction, on
every consumption path (in a unit of work, standalone, a batch; with and without limits configured), on SQLite,
on PostgreSQL through the ledger functions and through the portable path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from ledger import limits, portable
from ledger.consume import ConsumeInput, consume, consume_batch, consume_standalone
from ledger.db import unit_of_work
from ledger.errors import InsufficientCredits, LedgerError, LimitExceeded
from ledger.models import OutboxEvent
from ledger.outbox import set_low_balance_threshold
from ledger.posting import utcnow
from ledger.pricing import UsageInput
from tests.ledger.factories import make_grant, unique

# One limit that never refuses in these scenarios, so the limited paths run (ledger_consume with its limit rows).
GENEROUS_LIMIT = '[[limits]]\nname = "requests-daily"\nwindow = "day"\nmax_requests = 1000\n'
THRESHOLD = 100


def crossings(customer_id: str) -> list[tuple[str, dict[str, Any]]]:
    with unit_of_work() as session:
        rows = session.scalars(
            select(OutboxEvent)
            .where(OutboxEvent.customer_id == customer_id, OutboxEvent.type.startswith("balance."))
            .order_by(OutboxEvent.id)
        )
        return [(row.type, row.data) for row in rows]


def spend(mode: str, customer_id: str, amounts: list[int]) -> list[object]:
    """Consume ``amounts`` in order by one path; each outcome (a result or the ledger's error)."""
    items = [ConsumeInput(customer_id, unique("req"), units, UsageInput(operation="text")) for units in amounts]
    if mode == "batch":
        return list(consume_batch(items))
    outcomes: list[object] = []
    for item in items:
        try:
            if mode == "standalone":
                outcomes.append(
                    consume_standalone(customer_id, request_id=item.request_id, units=item.units, usage=item.usage)
                )
            else:
                with unit_of_work() as session:
                    outcomes.append(
                        consume(session, customer_id, request_id=item.request_id, units=item.units, usage=item.usage)
                    )
        except LedgerError as exc:
            outcomes.append(exc)
    return outcomes


@pytest.fixture(params=[False, True], ids=["no-limits", "limits"])
def limited(request: pytest.FixtureRequest, billing_config_file: Callable[[str], Path]) -> bool:
    billing_config_file(GENEROUS_LIMIT if request.param else "")
    return bool(request.param)


def customer_with_threshold(units: int) -> str:
    customer = unique("cus")
    make_grant(customer_id=customer, units=units)
    with unit_of_work() as session:
        set_low_balance_threshold(session, customer, THRESHOLD)
    return customer


@pytest.mark.parametrize("mode", ["session", "standalone", "batch"])
class TestCrossingOnConsume:
    def test_once_per_crossing_hand_worked(self, limited: bool, ledger_engine: Engine, mode: str) -> None:
        customer = customer_with_threshold(300)
        # 300 -> 150 -> 90 (below 100: low) -> 40 (still below: nothing) -> 0 (depleted)
        spend(mode, customer, [150, 60, 50, 40])
        assert [t for t, _ in crossings(customer)] == ["balance.low", "balance.depleted"]
        assert crossings(customer)[0][1] == {"balance_before": 150, "balance": 90, "cause": "usage", "threshold": 100}
        assert crossings(customer)[1][1] == {"balance_before": 40, "balance": 0, "cause": "usage"}
        # Back above by a grant (0 -> 200), then 200 -> 50 crosses again: one more low, no depletion.
        make_grant(customer_id=customer, units=200)
        spend(mode, customer, [150])
        assert [t for t, _ in crossings(customer)] == ["balance.low", "balance.depleted", "balance.low"]

    def test_one_consumption_across_both_lines(self, limited: bool, ledger_engine: Engine, mode: str) -> None:
        customer = customer_with_threshold(250)
        spend(mode, customer, [250])
        assert [t for t, _ in crossings(customer)] == ["balance.low", "balance.depleted"]

    def test_nothing_for_a_refused_consumption(self, limited: bool, ledger_engine: Engine, mode: str) -> None:
        customer = customer_with_threshold(120)
        (outcome,) = spend(mode, customer, [121])  # more than the balance: refused, nothing written
        assert isinstance(outcome, InsufficientCredits)
        assert crossings(customer) == []


class TestNothingWhenRolledBackOrLimited:
    def test_rolled_back_consumption_emits_nothing(self, limited: bool, ledger_engine: Engine) -> None:
        customer = customer_with_threshold(120)
        with pytest.raises(RuntimeError), unit_of_work() as session:
            consume(session, customer, request_id=unique("req"), units=60)
            raise RuntimeError("the caller's unit of work failed after the consumption")
        assert crossings(customer) == []
        spend("session", customer, [60])
        assert [t for t, _ in crossings(customer)] == ["balance.low"]

    def test_consumption_refused_by_a_limit_emits_nothing(
        self, billing_config_file: Callable[[str], Path], ledger_engine: Engine
    ) -> None:
        billing_config_file('[[limits]]\nname = "one-a-day"\nwindow = "day"\nmax_requests = 1\n')
        customer = customer_with_threshold(300)
        spend("session", customer, [10])  # the day's one request: 300 -> 290
        for mode in ("session", "standalone", "batch"):
            (outcome,) = spend(mode, customer, [250])  # would cross both lines; the limit refuses it
            assert isinstance(outcome, LimitExceeded), mode
        assert crossings(customer) == []


@pytest.mark.postgres
class TestLimitedConsumptionIsOneStatement:
    def test_limits_taken_by_ledger_consume_itself(
        self, billing_config_file: Callable[[str], Path], pg_engine: Engine, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """On PostgreSQL a limited consumption is one ``ledger_consume`` call that also takes the limits' room
        (no session with savepoints, no separate ``limits_reserve`` round trip)."""

        billing_config_file(GENEROUS_LIMIT)
        customer = customer_with_threshold(300)

        def refuse(*args: object, **kwargs: object) -> None:
            raise AssertionError("the limited consumption left the one-statement path")

        monkeypatch.setattr(limits, "take_room", refuse)
        monkeypatch.setattr(portable, "consume", refuse)
        for mode in ("session", "standalone", "batch"):
            spend(mode, customer, [10, 10])
        with unit_of_work() as session:
            (status,) = limits.limit_usage(session, customer, now=utcnow())
        assert status.used == 6


class TestCrossingOnHolds:
    def test_hold_release_hold_capture_hand_worked(self, ledger_engine: Engine) -> None:
        from ledger.holds import capture_hold_standalone, place_hold_standalone, release_hold_standalone

        customer = customer_with_threshold(300)
        place_hold_standalone(customer, request_id=unique("h"), units=150)  # 300 -> 150: above 100, nothing
        second = unique("h")
        place_hold_standalone(customer, request_id=second, units=60)  # 150 -> 90: low
        release_hold_standalone(second)  # 90 -> 150: back above
        third = unique("h")
        place_hold_standalone(customer, request_id=third, units=100)  # 150 -> 50: low again
        # The call used 160 of 100 held: 50 more are drawn (all there is), 10 short: 50 -> 0, depleted.
        captured = capture_hold_standalone(third, units=160)
        assert (captured.captured, captured.shortfall) == (150, 10)
        assert [(t, d["balance_before"], d["balance"], d["cause"]) for t, d in crossings(customer)] == [
            ("balance.low", 150, 90, "hold"),
            ("balance.low", 150, 50, "hold"),
            ("balance.depleted", 50, 0, "capture"),
        ]

    def test_refused_hold_emits_nothing(self, ledger_engine: Engine) -> None:
        from ledger.holds import place_hold_standalone

        customer = customer_with_threshold(120)
        with pytest.raises(InsufficientCredits):
            place_hold_standalone(customer, request_id=unique("h"), units=121)
        assert crossings(customer) == []
