"""The embedded default: no broker server, a SQLite-backed queue, and a real worker process consuming it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import Engine

from ledger.inbox import EventStatus
from ledger.settings import get_settings
from tests.worker.conftest import event_row, load_fixture, store
from tests.worker.workers import WorkerProcess, wait_until
from worker.celery_app import configure
from worker.enqueue import hand_over


@pytest.mark.slow
def test_a_worker_consumes_the_sqlite_queue_without_any_server(
    sqlite_engine: Engine, worker_config: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    database = sqlite_engine.url.database
    assert database
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{database}")
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    monkeypatch.delenv("CELERY_TASK_ALWAYS_EAGER", raising=False)
    get_settings.cache_clear()
    app = configure()
    assert app.conf.broker_url.startswith("sqla+sqlite:///")

    ids = [
        store(load_fixture("invoice.paid.subscription_cycle.sse.json")),
        store(load_fixture("customer.created.srm.json")),
    ]
    hand_over(ids)  # queued in the SQLite file, nobody consuming yet
    assert Path(app.conf.broker_url.removeprefix("sqla+sqlite:///")).exists()
    assert event_row(ids[0]).status == EventStatus.PENDING

    env = {k: v for k, v in os.environ.items() if k not in ("CELERY_BROKER_URL", "CELERY_TASK_ALWAYS_EAGER")}
    worker = WorkerProcess(env, tmp_path / "worker.log", concurrency=1)
    worker.start()
    try:
        assert wait_until(lambda: event_row(ids[0]).status == EventStatus.PROCESSED, timeout=60, interval=0.2), (
            tmp_path / "worker.log"
        ).read_text()[-3000:]
        assert event_row(ids[1]).status == EventStatus.IGNORED
    finally:
        worker.stop()
    configure_back = monkeypatch.undo
    configure_back()
    get_settings.cache_clear()
    configure()
