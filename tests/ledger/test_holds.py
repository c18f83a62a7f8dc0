"""Holds: place, capture (less, exact, more than held), release, expiry sweep; all idempotent."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from factories import account_state, grant_remaining, make_account, make_grant, make_hold, make_usage, unique
from sqlalchemy import Engine

from ledger.accounts import set_access_state
from ledger.check import check_ledger
from ledger.db import unit_of_work
from ledger.errors import AccessRefused, HoldNotOpen, IdempotencyConflict, InsufficientCredits, UnknownHold
from ledger.holds import capture_hold, place_hold, release_expired_holds, release_hold
from ledger.models import AccessState, HoldStatus


def assert_consistent(customer_id: str) -> None:
    with unit_of_work() as session:
        assert check_ledger(session, customer_id) == []


class TestPlaceHold:
    def test_reserves_units_from_the_balance(self, engine: Engine) -> None:
        customer = make_account()
        grant = make_grant(customer_id=customer, units=100)

        hold = make_hold(customer_id=customer, units=30)

        assert (hold.units, hold.status, hold.balance_after, hold.replayed) == (30, HoldStatus.OPEN, 70, False)
        assert account_state(customer)[:3] == (70, 30, 0)
        assert grant_remaining(grant.grant_id) == (70, 0)
        assert_consistent(customer)

    def test_same_request_id_returns_the_original_hold(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)
        first = make_hold(customer_id=customer, units=30, request_id="hold-same")
        before = account_state(customer)

        again = make_hold(customer_id=customer, units=30, request_id="hold-same")

        assert again.replayed and again.balance_after == first.balance_after
        assert account_state(customer) == before

    def test_same_request_id_with_other_units_conflicts(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)
        make_hold(customer_id=customer, units=30, request_id="hold-conflict")

        with pytest.raises(IdempotencyConflict):
            make_hold(customer_id=customer, units=31, request_id="hold-conflict")

    def test_more_than_the_balance_is_refused(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=10)

        with pytest.raises(InsufficientCredits) as err:
            make_hold(customer_id=customer, units=11)

        assert err.value.available == 10 and account_state(customer)[:2] == (10, 0)

    def test_suspended_account_is_refused(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=10)
        with unit_of_work() as session:
            set_access_state(session, customer, AccessState.SUSPENDED, as_of=datetime.now(UTC), source="t")

        with pytest.raises(AccessRefused):
            make_hold(customer_id=customer, units=1)

    def test_priced_from_usage_estimate(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)

        with unit_of_work() as session:
            hold = place_hold(session, customer, request_id=unique("hold"), usage=make_usage(operation="image"))

        assert hold.units == 20


class TestCaptureHold:
    def test_fewer_units_than_held_releases_the_rest(self, engine: Engine) -> None:
        customer = make_account()
        grant = make_grant(customer_id=customer, units=100)
        hold = make_hold(customer_id=customer, units=30)

        with unit_of_work() as session:
            result = capture_hold(session, hold.request_id, units=12)

        assert (result.held, result.captured, result.released, result.shortfall) == (30, 12, 18, 0)
        assert result.balance_after == 88 and not result.replayed
        assert account_state(customer)[:3] == (88, 0, 0)
        assert grant_remaining(grant.grant_id) == (88, 0)
        assert_consistent(customer)

    def test_without_units_captures_what_was_held(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)
        hold = make_hold(customer_id=customer, units=30)

        with unit_of_work() as session:
            result = capture_hold(session, hold.request_id)

        assert (result.captured, result.released, result.balance_after) == (30, 0, 70)

    def test_more_than_held_captures_what_the_balance_allows_and_reports_shortfall(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=40)
        hold = make_hold(customer_id=customer, units=30)

        with unit_of_work() as session:
            result = capture_hold(session, hold.request_id, units=55)

        assert (result.held, result.captured, result.released, result.shortfall) == (30, 40, 0, 15)
        assert result.balance_after == 0
        assert account_state(customer)[:3] == (0, 0, 0)
        assert_consistent(customer)

    def test_capture_with_usage_records_it(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)
        hold = make_hold(customer_id=customer, units=10)

        with unit_of_work() as session:
            result = capture_hold(session, hold.request_id, usage=make_usage(model=None, operation="image"))

        assert (result.captured, result.shortfall, result.balance_after) == (20, 0, 80)
        assert_consistent(customer)

    def test_repeated_capture_returns_the_original(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)
        hold = make_hold(customer_id=customer, units=30)
        with unit_of_work() as session:
            first = capture_hold(session, hold.request_id, units=12)
        before = account_state(customer)

        with unit_of_work() as session:
            again = capture_hold(session, hold.request_id, units=12)

        assert again.replayed and (again.captured, again.released, again.balance_after) == (12, 18, first.balance_after)
        assert account_state(customer) == before

    def test_repeated_capture_with_other_units_conflicts(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)
        hold = make_hold(customer_id=customer, units=30)
        with unit_of_work() as session:
            capture_hold(session, hold.request_id, units=12)

        with pytest.raises(IdempotencyConflict), unit_of_work() as session:
            capture_hold(session, hold.request_id, units=13)

    def test_unknown_hold_is_refused(self, engine: Engine) -> None:
        with pytest.raises(UnknownHold), unit_of_work() as session:
            capture_hold(session, "no-such-hold", units=1)

    def test_released_hold_cannot_be_captured(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)
        hold = make_hold(customer_id=customer, units=30)
        with unit_of_work() as session:
            release_hold(session, hold.request_id)

        with pytest.raises(HoldNotOpen), unit_of_work() as session:
            capture_hold(session, hold.request_id, units=1)


class TestReleaseHold:
    def test_gives_the_units_back_to_their_grants(self, engine: Engine) -> None:
        customer = make_account()
        first = make_grant(customer_id=customer, units=20, priority=1)
        second = make_grant(customer_id=customer, units=20)
        hold = make_hold(customer_id=customer, units=30)
        assert grant_remaining(first.grant_id) == (0, 0) and grant_remaining(second.grant_id) == (10, 0)

        with unit_of_work() as session:
            result = release_hold(session, hold.request_id)

        assert (result.status, result.balance_after, result.replayed) == (HoldStatus.RELEASED, 40, False)
        assert grant_remaining(first.grant_id) == (20, 0) and grant_remaining(second.grant_id) == (20, 0)
        assert account_state(customer)[:3] == (40, 0, 0)
        assert_consistent(customer)

    def test_second_release_changes_nothing(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=20)
        hold = make_hold(customer_id=customer, units=10)
        with unit_of_work() as session:
            release_hold(session, hold.request_id)
        before = account_state(customer)

        with unit_of_work() as session:
            again = release_hold(session, hold.request_id)

        assert again.replayed and again.status == HoldStatus.RELEASED
        assert account_state(customer) == before

    def test_captured_hold_cannot_be_released(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=20)
        hold = make_hold(customer_id=customer, units=10)
        with unit_of_work() as session:
            capture_hold(session, hold.request_id, units=10)

        with pytest.raises(HoldNotOpen), unit_of_work() as session:
            release_hold(session, hold.request_id)

    def test_release_of_an_overdraft_hold_cancels_its_debt(self, engine: Engine) -> None:
        customer = make_account(overdraft_limit=50)
        make_grant(customer_id=customer, units=10)
        hold = make_hold(customer_id=customer, units=30)
        assert account_state(customer)[:3] == (-20, 30, 20)

        with unit_of_work() as session:
            release_hold(session, hold.request_id)

        assert account_state(customer)[:3] == (10, 0, 0)
        assert_consistent(customer)


class TestReleaseExpiredHolds:
    def test_releases_only_holds_past_their_ttl(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)
        short = make_hold(customer_id=customer, units=10, ttl_seconds=60)
        long = make_hold(customer_id=customer, units=20, ttl_seconds=3600)

        with unit_of_work() as session:
            released = release_expired_holds(session, now=datetime.now(UTC) + timedelta(minutes=5))
        with unit_of_work() as session:
            again = release_expired_holds(session, now=datetime.now(UTC) + timedelta(minutes=5))

        assert (released, again) == (1, 0)
        assert account_state(customer)[:2] == (80, 20)
        with unit_of_work() as session:
            assert release_hold(session, short.request_id).status == HoldStatus.EXPIRED
            assert capture_hold(session, long.request_id).captured == 20
        assert_consistent(customer)


class TestNotes:
    """Why a hold was released (kept on the hold) and a capture's note (in its entry), on both backends."""

    def test_a_release_note_is_kept_on_the_hold_and_in_the_entry(self, engine: Engine) -> None:
        from sqlalchemy import select

        from ledger.holds import ReleaseNote, release_hold_standalone
        from ledger.models import Entry, Hold

        customer = make_account()
        make_grant(customer_id=customer, units=100)
        make_hold(customer_id=customer, units=30, request_id="hold-noted")
        note = ReleaseNote("provider_timeout", "openai", "gpt-4o-2024-08-06", "call_1")

        released = release_hold_standalone("hold-noted", note=note)
        again = release_hold_standalone("hold-noted", note=ReleaseNote("provider_error"))

        assert (released.status, released.replayed, again.replayed) == (HoldStatus.RELEASED, False, True)
        with unit_of_work() as session:
            hold = session.execute(select(Hold).where(Hold.request_id == "hold-noted")).scalar_one()
            assert (hold.release_reason, hold.provider, hold.model, hold.provider_request_id) == (
                "provider_timeout",  # the first release's note stays
                "openai",
                "gpt-4o-2024-08-06",
                "call_1",
            )
            reason = session.execute(select(Entry.reason).where(Entry.kind == "release")).scalar_one()
        assert (
            reason
            == "hold released: provider_timeout (provider openai, model gpt-4o-2024-08-06, provider request call_1)"
        )
        assert account_state(customer)[:2] == (100, 0)
        assert_consistent(customer)

    def test_a_capture_note_is_in_the_entry_and_part_of_the_request(self, engine: Engine) -> None:
        from sqlalchemy import select

        from ledger.holds import capture_hold_standalone
        from ledger.models import Entry

        customer = make_account()
        make_grant(customer_id=customer, units=100)
        make_hold(customer_id=customer, units=30, request_id="hold-estimated")

        captured = capture_hold_standalone("hold-estimated", units=12, note="estimated: stream abandoned")
        replay = capture_hold_standalone("hold-estimated", units=12, note="estimated: stream abandoned")

        assert (captured.captured, captured.released, replay.replayed) == (12, 18, True)
        with pytest.raises(IdempotencyConflict):
            capture_hold_standalone("hold-estimated", units=12)
        with unit_of_work() as session:
            reason = session.execute(select(Entry.reason).where(Entry.kind == "capture")).scalar_one()
        assert reason == "captured 12 of 30 held; estimated: stream abandoned"
        assert account_state(customer)[:2] == (88, 0)
        assert_consistent(customer)
