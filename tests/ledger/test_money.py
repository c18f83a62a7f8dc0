"""Money formatting, checked against hand-worked examples from Stripe's currency docs
(https://docs.stripe.com/currencies): the expected strings are written out by hand, not computed."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from ledger.config import ConfigError, load_billing_config
from ledger.money import (
    THREE_DECIMAL,
    ZERO_DECIMAL,
    exponent,
    format_amount,
    format_credits,
    format_money,
    format_usd,
    to_major,
    to_minor,
)


class TestExponent:
    def test_stripe_lists(self) -> None:
        # The sixteen zero-decimal and five three-decimal currencies of Stripe's page, typed from the page.
        page_zero = "bif clp djf gnf jpy kmf krw mga pyg rwf ugx vnd vuv xaf xof xpf"
        page_three = "bhd jod kwd omr tnd"
        assert set(page_zero.split(" ")) == ZERO_DECIMAL
        assert set(page_three.split(" ")) == THREE_DECIMAL

    @pytest.mark.parametrize(
        ("currency", "places"),
        [("usd", 2), ("EUR", 2), ("jpy", 0), ("KRW", 0), ("kwd", 3), ("bhd", 3), ("xyz", 2), (None, 2)],
    )
    def test_places(self, currency: str | None, places: int) -> None:
        assert exponent(currency) == places


class TestFormatMoney:
    @pytest.mark.parametrize(
        ("minor", "currency", "shown"),
        [
            # "to charge 10 USD, provide an amount value of 1000 (that is, 1000 cents)"
            (1000, "usd", "$10.00"),
            # "to charge ¥500, provide an amount value of 500"
            (500, "jpy", "JPY 500"),
            # "to charge 5.124 KWD, provide an amount value of 5124"
            (5124, "kwd", "KWD 5.124"),
            (5120, "kwd", "KWD 5.120"),
            (1, "usd", "$0.01"),
            (99, "eur", "EUR 0.99"),
            (123456789, "eur", "EUR 1,234,567.89"),
            (123456789, "jpy", "JPY 123,456,789"),
            (1000000, "krw", "KRW 1,000,000"),
            (-1999, "usd", "-$19.99"),
            (-500, "jpy", "JPY -500"),
            (7, "omr", "OMR 0.007"),
            (0, "gbp", "GBP 0.00"),
            # Reconciliation stores amounts as Numeric(30, 10): the trailing zeros must not leak.
            (Decimal("1000.0000000000"), "usd", "$10.00"),
            ("2500", "USD", "$25.00"),
        ],
    )
    def test_examples(self, minor: object, currency: str, shown: str) -> None:
        assert format_money(minor, currency) == shown

    def test_missing_values_and_currencies(self) -> None:
        assert format_money(None, "usd") == "—"
        assert format_money(1000, None) == "(currency unknown) 10.00"
        assert format_money("n/a", "usd") == "n/a"


class TestConversions:
    @pytest.mark.parametrize(
        ("minor", "currency", "major"),
        [(1000, "usd", "10.00"), (500, "jpy", "500"), (5124, "kwd", "5.124"), (-1, "eur", "-0.01")],
    )
    def test_round_trip(self, minor: int, currency: str, major: str) -> None:
        assert to_major(minor, currency) == Decimal(major)
        assert to_minor(Decimal(major), currency) == minor

    def test_to_minor_rounds_half_to_even(self) -> None:
        assert to_minor(Decimal("12.345"), "usd") == 1234
        assert to_minor(Decimal("12.355"), "usd") == 1236
        assert to_minor(Decimal("499.5"), "jpy") == 500


class TestFormatUsdAndCredits:
    @pytest.mark.parametrize(
        ("value", "shown"),
        [
            (Decimal("12.5"), "$12.50"),
            (Decimal("1234567.891"), "$1,234,567.89"),
            (Decimal("0.000375"), "$0.0004"),  # a sub-cent provider cost keeps four decimals
            (Decimal("0.0123"), "$0.0123"),
            (Decimal("0.00001"), "<$0.0001"),  # not zero: says it is smaller than shown
            (Decimal("-3.14159"), "-$3.14"),
            (Decimal("0E-10"), "$0.00"),
        ],
    )
    def test_usd(self, value: Decimal, shown: str) -> None:
        assert format_usd(value) == shown

    def test_usd_fixed_places(self) -> None:
        assert format_usd(Decimal("0.01"), 6) == "$0.010000"

    def test_credits(self) -> None:
        assert format_credits(1234567) == "1,234,567"
        assert format_credits(Decimal("12000.0000000000"), label=True) == "12,000 credits"
        assert format_credits(-50) == "-50"
        assert format_credits(None) == "—"


class TestFormatAmount:
    @pytest.mark.parametrize(
        ("value", "unit", "currency", "shown"),
        [
            (Decimal("1000.0000000000"), "minor", "usd", "$10.00"),
            (Decimal("1000.0000000000"), "minor", "jpy", "JPY 1,000"),
            (Decimal("12000"), "credits", None, "12,000 credits"),
            (Decimal("1500000"), "tokens", None, "1,500,000 tokens"),
            (Decimal("12.5000000000"), "usd", "usd", "$12.50"),
            (Decimal("2"), "count", None, "2"),
            (None, "minor", "usd", "—"),
        ],
    )
    def test_units(self, value: Decimal | None, unit: str, currency: str | None, shown: str) -> None:
        assert format_amount(value, unit, currency) == shown


class TestMoneyConfig:
    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ('[reconciliation]\nsettlement_currency = "US dollars"', "reconciliation.settlement_currency"),
            ('[reconciliation]\nfree_credit_allowance_usd = "-1"', "reconciliation.free_credit_allowance_usd"),
            (
                '[[plans]]\nprice = "p"\ncredits_per_period = 1\nfree_credit_allowance_usd = "-0.01"',
                "plans.0.free_credit_allowance_usd",
            ),
        ],
    )
    def test_bad_values_name_the_field(self, tmp_path: Path, body: str, field: str) -> None:
        path = tmp_path / "billing.toml"
        path.write_text(body, encoding="utf-8")
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_billing_config(path)


class TestWhereMoneyIsShown:
    def test_the_ledger_cli_shows_credits_with_separators_and_json_keeps_integers(self, engine: object) -> None:
        import json

        from typer.testing import CliRunner

        from worker.cli import app

        runner = CliRunner()
        granted = runner.invoke(
            app, ["grant", "cus_big", "--units", "1234567", "--reason", "test", "--idempotency-key", "big"]
        )
        assert granted.exit_code == 0, granted.output
        assert "granted 1,234,567 to cus_big: balance 1,234,567" in granted.stdout
        shown = runner.invoke(app, ["balance", "cus_big"])
        assert "balance    1,234,567" in shown.stdout
        assert json.loads(runner.invoke(app, ["balance", "cus_big", "--json"]).stdout)["balance"] == 1234567

    def test_the_demo_tables_show_money_and_credits_as_people_read_them(self) -> None:
        import io
        from types import SimpleNamespace

        from rich.console import Console

        from worker.demo.report import print_summary

        summary = {
            "customers": [
                {"customer_id": "cus_1", "name": "Ada", "balance": 12000, "held": 0, "debt": 1500, "available": 12000,
                 "access_state": "active", "usage_allowed": True},
            ],
            "usage_by_model": [
                {"model": "gpt-4o", "requests": 1200, "input_tokens": 1500000, "output_tokens": 20000,
                 "credits": 13000, "provider_cost_usd": "0.000375"},
            ],
            "reconciliation": {
                "runs": [],
                "mismatches": [
                    {"id": 1, "kind": "payment_without_grant", "customer_id": "cus_1", "expected": "1000",
                     "actual": "0", "unit": "credits", "currency": "usd", "summary": "s", "evidence": "e"},
                    {"id": 2, "kind": "customer_total_mismatch", "customer_id": "cus_1", "expected": "500",
                     "actual": "0", "unit": "minor", "currency": "jpy", "summary": "s", "evidence": "e"},
                ],
            },
            "ai_calls": [],
            "deliberate": [],
            "ledger_check": {"violations": []},
            "urls": {"review": "r", "usage_api": "u", "openapi": "o", "stripe_emulator": "s"},
            "review_login": {"user": "u", "password": "p"},
            "api_token": "t",
            "database_url": "d",
        }  # fmt: skip
        out = io.StringIO()
        print_summary(Console(file=out, width=200), summary, SimpleNamespace(customers=[]))  # type: ignore[arg-type]
        text = out.getvalue()
        assert "12,000" in text and "1,500" in text and "1,500,000" in text and "13,000" in text
        assert "$0.0004" in text and "1,000 credits" in text and "JPY 500" in text
