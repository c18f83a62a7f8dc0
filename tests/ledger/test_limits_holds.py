"""Holds take limit room: placing a hold counts against the limits, a release or expiry gives the room back in the
window it was taken in, a capture settles it at what was captured; on SQLite, on PostgreSQL through the ledger
functions and through the portable path, and under 64 concurrent clients on PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from factories import account_state, make_account, make_grant, make_usage, race_at_limit, unique
from sqlalchemy import Engine, func, select, update

from ledger import pgfast
from ledger.check import check_ledger
from ledger.db import unit_of_work
from ledger.errors import InsufficientCredits, LimitExceeded
from ledger.holds import (
    ReleaseNote,
    capture_hold,
    capture_hold_standalone,
    place_hold,
    place_hold_standalone,
    release_expired_holds,
    release_hold,
    release_hold_standalone,
)
from ledger.models import Hold, HoldStatus, LimitCounter, OutboxEvent
from ledger.posting import utcnow
from ledger.pricing import UsageInput

IMAGES = 3
CONFIG = f"""
[[limits]]
name = "images-per-user-daily"
scope = "user"
operation = "image"
window = "day"
max_requests = {IMAGES}

[[limits]]
name = "units-daily"
window = "day"
max_units = 1000

[[limits]]
name = "tokens-daily"
window = "day"
max_tokens = 5000
"""


@pytest.fixture
def limited(billing_config_file: Callable[[str], Path]) -> None:
    billing_config_file(CONFIG)


def image(user_id: str | None = "u1", *, input_tokens: int = 0) -> UsageInput:
    return make_usage(operation="image", user_id=user_id, model=None, provider=None, input_tokens=input_tokens)


def counters(customer_id: str) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(limit, scope value) -> (requests, units, tokens), summed over every window, read fresh."""
    with unit_of_work() as session:
        rows = session.execute(
            select(
                LimitCounter.limit_name,
                LimitCounter.scope_value,
                func.sum(LimitCounter.requests),
                func.sum(LimitCounter.units),
                func.sum(LimitCounter.tokens),
            )
            .where(LimitCounter.scope_value.startswith(customer_id))
            .group_by(LimitCounter.limit_name, LimitCounter.scope_value)
        ).all()
    return {(r[0], r[1].removeprefix(customer_id)): (int(r[2]), int(r[3]), int(r[4])) for r in rows}


def hold(customer_id: str, units: int, usage: UsageInput, *, request_id: str | None = None, ttl: int = 600) -> str:
    request_id = request_id or unique("hold")
    with unit_of_work() as session:
        place_hold(session, customer_id, request_id=request_id, units=units, usage=usage, ttl_seconds=ttl)
    return request_id


def funded(units: int = 10_000) -> str:
    customer = make_account()
    make_grant(customer_id=customer, units=units)
    return customer


def consistent(customer_id: str) -> None:
    with unit_of_work() as session:
        assert check_ledger(session, customer_id) == []


class TestHoldTakesRoom:
    def test_holds_count_until_the_limit_then_429_with_nothing_written(
        self, limited: None, ledger_engine: Engine
    ) -> None:
        customer = funded(1000)
        for _ in range(IMAGES):
            hold(customer, 10, image())
        before = account_state(customer)
        with pytest.raises(LimitExceeded) as info:
            hold(customer, 10, image(), request_id="hold-over")
        exc = info.value
        assert (exc.code, exc.limit, exc.used, exc.maximum) == ("limit_exceeded", "images-per-user-daily", 3, 3)
        # The refused hold drew nothing and left no row; the other limits took nothing for it.
        assert account_state(customer) == before == (970, 30, 0, 4)
        with unit_of_work() as session:
            assert session.scalar(select(func.count()).select_from(Hold).where(Hold.request_id == "hold-over")) == 0
        assert counters(customer) == {
            ("images-per-user-daily", "/user:u1"): (3, 30, 0),
            ("units-daily", ""): (3, 30, 0),
            ("tokens-daily", ""): (3, 30, 0),
        }
        consistent(customer)

    def test_release_gives_one_slot_back(self, limited: None, ledger_engine: Engine) -> None:
        customer = funded()
        placed = [hold(customer, 10, image()) for _ in range(IMAGES)]
        with unit_of_work() as session:
            release_hold(session, placed[1])
            release_hold(session, placed[1])  # a repeated release gives nothing back twice
        assert counters(customer)[("images-per-user-daily", "/user:u1")] == (2, 20, 0)
        hold(customer, 10, image())
        with pytest.raises(LimitExceeded):
            hold(customer, 10, image())
        consistent(customer)

    def test_noted_and_standalone_releases_give_room_back(self, limited: None, ledger_engine: Engine) -> None:
        customer = funded()
        first, second = hold(customer, 10, image()), hold(customer, 10, image())
        release_hold_standalone(first)
        with unit_of_work() as session:
            release_hold(session, second, note=ReleaseNote("provider_timeout", provider="openai"))
        assert counters(customer)[("images-per-user-daily", "/user:u1")] == (0, 0, 0)

    def test_expiry_gives_the_room_back(self, limited: None, ledger_engine: Engine) -> None:
        customer = funded()
        placed = [hold(customer, 10, image(), ttl=1) for _ in range(IMAGES)]
        with unit_of_work() as session:
            assert release_expired_holds(session, now=utcnow() + timedelta(seconds=5)) == IMAGES
            statuses = set(session.scalars(select(Hold.status).where(Hold.request_id.in_(placed))))
        assert statuses == {HoldStatus.EXPIRED}
        assert counters(customer)[("images-per-user-daily", "/user:u1")] == (0, 0, 0)
        for _ in range(IMAGES):
            hold(customer, 10, image())
        consistent(customer)

    def test_room_goes_back_to_the_window_it_was_taken_in(self, limited: None, ledger_engine: Engine) -> None:
        customer = funded()
        request_id = hold(customer, 10, image())
        # Make it a hold taken yesterday: its stored rows and its counter say yesterday's window.
        today = utcnow().replace(hour=0, minute=0, second=0, microsecond=0)
        yesterday = today - timedelta(days=1)
        with unit_of_work() as session:
            rows = session.scalar(select(Hold.limit_rows).where(Hold.request_id == request_id))
            assert rows is not None and len(rows) == 3
            for row in rows:
                assert datetime.fromisoformat(row["window_start"]) == today
                row["window_start"] = yesterday.isoformat()
            session.execute(update(Hold).where(Hold.request_id == request_id).values(limit_rows=rows))
            session.execute(
                update(LimitCounter)
                .where(LimitCounter.scope_value.startswith(customer))
                .values(window_start=yesterday, window_end=today)
            )
        hold(customer, 10, image())  # today's window: 1 request
        release_hold_standalone(request_id)
        with unit_of_work() as session:
            by_window = {
                (r.limit_name, r.window_start.astimezone(UTC) if r.window_start.tzinfo else r.window_start.replace(
                    tzinfo=UTC)): r.requests
                for r in session.scalars(select(LimitCounter).where(LimitCounter.scope_value.startswith(customer)))
            }  # fmt: skip
        assert by_window[("images-per-user-daily", yesterday)] == 0
        assert by_window[("images-per-user-daily", today)] == 1

    def test_per_user_and_without_user_id(self, limited: None, ledger_engine: Engine) -> None:
        customer = funded()
        for _ in range(IMAGES):
            hold(customer, 1, image("u1"))
        hold(customer, 1, image("u2"))  # another user has their own room
        for _ in range(IMAGES):
            hold(customer, 1, image(None))  # no user id: counted under the customer
        with pytest.raises(LimitExceeded) as info:
            hold(customer, 1, image(None))
        assert info.value.scope_value == customer
        assert counters(customer)[("images-per-user-daily", "")] == (3, 3, 0)
        assert counters(customer)[("images-per-user-daily", "/user:u2")] == (1, 1, 0)

    def test_insufficient_credits_takes_no_room(self, limited: None, ledger_engine: Engine) -> None:
        customer = funded(5)
        with pytest.raises(InsufficientCredits):
            hold(customer, 10, image())
        assert counters(customer) == {}

    def test_replayed_hold_takes_no_more_room(self, limited: None, ledger_engine: Engine) -> None:
        customer = funded()
        hold(customer, 10, image(), request_id="hold-replayed")
        hold(customer, 10, image(), request_id="hold-replayed")
        assert counters(customer)[("units-daily", "")] == (1, 10, 0)


class TestCaptureSettles:
    def test_capture_of_fewer_units_leaves_the_counter_at_what_was_captured(
        self, limited: None, ledger_engine: Engine
    ) -> None:
        customer = funded()
        request_id = hold(customer, 300, image())
        with unit_of_work() as session:
            captured = capture_hold(session, request_id, units=120)
        assert (captured.captured, captured.released) == (120, 180)
        # Held 300 then captured 120: the units counter ends at 120, the request stays counted.
        assert counters(customer)[("units-daily", "")] == (1, 120, 0)
        assert counters(customer)[("images-per-user-daily", "/user:u1")] == (1, 120, 0)
        # 1000 - 120 = 880 units of room: a hold of 880 fits, one more unit does not.
        hold(customer, 880, make_usage(operation="text", user_id="u1"))
        with pytest.raises(LimitExceeded) as info:
            hold(customer, 1, make_usage(operation="text", user_id="u1"))
        assert (info.value.limit, info.value.used) == ("units-daily", 1000)
        consistent(customer)

    def test_capture_past_the_maximum_is_counted_not_refused(self, limited: None, ledger_engine: Engine) -> None:
        customer = funded()
        request_id = hold(customer, 900, image())
        captured = capture_hold_standalone(request_id, units=1100)  # the call was served: charged, counted
        assert captured.captured == 1100
        assert counters(customer)[("units-daily", "")] == (1, 1100, 0)
        with pytest.raises(LimitExceeded):
            hold(customer, 1, image())

    def test_capture_settles_tokens_at_the_reported_usage(self, limited: None, ledger_engine: Engine) -> None:
        customer = funded()
        request_id = hold(customer, 10, image(input_tokens=4000))
        assert counters(customer)[("tokens-daily", "")] == (1, 10, 4000)
        with unit_of_work() as session:
            capture_hold(session, request_id, units=10, usage=image(input_tokens=1500))
        assert counters(customer)[("tokens-daily", "")] == (1, 10, 1500)

    def test_capture_without_units_keeps_the_hold(self, limited: None, ledger_engine: Engine) -> None:
        customer = funded()
        request_id = hold(customer, 40, image(input_tokens=700))
        with unit_of_work() as session:
            capture_hold(session, request_id)
            capture_hold(session, request_id)  # a replay settles nothing twice
        assert counters(customer)[("tokens-daily", "")] == (1, 40, 700)

    def test_without_limits_a_hold_stores_no_rows(self, ledger_engine: Engine) -> None:
        customer = funded()
        request_id = hold(customer, 10, image())
        with unit_of_work() as session:
            assert session.scalar(select(Hold.limit_rows).where(Hold.request_id == request_id)) is None
        release_hold_standalone(request_id)
        assert counters(customer) == {}


@pytest.mark.postgres
class TestHoldRace:
    @pytest.mark.parametrize("in_function", [True, False], ids=["ledger_hold", "portable"])
    @pytest.mark.parametrize("with_user", [True, False], ids=["user", "no-user"])
    def test_64_concurrent_holds_at_a_limit_of_n(
        self, billing_config_file: Callable[[str], Path], pg_engine: Engine, with_user: bool, in_function: bool
    ) -> None:
        limit = 17
        billing_config_file(CONFIG.replace(f"max_requests = {IMAGES}", f"max_requests = {limit}"))
        customer = funded(100_000)
        placed, refused, errors = race_at_limit(
            64,
            lambda i: place_hold_standalone(
                customer, request_id=f"race-{i}", units=5, usage=image("u1" if with_user else None)
            ).request_id,
            on_thread=lambda: pgfast.use_function(in_function),
        )
        assert errors == []
        assert (len(placed), len(refused)) == (limit, 64 - limit)
        assert {exc.limit for exc in refused} == {"images-per-user-daily"}
        scope = "/user:u1" if with_user else ""
        assert counters(customer)[("images-per-user-daily", scope)] == (limit, 5 * limit, 0)
        assert account_state(customer)[:3] == (100_000 - 5 * limit, 5 * limit, 0)
        with unit_of_work() as session:
            reached = session.scalar(
                select(func.count()).select_from(OutboxEvent).where(OutboxEvent.type == "limit.reached")
            )
        assert reached == 1
        # Releasing one gives exactly one slot back.
        usage = image("u1" if with_user else None)
        pgfast.use_function(in_function)
        try:
            release_hold_standalone(placed[0])
            place_hold_standalone(customer, request_id="after-release", units=5, usage=usage)
            with pytest.raises(LimitExceeded):
                place_hold_standalone(customer, request_id="one-more", units=5, usage=usage)
        finally:
            pgfast.use_function(True)
        consistent(customer)
