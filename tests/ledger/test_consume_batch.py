"""consume_batch: many consumptions, each its own idempotent unit, equal to applying them one by one.

The oracle is the single-call path (consume_standalone, one item at a time, in order): on PostgreSQL that is one
ledger_consume call each, while a batch is one ledger_consume_many call (grouped by customer) or, on SQLite, one
transaction with a savepoint per item. Histories mix repeats, reused ids across customers, refusals of every kind.
"""

from __future__ import annotations

import itertools
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from factories import unique
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, select

from ledger.accounts import open_account, set_access_state
from ledger.check import check_ledger
from ledger.consume import ConsumeInput, consume_batch, consume_standalone
from ledger.db import unit_of_work
from ledger.errors import IdempotencyConflict, InsufficientCredits, LedgerError, LimitExceeded
from ledger.grants import grant_credits
from ledger.models import AccessState, Account, Entry, Grant, GrantSource, LimitCounter, UsageRecord
from ledger.pricing import UsageInput

CUSTOMERS = 4  # the fourth is suspended; index 4 is a customer that does not exist
# (customer index, request id index, units, reason): few ids and customers, so repeats and reuse are common.
ITEM = st.tuples(st.integers(0, CUSTOMERS), st.integers(0, 7), st.integers(0, 25), st.sampled_from(["", "x"]))
HISTORY = st.tuples(st.lists(ITEM, min_size=1, max_size=30), st.lists(st.integers(1, 8), min_size=1, max_size=30))


def _world(prefix: str) -> tuple[list[str], dict[str, list[int]]]:
    """Customers funded alike in a world of their own: two grants each, different priorities and expiries."""
    now = datetime.now(UTC)
    customers = [f"{prefix}-c{i}" for i in range(CUSTOMERS)]
    grants: dict[str, list[int]] = {}
    with unit_of_work() as session:
        for i, customer in enumerate(customers):
            open_account(session, customer)
            grants[customer] = [
                grant_credits(session, customer, units=20 + 5 * i, source=GrantSource.TOP_UP,
                              idempotency_key=f"{customer}-g1").grant_id,
                grant_credits(session, customer, units=15, source=GrantSource.PROMOTION, priority=5,
                              expires_at=now + timedelta(days=1), idempotency_key=f"{customer}-g2").grant_id,
            ]  # fmt: skip
        set_access_state(session, customers[-1], AccessState.SUSPENDED, as_of=now, source="test")
    return [*customers, f"{prefix}-nobody"], grants


def _items(prefix: str, customers: list[str], history: list[tuple[int, int, int, str]]) -> list[ConsumeInput]:
    return [ConsumeInput(customers[c], f"{prefix}-r{r}", units=units, reason=reason) for c, r, units, reason in history]


def _normal(outcome: Any, grants: dict[str, list[int]]) -> tuple[Any, ...]:
    """An outcome with the world's names taken out: errors by kind, results by units and grant positions."""
    if isinstance(outcome, LedgerError):
        return (type(outcome).__name__, getattr(outcome, "available", None))
    position = {g: (i, n) for i, ids in enumerate(grants.values()) for n, g in enumerate(ids)}
    funded = tuple((position[g], u) for g, u in outcome.funded_by)
    return ("ok", outcome.units, outcome.balance_after, outcome.replayed, funded)


def _one_by_one(items: list[ConsumeInput]) -> list[Any]:
    outcomes: list[Any] = []
    for item in items:
        try:
            outcomes.append(
                consume_standalone(
                    item.customer_id, request_id=item.request_id, units=item.units, usage=item.usage, reason=item.reason
                )
            )
        except LedgerError as exc:
            outcomes.append(exc)
    return outcomes


def _recorded(customers: list[str]) -> list[tuple[Any, ...]]:
    """Each consumption's entry and usage row, world names taken out, in entry order per customer."""
    with unit_of_work() as session:
        rows = session.execute(
            select(Account.customer_id, Entry.units, Entry.balance_after, Entry.reason,
                   UsageRecord.request_id, UsageRecord.user_id, UsageRecord.feature, UsageRecord.provider,
                   UsageRecord.model, UsageRecord.input_tokens, UsageRecord.output_tokens, UsageRecord.cached_tokens,
                   UsageRecord.provider_cost_usd, UsageRecord.units)
            .join(Account, Account.id == Entry.account_id)
            .join(UsageRecord, UsageRecord.id == Entry.usage_id)
            .where(Account.customer_id.in_(customers), Entry.kind == "consume")
            .order_by(Account.customer_id, Entry.id)
        ).all()  # fmt: skip
    # Names differ between worlds by one letter after the prefix: keep what follows the world's own name.
    return [(row[0][-2:], *row[1:4], row[4].split("-", 1)[1], *row[5:]) for row in rows]


def _state(customers: list[str]) -> list[tuple[int, int, int, list[int]]]:
    with unit_of_work() as session:
        rows = []
        for customer in customers[:-1]:
            account = session.execute(select(Account).where(Account.customer_id == customer)).scalar_one()
            remaining = session.execute(
                select(Grant.remaining).where(Grant.account_id == account.id).order_by(Grant.id)
            ).scalars()
            rows.append((account.balance, account.held, account.debt, list(remaining)))
        return rows


class TestBatchEqualsOneByOne:
    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(history=HISTORY)
    # A repeat replays; a changed reason conflicts; another customer's use of an id conflicts; refusals of every
    # kind leave the others alone; one customer drawn across both grants.
    @example(history=([(0, 0, 5, ""), (0, 0, 5, ""), (0, 0, 5, "x"), (1, 0, 5, ""), (4, 1, 1, ""), (3, 2, 1, ""),
                       (0, 3, 40, ""), (0, 4, 100, "")], [8]))  # fmt: skip
    @example(history=([(1, 0, 3, ""), (0, 0, 3, ""), (0, 1, 0, ""), (1, 0, 3, "")], [1, 3]))
    # Found by this test: a refused first use by one customer, then another customer's items in one batch.
    @example(history=([(3, 1, 0, ""), (0, 1, 0, ""), (0, 0, 1, "")], [3]))
    # Found by this test: a refused use, another customer's use of the id, then the first customer's again.
    @example(history=([(3, 0, 0, ""), (0, 0, 0, ""), (3, 0, 0, "")], [3]))
    def test_same_outcomes_and_same_ledger(self, engine: Engine, history: tuple[list[Any], list[int]]) -> None:
        steps, cuts = history
        prefix = unique("w")
        batched_customers, batched_grants = _world(f"{prefix}b")
        single_customers, single_grants = _world(f"{prefix}s")
        batched_items = _items(f"{prefix}b", batched_customers, steps)
        single_items = _items(f"{prefix}s", single_customers, steps)

        batched: list[Any] = []
        start = 0
        for size in itertools.cycle(cuts):
            if start >= len(batched_items):
                break
            batched.extend(consume_batch(batched_items[start : start + size]))
            start += size
        single = _one_by_one(single_items)

        assert [_normal(o, batched_grants) for o in batched] == [_normal(o, single_grants) for o in single]
        assert _state(batched_customers) == _state(single_customers)
        with unit_of_work() as session:
            assert check_ledger(session) == []

    def test_a_repeat_in_one_batch_replays_its_first_use(self, engine: Engine) -> None:
        customers, _ = _world(unique("w"))
        first, again, changed = consume_batch(
            [
                ConsumeInput(customers[0], "dup", units=4),
                ConsumeInput(customers[0], "dup", units=4),
                ConsumeInput(customers[0], "dup", units=4, reason="other"),
            ]
        )
        assert not isinstance(first, LedgerError) and not first.replayed
        assert not isinstance(again, LedgerError) and again.replayed and again.entry_id == first.entry_id
        assert isinstance(changed, IdempotencyConflict)

    def test_usage_and_entries_are_recorded_as_one_by_one(self, engine: Engine) -> None:
        """Every customer's items applied together (PostgreSQL's set-wise path) record what single calls do."""
        prefix = unique("u")
        worlds = {side: _world(f"{prefix}{side}") for side in ("b", "s")}
        models = ["gpt-4o", "claude-sonnet", None]
        steps = [(c, n) for n in range(4) for c in range(3)]  # interleaved customers, four items each

        def items(side: str) -> list[ConsumeInput]:
            customers = worlds[side][0]
            return [
                ConsumeInput(
                    customers[c], f"{prefix}{side}-q{c}-{n}", units=n + 1, reason="r" if n % 2 else "",
                    usage=UsageInput(
                        user_id=f"user-{n}" if n != 2 else None, feature="chat", provider="openai",
                        model=models[c], input_tokens=10 * n, output_tokens=n, cached_tokens=n % 2,
                        provider_cost_usd=Decimal("0.0125") * n if n else None,
                    ),
                )
                for c, n in steps
            ]  # fmt: skip

        batched = consume_batch(items("b"))
        single = _one_by_one(items("s"))
        # Hand-worked: customer c's promotion grant (15 units, drawn first) pays 1, 2, 3, 4 units in order.
        assert [o.balance_after for o in batched] == [20 + 5 * c + 15 - (n + 1) * (n + 2) // 2 for c, n in steps]
        assert [_normal(o, worlds["b"][1]) for o in batched] == [_normal(o, worlds["s"][1]) for o in single]
        assert _recorded(worlds["b"][0]) == _recorded(worlds["s"][0])
        with unit_of_work() as session:
            assert check_ledger(session) == []

    def test_an_invalid_item_is_its_own_refusal(self, engine: Engine) -> None:
        customers, _ = _world(unique("w"))
        ok, bad, poor = consume_batch(
            [
                ConsumeInput(customers[0], "a1", units=1),
                ConsumeInput(customers[0], "a2"),  # neither units nor a usage to price
                ConsumeInput(customers[0], "a3", units=10**6),
            ]
        )
        assert not isinstance(ok, LedgerError) and ok.balance_after == 34
        assert isinstance(bad, LedgerError) and bad.code == "invalid_request"
        assert isinstance(poor, InsufficientCredits) and poor.available == 34


@pytest.mark.postgres
class TestRequestIdRaceAcrossCustomers:
    def test_two_customers_racing_on_one_request_id_get_one_success_and_one_conflict(self, pg_engine: Engine) -> None:
        customers, _ = _world(unique("race"))
        rounds = 40
        statuses = [sorted(_race(customers[:2], f"shared-{n}")) for n in range(rounds)]
        # Never a database error: the id goes to one customer, the other is told it is taken.
        assert statuses == [["ConsumeResult", "IdempotencyConflict"]] * rounds
        with unit_of_work() as session:
            assert check_ledger(session) == []


def _race(customers: list[str], request_id: str) -> list[str]:
    """Each customer spends under ``request_id`` at the same moment; the kinds of outcome they got."""
    barrier = threading.Barrier(len(customers))
    seen: list[str] = []
    lock = threading.Lock()

    def spend(customer: str) -> None:
        barrier.wait()
        (outcome,) = consume_batch([ConsumeInput(customer, request_id, units=1)])
        with lock:
            seen.append(type(outcome).__name__)

    threads = [threading.Thread(target=spend, args=(c,)) for c in customers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return seen


# Two limits a history reaches: 10 requests per customer per day, 9 units per user (or customer, without one) a day.
TIGHT_LIMITS = """
[[limits]]
name = "requests-per-customer"
window = "day"
max_requests = 10

[[limits]]
name = "units-per-user"
scope = "user"
window = "day"
max_units = 9
"""
# (customer index, request id index, units, user index): users 0-1, or none (index 2: counted under the customer)
LIMITED_ITEM = st.tuples(st.integers(0, 2), st.integers(0, 9), st.integers(1, 4), st.integers(0, 2))


class TestBatchUnderLimitsEqualsOneByOne:
    @settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(steps=st.lists(LIMITED_ITEM, min_size=1, max_size=24), cut=st.integers(2, 12))
    # Room for all of a batch (taken together on PostgreSQL), then a batch that reaches the maxima.
    @example(steps=[(0, n, 1, n % 2) for n in range(6)] + [(1, n, 2, 2) for n in range(3)], cut=9)
    @example(steps=[(c, n, 4, n % 3) for n in range(8) for c in range(3)], cut=12)
    def test_same_outcomes_same_ledger_same_counters(
        self,
        ledger_engine: Engine,
        billing_config_file: Any,
        steps: list[tuple[int, int, int, int]],
        cut: int,
    ) -> None:
        billing_config_file(TIGHT_LIMITS)
        prefix = unique("L")
        worlds = {side: _world(f"{prefix}{side}") for side in ("b", "s")}

        def items(side: str) -> list[ConsumeInput]:
            customers = worlds[side][0]
            return [
                ConsumeInput(customers[c], f"{prefix}{side}-r{r}", units=units,
                             usage=UsageInput(feature="chat", user_id=None if u == 2 else f"u{u}"))
                for c, r, units, u in steps
            ]  # fmt: skip

        # One call per customer and user alone opens the day's counters (as a window's first calls do), so the
        # batches meet counters that exist: room for the whole batch, or not.
        for side in ("b", "s"):
            _one_by_one([
                ConsumeInput(customer, f"{prefix}{side}-open-{c}-{u}", units=1,
                             usage=UsageInput(feature="chat", user_id=None if u == 2 else f"u{u}"))
                for c, customer in enumerate(worlds[side][0][:3]) for u in range(3)
            ])  # fmt: skip
        batched: list[Any] = []
        for start in range(0, len(steps), cut):
            batched.extend(consume_batch(items("b")[start : start + cut]))
        single = _one_by_one(items("s"))

        def normal(outcome: Any, grants: dict[str, list[int]]) -> tuple[Any, ...]:
            if isinstance(outcome, LimitExceeded):
                return ("LimitExceeded", outcome.limit, outcome.used, outcome.maximum)
            return _normal(outcome, grants)

        assert [normal(o, worlds["b"][1]) for o in batched] == [normal(o, worlds["s"][1]) for o in single]
        assert _state(worlds["b"][0]) == _state(worlds["s"][0])
        assert _counters(worlds["b"][0]) == _counters(worlds["s"][0])
        with unit_of_work() as session:
            assert check_ledger(session) == []


def _counters(customers: list[str]) -> list[tuple[Any, ...]]:
    """Each limit counter of these customers, names taken out: (limit, customer index, scope, requests, units)."""
    with unit_of_work() as session:
        rows = session.execute(
            select(LimitCounter.limit_name, LimitCounter.scope_value, LimitCounter.requests, LimitCounter.units)
        ).all()
    found = []
    for name, scope_value, requests, units in rows:
        owner, _, scope = scope_value.partition("/")
        if owner in customers:
            found.append((name, customers.index(owner), scope, requests, units))
    return sorted(found)


# A counter per customer (requests a day) and one per user (units a day).
TWO_LIMITS = """
[[limits]]
name = "requests-per-customer"
window = "day"
max_requests = 100

[[limits]]
name = "units-per-user"
scope = "user"
window = "day"
max_units = 50
"""


@pytest.mark.postgres
class TestBatchTakesCountersTogether:
    """ledger_consume_many adds a batch's sums to the counters of every customer all of whose counters stay below
    their maxima; a customer with a counter that does not (new, or the batch would reach its maximum) gets back
    what its other counters took, and its items go one by one. Worked by hand: the counters after each batch."""

    def test_a_new_counter_or_a_full_one_sends_only_its_customer_item_by_item(
        self, pg_engine: Engine, billing_config_file: Any
    ) -> None:
        billing_config_file(TWO_LIMITS)
        a, b = unique("A"), unique("B")
        with unit_of_work() as session:
            for customer in (a, b):
                grant_credits(session, customer, units=100, source=GrantSource.TOP_UP,
                              idempotency_key=f"{customer}-g")  # fmt: skip

        def call(customer: str, n: int, user: str, units: int) -> ConsumeInput:
            return ConsumeInput(customer, f"{customer}-{n}", units=units, usage=UsageInput(user_id=user))

        # The day's counters of a, a/u1, b and b/u1 exist, each at one request and one unit.
        _one_by_one([call(a, 0, "u1", 1), call(b, 0, "u1", 1)])
        # a's u2 has no counter yet: a goes item by item (its two counters taken set-wise are given back first);
        # b's counters take its items together.
        outcomes = consume_batch([call(a, 1, "u1", 3), call(b, 1, "u1", 5), call(a, 2, "u2", 4), call(b, 2, "u1", 6)])
        assert [(o.units, o.balance_after) for o in outcomes] == [(3, 96), (5, 94), (4, 92), (6, 88)]
        assert _counts(a, b) == {
            ("requests-per-customer", a): (3, 8), ("units-per-user", f"{a}/user:u1"): (2, 4),
            ("units-per-user", f"{a}/user:u2"): (1, 4),
            ("requests-per-customer", b): (3, 12), ("units-per-user", f"{b}/user:u1"): (3, 12),
        }  # fmt: skip
        # b/u1 at 12 units: 39 more would reach its maximum (51 > 50: refused one by one), so b's request counter
        # gives back what the batch took; a's counters (all below their maxima) take a's item together.
        outcomes = consume_batch([call(a, 3, "u1", 2), call(b, 3, "u1", 39)])
        assert (outcomes[0].units, outcomes[0].balance_after) == (2, 90)
        refused = outcomes[1]
        assert isinstance(refused, LimitExceeded)
        assert (refused.limit, refused.used, refused.maximum) == ("units-per-user", 12, 50)
        assert _counts(a, b) == {
            ("requests-per-customer", a): (4, 10), ("units-per-user", f"{a}/user:u1"): (3, 6),
            ("units-per-user", f"{a}/user:u2"): (1, 4),
            ("requests-per-customer", b): (3, 12), ("units-per-user", f"{b}/user:u1"): (3, 12),
        }  # fmt: skip
        with unit_of_work() as session:
            assert check_ledger(session) == []


def _counts(*customers: str) -> dict[tuple[str, str], tuple[int, int]]:
    """(limit, scope value) -> (requests, units) of these customers' counters."""
    with unit_of_work() as session:
        rows = session.execute(
            select(LimitCounter.limit_name, LimitCounter.scope_value, LimitCounter.requests, LimitCounter.units)
        ).all()
    return {(n, s): (r, u) for n, s, r, u in rows if s.partition("/")[0] in customers}
