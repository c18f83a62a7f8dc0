"""Fixtures of the HTTP edge's tests: a configured app on each backend and a hand-over recorder."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine
from starlette.testclient import TestClient
from webhook_helpers import API_TOKEN, OLD_SECRET, SECRET, HandOverRecorder

from ledger.settings import get_settings
from webhooks.app import create_app
from webhooks.inbox_writer import InboxWriter


@pytest.fixture
def webhook_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two webhook secrets configured, as while rolling one, and API tokens."""
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRETS", f"{OLD_SECRET}, {SECRET}")
    monkeypatch.setenv("API_TOKENS", f"{API_TOKEN},tok_test_2")


@pytest.fixture
def hand_over() -> HandOverRecorder:
    return HandOverRecorder()


@pytest.fixture
def make_client(webhook_env: None, hand_over: HandOverRecorder) -> Iterator[Callable[..., TestClient]]:
    """Build a TestClient around a fresh app; its lifespan runs, so the inbox writer drains on exit."""
    clients: list[TestClient] = []

    def make(**writer_options: object) -> TestClient:
        get_settings.cache_clear()  # pick up env vars the test set after settings were first read
        writer = InboxWriter(hand_over=hand_over, **writer_options)  # type: ignore[arg-type]
        client = TestClient(create_app(writer=writer), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(engine: Engine, make_client: Callable[..., TestClient]) -> TestClient:
    """A client of the app, on SQLite and on PostgreSQL."""
    return make_client()


@pytest.fixture
def pg_client(pg_engine: Engine, make_client: Callable[..., TestClient]) -> TestClient:
    """A client of the app on PostgreSQL."""
    return make_client()
