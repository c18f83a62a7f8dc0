"""Every mistake a person makes before a command does its work: one line naming the problem and the fix, exit 2.

Each class of mistake is tried against a command of every family (ledger, inbox, reconciliation, review, serve),
in text and --json form. What is expected is written here from the issue's contract, not read from the code.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from ledger import db
from ledger.migrate import migrate
from ledger.settings import get_settings
from tests.conftest import postgres_url
from worker.cli import EXIT_UNEXPECTED, app

runner = CliRunner()

# One command of each family that needs the database; none of them may start work on a database it cannot use.
COMMANDS: list[list[str]] = [
    ["balance", "cus_1"],
    ["grant", "cus_1", "--units", "5", "--reason", "r", "--idempotency-key", "k"],
    ["check"],
    ["events", "list"],
    ["mismatches", "list"],
    ["margin", "--since", "2026-11-01", "--until", "2026-11-02"],
    ["serve", "--port", "0"],
]
JSON_COMMANDS = [c for c in COMMANDS if c[0] not in ("serve", "grant")]


@pytest.fixture(autouse=True)
def _process_engine_from_settings() -> Iterator[None]:
    """The CLI builds its engine from DATABASE_URL, as in a real process; nothing is left for the next test."""
    db.set_engine(None)
    yield
    db.set_engine(None)
    db.check_on_first_use(None)


def invoke(args: list[str]) -> Any:
    return runner.invoke(app, args)


def assert_one_line(result: Any, *fragments: str, exit_code: int = 2) -> str:
    assert result.exit_code == exit_code, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr  # one line, no traceback, no usage text
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def assert_json_error(result: Any, code: str, exit_code: int = 2) -> dict[str, Any]:
    assert result.exit_code == exit_code, result.output
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout
    body = json.loads(lines[0])
    assert body["ok"] is False and body["code"] == code and body["error"]
    return body


def use(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("DATABASE_URL", url)
    get_settings.cache_clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a[:2]))
class TestDatabaseMistakes:
    def test_a_scheme_we_do_not_read(self, monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
        use(monkeypatch, "postgres://postgres@127.0.0.1:5432/billing")
        assert_one_line(invoke(args), "DATABASE_URL", "postgres://", "postgresql+psycopg://")

    def test_a_server_that_does_not_answer(self, monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
        use(monkeypatch, f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/billing")
        assert_one_line(invoke(args), "cannot reach PostgreSQL", "start the server or fix DATABASE_URL")

    def test_a_database_never_migrated(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, args: list[str]) -> None:
        use(monkeypatch, f"sqlite:///{tmp_path / 'billing.db'}")
        assert_one_line(invoke(args), "is empty", "billing-reconciler migrate")
        assert not (tmp_path / "billing.db").exists()  # looking did not create it

    def test_a_database_behind_the_code(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, args: list[str]) -> None:
        url = f"sqlite:///{tmp_path / 'old.db'}"
        engine = db.make_engine(url)
        migrate(engine, revision="0004")
        engine.dispose()
        use(monkeypatch, url)
        assert_one_line(invoke(args), "is behind", "0004", "run `billing-reconciler migrate`")

    def test_a_database_ahead_of_the_code(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, args: list[str]
    ) -> None:
        url = f"sqlite:///{tmp_path / 'new.db'}"
        engine = db.make_engine(url)
        migrate(engine)
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = 'zz_from_the_future'"))
        engine.dispose()
        use(monkeypatch, url)
        assert_one_line(invoke(args), "newer billing-reconciler", "zz_from_the_future", "upgrade")


class TestMigrateAndWorker:
    @pytest.mark.parametrize("args", [["migrate"], ["worker"]])
    def test_a_database_that_cannot_be_reached(self, monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
        use(monkeypatch, "postgres://postgres@127.0.0.1:5432/billing")
        assert_one_line(invoke(args), "DATABASE_URL", "postgresql+psycopg://")
        use(monkeypatch, f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/billing")
        assert_one_line(invoke(args), "cannot reach PostgreSQL")

    def test_the_worker_refuses_a_database_never_migrated(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        use(monkeypatch, f"sqlite:///{tmp_path / 'billing.db'}")
        assert_one_line(invoke(["worker"]), "is empty", "billing-reconciler migrate")

    def test_migrate_makes_the_empty_database_usable(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        use(monkeypatch, f"sqlite:///{tmp_path / 'billing.db'}")
        assert invoke(["migrate"]).exit_code == 0
        db.set_engine(None)
        assert invoke(["check", "--json"]).exit_code == 0


class TestMissingDatabase:
    @pytest.mark.postgres
    @pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a[:2]))
    def test_a_database_that_does_not_exist(self, monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
        url = postgres_url()
        if url is None:
            pytest.skip("no PostgreSQL configured")
        base = url.rsplit("/", 1)[0]
        use(monkeypatch, f"{base}/billing_no_such_database_16")
        assert_one_line(invoke(args), 'database "billing_no_such_database_16" does not exist', "createdb")


@pytest.mark.parametrize("args", JSON_COMMANDS, ids=lambda a: " ".join(a[:2]))
class TestJsonErrors:
    def test_each_mistake_is_one_json_object(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, args: list[str]
    ) -> None:
        use(monkeypatch, f"sqlite:///{tmp_path / 'billing.db'}")
        assert_json_error(invoke([*args, "--json"]), "database_not_ready")
        use(monkeypatch, "postgres://x@y/z")
        assert_json_error(invoke([*args, "--json"]), "config_error")
        use(monkeypatch, f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/billing")
        db.set_engine(None)
        assert_json_error(invoke([*args, "--json"]), "database_unreachable")

    def test_a_usage_error_is_one_json_object(self, sqlite_engine: Any, args: list[str]) -> None:
        assert_json_error(invoke([*args, "--no-such-option", "--json"]), "usage_error")


class TestStripeKey:
    """No command sends anything to the live Stripe API without a key."""

    @pytest.mark.parametrize(
        "args",
        [
            ["reconcile", "--since", "2026-11-01", "--until", "2026-11-02"],
            ["events", "backfill", "--since", "2026-11-01T00:00:00Z"],
        ],
        ids=["reconcile", "events backfill"],
    )
    def test_commands_that_read_stripe_need_a_key(
        self, sqlite_engine: Any, monkeypatch: pytest.MonkeyPatch, args: list[str]
    ) -> None:
        from reconciliation.gateway import get_gateway

        monkeypatch.delenv("STRIPE_API_KEY", raising=False)
        monkeypatch.delenv("STRIPE_API_BASE", raising=False)
        get_gateway.cache_clear()
        try:
            assert_one_line(invoke(args), "STRIPE_API_KEY is not set", "restricted read key")
            if args[0] == "reconcile":
                assert_json_error(invoke([*args, "--json"]), "stripe_key_missing")
        finally:
            get_gateway.cache_clear()

    def test_the_gateway_refuses_before_any_request(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from reconciliation.gateway import StripeGateway, StripeKeyMissing

        monkeypatch.delenv("STRIPE_API_KEY", raising=False)
        monkeypatch.delenv("STRIPE_API_BASE", raising=False)
        gateway = StripeGateway(max_attempts=1)
        with pytest.raises(StripeKeyMissing):
            gateway.retrieve("charge", "ch_1")
        with pytest.raises(StripeKeyMissing):
            next(gateway.list_charges())

    def test_a_local_stripe_needs_no_key(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from reconciliation.gateway import StripeGateway

        monkeypatch.delenv("STRIPE_API_KEY", raising=False)
        monkeypatch.setenv("STRIPE_API_BASE", "http://127.0.0.1:9")
        get_settings.cache_clear()
        StripeGateway(max_attempts=1).require_key()  # no error: the emulator or a test double


class TestBusyPort:
    @pytest.fixture
    def taken(self) -> Iterator[int]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            yield int(s.getsockname()[1])

    def test_serve(self, sqlite_engine: Any, taken: int) -> None:
        assert_one_line(invoke(["serve", "--port", str(taken)]), f"127.0.0.1:{taken}", "another --port")

    def test_demo(self, taken: int, tmp_path: Path) -> None:
        args = ["demo", "--port", str(taken), "--no-wait", "--workdir", str(tmp_path / "demo")]
        assert_one_line(invoke(args), f"127.0.0.1:{taken}", "another --port")
        assert_json_error(invoke([*args, "--json"]), "demo_failed")


class TestUnexpected:
    def test_one_line_and_a_code_outside_the_contract(
        self, sqlite_engine: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from ledger import queries

        def broken(*_: Any, **__: Any) -> Any:
            raise RuntimeError("something nobody planned for\nsecond line")

        monkeypatch.setattr(queries, "balance_summary", broken)
        line = assert_one_line(invoke(["balance", "cus_1"]), "RuntimeError", "--debug", exit_code=EXIT_UNEXPECTED)
        assert "second line" not in line
        assert EXIT_UNEXPECTED not in (0, 1, 2, 3, 4, 5)
        assert_json_error(invoke(["balance", "cus_1", "--json"]), "unexpected_error", exit_code=EXIT_UNEXPECTED)

    @pytest.mark.parametrize("how", ["flag", "log_level"])
    def test_the_traceback_only_when_debugging(
        self, sqlite_engine: Any, monkeypatch: pytest.MonkeyPatch, how: str
    ) -> None:
        from ledger import queries

        monkeypatch.setattr(queries, "balance_summary", lambda *a, **k: 1 / 0)
        if how == "flag":
            result = invoke(["--debug", "balance", "cus_1"])
        else:
            monkeypatch.setenv("LOG_LEVEL", "DEBUG")
            get_settings.cache_clear()
            result = invoke(["balance", "cus_1"])
        assert result.exit_code == EXIT_UNEXPECTED
        assert "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr


class TestHelpNeedsNoDatabase:
    def test_help_of_a_database_command_on_an_empty_database(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        use(monkeypatch, f"sqlite:///{tmp_path / 'billing.db'}")
        result = invoke(["balance", "--help"])
        assert result.exit_code == 0 and "Usage" in result.output
