"""The ledger's CLI commands, through the root app: output, --json, and every exit code."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from factories import make_account, make_grant, make_hold
from sqlalchemy import Engine, update
from typer.testing import CliRunner, Result

from ledger.accounts import set_access_state
from ledger.cli import EXIT_ACCESS, EXIT_CHECK_FAILED, EXIT_INSUFFICIENT, EXIT_OK, EXIT_UNKNOWN, EXIT_USAGE
from ledger.db import unit_of_work
from ledger.models import AccessState, Account
from worker.cli import app


def run(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def run_json(*args: str) -> tuple[int, dict[str, Any]]:
    result = run(*args, "--json")
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return result.exit_code, json.loads(lines[0])


class TestBalanceCommand:
    def test_shows_the_balance(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=120)

        result = run("balance", customer)

        assert result.exit_code == EXIT_OK and "balance    120" in result.stdout

    def test_json_and_unknown_customer(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=120)

        assert run_json("balance", customer)[1]["balance"] == 120
        code, body = run_json("balance", "cus_nobody")
        assert (code, body["ok"], body["code"]) == (EXIT_UNKNOWN, False, "unknown_customer")


class TestLedgerCommand:
    def test_lists_newest_first_with_a_limit(self, engine: Engine) -> None:
        customer = make_account()
        for _ in range(3):
            make_grant(customer_id=customer, units=10)

        code, body = run_json("ledger", customer, "--limit", "2")

        assert code == EXIT_OK
        assert [e["balance_after"] for e in body["entries"]] == [30, 20]
        assert run("ledger", customer).exit_code == EXIT_OK


class TestGrantCommand:
    def test_grants_once_per_key(self, engine: Engine) -> None:
        args = ("grant", "cus_cli", "--units", "50", "--reason", "goodwill", "--idempotency-key", "adj-1")

        first = run_json(*args, "--expires-at", "2099-01-01T00:00:00Z", "--priority", "2")
        again = run_json(*args, "--expires-at", "2099-01-01T00:00:00Z", "--priority", "2")

        assert first[0] == again[0] == EXIT_OK
        assert (first[1]["replayed"], again[1]["replayed"], again[1]["balance_after"]) == (False, True, 50)

    def test_bad_expiry_is_a_usage_error(self, engine: Engine) -> None:
        code, body = run_json(
            "grant", "cus_cli", "--units", "5", "--reason", "x", "--idempotency-key", "k", "--expires-at", "soon"
        )
        assert (code, body["code"]) == (EXIT_USAGE, "usage_error")

    def test_missing_option_is_a_usage_error(self, engine: Engine) -> None:
        assert run("grant", "cus_cli", "--units", "5").exit_code == EXIT_USAGE


class TestConsumeCommand:
    def test_consumes_units_and_replays(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)

        code, body = run_json("consume", customer, "--units", "7", "--request-id", "cli-r1")
        code_again, again = run_json("consume", customer, "--units", "7", "--request-id", "cli-r1")

        assert (code, body["units"], body["balance_after"], body["replayed"]) == (EXIT_OK, 7, 93, False)
        assert (code_again, again["replayed"], again["entry_id"]) == (EXIT_OK, True, body["entry_id"])

    def test_prices_model_tokens_with_attribution(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=1000)

        code, body = run_json(
            "consume",
            customer,
            "--model",
            "gpt-4o-2024-08-06",
            "--input-tokens",
            "1000000",
            "--output-tokens",
            "1000",
            "--request-id",
            "cli-r2",
            "--feature",
            "chat",
            "--user",
            "u1",
        )

        assert (code, body["units"]) == (EXIT_OK, 502) and body["usage_id"] is not None

    def test_prices_an_operation(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)

        assert run_json("consume", customer, "--operation", "image", "--request-id", "cli-r3")[1]["units"] == 20

    def test_insufficient_credits_exit_3(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=5)

        code, body = run_json("consume", customer, "--units", "6", "--request-id", "cli-r4")

        assert (code, body["code"], body["available"]) == (EXIT_INSUFFICIENT, "insufficient_credits", 5)

    def test_access_refused_exit_4(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=5)
        with unit_of_work() as session:
            set_access_state(session, customer, AccessState.SUSPENDED, as_of=datetime.now(UTC), source="t")

        code, body = run_json("consume", customer, "--units", "1", "--request-id", "cli-r5")

        assert (code, body["code"]) == (EXIT_ACCESS, "access_refused")

    def test_unknown_customer_exit_5(self, engine: Engine) -> None:
        assert run_json("consume", "cus_ghost", "--units", "1", "--request-id", "r")[0] == EXIT_UNKNOWN

    @pytest.mark.parametrize(
        "args",
        [
            ("--request-id", "r-none"),
            ("--units", "1", "--operation", "text", "--request-id", "r-both"),
            ("--model", "no-such-model", "--input-tokens", "5", "--request-id", "r-unknown-model"),
        ],
    )
    def test_bad_requests_exit_2(self, engine: Engine, args: tuple[str, ...]) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=5)

        code, body = run_json("consume", customer, *args)

        assert code == EXIT_USAGE and body["ok"] is False and body["code"] in {"usage_error", "invalid_request"}

    def test_reused_request_id_with_other_units_exit_2(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=50)
        run_json("consume", customer, "--units", "1", "--request-id", "cli-dup")

        code, body = run_json("consume", customer, "--units", "2", "--request-id", "cli-dup")

        assert (code, body["code"]) == (EXIT_USAGE, "idempotency_conflict")


class TestHoldCommands:
    def test_hold_capture_release_cycle(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)

        hold_code, hold = run_json("hold", customer, "--units", "30", "--request-id", "cli-h1", "--ttl", "60")
        capture_code, captured = run_json("capture", "cli-h1", "--units", "12")
        release_code, refused = run_json("release", "cli-h1")

        assert (hold_code, hold["units"], hold["status"]) == (EXIT_OK, 30, "open")
        assert (capture_code, captured["captured"], captured["released"], captured["balance_after"]) == (
            EXIT_OK,
            12,
            18,
            88,
        )
        assert (release_code, refused["code"]) == (EXIT_USAGE, "hold_not_open")

    def test_release_twice_is_done_both_times(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=100)
        make_hold(customer_id=customer, units=10, request_id="cli-h2")

        assert run_json("release", "cli-h2")[0] == EXIT_OK
        code, body = run_json("release", "cli-h2")
        assert (code, body["replayed"], body["balance_after"]) == (EXIT_OK, True, 100)

    def test_unknown_hold_exit_5(self, engine: Engine) -> None:
        assert run_json("capture", "no-such-hold")[0] == EXIT_UNKNOWN
        assert run_json("release", "no-such-hold")[0] == EXIT_UNKNOWN

    def test_hold_beyond_balance_exit_3(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=5)
        assert run_json("hold", customer, "--units", "6", "--request-id", "cli-h3")[0] == EXIT_INSUFFICIENT


class TestCheckCommand:
    def test_consistent_ledger_exits_0(self, engine: Engine) -> None:
        make_grant(units=10)
        result = run("check")
        assert result.exit_code == EXIT_OK and "consistent" in result.stdout

    def test_one_customer_and_an_unknown_one(self, engine: Engine) -> None:
        customer = make_account()
        make_grant(customer_id=customer, units=10)

        assert run_json("check", customer) == (EXIT_OK, {"ok": True, "violations": []})
        assert run_json("check", "cus_nobody")[0] == EXIT_UNKNOWN

    def test_every_broken_invariant_is_listed_with_exit_1(self, engine: Engine) -> None:
        first, second = make_account(), make_account()
        make_grant(customer_id=first, units=10)
        make_grant(customer_id=second, units=10)
        with unit_of_work() as session:
            session.execute(update(Account).where(Account.customer_id.in_([first, second])).values(balance=3))

        result = run("check")
        code, body = run_json("check")

        assert result.exit_code == code == EXIT_CHECK_FAILED
        assert first in result.stdout and second in result.stdout
        assert {(v["customer_id"], v["invariant"]) for v in body["violations"]} >= {
            (first, "balance_equals_entries"),
            (second, "balance_equals_entries"),
        }


class TestConfigError:
    def test_bad_billing_config_exits_2(self, engine: Engine, billing_config_file: Any) -> None:
        billing_config_file("[operations]\ntext = -1\n")
        assert run("balance", "cus_any").exit_code == EXIT_USAGE
