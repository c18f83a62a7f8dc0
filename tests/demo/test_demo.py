"""``billing-reconciler demo`` end to end, as a new user runs it: its printed summary is checked against the ledger.

The demo runs in a subprocess (as the README's "run" command); then the test opens the demo's database with the
ledger API and the reconciliation tables and checks every printed figure, the invariants, that every AI call made
through the wrapped SDKs was charged the hand-computed price of the tokens the demo's provider reported, and that the
discrepancies the demo made on purpose were found, with the right kind, for the right customer or provider day.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.engine import make_url

from ledger import db
from ledger.check import check_ledger
from ledger.db import unit_of_work
from ledger.inbox import EventStatus, StripeEvent
from ledger.models import Account, Entry, Hold, HoldStatus, UsageRecord
from ledger.queries import balance_summary
from reconciliation.models import Mismatch, MismatchStatus, ReconciliationRun
from tests.conftest import PROVIDER_FIXTURES, postgres_url, redis_url

DEMO_TIMEOUT_SECONDS = 240
# The example billing config's token prices, credits per million (input, output, cached), copied by hand from
# ledger/billing.example.toml: the test prices the provider's reported tokens itself.
PRICES = {
    "gpt-4o-2024-08-06": (500, 2000, 250),
    "gpt-4o-mini-2024-07-18": (30, 120, 15),
    "claude-sonnet-4-20250514": (600, 3000, 60),
    "claude-3-5-haiku-20241022": (160, 800, 16),
}
# Settings the demo must not inherit from the test run: it sets its own.
CLI = (sys.executable, "-c", "from worker.cli import main; main()")
SCRUBBED = ("DATABASE_URL", "CELERY_BROKER_URL", "CELERY_TASK_ALWAYS_EAGER", "BILLING_CONFIG")


def run_demo(workdir: Path, **env: str) -> dict[str, Any]:
    """Run ``billing-reconciler demo --no-wait --json --port 0``; return its JSON summary."""
    child_env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    child_env.update(env)
    argv = [*CLI, "demo", "--no-wait", "--json", "--port", "0"]
    proc = subprocess.run(
        [*argv, "--workdir", str(workdir)],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_SECONDS,
        check=False,
    )
    assert proc.returncode == 0, f"demo exited {proc.returncode}\nstderr:\n{proc.stderr[-4000:]}"
    summary: dict[str, Any] = json.loads(proc.stdout)
    return summary


def open_mismatches() -> list[Mismatch]:
    with unit_of_work() as session:
        rows = list(session.scalars(select(Mismatch).where(Mismatch.status == MismatchStatus.OPEN)))
        for row in rows:
            session.expunge(row)
    return rows


def provider_key(m: Mismatch) -> tuple[str, str, str | None] | None:
    side = (m.evidence or {}).get("provider")
    if not isinstance(side, dict):
        return None
    return (str(side.get("provider")), str(side.get("day")), side.get("model"))


def reported_tokens(provider: str, usage: dict[str, Any]) -> tuple[int, int, int]:
    """(uncached input, output, cached input) from the provider's own usage fields, as each provider defines them.

    OpenAI's prompt_tokens include the cached ones; Anthropic's input_tokens exclude cache reads (and cache writes
    are charged as input).
    """
    if provider == "openai":
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        return usage["prompt_tokens"] - cached, usage["completion_tokens"], cached
    return (
        usage["input_tokens"] + usage["cache_creation_input_tokens"],
        usage["output_tokens"],
        usage["cache_read_input_tokens"],
    )


def hand_price(model: str, inp: int, out: int, cached: int) -> int:
    """Credits for the tokens at the example config's prices, the call's fraction of a credit rounded up."""
    per_input, per_output, per_cached = PRICES[model]
    return -(-(inp * per_input + out * per_output + cached * per_cached) // 1_000_000)


def check_ai_calls(summary: dict[str, Any]) -> None:
    """Each AI call made through the wrapped SDKs was held, then captured at the provider's reported tokens."""
    ai_calls = summary["ai_calls"]
    assert len(ai_calls) == 11
    assert {c["provider"] for c in ai_calls} == {"openai", "anthropic"}
    assert any(c["stream"] for c in ai_calls) and not all(c["stream"] for c in ai_calls)
    fay = next(c["customer_id"] for c in summary["customers"] if c["name"].startswith("Fay"))
    assert all(c["customer_id"] != fay for c in ai_calls)  # refused at the hold: the provider was never called
    with unit_of_work() as session:
        for customer in {c["customer_id"] for c in ai_calls}:
            calls = [c for c in ai_calls if c["customer_id"] == customer]
            # The customer's holds placed by the wrapper (its request ids: call_...), in the order the calls ran.
            holds = list(
                session.scalars(
                    select(Hold)
                    .join(Account, Account.id == Hold.account_id)
                    .where(Account.customer_id == customer, Hold.request_id.like("call%"))
                    .order_by(Hold.id)
                )
            )
            assert [h.request_id for h in holds] == [c["hold"] for c in calls]
            for call, hold in zip(calls, holds, strict=True):
                inp, out, cached = reported_tokens(call["provider"], call["reported"])
                expected = hand_price(call["model"], inp, out, cached)
                assert hold.status is HoldStatus.CAPTURED
                assert hold.captured_units == expected == call["charged"], call
                record = session.scalars(select(UsageRecord).where(UsageRecord.request_id == hold.request_id)).one()
                assert (record.model, record.input_tokens, record.output_tokens, record.cached_tokens) == (
                    call["model"],
                    inp,
                    out,
                    cached,
                )
                assert (record.user_id, record.feature, record.units) == (call["user_id"], call["feature"], expected)
                if call["provider"] == "openai":
                    # The wrapper sent the hold's request id with the call (X-Client-Request-Id).
                    assert call["client_request_id"] == hold.request_id
    # The follow-up on the same contract was read from the provider's prompt cache, and charged so.
    assert any(reported_tokens(c["provider"], c["reported"])[2] >= 1024 for c in ai_calls)
    # Hand-worked: each of Eve's calls wrote 200,000 output tokens of gpt-4o (2,000 credits per million: 400)
    # after a prompt of a few tokens (500 per million: a fraction, rounded up to 1): 401, twice.
    eve = [c for c in ai_calls if c["user_id"] == "eve-u1"]
    assert [c["charged"] for c in eve] == [401, 401]


def check_against_ledger(summary: dict[str, Any]) -> None:
    """Every printed figure equals what the ledger and the reconciliation tables hold."""
    with unit_of_work() as session:
        assert check_ledger(session) == []
        for printed in summary["customers"]:
            ledger = balance_summary(session, printed["customer_id"])
            assert (printed["balance"], printed["held"], printed["debt"], printed["available"]) == (
                ledger.balance,
                ledger.held,
                ledger.debt,
                ledger.available,
            ), printed["customer_id"]
            assert printed["access_state"] == ledger.access_state.value
            assert printed["usage_allowed"] == ledger.usage_allowed

        # Every delivered event was stored once and handled; none of the held-back ones reached the inbox.
        statuses = dict(session.execute(select(StripeEvent.status, func.count()).group_by(StripeEvent.status)).all())
        assert set(statuses) <= {EventStatus.PROCESSED, EventStatus.IGNORED}, statuses
        assert {str(k.value): v for k, v in statuses.items()} == summary["events"]["by_status"]
        withheld = summary["events"]["withheld"]
        assert withheld
        assert session.scalar(select(func.count()).where(StripeEvent.event_id.in_(withheld))) == 0

        hold = session.scalars(
            select(Hold).where(Hold.request_id == summary["usage"]["expired_hold"]["request_id"])
        ).one()
        assert hold.status is HoldStatus.EXPIRED

        # The usage table: every metered call, by model, as the usage records hold them.
        recorded_usage = {
            (model or "(no model)"): (int(n), int(units))
            for model, n, units in session.execute(
                select(UsageRecord.model, func.count(), func.sum(UsageRecord.units)).group_by(UsageRecord.model)
            )
        }
        printed_usage = {u["model"]: (u["requests"], u["credits"]) for u in summary["usage_by_model"]}
        assert printed_usage == recorded_usage
        assert len(printed_usage) >= 4  # several models

    mismatches = open_mismatches()
    printed_counts = summary["reconciliation"]["open_mismatches_by_kind"]
    assert dict(Counter(m.kind.value for m in mismatches)) == printed_counts
    assert sorted(m["id"] for m in summary["reconciliation"]["mismatches"]) == sorted(m.id for m in mismatches)
    with unit_of_work() as session:
        recorded = {r.id: (r.status.value, r.counts) for r in session.scalars(select(ReconciliationRun))}
    printed_runs = {r["run_id"]: (r["status"], r["counts"]) for r in summary["reconciliation"]["runs"]}
    assert printed_runs == recorded

    customers = {c["name"].split()[0].lower(): c for c in summary["customers"]}
    by_kind: dict[str, list[Mismatch]] = {}
    for m in mismatches:
        by_kind.setdefault(m.kind.value, []).append(m)

    # Stripe side: Cleo's top-up never delivered, Dan's refund never delivered, and each held-back event missed.
    assert any(m.customer_id == customers["cleo"]["customer_id"] for m in by_kind["payment_without_grant"])
    assert any(m.customer_id == customers["dan"]["customer_id"] for m in by_kind["refund_not_clawed_back"])
    missed = {m.evidence["stripe"]["event_id"] for m in by_kind["missed_event"]}
    assert missed == set(withheld)

    # The stories behind the balances: a lost dispute after spending is debt; a canceled plan refuses usage.
    assert customers["eve"]["debt"] == 802 and customers["eve"]["balance"] == -802  # her two calls, spent
    check_ai_calls(summary)
    assert customers["fay"]["access_state"] == "canceled" and not customers["fay"]["usage_allowed"]
    assert all(item["found"] for item in summary["deliberate"]), summary["deliberate"]

    retry_first, retry_second = summary["usage"]["retry"]
    assert (retry_first["status"], retry_second["status"]) == (201, 200)
    assert retry_first["body"] == retry_second["body"]
    with unit_of_work() as session:  # charged once: one usage record, one consume entry
        key = retry_first["idempotency_key"]
        assert session.scalar(select(func.count()).where(UsageRecord.request_id == key)) == 1
        assert session.scalar(select(func.count()).where(Entry.idempotency_key == f"consume:{key}")) == 1
    refused = {call["label"]: call["status"] for call in summary["usage"]["refused"]}
    assert refused == {"refused_access": 403, "refused_credits": 402}

    if PROVIDER_FIXTURES.is_dir():
        drift = {(m.kind.value, *key) for m in mismatches if (key := provider_key(m)) is not None}
        assert ("provider_cost_drift", "anthropic", "2026-05-27", "claude-sonnet-4-20250514") in drift
        assert ("provider_usage_drift", "anthropic", "2026-05-27", "claude-sonnet-4-20250514") in drift
        assert ("provider_cost_drift", "openai", "2026-05-26", "gpt-4o-mini-2024-07-18") in drift
        assert ("provider_usage_drift", "openai", "2026-05-26", "gpt-4o-mini-2024-07-18") in drift
        assert ("provider_cost_drift", "openai", "2026-05-26", "text-embedding-3-small") in drift
        # Everything else metered on the reports' days matches them: no other provider findings.
        assert len(drift) == 5, drift


@pytest.fixture
def installed(request: pytest.FixtureRequest) -> Iterator[None]:
    """Restore the process-wide engine after a test replaced it."""
    yield
    db.set_engine(None)


@pytest.mark.slow
class TestDemoOnTheEmbeddedDefault:
    def test_demo_prints_what_the_ledger_holds(self, tmp_path: Path, installed: None) -> None:
        workdir = tmp_path / "demo"
        summary = run_demo(workdir)

        assert summary["backend"].startswith("embedded SQLite")
        database = workdir / "billing.db"
        assert database.is_file()
        assert summary["urls"]["review"].endswith("/review/")
        assert summary["review_login"]["user"] == "demo" and summary["review_login"]["password"]

        engine: Engine = db.make_engine(f"sqlite:///{database}")
        db.set_engine(engine)
        check_against_ledger(summary)


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """A new, empty database on the PostgreSQL server named by DATABASE_URL (dropped afterwards)."""
    base = postgres_url()
    if base is None:
        pytest.skip("no PostgreSQL configured: set DATABASE_URL=postgresql+psycopg://... to run this")
    url = make_url(base)
    name = f"br_demo_test_{uuid.uuid4().hex[:10]}"
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        db.set_engine(None)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
class TestDemoOnPostgresAndRedis:
    def test_demo_runs_a_real_worker_process(self, tmp_path: Path, fresh_pg_url: str) -> None:
        broker = redis_url()
        if broker is None:
            pytest.skip("no Redis configured: set CELERY_BROKER_URL=redis://... to run this")
        workdir = tmp_path / "demo"
        summary = run_demo(workdir, DATABASE_URL=fresh_pg_url, CELERY_BROKER_URL=broker)

        assert summary["backend"] == "PostgreSQL + Redis (real worker process)"
        assert (workdir / "worker.log").is_file()
        assert not (workdir / "billing.db").exists()
        db.set_engine(db.make_engine(fresh_pg_url))
        check_against_ledger(summary)

    def test_demo_refuses_a_database_that_holds_data(self, tmp_path: Path, fresh_pg_url: str) -> None:
        broker = redis_url()
        if broker is None:
            pytest.skip("no Redis configured: set CELERY_BROKER_URL=redis://... to run this")
        with psycopg.connect(make_url(fresh_pg_url).set(drivername="postgresql").render_as_string(False)) as conn:
            conn.execute("CREATE TABLE accounts (id integer)")
            conn.execute("INSERT INTO accounts VALUES (1)")
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
        env.update(DATABASE_URL=fresh_pg_url, CELERY_BROKER_URL=broker)
        proc = subprocess.run(
            [*CLI, "demo", "--no-wait", "--port", "0", "--workdir", str(tmp_path / "demo")],
            env=env,
            capture_output=True,
            text=True,
            timeout=DEMO_TIMEOUT_SECONDS,
            check=False,
        )
        assert proc.returncode == 2, proc.stderr
        assert "already holds data" in proc.stderr
        with psycopg.connect(make_url(fresh_pg_url).set(drivername="postgresql").render_as_string(False)) as conn:
            assert conn.execute("SELECT count(*) FROM accounts").fetchone() == (1,)
