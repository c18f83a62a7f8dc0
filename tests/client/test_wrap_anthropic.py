"""The official ``anthropic`` package, wrapped, against the fake provider and a live server on PostgreSQL.

Charges are worked out by hand from the fixtures' usage at the test prices (conftest: uncached input 1 credit a
token, output 2, cached 0.5); the prompt "Say Foo!" is estimated at 2 tokens.
"""

from __future__ import annotations

import anthropic
import pytest
from client_helpers import assert_settled, fund, holds, last_capture_reason
from fake_provider import Reply
from sqlalchemy import Engine

from webhooks.client import Billing

pytestmark = pytest.mark.postgres

PROMPT = [{"role": "user", "content": "Say Foo!"}]
MODEL = "claude-sonnet-4-5-20250929"
FUNDED = 10_000


@pytest.fixture
def claude(billing: Billing, anthropic_client: anthropic.Anthropic) -> anthropic.Anthropic:
    fund("cus_ant", FUNDED)
    wrapped: anthropic.Anthropic = billing.wrap_anthropic(
        anthropic_client, customer_id="cus_ant", user_id="u_1", feature="assistant"
    )
    return wrapped


class TestMessages:
    def test_plain_call_charges_the_reported_usage(self, claude, billing, pg_engine: Engine) -> None:
        message = claude.messages.create(model=MODEL, max_tokens=100, messages=PROMPT)
        assert message.id == "msg_01MkoP42QB7TUf5m2NVVK2kE"
        # usage: input 249, cache creation 0, cache read 0, output 26 -> 249 + 52 = 301 (more than the hold's 202:
        # the prompt was under-estimated; the balance covers the rest)
        assert_settled(billing, pg_engine, "cus_ant", funded=FUNDED, charged=301)
        (hold,) = holds(pg_engine, "cus_ant")
        assert (hold["units"], hold["captured_units"], hold["shortfall"]) == (202, 301, 0)

    def test_stream_charges_message_start_input_and_message_delta_output(self, claude, billing, pg_engine) -> None:
        stream = claude.messages.create(model=MODEL, max_tokens=100, messages=PROMPT, stream=True)
        text = "".join(e.delta.text for e in stream if e.type == "content_block_delta")
        assert text == "[12345,67890]"
        # message_start: input 135 (output 1 so far); message_delta: output 10 -> 135 + 20 = 155
        assert_settled(billing, pg_engine, "cus_ant", funded=FUNDED, charged=155)

    def test_tool_use_stream_whose_delta_carries_output_only(self, claude, billing, provider, pg_engine) -> None:
        provider.script("messages", Reply("anthropic.message_stream.tool_use.antpy.sse"))
        stream = claude.messages.create(model="claude-sonnet-4-20250514", max_tokens=100, messages=PROMPT, stream=True)
        assert [e.type for e in stream][-1] == "message_stop"
        # message_start: input 377; message_delta: output 65 -> 377 + 130 = 507
        assert_settled(billing, pg_engine, "cus_ant", funded=FUNDED, charged=507)

    def test_abandoned_stream_charges_reported_input_and_estimated_output(self, claude, billing, pg_engine) -> None:
        stream = claude.messages.create(model=MODEL, max_tokens=100, messages=PROMPT, stream=True)
        deltas = 0
        for event in stream:
            deltas += event.type == "content_block_delta"
            if deltas == 3:
                break  # "[", "12", "345," received: 7 characters, 2 tokens
        stream.close()
        # reported input 135; output: 2 estimated (more than the 1 reported so far) -> 135 + 4 = 139
        assert_settled(billing, pg_engine, "cus_ant", funded=FUNDED, charged=139)
        assert "estimated: stream abandoned" in last_capture_reason(pg_engine, "cus_ant")

    def test_abandoned_stream_with_release_policy_charges_only_what_was_reported(
        self, billing, anthropic_client, pg_engine
    ) -> None:
        fund("cus_rel", FUNDED)
        claude = billing.wrap_anthropic(anthropic_client, customer_id="cus_rel", on_abandoned_stream="release")
        with claude.messages.create(model=MODEL, max_tokens=100, messages=PROMPT, stream=True) as stream:
            for event in stream:
                if event.type == "content_block_delta" and event.delta.text == "345,":
                    break
        # message_start reported input 135 and output 1 -> 135 + 2 = 137, no estimate
        assert_settled(billing, pg_engine, "cus_rel", funded=FUNDED, charged=137)
        assert "partial: stream abandoned" in last_capture_reason(pg_engine, "cus_rel")

    def test_rate_limited_then_served_is_charged_once(self, claude, billing, provider, pg_engine) -> None:
        provider.script("messages", Reply(status=429))  # the recorded rate_limit_error body
        claude.messages.create(model=MODEL, max_tokens=100, messages=PROMPT)
        assert [s.outcome for s in provider.log] == ["error", "served"]
        assert_settled(billing, pg_engine, "cus_ant", funded=FUNDED, charged=301)

    def test_server_error_releases_the_hold(self, claude, billing, provider, pg_engine) -> None:
        provider.script("messages", *[Reply(status=500)] * 3)
        with pytest.raises(anthropic.InternalServerError):
            claude.messages.create(model=MODEL, max_tokens=100, messages=PROMPT)
        assert_settled(billing, pg_engine, "cus_ant", funded=FUNDED, charged=0)
        assert holds(pg_engine, "cus_ant")[0]["release_reason"] == "provider_error"

    def test_stream_cut_half_way_charges_reported_input_and_the_text(
        self, claude, billing, provider, pg_engine
    ) -> None:
        # message_start, content_block_start, ping, the "[" delta; then the connection drops
        provider.script("messages", Reply(cut_after=4))
        stream = claude.messages.create(model=MODEL, max_tokens=100, messages=PROMPT, stream=True)
        with pytest.raises(anthropic.APIConnectionError):
            for _ in stream:
                pass
        # reported input 135; output max(1 reported, "[" = 1 estimated) = 1 -> 135 + 2 = 137
        assert_settled(billing, pg_engine, "cus_ant", funded=FUNDED, charged=137)
        assert "estimated: stream cut" in last_capture_reason(pg_engine, "cus_ant")

    def test_client_timeout_releases_and_records_the_model(self, billing, provider, provider_url, pg_engine) -> None:
        fund("cus_slow", FUNDED)
        with anthropic.Anthropic(base_url=provider_url, api_key="k", max_retries=0, timeout=0.3) as slow:
            claude = billing.wrap_anthropic(slow, customer_id="cus_slow")
            provider.script("messages", Reply(delay=1.0))
            with pytest.raises(anthropic.APITimeoutError):
                claude.messages.create(model=MODEL, max_tokens=100, messages=PROMPT)
        assert_settled(billing, pg_engine, "cus_slow", funded=FUNDED, charged=0)
        (hold,) = holds(pg_engine, "cus_slow")
        assert (hold["release_reason"], hold["provider"], hold["model"]) == ("provider_timeout", "anthropic", MODEL)
