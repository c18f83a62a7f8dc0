"""Consumption: order of draw, idempotency, refusals, overdraft, usage and pricing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from factories import account_state, grant_remaining, make_account, make_consume, make_grant, make_usage, unique
from psycopg.pq import TransactionStatus
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import OperationalError

from ledger import db
from ledger.accounts import set_access_state
from ledger.check import check_ledger
from ledger.clawback import freeze_grant
from ledger.config import get_billing_config
from ledger.consume import ConsumeResult, UsageInput, consume, consume_standalone, price_usage
from ledger.db import unit_of_work
from ledger.errors import (
    AccessRefused,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidRequest,
    LedgerError,
    UnknownCustomer,
)
from ledger.models import AccessState, Allocation, Entry, EntryKind, GrantSource, UsageEnvironment, UsageRecord

NOW = datetime.now(UTC)


def assert_consistent(customer_id: str) -> None:
    with unit_of_work() as session:
        assert check_ledger(session, customer_id) == []


class TestConsume:
    def test_draws_higher_priority_then_earliest_expiry_then_oldest(self, ledger_engine: Engine) -> None:
        customer = make_account()
        oldest = make_grant(customer_id=customer, units=10)
        newer = make_grant(customer_id=customer, units=10)
        late_expiry = make_grant(customer_id=customer, units=10, expires_at=NOW + timedelta(days=30))
        early_expiry = make_grant(customer_id=customer, units=10, expires_at=NOW + timedelta(days=2))
        priority = make_grant(customer_id=customer, units=10, priority=10)

        result = make_consume(customer_id=customer, units=45)

        assert result.funded_by == (
            (priority.grant_id, 10),
            (early_expiry.grant_id, 10),
            (late_expiry.grant_id, 10),
            (oldest.grant_id, 10),
            (newer.grant_id, 5),
        )
        assert result.units == 45 and result.balance_after == 5 and not result.replayed
        assert grant_remaining(newer.grant_id) == (5, 0)
        assert_consistent(customer)

    def test_one_funding_grant_is_named_by_the_entry(self, ledger_engine: Engine) -> None:
        customer = make_account()
        grant = make_grant(customer_id=customer, units=50)

        result = make_consume(customer_id=customer, units=20, request_id=unique("req"))

        with unit_of_work() as session:
            entry = session.get_one(Entry, result.entry_id)
            assert (entry.kind, entry.units, entry.balance_after) == (EntryKind.CONSUME, -20, 30)
            assert entry.grant_id == grant.grant_id
            assert session.scalars(select(Allocation).where(Allocation.entry_id == entry.id)).all() == []

    def test_several_funding_grants_get_one_allocation_each(self, ledger_engine: Engine) -> None:
        customer = make_account()
        first = make_grant(customer_id=customer, units=5)
        second = make_grant(customer_id=customer, units=50)

        result = make_consume(customer_id=customer, units=20, request_id=unique("req"))

        with unit_of_work() as session:
            entry = session.get_one(Entry, result.entry_id)
            allocations = session.execute(
                select(Allocation.grant_id, Allocation.units)
                .where(Allocation.entry_id == entry.id)
                .order_by(Allocation.id)
            ).all()
            assert entry.grant_id is None
            assert [tuple(a) for a in allocations] == [(first.grant_id, -5), (second.grant_id, -15)]
        assert_consistent(customer)

    def test_same_request_id_returns_original_and_charges_nothing(self, ledger_engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=50)
        first = make_consume(customer_id=customer, units=20, request_id="req-same")
        before = account_state(customer)

        again = make_consume(customer_id=customer, units=20, request_id="req-same")

        assert again.replayed
        assert (again.entry_id, again.units, again.balance_after, again.funded_by) == (
            first.entry_id,
            first.units,
            first.balance_after,
            first.funded_by,
        )
        assert account_state(customer) == before

    def test_same_request_id_with_other_units_conflicts(self, ledger_engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=50)
        make_consume(customer_id=customer, units=20, request_id="req-conflict")

        with pytest.raises(IdempotencyConflict):
            make_consume(customer_id=customer, units=21, request_id="req-conflict")

    def test_same_request_id_for_another_customer_conflicts(self, ledger_engine: Engine) -> None:
        first, second = make_account(), make_account()
        make_grant(customer_id=first, units=50)
        make_grant(customer_id=second, units=50)
        make_consume(customer_id=first, units=5, request_id="req-shared")

        with pytest.raises(IdempotencyConflict):
            make_consume(customer_id=second, units=5, request_id="req-shared")

    def test_insufficient_credits_reports_available_and_writes_nothing(self, ledger_engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=30)
        before = account_state(customer)

        with pytest.raises(InsufficientCredits) as err:
            make_consume(customer_id=customer, units=31)

        assert err.value.available == 30 and err.value.requested == 31
        assert account_state(customer) == before

    def test_unknown_customer_is_refused(self, ledger_engine: Engine) -> None:
        with pytest.raises(UnknownCustomer):
            make_consume(customer_id="cus_nobody", units=1)

    @pytest.mark.parametrize("state", [AccessState.SUSPENDED, AccessState.CANCELED])
    def test_suspended_or_canceled_access_is_refused(self, ledger_engine: Engine, state: AccessState) -> None:
        customer = make_account()
        # Plan credits: neither state may spend them under the default access policy.
        make_grant(customer_id=customer, units=30, source=GrantSource.RENEWAL)
        with unit_of_work() as session:
            set_access_state(session, customer, state, as_of=NOW, source="test")
        before = account_state(customer)

        with pytest.raises(AccessRefused) as err:
            make_consume(customer_id=customer, units=1)

        assert err.value.state == state.value
        assert account_state(customer) == before

    @pytest.mark.parametrize("state", [AccessState.ACTIVE, AccessState.TRIALING])
    def test_active_and_trialing_access_is_allowed(self, ledger_engine: Engine, state: AccessState) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=30)
        with unit_of_work() as session:
            set_access_state(session, customer, state, as_of=NOW, source="test")

        assert make_consume(customer_id=customer, units=1).units == 1

    def test_past_due_is_allowed_until_grace_ends(self, ledger_engine: Engine) -> None:
        in_grace, past_grace = make_account(), make_account()
        for customer, grace in ((in_grace, NOW + timedelta(days=3)), (past_grace, NOW - timedelta(seconds=1))):
            # Plan credits: past the grace deadline they may no longer be spent (the default access policy).
            make_grant(customer_id=customer, units=30, source=GrantSource.RENEWAL)
            with unit_of_work() as session:
                set_access_state(session, customer, AccessState.PAST_DUE, as_of=NOW, source="t", grace_until=grace)

        assert make_consume(customer_id=in_grace, units=1).units == 1
        with pytest.raises(AccessRefused):
            make_consume(customer_id=past_grace, units=1)

    def test_overdraft_beyond_grants_becomes_debt(self, ledger_engine: Engine) -> None:
        customer = make_account(overdraft_limit=20)
        grant = make_grant(customer_id=customer, units=10)

        result = make_consume(customer_id=customer, units=25)

        assert result.balance_after == -15 and result.funded_by == ((grant.grant_id, 10),)
        balance, _, debt, _ = account_state(customer)
        assert (balance, debt) == (-15, 15)
        with pytest.raises(InsufficientCredits) as err:
            make_consume(customer_id=customer, units=6)
        assert err.value.available == 5
        assert_consistent(customer)

    def test_next_grant_settles_overdraft_debt(self, ledger_engine: Engine) -> None:
        customer = make_account(overdraft_limit=20)
        make_consume(customer_id=customer, units=15)

        grant = make_grant(customer_id=customer, units=40)

        assert grant.balance_after == 25
        assert account_state(customer)[:3] == (25, 0, 0)
        assert grant_remaining(grant.grant_id) == (25, 0)
        assert_consistent(customer)

    def test_lapsed_grant_is_not_drawn_and_is_expired(self, ledger_engine: Engine) -> None:
        customer = make_account()
        lapsed = make_grant(customer_id=customer, units=50, expires_at=NOW - timedelta(minutes=1), priority=5)
        live = make_grant(customer_id=customer, units=10)

        with pytest.raises(InsufficientCredits) as err:
            make_consume(customer_id=customer, units=11)
        assert err.value.available == 10
        result = make_consume(customer_id=customer, units=4)

        assert result.funded_by == ((live.grant_id, 4),) and result.balance_after == 6
        assert grant_remaining(lapsed.grant_id) == (0, 0)
        with unit_of_work() as session:
            kinds = session.scalars(select(Entry.kind).where(Entry.grant_id == lapsed.grant_id)).all()
        assert EntryKind.EXPIRE in kinds
        assert_consistent(customer)

    def test_frozen_units_are_not_spendable(self, ledger_engine: Engine) -> None:
        customer = make_account()
        disputed = make_grant(customer_id=customer, units=50)
        make_grant(customer_id=customer, units=5)
        with unit_of_work() as session:
            freeze_grant(session, disputed.grant_id, idempotency_key=unique("freeze"), reason="dispute opened")

        with pytest.raises(InsufficientCredits) as err:
            make_consume(customer_id=customer, units=6)

        assert err.value.available == 5

    def test_usage_is_priced_from_model_tokens_rounding_up(self, ledger_engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)
        usage = make_usage(input_tokens=1001, output_tokens=2000)  # 0.5005 + 4 credits -> 5

        result = make_consume(customer_id=customer, units=None, usage=usage)

        assert result.units == 5 and result.usage_id is not None
        with unit_of_work() as session:
            record = session.get_one(UsageRecord, result.usage_id)
            assert (record.units, record.input_tokens, record.output_tokens, record.feature) == (5, 1001, 2000, "chat")
            assert record.provider_cost_usd == Decimal("0.0225025")

    def test_usage_is_priced_from_operation(self, ledger_engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)

        result = make_consume(customer_id=customer, units=None, usage=make_usage(model=None, operation="image"))

        assert result.units == 20

    @pytest.mark.parametrize("environment", [UsageEnvironment.TEST, UsageEnvironment.INTERNAL])
    def test_test_and_internal_usage_is_recorded_but_free(
        self, ledger_engine: Engine, environment: UsageEnvironment
    ) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=10)

        result = make_consume(
            customer_id=customer, units=None, usage=make_usage(output_tokens=10_000_000, environment=environment)
        )

        assert result.units == 0 and result.balance_after == 10
        with unit_of_work() as session:
            record = session.get_one(UsageRecord, result.usage_id)
            assert record.environment == environment and record.units == 0
        assert_consistent(customer)

    def test_replay_with_usage_returns_the_same_usage_record(self, ledger_engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)
        usage = make_usage(model=None, operation="text")

        first = make_consume(customer_id=customer, units=None, usage=usage, request_id="req-usage")
        again = make_consume(customer_id=customer, units=None, usage=usage, request_id="req-usage")

        assert again.replayed and again.usage_id == first.usage_id

    @pytest.mark.parametrize(
        ("units", "usage"),
        [
            (None, None),
            (-1, None),
            (None, UsageInput(model="no-such-model", input_tokens=1)),
            (None, UsageInput(operation="no-such-operation")),
            (None, UsageInput(model="gpt-4o-2024-08-06", input_tokens=-5)),
        ],
    )
    def test_malformed_request_is_refused(
        self, ledger_engine: Engine, units: int | None, usage: UsageInput | None
    ) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)

        with pytest.raises(InvalidRequest):
            make_consume(customer_id=customer, units=units, usage=usage)

    def test_zero_units_records_the_request(self, ledger_engine: Engine) -> None:
        customer = make_account()

        result = make_consume(customer_id=customer, units=0, request_id="req-zero")

        assert result.units == 0 and result.entry_id is not None
        assert make_consume(customer_id=customer, units=0, request_id="req-zero").replayed

    def test_session_objects_are_not_stale_after_consume(self, ledger_engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=10)
        from ledger.accounts import get_account

        with unit_of_work() as session:
            account = get_account(session, customer)
            assert account.balance == 10
            consume(session, customer, request_id=unique("req"), units=3)
            assert account.balance == 7


ConsumeCall = Callable[..., ConsumeResult]


def in_unit_of_work(customer_id: str, **kwargs: Any) -> ConsumeResult:
    with unit_of_work() as session:
        return consume(session, customer_id, **kwargs)


def outcome(entry_point: ConsumeCall, customer_id: str, grant_ids: list[int], **kwargs: Any) -> tuple[object, ...]:
    """A consumption's result or refusal, grants named by their place in ``grant_ids`` (comparable across
    accounts)."""
    try:
        result = entry_point(customer_id, **kwargs)
    except InsufficientCredits as exc:
        return ("insufficient", exc.requested, exc.available)
    except AccessRefused as exc:
        return ("access_refused", exc.state)
    except LedgerError as exc:
        return (type(exc).__name__,)
    funded = tuple((grant_ids.index(g), u) for g, u in result.funded_by)
    return ("ok", result.units, result.balance_after, result.replayed, result.usage_id is not None, funded)


def consume_scenario(entry_point: ConsumeCall) -> list[tuple[object, ...]]:
    """Every outcome of a consumption, on a fresh account, through ``entry_point``; then the account's state."""
    customer = make_account(overdraft_limit=5)
    grants = [
        make_grant(customer_id=customer, units=50, expires_at=NOW - timedelta(minutes=1), priority=5),
        make_grant(customer_id=customer, units=10),
        make_grant(customer_id=customer, units=10, expires_at=NOW + timedelta(days=2)),
        make_grant(customer_id=customer, units=10, priority=3),
    ]
    ids = [g.grant_id for g in grants]
    prefix = unique("twin")
    steps: list[tuple[str, str, dict[str, Any]]] = [
        (customer, "1", {"units": 15}),  # expires the lapsed grant, draws two grants
        (customer, "1", {"units": 15}),  # replay
        (customer, "1", {"units": 16}),  # conflict
        (customer, "2", {"units": 100}),  # insufficient
        (customer, "3", {"units": 3}),  # one grant covers it: the function's fast path
        (customer, "4", {"usage": make_usage(output_tokens=2000)}),
        (customer, "5", {"units": 0}),
        (customer, "6", {"units": 12}),  # into the overdraft: debt
        (customer, "7", {}),  # neither units nor usage
        ("cus_nobody", "8", {"units": 1}),
    ]
    seen = [outcome(entry_point, c, ids, request_id=f"{prefix}-{n}", **kwargs) for c, n, kwargs in steps]
    with unit_of_work() as session:
        set_access_state(session, customer, AccessState.SUSPENDED, as_of=NOW, source="test")
    seen.append(outcome(entry_point, customer, ids, request_id=f"{prefix}-9", units=1))
    seen.append(account_state(customer))
    assert_consistent(customer)
    return seen


class TestConsumeStandalone:
    def test_same_results_and_errors_as_consume_in_a_unit_of_work(self, ledger_engine: Engine) -> None:
        by_unit_of_work = consume_scenario(in_unit_of_work)

        standalone = consume_scenario(consume_standalone)

        assert standalone == by_unit_of_work
        # The scenario reaches every outcome it names (so the comparison is not between two empty lists).
        assert [o[0] for o in standalone[:11]] == [
            "ok", "ok", "IdempotencyConflict", "insufficient", "ok", "ok", "ok", "ok", "InvalidRequest",
            "UnknownCustomer", "access_refused",
        ]  # fmt: skip
        assert standalone[1][3] is True and standalone[3] == ("insufficient", 100, 20)
        assert standalone[10] == ("access_refused", "suspended")
        balance, held, debt, _ = standalone[11]
        assert (balance, held, debt) == (-4, 0, 4)

    def test_replay_returns_the_original_and_charges_nothing(self, ledger_engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=50)
        first = consume_standalone(customer, request_id="req-alone", units=20)
        before = account_state(customer)

        again = consume_standalone(customer, request_id="req-alone", units=20)

        assert not first.replayed and again.replayed
        assert (again.entry_id, again.units, again.balance_after, again.funded_by) == (
            first.entry_id,
            20,
            30,
            first.funded_by,
        )
        assert account_state(customer) == before

    def test_replays_a_request_first_consumed_in_a_unit_of_work(self, ledger_engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=50)
        first = make_consume(customer_id=customer, units=7, request_id="req-both")

        again = consume_standalone(customer, request_id="req-both", units=7)

        assert again.replayed and (again.entry_id, again.balance_after) == (first.entry_id, 43)
        with pytest.raises(IdempotencyConflict):
            consume_standalone(customer, request_id="req-both", units=8)

    def test_usage_is_recorded_with_its_price(self, ledger_engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)

        result = consume_standalone(customer, request_id=unique("req"), usage=make_usage(input_tokens=1001))

        assert result.units == 1 and result.usage_id is not None
        with unit_of_work() as session:
            record = session.get_one(UsageRecord, result.usage_id)
            assert (record.units, record.input_tokens, record.feature) == (1, 1001, "chat")
        assert_consistent(customer)


@pytest.fixture
def one_connection(pg_engine: Engine) -> Iterator[Engine]:
    """The test database behind a pool of one connection: the next checkout gets the connection just used, and
    one never given back makes the next checkout fail (after 5 s) instead of going unnoticed."""
    engine = db.make_engine(
        pg_engine.url.render_as_string(hide_password=False), pool_size=1, max_overflow=0, pool_timeout=5
    )
    db.set_engine(engine)
    yield engine
    db.set_engine(None)


def assert_pooled_connection_clean(engine: Engine, customer_id: str) -> None:
    """The pooled connection is idle and out of autocommit: a unit of work on it is still one transaction."""
    with engine.connect() as conn:
        driver = conn.connection.driver_connection
        assert driver is not None
        assert driver.autocommit is False
        assert driver.info.transaction_status == TransactionStatus.IDLE
    before = account_state(customer_id)
    with pytest.raises(RuntimeError), unit_of_work() as session:
        consume(session, customer_id, request_id=unique("req"), units=1)
        raise RuntimeError("roll back")
    assert account_state(customer_id) == before  # rolled back, so it was not autocommitted


@pytest.mark.postgres
class TestConsumeStandaloneConnection:
    def test_a_refusal_gives_the_connection_back_clean(self, one_connection: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=5)

        with pytest.raises(InsufficientCredits) as err:
            consume_standalone(customer, request_id=unique("req"), units=6)

        assert err.value.available == 5
        assert_pooled_connection_clean(one_connection, customer)

    def test_a_database_error_undoes_everything_and_gives_the_connection_back_clean(
        self, one_connection: Engine
    ) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=50)
        before = account_state(customer)

        # entries.actor is VARCHAR(255): the entry's INSERT fails after the account and grant were updated. A value
        # the database cannot hold is the request's fault: refused as invalid (a 4xx at the API), nothing written.
        with pytest.raises(InvalidRequest, match="out of range"):
            consume_standalone(customer, request_id=unique("req"), units=5, actor="a" * 256)

        assert account_state(customer) == before
        assert_pooled_connection_clean(one_connection, customer)
        assert consume_standalone(customer, request_id=unique("req"), units=5).balance_after == 45

    def test_a_lost_connection_is_invalidated_and_replaced(self, one_connection: Engine, pg_engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=50)
        with one_connection.connect() as conn:
            lost_pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with pg_engine.connect() as admin:
            assert admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": lost_pid}).scalar_one()

        with pytest.raises(OperationalError) as err:
            consume_standalone(customer, request_id=unique("req"), units=5)

        assert err.value.connection_invalidated
        assert consume_standalone(customer, request_id=unique("req"), units=5).balance_after == 45
        with one_connection.connect() as conn:
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != lost_pid
        assert_pooled_connection_clean(one_connection, customer)


class TestPriceUsage:
    def test_operation_price(self) -> None:
        assert price_usage(UsageInput(operation="video"), get_billing_config()) == 100

    def test_model_price_counts_input_output_and_cached_and_rounds_up(self) -> None:
        usage = UsageInput(
            provider="anthropic",
            model="claude-sonnet-4-20250514",
            input_tokens=1_000_000,
            output_tokens=1,
            cached_tokens=1_000_000,
        )
        # 600 + 0.003 + 60 = 660.003 -> 661
        assert price_usage(usage, get_billing_config()) == 661

    def test_exact_price_is_not_rounded(self) -> None:
        usage = UsageInput(model="gpt-4o-2024-08-06", input_tokens=4_000_000)
        assert price_usage(usage, get_billing_config()) == 2000

    def test_non_billable_usage_is_free(self) -> None:
        assert price_usage(UsageInput(operation="video", billable=False), get_billing_config()) == 0

    def test_float_cost_is_refused(self) -> None:
        with pytest.raises(InvalidRequest):
            price_usage(UsageInput(operation="text", provider_cost_usd=0.1), get_billing_config())  # type: ignore[arg-type]

    def test_unpriced_usage_is_refused(self) -> None:
        with pytest.raises(InvalidRequest):
            price_usage(UsageInput(), get_billing_config())
