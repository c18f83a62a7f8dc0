"""Fixtures of the HTTP edge's tests: a configured app on each backend and a hand-over recorder."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import uvicorn
from sqlalchemy import Engine
from starlette.testclient import TestClient
from webhook_helpers import API_TOKEN, OLD_SECRET, SECRET, HandOverRecorder

from ledger import db
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


@pytest.fixture
def live_server(pg_engine: Engine, webhook_env: None, hand_over: HandOverRecorder) -> Iterator[str]:
    """The app served by uvicorn in a thread, on a free port.

    The server gets its own small pool: 64 clients contend for 8 connections (and the account's row lock), and
    the shared PostgreSQL (max_connections is shared by every test run on the machine) is not exhausted.
    """
    get_settings.cache_clear()
    engine = db.make_engine(pg_engine.url.render_as_string(hide_password=False), pool_size=8, max_overflow=0)
    db._engine, db._factory = engine, db.sessionmaker(engine, expire_on_commit=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(
        create_app(writer=InboxWriter(hand_over=hand_over)),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        # On a loaded machine a pooled client connection can sit idle past uvicorn's default 5 s; the server
        # closing it under the client's next request is a connection reset, not what these tests are about.
        timeout_keep_alive=120,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(20)
    db._engine, db._factory = pg_engine, db.sessionmaker(pg_engine, expire_on_commit=False)
    engine.dispose()
