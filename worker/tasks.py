"""Celery tasks: thin glue that takes ids, opens the unit of work through the services, and translates errors.

Tasks never receive payloads or ORM objects; the worker reads stored events from the inbox by id.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from celery import Task
from sqlalchemy.exc import DBAPIError, OperationalError

from ledger import grants as ledger_grants
from ledger import holds as ledger_holds
from ledger.db import unit_of_work
from ledger.settings import get_settings
from reconciliation.gateway import StripeReader, get_gateway
from worker import processing
from worker.celery_app import app
from worker.sweep import sweep

log = structlog.get_logger("worker.tasks")

# Errors that leave the whole batch undone (the database went away): Celery retries the task with backoff.
RETRY_TASK_ON = (OperationalError, DBAPIError, ConnectionError)


def task_gateway() -> StripeReader | None:
    """The gateway the event tasks use (tests replace this)."""
    return get_gateway()


@app.task(
    name="worker.process_events",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=RETRY_TASK_ON,
    retry_backoff=2,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=10,
)
def process_events(self: Task, event_row_ids: list[int]) -> dict[str, Any]:
    """Apply stored events by id, each exactly once in effect; re-send the ones that hit a transient error."""
    report = processing.process_events(event_row_ids, gateway=task_gateway())
    if report.retry and not self.app.conf.task_always_eager:
        # In eager mode nothing waits for a countdown; the sweep picks retries up instead.
        self.apply_async(args=[report.retry], countdown=report.retry_in)
    return report.as_dict()


@app.task(name="worker.process_event", acks_late=True, reject_on_worker_lost=True)
def process_event(event_row_id: int) -> dict[str, Any]:
    """Apply one stored event (for callers that have a single id)."""
    return processing.process_events([event_row_id], gateway=task_gateway()).as_dict()


@app.task(name="worker.noop", acks_late=True, reject_on_worker_lost=True)
def noop(event_row_ids: list[int]) -> int:
    """Do nothing: the benchmark's baseline for the broker and pool overhead."""
    return len(event_row_ids)


def _send_to_process_events(event_row_ids: Sequence[int]) -> None:
    process_events.apply_async(args=[[int(i) for i in event_row_ids]])


@app.task(name="worker.sweep_unprocessed")
def sweep_unprocessed(older_than_minutes: float | None = None) -> int:
    """Re-send stored events left unprocessed past the threshold, and waiting events whose retry time came."""
    minutes = get_settings().unprocessed_event_minutes if older_than_minutes is None else older_than_minutes
    # Sent straight to process_events (the sweep's batches are smaller than a message's limit): worker.enqueue
    # imports this module, and this module does not import it back.
    sent = sweep(_send_to_process_events, older_than=timedelta(minutes=minutes))
    if sent:
        log.info("sweep_requeued", events=sent)
    return sent


@app.task(name="worker.release_expired_holds")
def release_expired_holds() -> int:
    """Release holds whose time ran out (the AI call never came back)."""
    with unit_of_work() as session:
        return ledger_holds.release_expired_holds(session, now=datetime.now(UTC))


@app.task(name="worker.expire_grants")
def expire_grants() -> int:
    """Expire grants past their expiry, writing expiry entries."""
    with unit_of_work() as session:
        return ledger_grants.expire_grants(session, now=datetime.now(UTC))


# The reconciliation package's nightly entry point, looked up when the task runs (it is built separately).
RECONCILIATION_ENTRY_POINTS = (("reconciliation.cli", "run_nightly"), ("reconciliation.services", "run_nightly"))


@app.task(name="worker.run_reconciliation")
def run_reconciliation() -> dict[str, Any]:
    """The nightly reconciliation: call reconciliation's entry point when the package provides one."""
    for module_name, attr in RECONCILIATION_ENTRY_POINTS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        entry = getattr(module, attr, None)
        if callable(entry):
            kwargs: dict[str, Any] = {}
            if "gateway" in inspect.signature(entry).parameters:
                kwargs["gateway"] = get_gateway()
            result = entry(**kwargs)
            return {"ran": f"{module_name}.{attr}", "result": str(result)}
    log.warning("reconciliation_not_available")
    return {"ran": None}


@app.task(name="worker.deliver_notifications")
def deliver_notifications() -> dict[str, Any]:
    """Deliver the outbox to the configured endpoints (at least once, signed, with backoff)."""
    from worker.notifications import deliver_pending

    timeout = get_settings().notification_timeout_seconds
    return deliver_pending(timeout=timeout).as_dict()


@app.task(name="worker.detect_usage_spikes")
def detect_usage_spikes() -> dict[str, Any]:
    """Compare each customer's and user's last hour with its own baseline; open a review item per spike."""
    from reconciliation.spikes import scan_spikes

    with unit_of_work() as session:
        return scan_spikes(session, now=datetime.now(UTC)).as_dict()
