"""The daily usage roll-up: after any mix of consumptions and captures, its rows are the sums of the usage rows.

Runs on SQLite and on PostgreSQL through both consumption paths (the ``ledger_consume`` function and the Python
path): the triggers of migration 0005 keep the roll-up for every writer, and ``ledger.check`` proves it.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from factories import make_account, make_grant, unique
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, select, update

from ledger.check import check_ledger
from ledger.consume import consume
from ledger.db import unit_of_work
from ledger.errors import InsufficientCredits
from ledger.holds import capture_hold, place_hold
from ledger.migrate import migrate
from ledger.models import Account, UsageDaily, UsageEnvironment, UsageRecord
from ledger.pricing import UsageInput

Key = tuple[Any, ...]
Sums = tuple[int, int, int, int, int, Decimal]

MIDNIGHT = datetime(2026, 3, 1, tzinfo=UTC)
USAGE = st.fixed_dictionaries(
    {
        "provider": st.sampled_from(["openai", "anthropic", None]),
        "model": st.sampled_from(["gpt-4o-2024-08-06", "claude-3-5-haiku-20241022", None]),
        "workspace": st.sampled_from(["proj_main", None]),
        "feature": st.sampled_from(["chat", "search", None]),
        "environment": st.sampled_from(list(UsageEnvironment)),
        "billable": st.booleans(),
        "input_tokens": st.integers(0, 5_000),
        "output_tokens": st.integers(0, 5_000),
        "cached_tokens": st.integers(0, 100),
        # Sub-cent costs, summed exactly (integer 10^-10 USD on SQLite, NUMERIC on PostgreSQL).
        "cost": st.integers(0, 10**9).map(lambda n: Decimal(n).scaleb(-10)),
        # Either side of two UTC midnights.
        "at": st.integers(-3, 3).map(lambda m: MIDNIGHT + timedelta(minutes=m) + timedelta(days=m % 2)),
    }
)
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("consume"), st.integers(0, 30), USAGE),
        st.tuples(st.just("capture"), st.integers(1, 30), USAGE),
        st.tuples(st.just("replay"), st.integers(0, 20)),
    ),
    min_size=1,
    max_size=12,
)


def _usage(spec: dict[str, Any]) -> UsageInput:
    return UsageInput(
        user_id="user_1",
        workspace=spec["workspace"],
        feature=spec["feature"],
        provider=spec["provider"],
        model=spec["model"],
        input_tokens=spec["input_tokens"],
        output_tokens=spec["output_tokens"],
        cached_tokens=spec["cached_tokens"],
        provider_cost_usd=spec["cost"],
        billable=spec["billable"],
        environment=spec["environment"],
        occurred_at=spec["at"],
    )


def _utc_day(value: datetime) -> date:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC).date()


def summed_from_rows(customer: str) -> dict[Key, Sums]:
    """The roll-up as it should be, computed in Python from the account's usage rows."""
    out: dict[Key, list[Any]] = defaultdict(lambda: [0, 0, 0, 0, 0, Decimal(0)])
    with unit_of_work() as session:
        account_id = session.scalars(select(Account.id).where(Account.customer_id == customer)).one()
        for u in session.scalars(select(UsageRecord).where(UsageRecord.account_id == account_id)):
            key = (_utc_day(u.occurred_at), u.provider, u.model, u.workspace, u.feature, u.environment, u.billable)
            sums = out[key]
            for i, value in enumerate((1, u.input_tokens, u.output_tokens, u.cached_tokens, u.units)):
                sums[i] += value
            sums[5] += u.provider_cost_usd
    return {k: tuple(v) for k, v in out.items()}  # type: ignore[misc]


def rolled_up(customer: str) -> dict[Key, Sums]:
    """The account's roll-up rows, as stored."""
    with unit_of_work() as session:
        rows = session.execute(
            select(UsageDaily).join(Account, Account.id == UsageDaily.account_id).where(Account.customer_id == customer)
        ).scalars()
        return {
            (d.day, d.provider, d.model, d.workspace, d.feature, d.environment, d.billable): (
                d.requests,
                d.input_tokens,
                d.output_tokens,
                d.cached_tokens,
                d.units,
                d.provider_cost_usd,
            )
            for d in rows
        }


def violations(customer: str | None = None) -> list[str]:
    with unit_of_work() as session:
        return [v.detail for v in check_ledger(session, customer) if v.invariant == "usage_daily_equals_usage"]


class TestUsageDaily:
    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(operations=OPERATIONS)
    def test_roll_up_equals_the_usage_rows_after_any_mix(
        self, ledger_engine: Engine, operations: list[tuple[Any, ...]]
    ) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)
        done: list[Any] = []
        for kind, *args in operations:
            if kind == "replay":
                if done:
                    # A replay (same request id, same parameters) records no second usage row.
                    with unit_of_work() as session:
                        assert done[args[0] % len(done)](session).replayed
                continue
            units, spec = args
            usage = _usage(spec)
            rid = unique("u")
            if kind == "consume":

                def call(s: Any, r: str = rid, n: int = units, u: UsageInput = usage) -> Any:
                    return consume(s, customer, request_id=r, units=n, usage=u)
            else:
                try:
                    with unit_of_work() as session:
                        place_hold(session, customer, request_id=rid, units=units)
                except InsufficientCredits:
                    continue

                def call(s: Any, r: str = rid, n: int = units, u: UsageInput = usage) -> Any:
                    return capture_hold(s, r, units=n, usage=u)

            try:
                with unit_of_work() as session:
                    call(session)
            except InsufficientCredits:
                continue  # refused: nothing written, the roll-up included
            done.append(call)

        expected = summed_from_rows(customer)
        assert rolled_up(customer) == expected
        assert violations(customer) == []

    def test_a_day_and_a_null_key_each_get_their_own_row(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)
        late = _usage({**_SPEC, "at": MIDNIGHT - timedelta(microseconds=1)})
        early = _usage({**_SPEC, "at": MIDNIGHT})
        no_model = _usage({**_SPEC, "at": MIDNIGHT, "model": None})
        with unit_of_work() as session:
            for i, usage in enumerate((late, early, early, no_model, no_model)):
                consume(session, customer, request_id=f"{customer}-{i}", units=1, usage=usage)

        rows = rolled_up(customer)
        assert {(k[0], k[2], v[0]) for k, v in rows.items()} == {
            (MIDNIGHT.date() - timedelta(days=1), "gpt-4o-2024-08-06", 1),
            (MIDNIGHT.date(), "gpt-4o-2024-08-06", 2),
            (MIDNIGHT.date(), None, 2),
        }
        assert rows == summed_from_rows(customer)

    def test_rows_written_updated_and_deleted_directly_follow_in_the_roll_up(self, engine: Engine) -> None:
        # Any writer, not only the consumption paths: a bulk load, a correction, a deletion.
        customer = make_account()
        with unit_of_work() as session:
            account_id = session.scalars(select(Account.id).where(Account.customer_id == customer)).one()
            session.add_all(
                UsageRecord(
                    account_id=account_id,
                    request_id=f"{customer}-{i}",
                    provider="openai",
                    model="gpt-4o-2024-08-06",
                    input_tokens=1_000,
                    provider_cost_usd=Decimal("0.0025"),
                    units=1,
                    occurred_at=MIDNIGHT,
                )
                for i in range(3)
            )
        with unit_of_work() as session:
            ids = session.scalars(select(UsageRecord.id).where(UsageRecord.account_id == account_id)).all()
            session.execute(update(UsageRecord).where(UsageRecord.id == ids[0]).values(model="gpt-4o-mini-2024-07-18"))
            session.execute(update(UsageRecord).where(UsageRecord.id == ids[1]).values(input_tokens=7))
            session.execute(delete(UsageRecord).where(UsageRecord.id == ids[2]))

        rows = rolled_up(customer)
        assert rows == summed_from_rows(customer)
        assert sorted((k[2], v[0], v[1], v[5]) for k, v in rows.items()) == [
            ("gpt-4o-2024-08-06", 1, 7, Decimal("0.0025")),
            ("gpt-4o-mini-2024-07-18", 1, 1_000, Decimal("0.0025")),
        ]
        assert violations() == []


_SPEC: dict[str, Any] = {
    "provider": "openai",
    "model": "gpt-4o-2024-08-06",
    "workspace": "proj_main",
    "feature": "chat",
    "environment": UsageEnvironment.PRODUCTION,
    "billable": True,
    "input_tokens": 1_000,
    "output_tokens": 200,
    "cached_tokens": 0,
    "cost": Decimal("0.0045000001"),
    "at": MIDNIGHT,
}


class TestCheckFindsADriftedRollUp:
    def test_a_tampered_missing_or_extra_roll_up_row_is_a_violation(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)
        with unit_of_work() as session:
            consume(session, customer, request_id=f"{customer}-a", units=1, usage=_usage(_SPEC))
            consume(session, customer, request_id=f"{customer}-b", units=1, usage=_usage({**_SPEC, "workspace": None}))
        assert violations(customer) == []

        with unit_of_work() as session:
            account_id = session.scalars(select(Account.id).where(Account.customer_id == customer)).one()
            session.execute(
                update(UsageDaily)
                .where(UsageDaily.workspace == "proj_main")
                .values(provider_cost_usd=UsageDaily.provider_cost_usd + Decimal("0.0000000001"))
            )
            session.execute(delete(UsageDaily).where(UsageDaily.workspace.is_(None)))
            session.add(
                UsageDaily(
                    account_id=account_id,
                    day=date(2026, 1, 1),
                    provider=None,
                    model=None,
                    workspace=None,
                    feature=None,
                    environment=UsageEnvironment.TEST,
                    billable=False,
                    requests=1,
                    input_tokens=0,
                    output_tokens=0,
                    cached_tokens=0,
                    units=0,
                    provider_cost_usd=Decimal(0),
                )
            )

        found = violations(customer)
        assert len(found) == 3, found
        assert any("provider_cost_usd -0.0000000001" in v for v in found)
        assert any("requests +1" in v for v in found)  # the deleted row: usage rows nothing rolls up
        assert any("2026-01-01" in v and "requests -1" in v for v in found)
        assert len(violations()) == 3


class TestBackfill:
    def test_migration_backfills_the_roll_up_from_existing_usage_rows(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)
        with unit_of_work() as session:
            for i, at in enumerate((MIDNIGHT - timedelta(hours=1), MIDNIGHT, MIDNIGHT + timedelta(hours=5))):
                spec = {**_SPEC, "at": at, "model": None if i == 2 else _SPEC["model"]}
                consume(session, customer, request_id=f"{customer}-{i}", units=1, usage=_usage(spec))
        expected = summed_from_rows(customer)
        try:
            migrate(engine, "0004")  # drops the roll-up and its triggers; usage rows stay
            migrate(engine)
            assert rolled_up(customer) == expected
            assert violations() == []
        finally:
            migrate(engine)
