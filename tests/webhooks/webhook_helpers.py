"""Helpers of the HTTP edge's tests: a signer with Stripe's own scheme, a hand-over recorder, row counts."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import stripe
from sqlalchemy import Engine, func, select

from ledger.inbox import StripeEvent

SECRET = "whsec_test_current"
OLD_SECRET = "whsec_test_previous"
API_TOKEN = "tok_test_1"


def sign(payload: bytes, secret: str = SECRET, timestamp: int | None = None) -> str:
    """A Stripe-Signature header made by the stripe package itself."""
    return stripe.WebhookSignature.generate_signature_header(payload.decode("utf-8"), secret, timestamp=timestamp)


def signed_headers(payload: bytes, secret: str = SECRET, timestamp: int | None = None) -> dict[str, str]:
    return {"Stripe-Signature": sign(payload, secret, timestamp), "Content-Type": "application/json"}


class HandOverRecorder:
    """Stands in for the worker's broker: records every hand-over, or fails when told to."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.fail = False
        self._lock = threading.Lock()

    def __call__(self, ids: Sequence[int]) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        with self._lock:
            self.calls.append(list(ids))

    @property
    def ids(self) -> list[int]:
        return [i for call in self.calls for i in call]

    def wait_for(self, count: int, timeout: float = 5.0) -> list[int]:
        """The handed-over ids, once at least ``count`` have arrived (hand-over runs after the response)."""
        deadline = time.monotonic() + timeout
        while len(self.ids) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.ids


def stored_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(StripeEvent)).scalar_one())


def stored_payloads(engine: Engine) -> dict[str, bytes]:
    with engine.connect() as conn:
        return {e: bytes(p) for e, p in conn.execute(select(StripeEvent.event_id, StripeEvent.payload))}
