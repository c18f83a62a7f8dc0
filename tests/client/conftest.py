"""Fixtures of the client's tests: a live ``billing-reconciler serve`` on PostgreSQL, the fake provider, the SDKs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import anthropic
import openai
import pytest
from client_helpers import TOKEN, BillingServer, config_text
from fake_provider import FakeProvider
from sqlalchemy import Engine

from webhooks.client import AsyncBilling, Billing
from worker.demo.provider import ProviderServer


@pytest.fixture(scope="session")
def billing_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("client-config") / "billing.toml"
    path.write_text(config_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def _billing_server(_pg_migrated: Engine, billing_config: Path) -> Iterator[BillingServer]:
    server = BillingServer(_pg_migrated.url.render_as_string(hide_password=False), billing_config)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def billing_server(_billing_server: BillingServer, pg_engine: Engine) -> BillingServer:
    """The live server on a clean database (restarted if an earlier test left it down)."""
    if _billing_server.process is None or _billing_server.process.poll() is not None:
        _billing_server.start()
    return _billing_server


@pytest.fixture
def billing(billing_server: BillingServer) -> Iterator[Billing]:
    with Billing(billing_server.url, TOKEN, retries=3) as client:
        yield client


@pytest.fixture
def async_billing_factory(billing_server: BillingServer) -> Callable[[], AsyncBilling]:
    return lambda: AsyncBilling(billing_server.url, TOKEN, retries=3)


@pytest.fixture(scope="session")
def _provider() -> Iterator[tuple[FakeProvider, str]]:
    fake = FakeProvider()
    server = ProviderServer(fake.app()).start()
    yield fake, server.url
    server.stop()


@pytest.fixture
def provider(_provider: tuple[FakeProvider, str]) -> FakeProvider:
    """The fake provider, with no script and an empty log."""
    _provider[0].reset()
    return _provider[0]


@pytest.fixture
def provider_url(_provider: tuple[FakeProvider, str]) -> str:
    return _provider[1]


@pytest.fixture
def openai_client(provider: FakeProvider, provider_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{provider_url}/v1", api_key="sk-test", max_retries=2, timeout=5) as client:
        yield client


@pytest.fixture
def anthropic_client(provider: FakeProvider, provider_url: str) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=provider_url, api_key="sk-ant-test", max_retries=2, timeout=5) as client:
        yield client
