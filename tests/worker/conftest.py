"""Fixtures of the worker tests: storing raw events, a billing config, and a stand-in for Stripe."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, select

from ledger.db import unit_of_work
from ledger.inbox import StripeEvent, parse_envelope, store_event
from tests.conftest import STRIPE_EVENTS

# Prices of the shared fixtures, configured as packs and plans.
WORKER_BILLING_CONFIG = """
[credits]
fallback_credits_per_minor_unit = "1"
topup_priority = 0

[[packs]]
price = "price_credits_small"
credits = 1000

[[packs]]
price = "price_credits_large"
credits = 12000
expires_after_days = 365

[[plans]]
price = "price_1IDQm5JDPojXS6LNM31hxKzp"
name = "Pro"
credits_per_period = 10000
period_end = "expire"

[[plans]]
price = "price_1234"
name = "Team"
credits_per_period = 50000
period_end = "rollover"

[[plans]]
price = "price_pro_monthly"
name = "Pro monthly"
credits_per_period = 5000
period_end = "expire"

[access]
grace_days = 7
"""


def load_fixture(name: str) -> dict[str, Any]:
    """A shared Stripe event fixture, as a dict (a fresh copy each time)."""
    return copy.deepcopy(json.loads((STRIPE_EVENTS / name).read_text(encoding="utf-8")))


def store(event: dict[str, Any] | bytes) -> int:
    """Store a raw event through the inbox (as the receiver does); return its row id (existing or new)."""
    raw = event if isinstance(event, bytes) else orjson.dumps(event)
    envelope = parse_envelope(orjson.loads(raw))
    with unit_of_work() as session:
        row_id = store_event(session, raw, envelope)
        if row_id is None:
            row_id = session.scalars(select(StripeEvent.id).where(StripeEvent.event_id == envelope.event_id)).one()
    return row_id


def event_row(row_id: int) -> StripeEvent:
    """The stored event row, read afresh."""
    with unit_of_work() as session:
        row = session.get(StripeEvent, row_id)
        assert row is not None
        session.expunge(row)
        return row


class FakeStripe:
    """The outside world for handler tests: objects, line items and sessions Stripe would return."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.line_items: dict[str, list[dict[str, Any]]] = {}
        self.sessions: list[dict[str, Any]] = []
        self.calls: list[tuple[str, str]] = []

    def retrieve(self, object_type: str, object_id: str) -> dict[str, Any]:
        self.calls.append(("retrieve", object_id))
        return copy.deepcopy(self.objects[(object_type, object_id)])

    def retrieve_checkout_session_line_items(self, session_id: str) -> list[dict[str, Any]]:
        self.calls.append(("line_items", session_id))
        return copy.deepcopy(self.line_items.get(session_id, []))

    def list_checkout_sessions(self, **filters: Any) -> Iterator[dict[str, Any]]:
        self.calls.append(("list_checkout_sessions", str(filters)))
        for s in self.sessions:
            if all(s.get(k) == v for k, v in filters.items() if not k.startswith("created")):
                yield copy.deepcopy(s)


@pytest.fixture
def worker_config(billing_config_file: Callable[[str], Path]) -> Path:
    """The billing config with the fixtures' prices."""
    return billing_config_file(WORKER_BILLING_CONFIG)


@pytest.fixture
def fake_stripe() -> FakeStripe:
    return FakeStripe()


@pytest.fixture
def db(engine: Engine, worker_config: Path) -> Engine:
    """A clean database on each backend, with the worker's billing config."""
    return engine
