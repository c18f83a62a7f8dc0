"""Signed webhook delivery, the way Stripe (and ``stripe trigger``) sends events to an endpoint."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx


def sign_payload(body: bytes | str, secret: str, timestamp: int | None = None) -> str:
    """Return a ``Stripe-Signature`` header for ``body``: ``t=<ts>,v1=<HMAC-SHA256(secret, "<ts>.<body>")>``."""
    raw = body.encode() if isinstance(body, str) else body
    ts = int(time.time()) if timestamp is None else int(timestamp)
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + raw, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


@dataclass(frozen=True)
class Delivery:
    """One delivery of one event: every attempt's status (0 = connection error), last one decides."""

    event_id: str
    event_type: str
    statuses: tuple[int, ...]
    duplicate: bool = False

    @property
    def status(self) -> int:
        return self.statuses[-1] if self.statuses else 0

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def attempts(self) -> int:
        return len(self.statuses)


@dataclass
class DeliveryReport:
    """What ``deliver_webhooks`` did, in delivery order."""

    deliveries: list[Delivery] = field(default_factory=list)

    @property
    def statuses(self) -> list[int]:
        return [d.status for d in self.deliveries]

    @property
    def all_ok(self) -> bool:
        return all(d.ok for d in self.deliveries)

    @property
    def failed(self) -> list[Delivery]:
        return [d for d in self.deliveries if not d.ok]

    def __len__(self) -> int:
        return len(self.deliveries)


def _as_body(event: Mapping[str, Any] | bytes | str) -> tuple[bytes, str, str]:
    if isinstance(event, (bytes, str)):
        raw = event.encode() if isinstance(event, str) else event
        decoded = json.loads(raw)
    else:
        decoded = dict(event)
        raw = json.dumps(decoded, indent=2).encode()
    return raw, str(decoded.get("id", "")), str(decoded.get("type", ""))


def deliver_webhooks(
    url: str,
    secret: str,
    events: Iterable[Mapping[str, Any] | bytes | str],
    *,
    duplicates: float = 0.0,
    shuffle: bool = False,
    seed: int | None = None,
    retries: int = 2,
    retry_delay: float = 0.05,
    timeout: float = 10.0,
    client: httpx.Client | None = None,
    headers: Mapping[str, str] | None = None,
) -> DeliveryReport:
    """POST each event (a dict or its raw JSON) to ``url``, signed with ``secret``, like Stripe does.

    ``duplicates`` is the share of events (0.0..1.0) sent a second time, later in the order; ``shuffle``
    delivers in random order (seeded by ``seed``); a non-2xx answer or connection error is retried up to
    ``retries`` more times. Returns the per-delivery statuses.
    """
    if not 0.0 <= duplicates <= 1.0:
        raise ValueError("duplicates must be between 0.0 and 1.0")
    rng = random.Random(seed)
    bodies = [_as_body(event) for event in events]
    plan: list[tuple[bytes, str, str, bool]] = [(raw, eid, etype, False) for raw, eid, etype in bodies]
    if shuffle:
        rng.shuffle(plan)
    if duplicates:
        for raw, eid, etype in bodies:
            if rng.random() < duplicates:
                # A duplicate lands anywhere after its first delivery, as Stripe's redeliveries do.
                first = next(i for i, item in enumerate(plan) if item[1] == eid and not item[3])
                position = rng.randint(first + 1, len(plan))
                plan.insert(position, (raw, eid, etype, True))
    own_client = client is None
    http = client or httpx.Client(timeout=timeout)
    report = DeliveryReport()
    try:
        for raw, eid, etype, duplicate in plan:
            statuses: list[int] = []
            for attempt in range(retries + 1):
                sent_headers = {
                    "Content-Type": "application/json; charset=utf-8",
                    "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
                    "Stripe-Signature": sign_payload(raw, secret),
                    **(headers or {}),
                }
                try:
                    status = http.post(url, content=raw, headers=sent_headers).status_code
                except httpx.HTTPError:
                    status = 0
                statuses.append(status)
                if 200 <= status < 300:
                    break
                if attempt < retries and retry_delay:
                    time.sleep(retry_delay * (2**attempt))
            report.deliveries.append(Delivery(eid, etype, tuple(statuses), duplicate))
    finally:
        if own_client:
            http.close()
    return report


class WebhookEndpoint:
    """A webhook endpoint registered on a store: each new event is delivered from a background thread, signed,
    in creation order, as Stripe delivers to a configured endpoint. ``flush()`` waits until all are sent."""

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        enabled_events: Iterable[str] = ("*",),
        retries: int = 2,
        retry_delay: float = 0.05,
        timeout: float = 10.0,
    ) -> None:
        import fnmatch
        import queue
        import threading

        self.url = url
        self.secret = secret
        self.enabled_events = tuple(enabled_events)
        self.report = DeliveryReport()
        self._match = fnmatch.fnmatchcase
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        self._retries = retries
        self._retry_delay = retry_delay
        self._client = httpx.Client(timeout=timeout)
        self._thread = threading.Thread(target=self._run, name="webhook-endpoint", daemon=True)
        self._thread.start()

    def wants(self, event_type: str) -> bool:
        """True when this endpoint subscribes to ``event_type``."""
        return any(self._match(event_type, pattern) for pattern in self.enabled_events)

    def enqueue(self, body: bytes) -> None:
        """Queue one rendered event for delivery."""
        self._queue.put(body)

    def _run(self) -> None:
        while True:
            body = self._queue.get()
            try:
                if body is None:
                    return
                part = deliver_webhooks(
                    self.url,
                    self.secret,
                    [body],
                    retries=self._retries,
                    retry_delay=self._retry_delay,
                    client=self._client,
                )
                self.report.deliveries.extend(part.deliveries)
            finally:
                self._queue.task_done()

    def flush(self) -> DeliveryReport:
        """Wait until every queued event has been delivered (or given up on); return the report so far."""
        self._queue.join()
        return self.report

    def close(self) -> None:
        """Deliver what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout=30)
        self._client.close()
