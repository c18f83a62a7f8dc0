"""The wrappers against a live ``serve`` on the embedded default (a SQLite file, no broker), as a new user runs it.

The same calls as the PostgreSQL tests (test_wrap_openai, test_wrap_anthropic, test_wrap_async), with the same
charges worked out by hand there from the fixtures' usage at the test prices: the wrapper's dance (hold, the
provider call, capture or release) must settle the same on both backends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest
from client_helpers import TOKEN, BillingServer, assert_settled, fund, holds, last_capture_reason
from fake_provider import FakeProvider, Reply
from sqlalchemy import Engine

from webhooks.client import AsyncBilling, Billing

PROMPT = [{"role": "user", "content": "Say Foo!"}]
FUNDED = 10_000


@pytest.fixture
def embedded_server(sqlite_engine: Engine, billing_config: Path) -> Iterator[BillingServer]:
    """A live server on this test's SQLite file (the test reads the same file through ``sqlite_engine``)."""
    server = BillingServer(sqlite_engine.url.render_as_string(hide_password=False), billing_config)
    server.env.pop("CELERY_BROKER_URL", None)  # the embedded default: no broker either
    server.start()
    yield server
    server.stop()


@pytest.fixture
def billing(embedded_server: BillingServer) -> Iterator[Billing]:
    with Billing(embedded_server.url, TOKEN, retries=3) as client:
        yield client


class TestOpenAIOnTheEmbeddedDefault:
    def test_plain_stream_abandoned_failed_and_timed_out_calls(
        self, billing: Billing, openai_client: openai.OpenAI, provider: FakeProvider, provider_url: str,
        sqlite_engine: Engine,
    ) -> None:  # fmt: skip
        fund("cus_oai", FUNDED)
        oai = billing.wrap_openai(openai_client, customer_id="cus_oai", user_id="u_1", feature="chat")
        # plain: prompt 14 + completion 37 x 2 = 88; held 2 + 100 x 2 = 202
        oai.chat.completions.create(model="gpt-4o-2024-08-06", messages=PROMPT, max_tokens=100)
        assert_settled(billing, sqlite_engine, "cus_oai", funded=FUNDED, charged=88)
        (hold,) = holds(sqlite_engine, "cus_oai")
        assert (hold["units"], hold["captured_units"]) == (202, 88)
        # a stream with the usage chunk: 9 + 2 x 2 = 13
        stream = oai.chat.completions.create(model="gpt-4o-2024-08-06", messages=PROMPT, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Foo!"
        assert_settled(billing, sqlite_engine, "cus_oai", funded=FUNDED, charged=88 + 13)
        # abandoned after "Foo": the estimate, 2 + 1 x 2 = 4
        with oai.chat.completions.create(model="gpt-4o-2024-08-06", messages=PROMPT, stream=True) as stream:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content == "Foo":
                    break
        assert_settled(billing, sqlite_engine, "cus_oai", funded=FUNDED, charged=88 + 13 + 4)
        assert "estimated: stream abandoned" in last_capture_reason(sqlite_engine, "cus_oai")
        # three 500s (the SDK's retries), nothing served: released
        provider.script("chat", Reply(status=500), Reply(status=500), Reply(status=500))
        with pytest.raises(openai.InternalServerError):
            oai.chat.completions.create(model="gpt-4o-2024-08-06", messages=PROMPT)
        assert_settled(billing, sqlite_engine, "cus_oai", funded=FUNDED, charged=88 + 13 + 4)
        assert holds(sqlite_engine, "cus_oai")[-1]["release_reason"] == "provider_error"
        # a client timeout with no answer: released, the call recorded on the hold
        provider.script("chat", Reply(delay=1.0))
        with openai.OpenAI(base_url=f"{provider_url}/v1", api_key="sk-test", max_retries=0, timeout=0.3) as slow:
            with pytest.raises(openai.APITimeoutError):
                billing.wrap_openai(slow, customer_id="cus_oai").chat.completions.create(
                    model="gpt-4o-2024-08-06", messages=PROMPT
                )
        assert_settled(billing, sqlite_engine, "cus_oai", funded=FUNDED, charged=88 + 13 + 4)
        last = holds(sqlite_engine, "cus_oai")[-1]
        assert (last["release_reason"], last["provider"], last["model"]) == (
            "provider_timeout",
            "openai",
            "gpt-4o-2024-08-06",
        )


class TestAnthropicOnTheEmbeddedDefault:
    def test_plain_and_stream_calls(
        self, billing: Billing, anthropic_client: anthropic.Anthropic, sqlite_engine: Engine
    ) -> None:
        fund("cus_ant", FUNDED)
        claude = billing.wrap_anthropic(anthropic_client, customer_id="cus_ant", user_id="u_1", feature="assistant")
        model = "claude-sonnet-4-5-20250929"
        # input 249, output 26 -> 249 + 52 = 301
        claude.messages.create(model=model, max_tokens=100, messages=PROMPT)
        assert_settled(billing, sqlite_engine, "cus_ant", funded=FUNDED, charged=301)
        # message_start: input 135; message_delta: output 10 -> 135 + 20 = 155
        stream = claude.messages.create(model=model, max_tokens=100, messages=PROMPT, stream=True)
        assert "".join(e.delta.text for e in stream if e.type == "content_block_delta") == "[12345,67890]"
        assert_settled(billing, sqlite_engine, "cus_ant", funded=FUNDED, charged=301 + 155)


class TestAsyncOnTheEmbeddedDefault:
    def test_a_plain_async_call(
        self, embedded_server: BillingServer, billing: Billing, provider_url: str, sqlite_engine: Engine
    ) -> None:
        fund("cus_async", FUNDED)

        async def call() -> None:
            async with (
                AsyncBilling(embedded_server.url, TOKEN, retries=3) as abilling,
                openai.AsyncOpenAI(base_url=f"{provider_url}/v1", api_key="sk-test", max_retries=0) as client,
            ):
                oai = abilling.wrap_openai(client, customer_id="cus_async", feature="chat")
                await oai.chat.completions.create(model="gpt-4o-2024-08-06", messages=PROMPT, max_tokens=100)

        asyncio.run(call())
        assert_settled(billing, sqlite_engine, "cus_async", funded=FUNDED, charged=88)
