"""The Celery side with the embedded default: eager in-process tasks, the sweep, the periodic jobs."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, update

from ledger import grants as ledger_grants
from ledger.db import unit_of_work
from ledger.inbox import EventStatus, StripeEvent
from ledger.models import GrantSource
from ledger.settings import get_settings
from tests.worker.conftest import event_row, load_fixture, store
from worker import tasks
from worker.celery_app import BEAT_SCHEDULE, QUEUES, TASK_ROUTES, broker_url, configure, embedded_broker_url
from worker.enqueue import hand_over


@pytest.fixture
def eager(monkeypatch: pytest.MonkeyPatch, db: Engine) -> Iterator[Engine]:
    monkeypatch.setenv("CELERY_TASK_ALWAYS_EAGER", "true")
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    get_settings.cache_clear()
    monkeypatch.setattr(tasks, "task_gateway", lambda: None)
    configure()
    yield db
    monkeypatch.delenv("CELERY_TASK_ALWAYS_EAGER")
    get_settings.cache_clear()
    configure()


class TestAppConfig:
    def test_configured_for_exactly_once_effect(self) -> None:
        app = configure()
        conf = app.conf
        assert conf.task_serializer == "json" and conf.accept_content == ["json"]
        assert conf.task_acks_late and conf.task_reject_on_worker_lost
        assert conf.worker_prefetch_multiplier == 1
        assert {q.name for q in conf.task_queues} == set(QUEUES)
        assert TASK_ROUTES["worker.process_events"]["queue"] == "events"

    def test_no_broker_means_the_embedded_sqlite_queue(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
        monkeypatch.setenv("DATABASE_URL", "sqlite:////tmp/somewhere/billing.db")
        get_settings.cache_clear()
        assert broker_url(get_settings()) == "sqla+sqlite:////tmp/somewhere/billing-queue.db"
        assert embedded_broker_url(get_settings()).startswith("sqla+sqlite:///")

    def test_beat_runs_the_sweep_holds_expiry_nightly_reconciliation_notifications_and_spikes(self) -> None:
        tasks_scheduled = {entry["task"] for entry in BEAT_SCHEDULE.values()}
        assert tasks_scheduled == {
            "worker.sweep_unprocessed",
            "worker.release_expired_holds",
            "worker.expire_grants",
            "worker.run_reconciliation",
            "worker.deliver_notifications",
            "worker.detect_usage_spikes",
        }
        assert set(TASK_ROUTES) >= tasks_scheduled


class TestEagerHandOver:
    def test_hand_over_processes_in_process(self, eager: Engine) -> None:
        ids = [
            store(load_fixture("invoice.paid.subscription_cycle.sse.json")),
            store(load_fixture("customer.created.srm.json")),
        ]
        hand_over(ids)
        assert [event_row(i).status for i in ids] == [EventStatus.PROCESSED, EventStatus.IGNORED]

    def test_hand_over_of_nothing_sends_nothing(self, eager: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        sent: list[Any] = []
        monkeypatch.setattr(tasks.process_events, "apply_async", lambda *a, **k: sent.append((a, k)))
        hand_over([])
        assert sent == []
        hand_over([7, 8])  # the recorder sees a real hand-over: one message with both ids
        assert sent == [((), {"args": [[7, 8]]})]


class TestSweep:
    def test_events_left_pending_are_processed_by_the_sweep(self, eager: Engine) -> None:
        stale = store(load_fixture("invoice.paid.subscription_cycle.sse.json"))
        fresh = store(load_fixture("customer.created.srm.json"))
        with unit_of_work() as session:
            session.execute(
                update(StripeEvent)
                .where(StripeEvent.id == stale)
                .values(received_at=datetime.now(UTC) - timedelta(minutes=get_settings().unprocessed_event_minutes + 1))
            )
        assert tasks.sweep_unprocessed.apply().get() == 1
        assert event_row(stale).status == EventStatus.PROCESSED
        assert event_row(fresh).status == EventStatus.PENDING  # the receiver's hand-over is still on its way

    def test_waiting_events_are_retried_when_their_time_comes(self, eager: Engine) -> None:
        refund = load_fixture("refund.created.sse.json")
        row_id = store(refund)
        hand_over([row_id])
        assert event_row(row_id).status == EventStatus.WAITING
        with unit_of_work() as session:
            result = ledger_grants.grant_credits(
                session,
                "cus_manual",
                units=100,
                source=GrantSource.TOP_UP,
                idempotency_key="manual-grant",
                stripe_object_id=refund["data"]["object"]["payment_intent"],
                amount_minor=2000,
            )
            session.execute(
                update(StripeEvent).where(StripeEvent.id == row_id).values(next_attempt_at=datetime.now(UTC))
            )
        assert tasks.sweep_unprocessed.apply(kwargs={"older_than_minutes": 0}).get() == 1
        row = event_row(row_id)
        assert row.status == EventStatus.PROCESSED, row.last_error
        with unit_of_work() as session:
            from ledger.models import Grant

            grant = session.get(Grant, result.grant_id)
            assert grant is not None and grant.clawed_back == 50


class TestPeriodicJobs:
    def test_expire_grants_task_expires_lapsed_grants(self, eager: Engine) -> None:
        with unit_of_work() as session:
            ledger_grants.grant_credits(
                session,
                "cus_exp",
                units=10,
                source=GrantSource.PROMOTION,
                idempotency_key="exp-1",
                expires_at=datetime.now(UTC) - timedelta(seconds=1),
            )
        assert tasks.expire_grants.apply().get() == 1
        assert tasks.expire_grants.apply().get() == 0

    def test_release_expired_holds_task_runs(self, eager: Engine) -> None:
        assert tasks.release_expired_holds.apply().get() == 0

    def test_reconciliation_hook_calls_the_entry_point(self, eager: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        import reconciliation.cli

        calls: list[Any] = []
        monkeypatch.setattr(reconciliation.cli, "run_nightly", lambda: calls.append(1) or "summary")
        result = tasks.run_reconciliation.apply().get()
        assert calls == [1] and result["ran"] == "reconciliation.cli.run_nightly"
