"""The revenue page: the roll-forward per month and currency, its waterfall chart, and bad parameters."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlalchemy.orm import Session
from starlette.testclient import TestClient

from ledger.consume import consume
from ledger.grants import grant_credits
from ledger.models import GrantSource


def _seed(engine: Engine) -> None:
    with Session(engine) as s, s.begin():
        grant_credits(
            s, "cus_rev", units=1000, source=GrantSource.TOP_UP, idempotency_key="g1", amount_minor=1000, currency="usd"
        )
        grant_credits(
            s, "cus_jpy", units=100, source=GrantSource.TOP_UP, idempotency_key="g2", amount_minor=5000, currency="jpy"
        )
        grant_credits(s, "cus_rev", units=50, source=GrantSource.PROMOTION, idempotency_key="p1")
    with Session(engine) as s, s.begin():
        consume(s, "cus_rev", request_id="r1", units=300)  # drawn from the older grant at equal priority: the top-up


class TestRevenuePage:
    def test_months_currencies_and_the_chart(self, engine: Engine, signed_in: TestClient) -> None:
        _seed(engine)
        html = signed_in.get("/review/revenue").text
        assert "<svg" in html and "USD" in html and "JPY" in html
        assert "$10.00" in html and "JPY 5,000" in html  # sold this month
        assert "Does not tie" not in html
        usd = html.split("<h2>USD</h2>")[1].split("</table>")[0]
        # 300 of the $10.00 top-up's 1,000 credits spent: $3.00 recognized, $7.00 still deferred.
        assert "$3.00" in usd and "$7.00" in usd

    def test_bad_parameters_are_400(self, engine: Engine, signed_in: TestClient) -> None:
        assert signed_in.get("/review/revenue?from=2026-13").status_code == 400
        assert signed_in.get("/review/revenue?from=2026-05&to=2026-01").status_code == 400
        assert signed_in.get("/review/revenue?from=2020-01&to=2026-01").status_code == 400
        assert signed_in.get("/review/revenue?from=x%00").status_code == 400
        for edge in ("to=9999-12", "from=0001-01&to=0001-02", "to=%EF%BC%92%EF%BC%90%EF%BC%92%EF%BC%96-01"):
            assert signed_in.get(f"/review/revenue?{edge}").status_code == 400, edge


class TestCustomerNetMargin:
    def test_the_customer_page_shows_revenue_net_of_fees_beside_gross(
        self, engine: Engine, signed_in: TestClient
    ) -> None:
        from tests.review.conftest import seed

        seed(engine)
        html = signed_in.get("/review/customers/cus_alpha").text
        usage = html.split('id="usage"')[1]
        assert "Net revenue" in usage and "Net margin" in usage and "after Stripe's fees" in usage


class TestPayoutList:
    def test_payouts_with_their_tie_out_from_the_payouts_table(self, engine: Engine, signed_in: TestClient) -> None:
        from datetime import UTC, datetime

        from reconciliation.payouts import record_payouts

        now = datetime.now(UTC)
        charges = {"charge": {"count": 1, "amount": 1000, "fee": 59, "net": 941}}
        payouts = [
            {"payout": "po_ok", "amount": 941, "currency": "usd", "status": "paid", "created": now.isoformat(),
             "arrival_date": int(now.timestamp()), "transactions": 1, "net": 941, "by_type": charges,
             "differences": 0, "tie_out": "ties"},
            {"payout": "po_bad", "amount": 1041, "currency": "usd", "status": "in_transit",
             "created": now.isoformat(), "transactions": 1, "net": 941, "by_type": charges, "differences": 1,
             "tie_out": "differs"},
            {"payout": "po_failed", "amount": 500, "currency": "usd", "status": "failed", "created": now.isoformat(),
             "tie_out": "not_checked"},
        ]  # fmt: skip
        with Session(engine) as s, s.begin():
            record_payouts(s, 7, payouts, now=now)
        html = signed_in.get("/review/revenue").text.split('id="payouts"')[1]
        assert "po_ok" in html and "ties" in html and "$9.41" in html and "charge 1: $9.41" in html
        assert "po_bad" in html and "1 difference" in html and "$10.41" in html and "in_transit" in html
        assert "po_failed" in html and "not checked (failed)" in html
        assert 'href="/review/mismatches?kind=payout_mismatch&amp;run=7"' in html
