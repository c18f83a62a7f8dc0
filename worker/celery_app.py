"""The Celery app, configured from settings.

Production: Redis broker (``CELERY_BROKER_URL``). With no broker configured, the embedded default needs no
server: a SQLite-backed kombu transport (``sqla+sqlite``) that ``billing-reconciler worker`` consumes, or, with
``CELERY_TASK_ALWAYS_EAGER=true``, tasks run in-process where they are sent.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from celery import Celery
from celery.schedules import crontab
from celery.signals import worker_process_init
from kombu import Exchange, Queue

from ledger.settings import Settings, get_settings

EVENTS_QUEUE = "events"
MAINTENANCE_QUEUE = "maintenance"
RECONCILIATION_QUEUE = "reconciliation"
QUEUES = (EVENTS_QUEUE, MAINTENANCE_QUEUE, RECONCILIATION_QUEUE)

TASK_ROUTES = {
    "worker.process_events": {"queue": EVENTS_QUEUE},
    "worker.noop": {"queue": EVENTS_QUEUE},
    "worker.sweep_unprocessed": {"queue": MAINTENANCE_QUEUE},
    "worker.release_expired_holds": {"queue": MAINTENANCE_QUEUE},
    "worker.expire_grants": {"queue": MAINTENANCE_QUEUE},
    "worker.run_reconciliation": {"queue": RECONCILIATION_QUEUE},
    "worker.deliver_notifications": {"queue": MAINTENANCE_QUEUE},
    "worker.detect_usage_spikes": {"queue": MAINTENANCE_QUEUE},
}

BEAT_SCHEDULE = {
    "sweep-unprocessed-events": {"task": "worker.sweep_unprocessed", "schedule": 60.0},
    "release-expired-holds": {"task": "worker.release_expired_holds", "schedule": 60.0},
    "expire-grants": {"task": "worker.expire_grants", "schedule": 300.0},
    "nightly-reconciliation": {"task": "worker.run_reconciliation", "schedule": crontab(hour=3, minute=15)},
    # The outbox: fan out and deliver what is due (new events, and retries whose backoff ran out).
    "deliver-notifications": {"task": "worker.deliver_notifications", "schedule": 10.0},
    "detect-usage-spikes": {"task": "worker.detect_usage_spikes", "schedule": crontab(minute="*/15")},
}


def embedded_broker_url(settings: Settings) -> str:
    """The SQLite-backed queue beside the SQLite database (or in the working directory)."""
    url = settings.database_url
    if url.startswith("sqlite:///") and not url.endswith(":memory:"):
        db_path = Path(url.removeprefix("sqlite:///"))
        return f"sqla+sqlite:///{db_path.with_name(db_path.stem + '-queue.db')}"
    return "sqla+sqlite:///./billing-queue.db"


def broker_url(settings: Settings) -> str:
    """The broker URL the app uses: the configured one, or the embedded SQLite queue."""
    return settings.celery_broker_url or embedded_broker_url(settings)


def _config(settings: Settings) -> dict[str, Any]:
    exchange = Exchange("billing", type="direct")
    url = broker_url(settings)
    return {
        "broker_url": url,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        # A task is acknowledged after it ran, and a worker that dies mid-task gives the message back:
        # redelivery is safe because processing an event twice is a no-op.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # One message at a time per process: an event batch is already many events.
        "worker_prefetch_multiplier": 1,
        "task_queues": [Queue(name, exchange, routing_key=name) for name in QUEUES],
        "task_default_queue": EVENTS_QUEUE,
        "task_default_exchange": "billing",
        "task_default_routing_key": EVENTS_QUEUE,
        "task_routes": TASK_ROUTES,
        "task_always_eager": settings.celery_task_always_eager,
        "task_eager_propagates": True,
        "beat_schedule": BEAT_SCHEDULE,
        "timezone": "UTC",
        "enable_utc": True,
        "worker_hijack_root_logger": False,
        # Redis: an unacknowledged message returns to the queue after this long (a worker that vanished).
        "broker_transport_options": {"visibility_timeout": 3600} if url.startswith("redis") else {},
    }


app = Celery("billing_reconciler", include=["worker.tasks"])
_configured: tuple[str, bool] | None = None
_lock = threading.Lock()


def configure(settings: Settings | None = None) -> Celery:
    """(Re)configure the app from settings when they changed (tests change the environment between runs)."""
    global _configured
    settings = settings or get_settings()
    key = (broker_url(settings), settings.celery_task_always_eager)
    with _lock:
        if key != _configured:
            if _configured is not None and app._pool is not None:
                # The broker changed (tests switch settings): drop the connections to the old one.
                app._pool = None
                app.amqp._producer_pool = None
            app.conf.update(_config(settings))
            _configured = key
    return app


def get_app() -> Celery:
    """The Celery app, configured from the current settings."""
    return configure()


@worker_process_init.connect
def _fresh_connections_in_child(**_: Any) -> None:
    # A forked pool process must not share the parent's database sockets.
    from sqlalchemy.orm import configure_mappers

    from ledger.db import get_engine
    from reconciliation.gateway import get_gateway

    get_engine().dispose(close=False)
    # One-time costs paid now rather than inside the first batch, with its accounts locked: configuring the
    # ORM mappers (about 0.5 s of CPU) and building the Stripe gateway (the SDK loads its HTTP stack, ~0.7 s).
    configure_mappers()
    get_gateway()


configure()
