"""Prometheus metrics of the HTTP edge, safe with several worker processes.

With more than one server process, ``billing-reconciler serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` before the
workers start, so each process writes its samples to files there and ``/metrics`` merges them.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector

EVENTS_RECEIVED = Counter("webhook_events_received", "Stripe webhook deliveries received")
EVENTS_STORED = Counter("webhook_events_stored", "Stripe events stored for the first time")
EVENTS_DUPLICATE = Counter("webhook_events_duplicate", "Stripe event redeliveries (already stored)")
EVENTS_REJECTED = Counter("webhook_events_rejected", "Stripe webhook deliveries refused, by reason", ["reason"])
HANDOVER_FAILED = Counter("webhook_handover_failed_events", "Stored events the worker hand-over failed to take")
EVENTS_HANDED_OVER = Counter("webhook_events_handed_over", "Stored events handed over to the worker")
WEBHOOK_LATENCY = Histogram(
    "webhook_request_duration_seconds",
    "Time from the first body byte to the response of POST /webhooks/stripe",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
COMMIT_BATCH_SIZE = Histogram(
    "webhook_commit_batch_events",
    "Events written per group-commit transaction",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
USAGE_BATCH_SIZE = Histogram(
    "usage_commit_batch_calls",
    "Usage API consumptions applied per group-commit transaction",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
API_REQUESTS = Counter("usage_api_requests", "Usage API requests, by route and status", ["route", "status"])


def multiprocess_mode() -> bool:
    """True when prometheus_client was imported with PROMETHEUS_MULTIPROC_DIR set (several server processes)."""
    return values.ValueClass is not values.MutexValue


def render_metrics() -> tuple[bytes, str]:
    """The Prometheus exposition of every metric (merged over processes) and its content type."""
    if multiprocess_mode():
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
