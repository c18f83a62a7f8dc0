"""The review workflow and its audit trail, idempotent re-runs (update, close, reappear, reopen), and the CLI."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from ledger.db import session_factory
from ledger.errors import InvalidRequest
from ledger.inbox import EventStatus
from ledger.models import Grant
from reconciliation import services
from reconciliation.engine import RunSummary, reconcile
from reconciliation.models import (
    ActionKind,
    Mismatch,
    MismatchAction,
    MismatchKind,
    MismatchStatus,
    ReconciliationRun,
    RunStatus,
    StagedStripeAlias,
    StagedStripeObject,
)
from tests.reconciliation import builders as b
from tests.reconciliation.conftest import Emulator

pytestmark = pytest.mark.usefixtures("test_config")


def _until() -> datetime:
    return datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(days=1)


def _run(emu: Emulator, **kwargs: Any) -> RunSummary:
    kwargs.setdefault("since", emu.start)
    kwargs.setdefault("until", _until())
    return reconcile(session_factory(), emu.gateway, actor="tester", **kwargs)


def _world(emu: Emulator) -> dict[str, str]:
    """Three top-ups: one never granted, one granted short, one fine."""
    store = emu.store
    c = store.create_customer(email="w@example.com").id
    missing = store.topup(c, "price_credits_small")
    short = store.topup(c, "price_credits_large")
    fine = store.topup(c, "price_credits_small")
    with session_factory().begin() as s:
        b.grant_topup(s, store, short.id, units=100)
        b.grant_topup(s, store, fine.id)
        b.store_all_events(s, store.events(), status=EventStatus.PROCESSED)
    return {"customer": c, "missing": missing.id, "short": short.id, "short_pi": short.payment_intent or ""}


def _by_kind(engine: Engine, kind: MismatchKind) -> Mismatch:
    with Session(engine) as s:
        return s.scalars(select(Mismatch).where(Mismatch.kind == kind)).one()


def _actions(engine: Engine, mismatch_id: int) -> list[tuple[ActionKind, MismatchStatus | None, MismatchStatus]]:
    with Session(engine) as s:
        return [(a.action, a.from_status, a.to_status) for a in services.list_actions(s, mismatch_id)]


class TestReviewWorkflow:
    def test_resolve_ignore_reopen_write_the_audit_trail(self, engine: Engine, emulator: Emulator) -> None:
        _world(emulator)
        _run(emulator)
        mid = _by_kind(engine, MismatchKind.AMOUNT_MISMATCH).id
        with session_factory().begin() as s:
            services.resolve(s, mid, actor="ana", note="granted the rest by hand")
        with session_factory().begin() as s:
            services.reopen(s, mid, actor="ben", note="not actually granted")
        with session_factory().begin() as s:
            m = services.ignore(s, mid, actor="ana", note="goodwill")
            assert m.status is MismatchStatus.IGNORED
        with Session(engine) as s:
            trail = services.list_actions(s, mid)
        assert [(a.action, a.actor, a.from_status, a.to_status, a.note) for a in trail] == [
            (ActionKind.DETECTED, "tester", None, MismatchStatus.OPEN, trail[0].note),
            (ActionKind.RESOLVE, "ana", MismatchStatus.OPEN, MismatchStatus.RESOLVED, "granted the rest by hand"),
            (ActionKind.REOPEN, "ben", MismatchStatus.RESOLVED, MismatchStatus.OPEN, "not actually granted"),
            (ActionKind.IGNORE, "ana", MismatchStatus.OPEN, MismatchStatus.IGNORED, "goodwill"),
        ]
        assert all(a.at is not None for a in trail)

    def test_a_note_is_required_and_nothing_is_written_without_one(self, engine: Engine, emulator: Emulator) -> None:
        _world(emulator)
        _run(emulator)
        mid = _by_kind(engine, MismatchKind.AMOUNT_MISMATCH).id
        for note in ("", "   "):
            with pytest.raises(InvalidRequest, match="note is required"), session_factory().begin() as s:
                services.resolve(s, mid, actor="ana", note=note)
        assert _actions(engine, mid) == [(ActionKind.DETECTED, None, MismatchStatus.OPEN)]
        assert _by_kind(engine, MismatchKind.AMOUNT_MISMATCH).status is MismatchStatus.OPEN

    def test_invalid_transitions_and_unknown_ids(self, engine: Engine, emulator: Emulator) -> None:
        _world(emulator)
        _run(emulator)
        mid = _by_kind(engine, MismatchKind.AMOUNT_MISMATCH).id
        with pytest.raises(services.InvalidTransition), session_factory().begin() as s:
            services.reopen(s, mid, actor="ana", note="it is open already")
        with pytest.raises(services.UnknownMismatch), session_factory().begin() as s:
            services.resolve(s, 999_999, actor="ana", note="x")

    def test_list_filters_and_export(self, engine: Engine, emulator: Emulator, tmp_path: Path) -> None:
        world = _world(emulator)
        summary = _run(emulator)
        with session_factory().begin() as s:
            assert {m.kind for m in services.list_mismatches(s)} == {
                MismatchKind.AMOUNT_MISMATCH,
                MismatchKind.PAYMENT_WITHOUT_GRANT,
            }
            assert len(services.list_mismatches(s, kind="amount_mismatch")) == 1
            assert len(services.list_mismatches(s, customer_id=world["customer"], run_id=summary.run_id)) == 2
            assert services.list_mismatches(s, status=MismatchStatus.RESOLVED) == []
            n = services.export_csv(s, tmp_path / "out.csv")
        rows = list(csv.DictReader((tmp_path / "out.csv").open()))
        assert n == len(rows) == 2
        assert {r["kind"] for r in rows} == {"amount_mismatch", "payment_without_grant"}
        assert all(json.loads(r["evidence"])["stripe"]["id"] for r in rows)


class TestReruns:
    def test_rerunning_a_window_changes_nothing(self, engine: Engine, emulator: Emulator) -> None:
        _world(emulator)
        first = _run(emulator)
        with Session(engine) as s:
            before = [(m.id, m.fingerprint, m.status, m.amounts_digest) for m in s.scalars(select(Mismatch))]
            n_actions = s.scalar(select(func.count(MismatchAction.id)))
        second = _run(emulator)
        assert second.counts == first.counts
        assert second.outcomes == {"unchanged": 2} and second.closed == 0
        with Session(engine) as s:
            after = [(m.id, m.fingerprint, m.status, m.amounts_digest) for m in s.scalars(select(Mismatch))]
            assert after == before
            assert s.scalar(select(func.count(MismatchAction.id))) == n_actions
            assert {m.last_seen_run_id for m in s.scalars(select(Mismatch))} == {second.run_id}
            runs = s.scalars(select(ReconciliationRun).order_by(ReconciliationRun.id)).all()
            assert [r.status for r in runs] == [RunStatus.SUCCEEDED, RunStatus.SUCCEEDED]
            assert runs[1].counts == {"amount_mismatch": 1, "payment_without_grant": 1}
            assert runs[1].finished_at is not None
            # Staging rows are scratch space: gone after each run.
            assert s.scalar(select(func.count(StagedStripeObject.id))) == 0
            assert s.scalar(select(func.count()).select_from(StagedStripeAlias)) == 0

    def test_a_fixed_mismatch_is_closed_with_a_note(self, engine: Engine, emulator: Emulator) -> None:
        world = _world(emulator)
        _run(emulator)
        mid = _by_kind(engine, MismatchKind.PAYMENT_WITHOUT_GRANT).id
        with session_factory().begin() as s:
            b.grant_topup(s, emulator.store, world["missing"])
        third = _run(emulator)
        assert third.closed == 1
        m = _by_kind(engine, MismatchKind.PAYMENT_WITHOUT_GRANT)
        assert m.id == mid and m.status is MismatchStatus.CLOSED
        with Session(engine) as s:
            last = services.list_actions(s, mid)[-1]
        assert (last.action, last.from_status, last.to_status, last.actor) == (
            ActionKind.AUTO_CLOSE,
            MismatchStatus.OPEN,
            MismatchStatus.CLOSED,
            "tester",
        )
        assert "no longer observed" in last.note and last.run_id == third.run_id

    def test_a_resolved_mismatch_stays_resolved_until_its_amounts_change(
        self, engine: Engine, emulator: Emulator
    ) -> None:
        world = _world(emulator)
        _run(emulator)
        mid = _by_kind(engine, MismatchKind.AMOUNT_MISMATCH).id
        with session_factory().begin() as s:
            services.resolve(s, mid, actor="ana", note="top-up bonus agreed with sales")
        again = _run(emulator)
        assert again.outcomes.get("reopened") is None
        assert _by_kind(engine, MismatchKind.AMOUNT_MISMATCH).status is MismatchStatus.RESOLVED
        with session_factory().begin() as s:
            s.execute(update(Grant).where(Grant.stripe_object_id == world["short_pi"]).values(units=200))
        changed = _run(emulator)
        assert changed.outcomes.get("reopened") == 1
        m = _by_kind(engine, MismatchKind.AMOUNT_MISMATCH)
        assert m.status is MismatchStatus.OPEN and m.actual_amount == 200
        assert _actions(engine, mid)[-1] == (ActionKind.AMOUNTS_CHANGED, MismatchStatus.RESOLVED, MismatchStatus.OPEN)

    def test_a_closed_mismatch_that_comes_back_reopens(self, engine: Engine, emulator: Emulator) -> None:
        world = _world(emulator)
        _run(emulator)
        with session_factory().begin() as s:
            s.execute(update(Grant).where(Grant.stripe_object_id == world["short_pi"]).values(units=12000))
        _run(emulator)
        m = _by_kind(engine, MismatchKind.AMOUNT_MISMATCH)
        assert m.status is MismatchStatus.CLOSED
        with session_factory().begin() as s:
            s.execute(update(Grant).where(Grant.stripe_object_id == world["short_pi"]).values(units=50))
        back = _run(emulator)
        assert back.outcomes.get("reappeared") == 1
        assert _by_kind(engine, MismatchKind.AMOUNT_MISMATCH).status is MismatchStatus.OPEN
        assert _actions(engine, m.id)[-1] == (ActionKind.REAPPEARED, MismatchStatus.CLOSED, MismatchStatus.OPEN)

    def test_ignored_mismatches_stay_ignored_when_they_disappear(self, engine: Engine, emulator: Emulator) -> None:
        world = _world(emulator)
        _run(emulator)
        mid = _by_kind(engine, MismatchKind.PAYMENT_WITHOUT_GRANT).id
        with session_factory().begin() as s:
            services.ignore(s, mid, actor="ana", note="test payment")
            b.grant_topup(s, emulator.store, world["missing"])
        assert _run(emulator).closed == 0
        assert _by_kind(engine, MismatchKind.PAYMENT_WITHOUT_GRANT).status is MismatchStatus.IGNORED

    def test_a_run_over_another_window_does_not_close_what_it_did_not_cover(
        self, engine: Engine, emulator: Emulator
    ) -> None:
        _world(emulator)
        _run(emulator)
        later = _run(emulator, since=_until(), until=_until() + timedelta(days=1))
        assert later.closed == 0 and later.counts == {}
        with Session(engine) as s:
            assert {m.status for m in s.scalars(select(Mismatch))} == {MismatchStatus.OPEN}

    def test_a_failing_run_is_recorded_as_failed(self, engine: Engine, emulator: Emulator) -> None:
        _world(emulator)

        class Broken:
            def __getattr__(self, name: str) -> Any:
                def fail(*args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
                    raise ConnectionError("Stripe is down")

                return fail

        with pytest.raises(ConnectionError):
            reconcile(session_factory(), Broken(), since=emulator.start, until=_until(), actor="t")  # type: ignore[arg-type]
        with Session(engine) as s:
            run = s.scalars(select(ReconciliationRun)).one()
            assert run.status is RunStatus.FAILED and "Stripe is down" in (run.error or "")
            assert s.scalars(select(Mismatch)).all() == []
            assert s.scalar(select(func.count(StagedStripeObject.id))) == 0

    def test_a_callers_session_owns_the_transaction(self, engine: Engine, emulator: Emulator) -> None:
        _world(emulator)
        with Session(engine) as s:
            summary = reconcile(s, emulator.gateway, since=emulator.start, until=_until(), actor="caller")
            assert summary.counts == {"amount_mismatch": 1, "payment_without_grant": 1}
            assert len(s.scalars(select(Mismatch)).all()) == 2
            s.rollback()
        with Session(engine) as s:
            assert s.scalars(select(ReconciliationRun)).all() == []
            assert s.scalars(select(Mismatch)).all() == []

    def test_staging_left_by_a_killed_run_is_cleared(self, engine: Engine, emulator: Emulator) -> None:
        with session_factory().begin() as s:
            s.add(StagedStripeObject(run_id=424242, object_type="charge", object_id="ch_left_over", detail={}))
            s.add(StagedStripeAlias(run_id=424242, key="pi_left_over", payment_id="cs_left_over"))
        _run(emulator)
        with Session(engine) as s:
            assert s.scalar(select(func.count(StagedStripeObject.id))) == 0
            assert s.scalar(select(func.count()).select_from(StagedStripeAlias)) == 0


class TestCli:
    @pytest.fixture
    def cli(self, emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
        from ledger.settings import get_settings
        from reconciliation.gateway import get_gateway

        monkeypatch.setenv("STRIPE_API_BASE", emulator.server.url)
        monkeypatch.setenv("STRIPE_MAX_RETRIES", "0")
        get_settings.cache_clear()
        get_gateway.cache_clear()
        yield CliRunner()
        get_gateway.cache_clear()

    def _invoke(self, runner: CliRunner, *args: str) -> Any:
        from worker.cli import app

        return runner.invoke(app, list(args))

    def test_reconcile_then_review_from_the_cli(
        self, engine: Engine, emulator: Emulator, cli: CliRunner, tmp_path: Path
    ) -> None:
        _world(emulator)
        since, until = emulator.start.isoformat(), _until().isoformat()
        result = self._invoke(cli, "reconcile", "--since", since, "--until", until, "--json", "--actor", "cron")
        assert result.exit_code == 1, result.output  # mismatches found
        summary = json.loads(result.stdout)
        assert (summary["ok"], summary["code"]) == (False, "mismatches_found")  # ok exactly when exit 0
        assert summary["counts"] == {"amount_mismatch": 1, "payment_without_grant": 1}
        assert summary["status"] == "succeeded"

        listed = self._invoke(cli, "mismatches", "list", "--kind", "amount_mismatch", "--json")
        assert listed.exit_code == 0, listed.output
        (item,) = json.loads(listed.stdout)["mismatches"]
        mid = str(item["id"])

        shown = self._invoke(cli, "mismatches", "show", mid, "--json")
        assert json.loads(shown.stdout)["actions"][0]["actor"] == "cron"

        no_note = self._invoke(cli, "mismatches", "resolve", mid, "--note", " ")
        assert no_note.exit_code == 2 and "note is required" in no_note.output
        done = self._invoke(cli, "mismatches", "resolve", mid, "--note", "fixed", "--actor", "ana")
        assert done.exit_code == 0 and "resolved" in done.output
        again = self._invoke(cli, "mismatches", "resolve", mid, "--note", "twice")
        assert again.exit_code == 2
        assert self._invoke(cli, "mismatches", "reopen", mid, "--note", "no").exit_code == 0
        assert self._invoke(cli, "mismatches", "ignore", mid, "--note", "meh").exit_code == 0
        assert self._invoke(cli, "mismatches", "show", "424242").exit_code == 5

        trail = json.loads(self._invoke(cli, "mismatches", "show", mid, "--json").stdout)["actions"]
        assert [(a["action"], a["actor"]) for a in trail][1:] == [
            ("resolve", "ana"),
            ("reopen", trail[2]["actor"]),
            ("ignore", trail[3]["actor"]),
        ]
        assert trail[2]["actor"]  # the OS user when --actor is not given

        out = tmp_path / "m.csv"
        exported = self._invoke(cli, "mismatches", "export", "--csv", str(out))
        assert exported.exit_code == 0
        assert len(list(csv.DictReader(out.open()))) == 2

    def test_reconcile_usage_errors(self, engine: Engine, emulator: Emulator, cli: CliRunner, tmp_path: Path) -> None:
        bad = tmp_path / "r.json"
        bad.write_text("nope")
        args = ["reconcile", "--since", "2026-01-02", "--until", "2026-01-03"]
        result = self._invoke(cli, *args, "--provider-report", str(bad))
        assert result.exit_code == 2 and "r.json" in result.output
        assert self._invoke(cli, "reconcile", "--since", "2026-01-03", "--until", "2026-01-02").exit_code == 2
        assert self._invoke(cli, "reconcile", "--since", "yesterday", "--until", "2026-01-02").exit_code == 2
        with Session(engine) as s:
            assert s.scalars(select(ReconciliationRun)).all() == []

    def test_run_nightly_reconciles_the_previous_utc_day(
        self, engine: Engine, emulator: Emulator, cli: CliRunner
    ) -> None:
        from reconciliation.cli import run_nightly

        world = _world(emulator)
        now = emulator.start + timedelta(days=1, hours=3, minutes=15)
        summary = run_nightly(now)
        midnight = emulator.start.replace(hour=0)
        assert (summary.since, summary.until) == (midnight, midnight + timedelta(days=1))
        assert summary.counts == {"amount_mismatch": 1, "payment_without_grant": 1}
        with Session(engine) as s:
            run = s.scalars(select(ReconciliationRun)).one()
            assert run.actor == "nightly" and run.status is RunStatus.SUCCEEDED
        assert world["missing"]

    def test_margin_command(self, engine: Engine, emulator: Emulator, cli: CliRunner) -> None:
        c = emulator.store.create_customer().id
        cs = emulator.store.topup(c, "price_credits_large")
        with session_factory().begin() as s:
            b.grant_topup(s, emulator.store, cs.id)
            b.record_usage(
                s,
                c,
                "r1",
                provider="openai",
                model="gpt-4o-2024-08-06",
                workspace=None,
                at=emulator.start + timedelta(hours=1),
                input_tokens=1_000_000,
                output_tokens=0,
            )
        since, until = emulator.start.isoformat(), _until().isoformat()
        result = self._invoke(cli, "margin", "--since", since, "--until", until, "--json")
        assert result.exit_code == 0, result.output
        (row,) = json.loads(result.stdout)["rows"]
        assert (row["customer_id"], row["units"], row["cost_usd"]) == (c, 750, "2.5000000000")
        assert self._invoke(cli, "margin", "--since", until, "--until", since).exit_code == 2

    def test_reconcile_when_stripe_is_unreachable(
        self, engine: Engine, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from ledger.settings import get_settings
        from reconciliation.gateway import get_gateway

        monkeypatch.setenv("STRIPE_API_BASE", "http://127.0.0.1:9")
        monkeypatch.setenv("STRIPE_MAX_RETRIES", "0")
        get_settings.cache_clear()
        get_gateway.cache_clear()
        try:
            result = self._invoke(CliRunner(), "reconcile", "--since", "2026-01-02", "--until", "2026-01-03")
        finally:
            get_gateway.cache_clear()
        # A failed run is its own exit code (7), never "mismatches found" (1).
        assert result.exit_code == 7 and "no Stripe list could be read" in result.output, result.output
        with Session(engine) as s:
            run = s.scalars(select(ReconciliationRun)).one()
            assert run.status is RunStatus.FAILED and run.error


class TestConcurrentRuns:
    @pytest.mark.postgres
    def test_two_runs_at_once_record_each_mismatch_once(self, pg_engine: Engine, emulator: Emulator) -> None:
        from concurrent.futures import ThreadPoolExecutor

        _world(emulator)
        with ThreadPoolExecutor(max_workers=3) as pool:
            results = list(pool.map(lambda _: _run(emulator), range(3)))
        assert all(r.status is RunStatus.SUCCEEDED for r in results)
        assert sorted(r.outcomes.get("new", 0) for r in results) == [0, 0, 2]
        with Session(pg_engine) as s:
            assert s.scalar(select(func.count(Mismatch.id))) == 2
            assert s.scalar(select(func.count(MismatchAction.id))) == 2
