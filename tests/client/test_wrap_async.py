"""The async clients (AsyncOpenAI, AsyncAnthropic) wrapped by AsyncBilling: the same cases as the sync ones."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import anthropic
import openai
import pytest
from client_helpers import assert_settled, fund, holds, last_capture_reason
from fake_provider import FakeProvider, Reply
from sqlalchemy import Engine

from webhooks.client import AsyncBilling, Billing, InvalidRequest

pytestmark = pytest.mark.postgres

PROMPT = [{"role": "user", "content": "Say Foo!"}]
FUNDED = 10_000


class TestAsyncOpenAI:
    def test_plain_stream_abandoned_and_failed_calls(
        self,
        async_billing_factory: Callable[[], AsyncBilling],
        billing: Billing,
        provider: FakeProvider,
        provider_url: str,
        pg_engine: Engine,
    ) -> None:
        fund("cus_async", FUNDED)

        async def calls() -> None:
            async with (
                async_billing_factory() as abilling,
                openai.AsyncOpenAI(
                    base_url=f"{provider_url}/v1", api_key="sk-test", max_retries=0, timeout=5
                ) as client,
            ):
                oai = abilling.wrap_openai(client, customer_id="cus_async", feature="chat")
                # plain: 14 + 37 x 2 = 88
                await oai.chat.completions.create(model="gpt-4o-2024-08-06", messages=PROMPT, max_tokens=100)
                # stream with the usage chunk: 9 + 2 x 2 = 13
                stream = await oai.chat.completions.create(model="gpt-4o-2024-08-06", messages=PROMPT, stream=True)
                assert len([chunk async for chunk in stream]) == 5
                # Responses stream abandoned after "Hi": prompt estimate 2 + 1 x 2 = 4
                stream = await oai.responses.create(model="gpt-5.4", input="Say Foo!", stream=True)
                async for event in stream:
                    if event.type == "response.output_text.delta":
                        break
                await stream.close()
                # a 500 before any output: released
                provider.script("chat", Reply(status=500))
                with pytest.raises(openai.InternalServerError):
                    await oai.chat.completions.create(model="gpt-4o-2024-08-06", messages=PROMPT)
                # an unpriced model: refused before the call
                with pytest.raises(InvalidRequest):
                    await oai.chat.completions.create(model="gpt-unpriced", messages=PROMPT)

        asyncio.run(calls())
        assert_settled(billing, pg_engine, "cus_async", funded=FUNDED, charged=88 + 13 + 4)
        assert [h["status"] for h in holds(pg_engine, "cus_async")] == ["captured"] * 3 + ["released"]
        assert len(provider.log) == 4

    def test_timeout_releases_with_provider_timeout(
        self, async_billing_factory, billing, provider, provider_url, pg_engine
    ) -> None:
        fund("cus_async", FUNDED)
        provider.script("chat", Reply(delay=1.0))

        async def call() -> None:
            async with (
                async_billing_factory() as abilling,
                openai.AsyncOpenAI(
                    base_url=f"{provider_url}/v1", api_key="sk-test", max_retries=0, timeout=0.3
                ) as client,
            ):
                oai = abilling.wrap_openai(client, customer_id="cus_async")
                with pytest.raises(openai.APITimeoutError):
                    await oai.chat.completions.create(model="gpt-4o-2024-08-06", messages=PROMPT)

        asyncio.run(call())
        assert_settled(billing, pg_engine, "cus_async", funded=FUNDED, charged=0)
        (hold,) = holds(pg_engine, "cus_async")
        assert (hold["release_reason"], hold["provider_request_id"]) == ("provider_timeout", hold["request_id"])

    def test_background_settlement_is_awaited_by_aclose(
        self, async_billing_factory, billing, provider, provider_url, pg_engine
    ) -> None:
        fund("cus_async", FUNDED)

        async def calls() -> None:
            abilling = async_billing_factory()
            async with openai.AsyncOpenAI(base_url=f"{provider_url}/v1", api_key="k", max_retries=0) as client:
                oai = abilling.wrap_openai(client, customer_id="cus_async", settle="background")
                await asyncio.gather(
                    *(
                        oai.chat.completions.create(model="gpt-4o-2024-08-06", messages=PROMPT, max_tokens=100)
                        for _ in range(4)
                    )
                )
            await abilling.aclose()  # waits for the captures still pending

        asyncio.run(calls())
        assert_settled(billing, pg_engine, "cus_async", funded=FUNDED, charged=4 * 88)

    def test_sync_billing_refuses_an_async_client(self, billing: Billing, provider_url: str) -> None:
        with pytest.raises(TypeError, match="AsyncBilling"):
            billing.wrap_openai(openai.AsyncOpenAI(base_url=provider_url, api_key="k"), customer_id="c")


class TestAsyncAnthropic:
    def test_plain_stream_and_cut_stream(
        self, async_billing_factory, billing, provider, provider_url, pg_engine
    ) -> None:
        fund("cus_async", FUNDED)

        async def calls() -> None:
            async with (
                async_billing_factory() as abilling,
                anthropic.AsyncAnthropic(base_url=provider_url, api_key="k", max_retries=0, timeout=5) as client,
            ):
                claude = abilling.wrap_anthropic(client, customer_id="cus_async")
                # plain: 249 + 26 x 2 = 301
                await claude.messages.create(model="claude-sonnet-4-5-20250929", max_tokens=100, messages=PROMPT)
                # stream: 135 + 10 x 2 = 155
                stream = await claude.messages.create(
                    model="claude-sonnet-4-5-20250929", max_tokens=100, messages=PROMPT, stream=True
                )
                async for _ in stream:
                    pass
                # cut after "[": reported input 135, output 1 -> 137
                provider.script("messages", Reply(cut_after=4))
                stream = await claude.messages.create(
                    model="claude-sonnet-4-5-20250929", max_tokens=100, messages=PROMPT, stream=True
                )
                with pytest.raises(anthropic.APIConnectionError):
                    async for _ in stream:
                        pass

        asyncio.run(calls())
        assert_settled(billing, pg_engine, "cus_async", funded=FUNDED, charged=301 + 155 + 137)
        assert "estimated: stream cut" in last_capture_reason(pg_engine, "cus_async")
