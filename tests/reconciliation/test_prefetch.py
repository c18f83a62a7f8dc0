"""The margin and provider checks' queries run on a second connection while the other checks run (PostgreSQL,
session factory): they find exactly what the same checks find on the run's own session, and a failure there
fails the run like any other."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from ledger.consume import consume
from ledger.db import session_factory
from ledger.inbox import EventStatus
from ledger.pricing import UsageInput
from reconciliation import checks
from reconciliation.engine import reconcile
from reconciliation.models import Mismatch, MismatchKind, ReconciliationRun, RunStatus
from tests.reconciliation import builders as b
from tests.reconciliation.conftest import Emulator

pytestmark = [pytest.mark.usefixtures("test_config"), pytest.mark.postgres]


def _until() -> datetime:
    return datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(days=1)


def _world(engine: Engine, emu: Emulator, tmp_path: Path) -> list[Path]:
    """Usage with a negative margin, free production usage, and provider reports that drift; returns the reports."""
    store = emu.store
    cheap, free = store.create_customer().id, store.create_customer().id
    at = emu.start + timedelta(hours=2)
    for customer in (cheap, free):
        cs = store.topup(customer, "price_credits_large")
        store.clock.advance(minutes=5)
        with session_factory().begin() as s:
            b.grant_topup(s, store, cs.id)
    with session_factory().begin() as s:
        for day in range(2):
            for i, (provider, model, scope) in enumerate(b.MODELS):
                b.record_usage(
                    s,
                    cheap,
                    f"r{day}-{i}",
                    provider=provider,
                    model=model,
                    workspace=scope,
                    at=at + timedelta(days=day),
                    input_tokens=100_000,
                    output_tokens=20_000,
                )
        # 2M output tokens charged one credit: far below cost.
        consume(
            s,
            cheap,
            request_id="costly",
            units=1,
            usage=UsageInput(
                provider="openai",
                model="gpt-4o-2024-08-06",
                output_tokens=2_000_000,
                provider_cost_usd=Decimal("20"),
                occurred_at=at,
            ),
        )
        b.record_usage(
            s,
            free,
            "free",
            provider="openai",
            model="gpt-4o-2024-08-06",
            workspace=None,
            at=at,
            input_tokens=1_000,
            output_tokens=1_000,
            billable=False,
        )
        b.store_all_events(s, store.events(), status=EventStatus.PROCESSED)
    with Session(engine) as s:
        groups = b.usage_groups(s)
    day0 = emu.start.date()
    drift = {("openai", day0, "gpt-4o-2024-08-06", "proj_main"): Decimal("1.00")}
    return b.write_reports(tmp_path, groups, cost_drift=drift, usage_drift={})


def _found(engine: Engine) -> dict[str, tuple[MismatchKind, Decimal | None, Decimal | None]]:
    with Session(engine) as s:
        return {m.fingerprint: (m.kind, m.expected_amount, m.actual_amount) for m in s.scalars(select(Mismatch))}


class TestPrefetch:
    def test_the_prefetched_run_finds_what_the_run_on_one_session_finds(
        self, pg_engine: Engine, emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        reports = _world(pg_engine, emulator, tmp_path)
        threads: list[str] = []
        margin_candidates = checks.margin_candidates

        def spy(*args: Any) -> list[Any]:
            threads.append(threading.current_thread().name)
            return margin_candidates(*args)

        monkeypatch.setattr(checks, "margin_candidates", spy)
        window = {"since": emulator.start, "until": _until(), "provider_reports": reports, "actor": "test"}
        # A caller's session: every check on that one session.
        with Session(pg_engine) as s:
            alone = reconcile(s, emulator.gateway, **window)  # type: ignore[arg-type]
            s.commit()
        assert threads == ["MainThread"]
        found = _found(pg_engine)
        kinds = {kind for kind, _e, _a in found.values()}
        assert {
            MismatchKind.NEGATIVE_MARGIN,
            MismatchKind.NON_BILLABLE_PRODUCTION_USAGE,
            MismatchKind.PROVIDER_COST_DRIFT,
        } <= kinds

        # A session factory: margin and provider sums come from the second connection.
        prefetched = reconcile(session_factory(), emulator.gateway, **window)  # type: ignore[arg-type]
        assert threads[1:] == ["reconcile-prefetch_0"]
        assert prefetched.counts == alone.counts
        assert prefetched.outcomes == {"unchanged": alone.total}
        assert _found(pg_engine) == found

    def test_a_failure_on_the_second_connection_fails_the_run(
        self, pg_engine: Engine, emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        reports = _world(pg_engine, emulator, tmp_path)

        def broken(*_args: object) -> list[object]:
            raise RuntimeError("margin query failed")

        monkeypatch.setattr(checks, "margin_candidates", broken)
        with pytest.raises(RuntimeError, match="margin query failed"):
            reconcile(
                session_factory(),
                emulator.gateway,
                since=emulator.start,
                until=_until(),
                provider_reports=reports,
                actor="test",
            )
        with Session(pg_engine) as s:
            run = s.scalars(select(ReconciliationRun)).one()
            assert run.status is RunStatus.FAILED and "margin query failed" in (run.error or "")
            assert s.scalars(select(Mismatch)).all() == []
