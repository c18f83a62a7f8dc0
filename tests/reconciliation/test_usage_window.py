"""The usage of a window, as the margin and provider checks read it: whole days from the daily roll-up, the
partial days at either end from the usage rows. It must equal the usage rows of the window, whatever the window."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from ledger.accounts import open_account
from ledger.db import session_factory
from ledger.grants import grant_credits
from ledger.models import Account, Grant, GrantSource, UsageEnvironment, UsageRecord
from reconciliation.checks import margin_candidates
from reconciliation.usage import usage_in_window, whole_days

DAY0 = datetime(2026, 3, 1, tzinfo=UTC)
# Usage every 5 hours 7 minutes over four days, both sides of each midnight, in three environments.
TIMES = [DAY0 - timedelta(hours=3) + timedelta(minutes=307 * i) for i in range(22)]


def _load() -> dict[str, int]:
    """Two accounts' usage rows at TIMES; returns their account ids by customer."""
    with session_factory().begin() as s:
        for customer in ("cus_a", "cus_b"):
            open_account(s, customer)
        s.flush()
        accounts = {c: i for c, i in s.execute(select(Account.customer_id, Account.id))}
        for i, at in enumerate(TIMES):
            s.add(
                UsageRecord(
                    account_id=accounts["cus_a" if i % 3 else "cus_b"],
                    request_id=f"w{i}",
                    provider="openai",
                    model=None if i % 4 == 0 else "gpt-4o-2024-08-06",
                    feature="chat",
                    input_tokens=100 + i,
                    units=i,
                    provider_cost_usd=Decimal("0.0000000007") * (i + 1),
                    billable=i % 5 != 0,
                    environment=list(UsageEnvironment)[i % 3],
                    occurred_at=at,
                )
            )
    return accounts


def _from_rows(session: Session, since: datetime, until: datetime, account_id: int | None) -> dict[Any, Any]:
    out: dict[Any, list[Any]] = defaultdict(lambda: [0, 0, Decimal(0)])
    for u in session.scalars(select(UsageRecord)):
        at = u.occurred_at if u.occurred_at.tzinfo else u.occurred_at.replace(tzinfo=UTC)
        if since <= at < until and account_id in (None, u.account_id):
            sums = out[(u.account_id, u.model, u.environment, u.billable)]
            sums[0] += 1
            sums[1] += u.units
            sums[2] += u.provider_cost_usd
    return {k: tuple(v) for k, v in out.items()}


def _from_window(session: Session, since: datetime, until: datetime, account_id: int | None) -> dict[Any, Any]:
    w = usage_in_window(session, since, until, account_id=account_id)
    keys = (w.c.account_id, w.c.model, w.c.environment, w.c.billable)
    stmt = select(*keys, func.sum(w.c.requests), func.sum(w.c.units), func.sum(w.c.provider_cost_usd)).group_by(*keys)
    return {(a, m, e, b): (n, u, c) for a, m, e, b, n, u, c in session.execute(stmt)}


WINDOWS = [
    (DAY0, DAY0 + timedelta(days=2)),  # whole days only
    (DAY0 - timedelta(hours=2), DAY0 + timedelta(days=1, hours=7)),  # partial days at both ends
    (DAY0 + timedelta(hours=1), DAY0 + timedelta(hours=20)),  # inside one day
    (DAY0 - timedelta(hours=5), DAY0 + timedelta(hours=3)),  # across one midnight, no whole day
    (DAY0 + timedelta(hours=9), DAY0 + timedelta(days=3)),  # partial start, whole days to the end
    (DAY0 - timedelta(days=1), DAY0 + timedelta(days=5)),  # everything
]


class TestUsageInWindow:
    def test_whole_days_of_a_window(self) -> None:
        assert whole_days(DAY0, DAY0 + timedelta(days=2)) == (DAY0.date(), DAY0.date() + timedelta(days=2))
        first, end = whole_days(DAY0 + timedelta(seconds=1), DAY0 + timedelta(days=1, hours=1))
        assert (first, end) == (DAY0.date() + timedelta(days=1), DAY0.date() + timedelta(days=1))

    @pytest.mark.parametrize(("since", "until"), WINDOWS)
    def test_equals_the_usage_rows_of_the_window(self, engine: Engine, since: datetime, until: datetime) -> None:
        accounts = _load()
        with Session(engine) as s:
            for account_id in (None, accounts["cus_a"]):
                expected = _from_rows(s, since, until, account_id)
                assert expected, "the window should hold usage"
                assert _from_window(s, since, until, account_id) == expected


class TestMarginCandidates:
    def test_only_accounts_near_or_below_cost_leave_the_database(self, engine: Engine) -> None:
        with session_factory().begin() as s:
            ids = {}
            for customer, cost in (("cus_healthy", "0.0045"), ("cus_thin", "0.00995"), ("cus_loss", "0.02")):
                # $10 for 1,000 credits: a credit is worth $0.01; each call below charges one credit.
                grant = grant_credits(
                    s,
                    customer,
                    units=1_000,
                    source=GrantSource.TOP_UP,
                    idempotency_key=f"topup:{customer}",
                    amount_minor=1_000,
                    currency="usd",
                )
                ids[customer] = s.get_one(Grant, grant.grant_id).account_id
                s.add_all(
                    UsageRecord(
                        account_id=ids[customer],
                        request_id=f"{customer}-{i}",
                        provider="openai",
                        model="gpt-4o-2024-08-06",
                        provider_cost_usd=Decimal(cost),
                        units=1,
                        occurred_at=DAY0 + timedelta(hours=i),
                    )
                    for i in range(30)
                )
        with Session(engine) as s:
            found = {
                row.account_id for row in margin_candidates(s, DAY0 - timedelta(hours=3), DAY0 + timedelta(days=2))
            }
        # Within 1% of the revenue counts (Python decides exactly); far below it does not leave the database.
        assert found == {ids["cus_thin"], ids["cus_loss"]}
