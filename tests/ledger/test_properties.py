"""Property tests: random sequences of ledger operations give what a plain model of the rules gives.

Every balance, held and debt figure, every grant's remaining units, every consumption's allocation across
grants, every capture's figures and every refusal are compared with tests/ledger/ledger_model.py, written from
the documented rules (not by calling ledger code); replays change nothing; the invariant checker agrees. They run
on SQLite and on PostgreSQL through both consumption paths (the ``ledger_consume`` function and the portable
Python path), so the two implementations of the rules are held to the same model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from factories import unique
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from ledger_model import ModelAccount, Refused
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from ledger.accounts import open_account, set_overdraft_limit
from ledger.check import check_ledger
from ledger.clawback import clawback, freeze_grant, unfreeze_grant
from ledger.consume import consume
from ledger.db import unit_of_work
from ledger.errors import HoldNotOpen, IdempotencyConflict, InsufficientCredits
from ledger.grants import expire_grants, grant_credits
from ledger.holds import capture_hold, place_hold, release_expired_holds, release_hold
from ledger.models import Account, Entry, Grant, GrantSource, Hold, HoldStatus

INDEX = st.integers(0, 20)
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(
            st.just("grant"), st.integers(1, 60), st.integers(0, 2), st.sampled_from(["never", "lapsed", "later"])
        ),
        st.tuples(st.just("consume"), st.integers(0, 40)),
        st.tuples(st.just("hold"), st.integers(0, 40)),
        st.tuples(st.just("capture"), INDEX, st.one_of(st.none(), st.integers(0, 60))),
        st.tuples(st.just("release"), INDEX),
        st.tuples(st.just("expire")),
        st.tuples(st.just("clawback"), INDEX, st.integers(1, 80)),
        st.tuples(st.just("freeze"), INDEX),
        st.tuples(st.just("unfreeze"), INDEX),
        st.tuples(st.just("overdraft"), st.integers(0, 30)),
        st.tuples(st.just("replay"), INDEX),
    ),
    min_size=1,
    max_size=16,
)

Operation = Callable[[Session], Any]


def snapshot(customer: str) -> tuple[Any, ...]:
    """Everything a replay must leave unchanged."""
    with unit_of_work() as session:
        account = session.execute(
            select(Account.id, Account.balance, Account.held, Account.debt).where(Account.customer_id == customer)
        ).one()
        entries = session.execute(select(func.count()).where(Entry.account_id == account.id)).scalar_one()
        grants = session.execute(
            select(Grant.id, Grant.remaining, Grant.frozen).where(Grant.account_id == account.id).order_by(Grant.id)
        ).all()
        return (tuple(account), entries, tuple(tuple(g) for g in grants))


def assert_invariants(customer: str) -> None:
    with unit_of_work() as session:
        assert check_ledger(session, customer) == []
        account_id, balance, debt = session.execute(
            select(Account.id, Account.balance, Account.debt).where(Account.customer_id == customer)
        ).one()
        entry_sum = session.execute(
            select(func.coalesce(func.sum(Entry.units), 0)).where(Entry.account_id == account_id)
        )
        assert balance == entry_sum.scalar_one()
        lowest = session.execute(select(func.min(Grant.remaining)).where(Grant.account_id == account_id)).scalar()
        assert lowest is None or lowest >= 0
        assert debt >= 0


def assert_matches_model(customer: str, model: ModelAccount, grant_ids: list[int]) -> None:
    """The account's balance, held, debt, every grant's remaining units and every hold's status are the model's."""
    with unit_of_work() as session:
        statuses = dict(
            session.execute(select(Hold.request_id, Hold.status).where(Hold.request_id.in_(list(model.holds)))).all()
        )
        account = session.execute(
            select(Account.balance, Account.held, Account.debt).where(Account.customer_id == customer)
        ).one()
        rows = session.execute(select(Grant.id, Grant.remaining, Grant.frozen).where(Grant.id.in_(grant_ids))).all()
        remaining = {grant_id: (units, frozen) for grant_id, units, frozen in rows}
    assert tuple(account) == (model.balance, model.held, model.debt)
    assert [remaining[g] for g in grant_ids] == [(g.remaining, g.frozen) for g in model.grants]
    assert {r: HoldStatus(s).value for r, s in statuses.items()} == {r: h.status for r, h in model.holds.items()}


def same_result(original: Any, again: Any) -> bool:
    if dataclasses.is_dataclass(original):
        assert getattr(again, "replayed", False), again
        return dataclasses.replace(again, replayed=original.replayed) == original  # type: ignore[type-var]
    return bool(original == again)


def run_against_model(customer: str, operations: list[tuple[Any, ...]], overdraft: int) -> None:
    """Apply ``operations`` to the ledger and to the model; every result, refusal and state must agree."""
    now = datetime.now(UTC)
    expiries = {"never": None, "lapsed": now - timedelta(seconds=1), "later": now + timedelta(days=1)}
    model = ModelAccount(overdraft=overdraft)
    with unit_of_work() as session:
        open_account(session, customer)
        set_overdraft_limit(session, customer, overdraft)
    grant_ids: list[int] = []  # ledger grant id by model index
    holds: list[str] = []
    done: list[tuple[Operation, Any]] = []

    def call(operation: Operation) -> Any:
        with unit_of_work() as session:
            return operation(session)

    for step_no, step in enumerate(operations):
        kind, args = step[0], step[1:]
        if kind == "replay":
            if not done:
                continue
            original_op, original_result = done[args[0] % len(done)]
            before = snapshot(customer)
            assert same_result(original_result, call(original_op)), step
            assert snapshot(customer) == before
            continue
        if kind == "grant":
            units, priority, expiry = args

            def op(s: Session, u: int = units, p: int = priority, e: Any = expiries[expiry],
                   k: str = f"{customer}-g{step_no}") -> Any:  # fmt: skip
                return grant_credits(s, customer, units=u, source=GrantSource.TOP_UP, idempotency_key=k, priority=p,
                                     expires_at=e)  # fmt: skip

            result = call(op)
            index, balance_after = model.grant(units, priority, expiry)
            grant_ids.append(result.grant_id)
            assert (len(grant_ids) - 1, result.balance_after) == (index, balance_after)
            done.append((op, result))
        elif kind in ("consume", "hold"):
            rid = f"{customer}-{kind}{step_no}"

            def op(s: Session, u: int = args[0], r: str = rid, k: str = kind) -> Any:
                return (consume if k == "consume" else place_hold)(s, customer, request_id=r, units=u)

            try:
                expected = model.consume(args[0]) if kind == "consume" else model.hold(rid, args[0])
            except Refused as refusal:
                with pytest.raises(InsufficientCredits) as refused:
                    call(op)
                assert refused.value.available == refusal.available, step
            else:
                result = call(op)
                if kind == "consume":
                    index = {g: i for i, g in enumerate(grant_ids)}
                    funded = [(index[g], u) for g, u in result.funded_by]
                    assert (result.units, result.balance_after, funded) == expected, step
                else:
                    assert (result.units, result.balance_after) == expected, step
                    holds.append(rid)
                done.append((op, result))
        elif kind in ("capture", "release") and holds:
            rid = holds[args[0] % len(holds)]
            if kind == "capture":

                def op(s: Session, r: str = rid, u: int | None = args[1]) -> Any:
                    return capture_hold(s, r, units=u)
            else:

                def op(s: Session, r: str = rid) -> Any:
                    return release_hold(s, r)

            try:
                expected = model.capture(rid, args[1]) if kind == "capture" else model.release(rid)
            except Refused as refusal:
                error = IdempotencyConflict if refusal.kind == "conflict" else HoldNotOpen
                with pytest.raises(error):
                    call(op)
            else:
                result = call(op)
                if kind == "capture":
                    got = (result.held, result.captured, result.released, result.shortfall, result.balance_after)
                    assert got == expected, step
                else:
                    assert result.status.value == expected, step
        elif kind == "clawback" and grant_ids:
            index = args[0] % len(grant_ids)

            def op(s: Session, g: int = grant_ids[index], k: str = f"{customer}-c{step_no}", u: int = args[1]) -> Any:
                return clawback(s, g, units=u, idempotency_key=k, reason="refund")

            result = call(op)
            assert (result.clawed, result.debt) == model.clawback(index, args[1]), step
            done.append((op, result))
        elif kind in ("freeze", "unfreeze") and grant_ids:
            index = args[0] % len(grant_ids)
            move = freeze_grant if kind == "freeze" else unfreeze_grant

            def op(s: Session, g: int = grant_ids[index], k: str = f"{customer}-f{step_no}", m: Any = move) -> Any:
                return m(s, g, idempotency_key=k, reason="dispute")

            result = call(op)
            assert result == (model.freeze(index) if kind == "freeze" else model.unfreeze(index)), step
            done.append((op, result))
        elif kind == "expire":
            later = datetime.now(UTC)
            # The counts cover every account in the database (earlier examples' too): this account's part is
            # compared below, grant by grant and hold by hold.
            call(lambda s, t=later: (expire_grants(s, now=t), release_expired_holds(s, now=t + timedelta(hours=1))))
            model.expire()
        elif kind == "overdraft":
            call(lambda s, u=args[0]: set_overdraft_limit(s, customer, u))
            model.overdraft = args[0]
        else:
            continue
        assert_matches_model(customer, model, grant_ids)
        assert_invariants(customer)


class TestLedgerAgainstModel:
    """Random histories on SQLite and PostgreSQL (the function and the Python path) against the plain model."""

    @settings(
        max_examples=30,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(operations=OPERATIONS, overdraft=st.sampled_from([0, 10, 40]))
    # Histories that steer each rule, tried on every run besides the random ones.
    @example(  # draw order: priority, then expiry, then age; a lapsed grant is expired, not drawn
        operations=[("grant", 10, 0, "never"), ("grant", 10, 0, "later"), ("grant", 10, 2, "lapsed"),
                    ("grant", 10, 1, "never"), ("consume", 25)],
        overdraft=0,
    )  # fmt: skip
    @example(  # refused whole; then overdraft debt, settled by the next grant
        operations=[("grant", 10, 0, "never"), ("consume", 11), ("consume", 15), ("grant", 4, 0, "never"),
                    ("consume", 3), ("replay", 1)],
        overdraft=10,
    )  # fmt: skip
    @example(  # a hold captured for more than held, one for less, one released and one expired
        operations=[("grant", 30, 0, "never"), ("grant", 5, 1, "later"), ("hold", 10), ("hold", 8), ("hold", 4),
                    ("hold", 1), ("capture", 0, 25), ("capture", 1, 3), ("release", 2), ("expire",),
                    ("capture", 0, 25), ("capture", 0, 24), ("release", 0), ("capture", 2, None)],
        overdraft=10,
    )  # fmt: skip
    @example(  # a partly captured hold across two grants gives back to the last drawn first
        operations=[("grant", 5, 1, "never"), ("grant", 20, 0, "never"), ("hold", 10), ("capture", 0, 3),
                    ("hold", 12), ("release", 1)],
        overdraft=0,
    )  # fmt: skip
    @example(  # a frozen grant is not drawn; a clawback takes its frozen units before recording debt
        operations=[("grant", 20, 1, "never"), ("grant", 10, 0, "never"), ("consume", 5), ("freeze", 0),
                    ("consume", 4), ("clawback", 0, 18), ("unfreeze", 0), ("consume", 1)],
        overdraft=0,
    )  # fmt: skip
    @example(  # a clawback past what is left: the spent part becomes debt; a hold's debt cancelled on release
        operations=[("grant", 20, 0, "never"), ("consume", 15), ("clawback", 0, 18), ("hold", 5), ("release", 0),
                    ("clawback", 0, 18), ("grant", 10, 0, "never")],
        overdraft=10,
    )  # fmt: skip
    def test_every_result_and_refusal_is_the_models(
        self, ledger_engine: Engine, operations: list[tuple[Any, ...]], overdraft: int
    ) -> None:
        run_against_model(unique("prop"), operations, overdraft)


CONSUME_SCENARIOS = st.lists(
    st.one_of(
        st.tuples(
            st.just("grant"), st.integers(1, 40), st.integers(0, 2), st.sampled_from(["never", "lapsed", "later"])
        ),
        st.tuples(st.just("consume"), st.integers(0, 50)),
        st.tuples(st.just("consume"), st.integers(1, 12)),
        st.tuples(st.just("replay"), INDEX),
        st.tuples(st.just("clawback"), INDEX, st.integers(1, 50)),
        st.tuples(st.just("freeze"), INDEX),
        st.tuples(st.just("unfreeze"), INDEX),
        st.tuples(st.just("overdraft"), st.integers(0, 30)),
        st.tuples(st.just("suspend"), st.booleans()),
        st.tuples(st.just("hold"), st.integers(0, 40)),
        st.tuples(st.just("capture"), INDEX, st.one_of(st.none(), st.integers(0, 60))),
        st.tuples(st.just("release"), INDEX),
    ),
    min_size=1,
    max_size=16,
)


class TestConsumePathsAgree:
    """The PostgreSQL function and the Python path give the same outcome for the same history."""

    @settings(
        max_examples=50,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(scenario=CONSUME_SCENARIOS)
    # Histories that steer each rule, tried on every run besides the random ones.
    @example(scenario=[("grant", 10, 0, "never"), ("grant", 10, 2, "never"), ("consume", 5), ("consume", 12)])
    @example(scenario=[("grant", 10, 0, "never"), ("grant", 10, 0, "later"), ("consume", 5), ("replay", 0)])
    @example(scenario=[("grant", 10, 2, "lapsed"), ("grant", 10, 1, "never"), ("consume", 5), ("consume", 6)])
    @example(scenario=[("overdraft", 10), ("consume", 5), ("grant", 20, 0, "never"), ("consume", 5), ("replay", 0)])
    @example(scenario=[("grant", 20, 0, "never"), ("consume", 5), ("clawback", 0, 18), ("consume", 1)])
    @example(scenario=[("grant", 20, 0, "never"), ("suspend", True), ("consume", 1), ("suspend", False), ("replay", 0)])
    @example(
        scenario=[("grant", 20, 0, "never"), ("freeze", 0), ("consume", 1), ("grant", 5, 0, "never"), ("consume", 5)]
    )
    @example(scenario=[("grant", 20, 0, "never"), ("consume", 5), ("freeze", 0), ("clawback", 0, 18), ("unfreeze", 0)])
    @example(scenario=[("grant", 10, 1, "never"), ("grant", 10, 0, "later"), ("hold", 15), ("capture", 0, 5)])
    @example(scenario=[("grant", 10, 0, "never"), ("hold", 8), ("capture", 0, 30), ("capture", 0, 30)])
    @example(scenario=[("overdraft", 10), ("hold", 5), ("grant", 20, 0, "never"), ("release", 0), ("release", 0)])
    @example(scenario=[("grant", 10, 2, "lapsed"), ("grant", 10, 0, "never"), ("hold", 6), ("capture", 0, None)])
    def test_same_history_same_outcomes(self, pg_engine: Engine, scenario: list[tuple[Any, ...]]) -> None:
        from ledger import pgfast
        from ledger.accounts import set_access_state
        from ledger.errors import AccessRefused
        from ledger.models import AccessState

        now = datetime.now(UTC)
        customers = {True: unique("fn"), False: unique("py")}
        grants: dict[bool, list[int]] = {True: [], False: []}
        holds: list[str] = []
        requests: list[tuple[str, int]] = []
        outcomes: dict[bool, list[Any]] = {True: [], False: []}
        with unit_of_work() as session:
            for customer in customers.values():
                open_account(session, customer)
        for step_no, step in enumerate(scenario):
            kind, args = step[0], step[1:]
            if kind == "replay":
                if not requests:
                    continue
                rid, units = requests[args[0] % len(requests)]
            elif kind == "consume":
                rid, units = f"r{step_no}", args[0]
                requests.append((rid, units))
            for use_function in (True, False):
                customer = customers[use_function]
                pgfast.use_function(use_function)
                try:
                    with unit_of_work() as session:
                        if kind == "grant":
                            units_, priority, expiry = args
                            expires_at = {"never": None, "lapsed": now - timedelta(seconds=1),
                                          "later": now + timedelta(days=1)}[expiry]  # fmt: skip
                            result = grant_credits(session, customer, units=units_, source=GrantSource.TOP_UP,
                                                   idempotency_key=f"{customer}-g{step_no}", priority=priority,
                                                   expires_at=expires_at)  # fmt: skip
                            grants[use_function].append(result.grant_id)
                            outcome: Any = ("grant", result.balance_after)
                        elif kind in ("consume", "replay"):
                            result = consume(session, customer, request_id=f"{customer}-{rid}", units=units)
                            index = {g: i for i, g in enumerate(grants[use_function])}
                            outcome = (kind, result.units, result.balance_after, result.replayed,
                                       tuple((index[g], u) for g, u in result.funded_by))  # fmt: skip
                        elif kind in ("clawback", "freeze", "unfreeze") and grants[use_function]:
                            grant_id = grants[use_function][args[0] % len(grants[use_function])]
                            if kind == "clawback":
                                key = f"{customer}-c{step_no}"
                                claw = clawback(session, grant_id, units=args[1], idempotency_key=key, reason="refund")
                                outcome = ("clawback", claw.clawed, claw.debt)
                            elif kind == "freeze":
                                key = f"{customer}-f{step_no}"
                                outcome = ("freeze", freeze_grant(session, grant_id, idempotency_key=key, reason="x"))
                            else:
                                key = f"{customer}-u{step_no}"
                                released = unfreeze_grant(session, grant_id, idempotency_key=key, reason="x")
                                outcome = ("unfreeze", released)
                        elif kind == "hold":
                            placed = place_hold(session, customer, request_id=f"{customer}-h{step_no}", units=args[0])
                            outcome = ("hold", placed.units, placed.balance_after, placed.replayed)
                        elif kind in ("capture", "release") and holds:
                            hold_id = f"{customer}-{holds[args[0] % len(holds)]}"
                            if kind == "capture":
                                took = capture_hold(session, hold_id, units=args[1])
                                outcome = ("capture", took.held, took.captured, took.released, took.shortfall,
                                           took.balance_after, took.replayed)  # fmt: skip
                            else:
                                gave = release_hold(session, hold_id)
                                outcome = ("release", gave.units, gave.status, gave.balance_after, gave.replayed)
                        elif kind == "overdraft":
                            set_overdraft_limit(session, customer, args[0])
                            outcome = ("overdraft",)
                        elif kind == "suspend":
                            state = AccessState.SUSPENDED if args[0] else AccessState.ACTIVE
                            set_access_state(session, customer, state, as_of=now + timedelta(seconds=step_no),
                                             source="test")  # fmt: skip
                            outcome = ("access", state.value)
                        else:
                            outcome = ("skipped",)
                except (InsufficientCredits, AccessRefused, HoldNotOpen, IdempotencyConflict) as exc:
                    outcome = (type(exc).__name__, getattr(exc, "available", None))
                finally:
                    pgfast.use_function(True)
                outcomes[use_function].append(outcome)
            if kind == "hold" and outcomes[True][-1][0] == "hold":
                holds.append(f"h{step_no}")
            assert outcomes[True] == outcomes[False], scenario
            assert snapshot(customers[True])[0][1:] == snapshot(customers[False])[0][1:]
        for customer in customers.values():
            assert_invariants(customer)
