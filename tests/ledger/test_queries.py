"""The read side: balance summary, entries, usage summary."""

from __future__ import annotations

from decimal import Decimal

import pytest
from factories import make_account, make_consume, make_grant, make_hold, make_usage
from sqlalchemy import Engine

from ledger.accounts import set_overdraft_limit
from ledger.db import unit_of_work
from ledger.errors import UnknownCustomer
from ledger.models import EntryKind, UsageEnvironment
from ledger.queries import balance_summary, list_entries, usage_summary


class TestBalanceSummary:
    def test_reports_balance_held_debt_and_live_grants(self, engine: Engine) -> None:
        customer = make_account()
        spent = make_grant(customer_id=customer, units=10, priority=5)
        live = make_grant(customer_id=customer, units=100)
        make_consume(customer_id=customer, units=15)
        make_hold(customer_id=customer, units=20)
        with unit_of_work() as session:
            set_overdraft_limit(session, customer, 7)

        with unit_of_work() as session:
            summary = balance_summary(session, customer)

        assert (summary.balance, summary.held, summary.debt, summary.available) == (75, 20, 0, 82)
        assert summary.usage_allowed and summary.access_state == "active"
        assert [g.grant_id for g in summary.grants] == [live.grant_id]
        assert spent.grant_id not in [g.grant_id for g in summary.grants]

    def test_unknown_customer_raises(self, engine: Engine) -> None:
        with pytest.raises(UnknownCustomer), unit_of_work() as session:
            balance_summary(session, "cus_none")


class TestListEntries:
    def test_newest_first_with_a_cursor(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)
        for _ in range(4):
            make_consume(customer_id=customer, units=1)

        with unit_of_work() as session:
            page = list_entries(session, customer, limit=3)
            rest = list_entries(session, customer, limit=3, before_id=page[-1].id)

        assert [e.balance_after for e in page] == [96, 97, 98]
        assert [(e.kind, e.balance_after) for e in rest] == [(EntryKind.CONSUME, 99), (EntryKind.GRANT, 100)]


class TestUsageSummary:
    def test_groups_by_feature_with_cost_and_margin(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=1000)
        chat = make_usage(feature="chat", input_tokens=1_000_000, provider_cost_usd=Decimal("2.5"))
        search = make_usage(feature="search", output_tokens=100_000)
        free = make_usage(feature="chat", output_tokens=100_000, environment=UsageEnvironment.TEST)
        for usage in (chat, search, free):
            make_consume(customer_id=customer, units=None, usage=usage)

        with unit_of_work() as session:
            rows = usage_summary(session, customer, since=None, until=None, group_by="feature")

        by_key = {r.key: r for r in rows}
        assert set(by_key) == {"chat", "search"}
        assert (by_key["chat"].requests, by_key["chat"].credits, by_key["chat"].output_tokens) == (2, 500, 100_000)
        assert by_key["search"].credits == 200 and by_key["search"].provider_cost_usd == Decimal("1.0")
        # 500 credits at 1 credit per cent = $5.00; the chat rows cost $2.50 + $1.00 (list price of the free one).
        assert by_key["chat"].margin == Decimal("5") - by_key["chat"].provider_cost_usd

    @pytest.mark.parametrize("group_by", ["day", "model", "user"])
    def test_other_groupings_count_every_request(self, engine: Engine, group_by: str) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=1000)
        for _ in range(3):
            make_consume(customer_id=customer, units=None, usage=make_usage(model=None, operation="text"))

        with unit_of_work() as session:
            rows = usage_summary(session, customer, since=None, until=None, group_by=group_by)  # type: ignore[arg-type]

        assert [(r.requests, r.credits) for r in rows] == [(3, 3)]
