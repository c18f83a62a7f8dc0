"""Fixtures for the emulator's own tests: a store with a fixed clock, its server, and a real stripe client."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import stripe
from stripe_emulator import Clock, EmulatorServer, Store

# A fixed start so that tests are reproducible: 2026-03-01T00:00:00Z.
START = 1772323200


@pytest.fixture
def store() -> Store:
    return Store(clock=Clock(START), seed=7)


@pytest.fixture
def server(store: Store) -> Iterator[EmulatorServer]:
    emulator = EmulatorServer(store).start()
    yield emulator
    emulator.stop()


@pytest.fixture
def client(server: EmulatorServer) -> stripe.StripeClient:
    return stripe.StripeClient("sk_test_emulator", base_addresses={"api": server.url}, max_network_retries=0)
