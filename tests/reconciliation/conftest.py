"""Fixtures for reconciliation tests: the Stripe emulator behind the worker's gateway, and a test billing config."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from stripe_emulator import Clock, EmulatorServer, Store

from reconciliation.gateway import StripeGateway
from tests.reconciliation.builders import TEST_BILLING_CONFIG


@dataclass
class Emulator:
    store: Store
    server: EmulatorServer
    gateway: StripeGateway
    start: datetime


def recent_start(days: int = 10) -> datetime:
    """A start time some days back from now: ledger rows get today's created_at, so windows must reach now."""
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    return now - timedelta(days=days)


@pytest.fixture
def test_config(billing_config_file: Callable[[str], Path]) -> Path:
    """The reconciliation tests' billing config (model prices three times cost)."""
    return billing_config_file(TEST_BILLING_CONFIG)


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    """A Stripe emulator whose clock starts ten days ago, and a gateway pointed at it (no retries)."""
    start = recent_start()
    store = Store(clock=Clock(start))
    server = EmulatorServer(store).start()
    gateway = StripeGateway(api_key="sk_test_recon", api_base=server.url, max_attempts=1)
    try:
        yield Emulator(store=store, server=server, gateway=gateway, start=start)
    finally:
        server.stop()
