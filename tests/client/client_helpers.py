"""What the client's tests share: the live server process, the test prices, funding and reading the ledger."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from sqlalchemy import Engine, text

from ledger.accounts import open_account
from ledger.db import unit_of_work
from ledger.grants import grant_credits
from ledger.models import GrantSource
from webhooks.client import Billing

REPO = Path(__file__).resolve().parents[2]
TOKEN = "tok_client_tests"

# Every model of the provider fixtures at one price, so charges are easy to work out by hand: an uncached input
# token costs 1 credit, an output token 2, a cached input token 0.5 (a fraction of a credit is rounded up).
PRICED_MODELS = [
    ("openai", "gpt-4o-2024-08-06"),
    ("openai", "gpt-4o-mini-2024-07-18"),
    ("openai", "gpt-5.4"),
    ("openai", "o1-2024-12-17"),
    ("anthropic", "claude-sonnet-4-5-20250929"),
    ("anthropic", "claude-sonnet-4-20250514"),
]


def config_text() -> str:
    """The billing config of the tests: every fixture model at the prices above."""
    models = "".join(
        f"""
[[models]]
provider = "{provider}"
model = "{model}"
credits_per_million_input = "1000000"
credits_per_million_output = "2000000"
credits_per_million_cached = "500000"
cost_per_million_input_usd = "2.50"
cost_per_million_output_usd = "10.00"
cost_per_million_cached_usd = "1.25"
"""
        for provider, model in PRICED_MODELS
    )
    return f"""
[credits]
fallback_credits_per_minor_unit = "1"
[operations]
text = 1
{models}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BillingServer:
    """``billing-reconciler serve`` in its own process, which a test may kill and start again on the same port."""

    def __init__(self, database_url: str, config: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
            "DATABASE_URL": database_url,
            "API_TOKENS": TOKEN,
            "BILLING_CONFIG": str(config),
            "LOG_LEVEL": "WARNING",
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable, "-c", "from worker.cli import main; main()", "serve", "--port", str(self.port)]
        self.process = subprocess.Popen(command, env=self.env, cwd=REPO)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("billing-reconciler serve did not start")

    def kill(self) -> None:
        """Crash the server (SIGKILL): requests in flight get no answer, open transactions roll back."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)


def fund(customer_id: str, units: int) -> None:
    """Open the customer's account with ``units`` credits."""
    with unit_of_work() as session:
        open_account(session, customer_id)
        grant_credits(
            session, customer_id, units=units, source=GrantSource.TOP_UP, idempotency_key=f"{customer_id}:seed"
        )


def holds(engine: Engine, customer_id: str) -> list[dict[str, object]]:
    """Every hold of the customer, oldest first, as stored."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT h.request_id, h.units, h.captured_units, h.shortfall, h.status, h.release_reason,"
                " h.provider, h.model, h.provider_request_id FROM holds h JOIN accounts a ON a.id = h.account_id"
                " WHERE a.customer_id = :c ORDER BY h.id"
            ),
            {"c": customer_id},
        ).mappings()
        return [dict(r) for r in rows]


def spent(engine: Engine, customer_id: str) -> int:
    """Credits the customer has been charged in all (captures and consumptions; holds not counted)."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT COALESCE(SUM(h.captured_units), 0) FROM holds h JOIN accounts a ON a.id = h.account_id"
                    " WHERE a.customer_id = :c AND h.status = 'captured'"
                ),
                {"c": customer_id},
            ).scalar_one()
        ) + int(
            conn.execute(
                text(
                    "SELECT COALESCE(-SUM(e.units), 0) FROM entries e JOIN accounts a ON a.id = e.account_id"
                    " WHERE a.customer_id = :c AND e.kind = 'consume'"
                ),
                {"c": customer_id},
            ).scalar_one()
        )


def assert_settled(billing: Billing, engine: Engine, customer_id: str, *, funded: int, charged: int) -> None:
    """No hold left open, the balance is what was funded less ``charged``, and every charge was made once."""
    stored = holds(engine, customer_id)
    assert [h["status"] for h in stored if h["status"] not in ("captured", "released")] == []
    balance = billing.balance(customer_id)
    assert balance.held == 0
    assert (balance.balance, balance.debt) == (funded - charged, 0)
    assert spent(engine, customer_id) == charged
    with engine.connect() as conn:
        # One capture entry per captured hold, never two.
        captures = conn.execute(
            text(
                "SELECT e.hold_id, COUNT(*) FROM entries e JOIN accounts a ON a.id = e.account_id"
                " WHERE a.customer_id = :c AND e.kind = 'capture' GROUP BY e.hold_id"
            ),
            {"c": customer_id},
        ).all()
    assert all(count == 1 for _, count in captures)
    assert len(captures) == sum(1 for h in stored if h["status"] == "captured")


def last_capture_reason(engine: Engine, customer_id: str) -> str:
    """The reason text of the customer's latest capture entry."""
    with engine.connect() as conn:
        return str(
            conn.execute(
                text(
                    "SELECT e.reason FROM entries e JOIN accounts a ON a.id = e.account_id"
                    " WHERE a.customer_id = :c AND e.kind = 'capture' ORDER BY e.id DESC LIMIT 1"
                ),
                {"c": customer_id},
            ).scalar_one()
        )
