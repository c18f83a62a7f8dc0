"""Provider costs are exact Decimals on every backend, in rows and in SQL sums."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import Session

from ledger.models import Account, UsageRecord


class TestUsdAmount:
    def test_rows_and_sums_are_exact(self, engine: Engine) -> None:
        # Amounts whose binary float forms do not add up exactly: 0.1 + 0.2 != 0.3 as floats.
        costs = [Decimal("0.1"), Decimal("0.2"), Decimal("4.127775"), Decimal("0.0000000001"), Decimal("123456.789")]
        with Session(engine) as session, session.begin():
            account = Account(customer_id="cus_money")
            session.add(account)
            session.flush()
            session.add_all(
                UsageRecord(account_id=account.id, request_id=f"r{i}", provider_cost_usd=c) for i, c in enumerate(costs)
            )
        with Session(engine) as session:
            stored = session.scalars(select(UsageRecord.provider_cost_usd).order_by(UsageRecord.id)).all()
            total = session.scalar(select(func.sum(UsageRecord.provider_cost_usd)))
        assert stored == costs
        assert all(isinstance(v, Decimal) for v in stored)
        assert total == Decimal("123461.2167750001")

    def test_a_float_is_refused(self, sqlite_engine: Engine) -> None:
        with Session(sqlite_engine) as session, session.begin():
            account = Account(customer_id="cus_float")
            session.add(account)
            session.flush()
            session.add(UsageRecord(account_id=account.id, request_id="f", provider_cost_usd=0.1))  # type: ignore[arg-type]
            with pytest.raises(StatementError, match="not float"):
                session.flush()
