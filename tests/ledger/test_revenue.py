"""The deferred revenue roll-forward: hand-worked figures with rounding carried, and a generated month in three
currencies that ties to the cent every day against the grants' own state."""

from __future__ import annotations

import contextlib
import csv
import json
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from ledger.clawback import clawback, freeze_grant, unfreeze_grant
from ledger.consume import consume
from ledger.db import session_factory
from ledger.errors import InsufficientCredits, UnknownCustomer
from ledger.grants import expire_grants, grant_credits
from ledger.models import Entry, Grant, GrantSource
from ledger.revenue import Line, Period, revenue_report, verify

START = (datetime.now(UTC) - timedelta(days=40)).replace(hour=0, minute=0, second=0, microsecond=0)


def _day(n: int) -> datetime:
    return START + timedelta(days=n, hours=12)


def _on(day: int, work: Callable[[Session], object]) -> object:
    """Run ``work`` in one unit of work and date what it wrote (grants, entries) on ``day``."""
    with session_factory().begin() as s:
        last_entry = s.scalar(select(func.max(Entry.id))) or 0
        last_grant = s.scalar(select(func.max(Grant.id))) or 0
        result = work(s)
        s.flush()
        s.execute(update(Entry).where(Entry.id > last_entry).values(created_at=_day(day)))
        s.execute(update(Grant).where(Grant.id > last_grant).values(created_at=_day(day)))
    return result


def _grant(customer: str, units: int, amount: int | None, currency: str | None, key: str, **kw: object) -> int:
    def work(s: Session) -> int:
        source = kw.pop("source", GrantSource.TOP_UP)
        return grant_credits(
            s,
            customer,
            units=units,
            source=source,  # type: ignore[arg-type]
            idempotency_key=key,
            amount_minor=amount,
            currency=currency,
            **kw,  # type: ignore[arg-type]
        ).grant_id

    return work  # type: ignore[return-value]


def _lines(lines: list[Line], currency: str) -> dict[int, Line]:
    return {(x.period_start - START).days: x for x in lines if x.currency == currency}


class TestRollForward:
    def test_hand_worked_figures_tie_to_the_cent(self, engine: Engine) -> None:
        usd = _on(0, _grant("cus_a", 3000, 1000, "usd", "usd"))
        eur = _on(0, _grant("cus_b", 1000, 1000, "eur", "eur"))
        _on(0, _grant("cus_c", 500, 5000, "jpy", "jpy"))
        _on(0, _grant("cus_d", 200, None, None, "promo", source=GrantSource.PROMOTION))
        for day, n in ((1, 1), (2, 1), (3, 1), (4, 1500)):
            _on(day, lambda s, d=day, n=n: consume(s, "cus_a", request_id=f"a{d}", units=n))
        _on(2, lambda s: clawback(s, eur, units=400, idempotency_key="refund", reason="refund"))
        _on(3, lambda s: consume(s, "cus_c", request_id="c3", units=100))
        _on(3, lambda s: consume(s, "cus_d", request_id="d3", units=50))

        def lapse(s: Session) -> int:
            s.execute(update(Grant).where(Grant.id == usd).values(expires_at=_day(5) - timedelta(hours=1)))
            return expire_grants(s, now=_day(5))

        _on(5, lapse)

        with Session(engine) as s:
            report = revenue_report(s, since=START, until=datetime.now(UTC) + timedelta(days=1), by=Period.DAY)
            assert verify(s, report) == []
        a = _lines(report.money, "usd")
        # $10.00 for 3,000 credits: a credit is a third of a cent, so the first two are worth nothing and the
        # third a cent; 1,500 more take the cumulative worth to floor(1,503 x 1000 / 3000) = 501; the 1,497 that
        # expire are the remaining 499 cents of breakage. 0 + 0 + 1 + 500 + 499 = 1000.
        assert a[0].sold == 1000 and [a[d].recognized for d in (1, 2, 3, 4)] == [0, 0, 1, 500]
        assert a[5].expired == 499 and a[5].closing == 0 and a[4].closing == 499
        e = _lines(report.money, "eur")
        assert (e[0].sold, e[2].clawed_back, e[2].closing) == (1000, 400, 600)  # EUR 4.00 refunded
        j = _lines(report.money, "jpy")
        assert (j[0].sold, j[3].recognized, j[3].closing) == (5000, 1000, 4000)  # JPY, zero-decimal
        free = {(x.period_start - START).days: x for x in report.free_credits}
        assert (free[0].sold, free[3].recognized, free[3].closing) == (200, 50, 150)

    def test_a_window_starting_later_opens_with_the_balance_carried(self, engine: Engine) -> None:
        _on(0, _grant("cus_a", 1000, 1000, "usd", "g"))
        _on(1, lambda s: consume(s, "cus_a", request_id="r1", units=250))
        with Session(engine) as s:
            report = revenue_report(s, since=_day(2), until=datetime.now(UTC) + timedelta(days=1))
            assert verify(s, report) == []
        assert report.money[0].opening == 750 and report.money[-1].closing == 750

    def test_a_generated_month_ties_every_day(self, engine: Engine) -> None:
        rng = random.Random(17)
        customers = [f"cus_{i}" for i in range(6)]
        prices = {"usd": (1000, 1000), "eur": (900, 1000), "jpy": (1500, 1000)}  # (minor, credits)
        grants: list[tuple[int, str]] = []
        frozen: set[int] = set()
        for day in range(30):
            for _ in range(rng.randint(1, 4)):
                c = rng.choice(customers)
                currency = rng.choice(list(prices))
                minor, credits = prices[currency]
                q = rng.randint(1, 3)
                source = rng.choice([GrantSource.TOP_UP, GrantSource.RENEWAL])
                expires = _day(day + rng.randint(2, 20)) if rng.random() < 0.4 else None
                gid = _on(
                    day,
                    _grant(c, credits * q + rng.randint(0, 7), minor * q, currency, f"g{day}{len(grants)}",
                           source=source, expires_at=expires),
                )  # fmt: skip
                grants.append((int(gid), c))  # type: ignore[call-overload]
            if rng.random() < 0.3:
                _on(day, _grant(rng.choice(customers), 300, 0, "usd", f"trial{day}", source=GrantSource.RENEWAL))
            for c in customers:
                with contextlib.suppress(InsufficientCredits, UnknownCustomer):
                    _on(day, lambda s, c=c, d=day: consume(s, c, request_id=f"u{c}{d}", units=rng.randint(1, 900)))
            if grants and rng.random() < 0.5:
                gid, _c = rng.choice(grants)
                _on(day, lambda s, g=gid, d=day: clawback(s, g, units=rng.randint(1, 500), idempotency_key=f"r{d}",
                                                          reason="refund"))  # fmt: skip
            if grants and rng.random() < 0.3:
                gid, _c = rng.choice(grants)
                if gid not in frozen:
                    frozen.add(gid)
                    _on(day, lambda s, g=gid, d=day: freeze_grant(s, g, idempotency_key=f"f{d}", reason="dispute"))
            if frozen and rng.random() < 0.3:
                gid = sorted(frozen)[0]
                frozen.discard(gid)
                if rng.random() < 0.5:
                    _on(day, lambda s, g=gid, d=day: unfreeze_grant(s, g, idempotency_key=f"w{d}", reason="won"))
                else:
                    _on(day, lambda s, g=gid, d=day: clawback(s, g, units=10_000, idempotency_key=f"l{d}",
                                                              reason="dispute lost"))  # fmt: skip
            _on(day, lambda s, d=day: expire_grants(s, now=_day(d)))

        with Session(engine) as s:
            report = revenue_report(s, since=START, until=datetime.now(UTC) + timedelta(days=1), by=Period.DAY)
            assert verify(s, report) == []  # the last closing balances equal what the grants hold now
            by_month = revenue_report(s, since=START, until=datetime.now(UTC) + timedelta(days=1))
            assert verify(s, by_month) == []
        for currency in prices:
            days = sorted(_lines(report.money, currency).items())
            assert days[0][1].opening == 0
            for (_, before), (_, after) in pairwise(days):
                assert after.opening == before.closing
            moved = sum(x.recognized + x.expired + x.clawed_back + x.adjusted for _, x in days)
            assert sum(x.sold for _, x in days) - moved == days[-1][1].closing
            assert any(x.expired for _, x in days) and any(x.clawed_back for _, x in days)
        assert sum(x.sold for x in report.free_credits) > 0

    def test_bad_window(self, engine: Engine) -> None:
        with Session(engine) as s, pytest.raises(ValueError):
            revenue_report(s, since=START, until=START)


class TestRevenueCommand:
    def test_table_json_and_csv(self, engine: Engine, tmp_path: Path) -> None:
        from worker.cli import app

        _on(0, _grant("cus_a", 1000, 1000, "usd", "g"))
        _on(0, _grant("cus_b", 100, 5000, "jpy", "j"))
        _on(1, lambda s: consume(s, "cus_a", request_id="r1", units=250))
        window = ["--since", START.isoformat(), "--until", (datetime.now(UTC) + timedelta(days=1)).isoformat()]
        runner = CliRunner()
        table = runner.invoke(app, ["revenue", *window])
        assert table.exit_code == 0, table.output
        assert "$10.00" in table.stdout and "$7.50" in table.stdout and "JPY 5,000" in table.stdout
        out = tmp_path / "revenue.csv"
        result = runner.invoke(app, ["revenue", *window, "--by", "day", "--json", "--csv", str(out)])
        assert result.exit_code == 0, result.output
        body = json.loads(result.stdout)
        assert body["ok"] is True and body["problems"] == [] and body["by"] == "day"
        rows = list(csv.DictReader(out.open(encoding="utf-8")))
        usd = [r for r in rows if r["currency"] == "usd"]
        # Exact minor units with their currency: 1000 sold on day 0, 250 recognized on day 1, 750 deferred.
        assert (usd[0]["sold"], usd[1]["recognized"], usd[-1]["closing_deferred"]) == ("1000", "250", "750")
        assert runner.invoke(app, ["revenue", "--since", "2026-01-02", "--until", "2026-01-01"]).exit_code == 2
