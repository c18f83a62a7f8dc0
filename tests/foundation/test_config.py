"""Settings and the billing config file: validated once, with errors that name the field."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ledger.config import EXAMPLE_CONFIG_PATH, ConfigError, PeriodEnd, load_billing_config
from ledger.settings import Settings
from worker.cli import app


class TestBillingConfig:
    def test_shipped_example_is_valid(self) -> None:
        config = load_billing_config(EXAMPLE_CONFIG_PATH)
        assert config.operations["image"] == 20
        assert config.plan_for_price("price_team_monthly").period_end is PeriodEnd.ROLLOVER  # type: ignore[union-attr]
        price = config.model_price("gpt-4o-2024-08-06", "openai")
        assert price is not None and price.cost_per_million_input_usd == Decimal("2.50")

    def test_decimals_never_pass_through_float(self, billing_config_file: Callable[[str], Path]) -> None:
        path = billing_config_file(
            '[[models]]\nprovider = "openai"\nmodel = "m"\n'
            'credits_per_million_input = "0.1"\ncredits_per_million_output = "0.7"\n'
            'cost_per_million_input_usd = "0.000000001"\n'
        )
        price = load_billing_config(path).model_price("m")
        assert price is not None
        assert price.credits_per_million_input == Decimal("0.1")
        assert price.cost_per_million_input_usd == Decimal("0.000000001")

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ('[[packs]]\nprice = "p"\ncredits = -5\n', "packs.0.credits"),
            ('[[plans]]\nprice = "p"\ncredits_per_period = 10\nperiod_end = "sometimes"\n', "plans.0.period_end"),
            ("[operations]\ntext = -1\n", "operations.text"),
            ('[[packs]]\nprice = "p"\ncredits = 1\n[[packs]]\nprice = "p"\ncredits = 2\n', "packs.price"),
            ('[credits]\nfallback_credits_per_minor_unit = "x"\n', "credits.fallback_credits_per_minor_unit"),
            ("[unknown]\nx = 1\n", "unknown"),
        ],
    )
    def test_invalid_field_is_named(self, billing_config_file: Callable[[str], Path], body: str, field: str) -> None:
        path = billing_config_file(body)
        with pytest.raises(ConfigError) as info:
            load_billing_config(path)
        assert field in str(info.value)
        assert str(path) in str(info.value)

    def test_not_toml_is_a_clear_error(self, billing_config_file: Callable[[str], Path]) -> None:
        path = billing_config_file("this is = = not toml")
        with pytest.raises(ConfigError, match="not valid TOML"):
            load_billing_config(path)


class TestStartup:
    def test_bad_config_exits_2_naming_the_field(self, billing_config_file: Callable[[str], Path]) -> None:
        billing_config_file('[[packs]]\nprice = "p"\ncredits = 0\n')
        result = CliRunner().invoke(app, ["migrate"])
        assert result.exit_code == 2
        assert "packs.0.credits" in result.output

    def test_missing_config_file_exits_2(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        monkeypatch.setenv("BILLING_CONFIG", str(tmp_path / "absent.toml"))
        result = CliRunner().invoke(app, ["migrate"])
        assert result.exit_code == 2
        assert "file not found" in result.output

    def test_bad_setting_exits_2(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("STRIPE_WEBHOOK_TOLERANCE_SECONDS", "soon")
        result = CliRunner().invoke(app, ["migrate"])
        assert result.exit_code == 2
        assert "STRIPE_WEBHOOK_TOLERANCE_SECONDS" in result.output  # the variable a person sets


class TestSettings:
    def test_comma_separated_secrets(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("STRIPE_WEBHOOK_SECRETS", "whsec_a, whsec_b")
        monkeypatch.setenv("API_TOKENS", "t1")
        settings = Settings()
        assert [s.get_secret_value() for s in settings.stripe_webhook_secrets] == ["whsec_a", "whsec_b"]
        assert [s.get_secret_value() for s in settings.api_tokens] == ["t1"]

    def test_secrets_do_not_leak_into_repr(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("STRIPE_API_KEY", "sk_live_verysecret")
        assert "verysecret" not in repr(Settings())

    def test_default_is_embedded_sqlite(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("DATABASE_URL", raising=False)
        settings = Settings()
        assert settings.database_url.startswith("sqlite")
        assert not settings.is_postgres


class TestLogging:
    def test_credentials_are_redacted(self, capsys: pytest.CaptureFixture[str]) -> None:
        from ledger.logs import configure_logging, get_logger

        configure_logging("INFO", json=True)
        get_logger("t").info("calling stripe", key="sk_live_abc123", header="Bearer tok_1", secret="whsec_zz9")
        err = capsys.readouterr().err
        assert "calling stripe" in err
        assert "sk_live_abc123" not in err and "tok_1" not in err and "whsec_zz9" not in err
        assert err.count("[redacted]") == 3
