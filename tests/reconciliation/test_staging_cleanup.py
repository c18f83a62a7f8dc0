"""Clearing a run's staged Stripe rows: all of its rows go, another live run's rows stay, and a run paging right
now is neither waited for nor disturbed (on PostgreSQL the tables are truncated when the run is alone)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, func, insert, select, text
from sqlalchemy.orm import Session

from ledger.db import session_factory
from reconciliation.models import ReconciliationRun, RunStatus, StagedStripeAlias, StagedStripeObject
from reconciliation.staging import clear_staging


def _run(session: Session, *, status: RunStatus = RunStatus.RUNNING, age: timedelta = timedelta(0)) -> int:
    now = datetime.now(UTC)
    run = ReconciliationRun(
        since=now - timedelta(days=1),
        until=now,
        started_at=now - age,
        status=status,
        actor="test",
        counts={},
        stats={},
        provider_reports=[],
    )
    session.add(run)
    session.flush()
    return run.id


def _stage(session: Session, run_id: int, n: int = 3) -> None:
    session.execute(
        insert(StagedStripeObject),
        [{"run_id": run_id, "object_type": "charge", "object_id": f"ch_{run_id}_{i}", "detail": {}} for i in range(n)],
    )
    session.execute(
        insert(StagedStripeAlias),
        [{"run_id": run_id, "key": f"pi_{run_id}_{i}", "payment_id": f"cs_{run_id}_{i}"} for i in range(n)],
    )


def _staged(engine: Engine) -> dict[int, int]:
    with Session(engine) as s:
        objects = s.execute(select(StagedStripeObject.run_id, func.count()).group_by(StagedStripeObject.run_id))
        aliases = s.execute(select(StagedStripeAlias.run_id, func.count()).group_by(StagedStripeAlias.run_id))
        by_run = {int(k): int(v) for k, v in objects}
        assert by_run == {int(k): int(v) for k, v in aliases}
    return by_run


class TestClearStaging:
    def test_a_run_alone_leaves_nothing_staged(self, engine: Engine) -> None:
        with session_factory().begin() as s:
            mine = _run(s)
            dead = _run(s, age=timedelta(days=2))  # died two days ago without cleaning up
            _stage(s, mine)
            _stage(s, dead)
        with session_factory().begin() as s:
            clear_staging(s, mine)
        # PostgreSQL truncates (the dead run's rows go too); SQLite deletes this run's rows only.
        assert _staged(engine) == ({} if engine.dialect.name == "postgresql" else {dead: 3})

    def test_another_live_runs_rows_stay(self, engine: Engine) -> None:
        with session_factory().begin() as s:
            mine, other = _run(s), _run(s)
            _stage(s, mine)
            _stage(s, other, n=5)
        with session_factory().begin() as s:
            clear_staging(s, mine)
        assert _staged(engine) == {other: 5}

    @pytest.mark.postgres
    def test_a_run_paging_right_now_is_not_waited_for(self, pg_engine: Engine) -> None:
        with session_factory().begin() as s:
            mine = _run(s)
            _stage(s, mine)
        # Another process has just begun paging: its run row is not even committed, its staging transaction is open.
        with Session(pg_engine) as paging:
            other = _run(paging)
            _stage(paging, other, n=2)
            with session_factory().begin() as s:
                s.execute(text("SET LOCAL statement_timeout = '5s'"))  # waiting would fail here, not hang
                clear_staging(s, mine)
            paging.commit()
        assert _staged(pg_engine) == {other: 2}
