"""The official ``openai`` package, wrapped, against the fake provider and a live server on PostgreSQL.

Charges are worked out by hand from the fixtures' usage at the test prices (conftest: uncached input 1 credit a
token, output 2, cached 0.5). The prompt "Say Foo!" is 8 characters: estimated at 2 tokens.
"""

from __future__ import annotations

import httpx
import openai
import pytest
from client_helpers import TOKEN, BillingServer, assert_settled, fund, holds, last_capture_reason
from fake_provider import Reply
from sqlalchemy import Engine

from webhooks.client import Billing, BillingUnavailable, InsufficientCredits, InvalidRequest, SettlementFailed

pytestmark = pytest.mark.postgres

PROMPT = [{"role": "user", "content": "Say Foo!"}]
FUNDED = 10_000


@pytest.fixture
def oai(billing: Billing, openai_client: openai.OpenAI) -> openai.OpenAI:
    fund("cus_oai", FUNDED)
    wrapped: openai.OpenAI = billing.wrap_openai(openai_client, customer_id="cus_oai", user_id="u_1", feature="chat")
    return wrapped


class TestChatCompletions:
    def test_plain_call_charges_the_reported_usage(self, oai, billing, provider, pg_engine: Engine) -> None:
        answer = oai.chat.completions.create(model="gpt-4o-2024-08-06", messages=PROMPT, max_tokens=100)
        assert answer.id == "chatcmpl-ABfvaueLEMLNYbT8YzpJxsmiQ6HSY"  # the provider's answer, untouched
        # usage: prompt 14 (no prompt_tokens_details: 0 cached), completion 37 -> 14 + 37 x 2 = 88
        assert_settled(billing, pg_engine, "cus_oai", funded=FUNDED, charged=88)
        (hold,) = holds(pg_engine, "cus_oai")
        # The hold: prompt estimate 2 + max_tokens 100 x 2 = 202, captured 88, the rest given back.
        assert (hold["units"], hold["captured_units"]) == (202, 88)
        # The provider saw our request id, which OpenAI logs with the call.
        assert provider.log[0].headers["x-client-request-id"] == hold["request_id"]

    def test_a_served_name_without_a_price_costs_one_extra_capture_once(
        self, billing_server: BillingServer, provider, openai_client: openai.OpenAI, pg_engine: Engine
    ) -> None:
        # The provider answers under a snapshot name the config does not price (as OpenAI answers gpt-4o as
        # gpt-4o-2024-08-06): the capture under that name is refused, and the call is charged under the name
        # requested. The client remembers the name, so later calls capture under the requested name at once.
        fund("cus_alias", FUNDED)
        sent: list[str] = []
        http = httpx.Client(
            base_url=billing_server.url, event_hooks={"request": [lambda r: sent.append(r.url.path)]}, timeout=10
        )
        with Billing(billing_server.url, TOKEN, http=http) as client:
            oai = client.wrap_openai(openai_client, customer_id="cus_alias")
            for _ in range(3):
                provider.script("chat", Reply(model="gpt-4o-2099-01-01"))
                oai.chat.completions.create(model="gpt-4o-2024-08-06", messages=PROMPT, max_tokens=100)
            # each call: prompt 14 + completion 37 x 2 = 88, at the requested model's prices
            assert_settled(client, pg_engine, "cus_alias", funded=FUNDED, charged=3 * 88)
        http.close()
        captures = [path for path in sent if path.endswith("/capture")]
        assert len([p for p in sent if p == "/v1/holds"]) == 3
        assert len(captures) == 4  # the first call's refused capture, then one capture a call
        assert captures[0] == captures[1]

    def test_cached_and_reasoning_tokens_are_read_from_the_details(self, oai, billing, provider, pg_engine) -> None:
        provider.script("chat", Reply("openai.chat_completion.usage_cached_reasoning.oaispec.json"))
        oai.chat.completions.create(model="gpt-5.4", messages=PROMPT)
        # usage: prompt 19 with 0 cached, completion 10 (reasoning 0 included) -> 19 + 20 = 39
        assert_settled(billing, pg_engine, "cus_oai", funded=FUNDED, charged=39)

    def test_stream_sets_include_usage_and_charges_the_usage_chunk(self, oai, billing, provider, pg_engine) -> None:
        stream = oai.chat.completions.create(model="gpt-4o-2024-08-06", messages=PROMPT, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text == "Foo!"
        assert provider.log[0].request["stream_options"] == {"include_usage": True}
        # the usage chunk: prompt 9, completion 2 -> 9 + 4 = 13
        assert_settled(billing, pg_engine, "cus_oai", funded=FUNDED, charged=13)

    def test_stream_without_usage_is_estimated_from_the_text(self, oai, billing, provider, pg_engine) -> None:
        stream = oai.chat.completions.create(
            model="gpt-4o-2024-08-06", messages=PROMPT, stream=True, stream_options={"include_usage": False}
        )
        assert [c.choices[0].delta.content for c in stream] == ["", "Foo", "!", None]
        assert provider.log[0].request["stream_options"] == {"include_usage": False}  # the caller's choice stands
        # no usage reported: prompt estimate 2 + "Foo!" (4 characters: 1 token) x 2 = 4, marked estimated
        assert_settled(billing, pg_engine, "cus_oai", funded=FUNDED, charged=4)
        assert "estimated: stream ended" in last_capture_reason(pg_engine, "cus_oai")

    def test_abandoned_stream_charges_the_estimate_of_what_was_received(self, oai, billing, pg_engine) -> None:
        with oai.chat.completions.create(model="gpt-4o-2024-08-06", messages=PROMPT, stream=True) as stream:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content == "Foo":
                    break  # the caller stops reading before the usage chunk
        # "Foo" received (1 token): prompt estimate 2 + 1 x 2 = 4
        assert_settled(billing, pg_engine, "cus_oai", funded=FUNDED, charged=4)
        assert "estimated: stream abandoned" in last_capture_reason(pg_engine, "cus_oai")

    def test_abandoned_stream_with_the_release_policy_charges_nothing(self, billing, openai_client, pg_engine) -> None:
        fund("cus_rel", FUNDED)
        oai = billing.wrap_openai(openai_client, customer_id="cus_rel", on_abandoned_stream="release")
        stream = oai.chat.completions.create(model="gpt-4o-2024-08-06", messages=PROMPT, stream=True)
        next(stream), next(stream)
        stream.close()
        assert_settled(billing, pg_engine, "cus_rel", funded=FUNDED, charged=0)
        (hold,) = holds(pg_engine, "cus_rel")
        assert (hold["status"], hold["release_reason"]) == ("released", "stream_abandoned")

    def test_rate_limited_then_served_is_charged_once(self, oai, billing, provider, pg_engine) -> None:
        provider.script("chat", Reply(status=429))
        oai.chat.completions.create(model="gpt-4o-2024-08-06", messages=PROMPT, max_tokens=100)
        assert [s.outcome for s in provider.log] == ["error", "served"]  # the SDK retried the 429
        assert_settled(billing, pg_engine, "cus_oai", funded=FUNDED, charged=88)
        assert len(holds(pg_engine, "cus_oai")) == 1

    def test_server_error_releases_the_hold(self, oai, billing, provider, pg_engine) -> None:
        provider.script("chat", Reply(status=500), Reply(status=500), Reply(status=500))
        with pytest.raises(openai.InternalServerError):
            oai.chat.completions.create(model="gpt-4o-2024-08-06", messages=PROMPT)
        assert len(provider.log) == 3 and provider.served() == []
        assert_settled(billing, pg_engine, "cus_oai", funded=FUNDED, charged=0)
        (hold,) = holds(pg_engine, "cus_oai")
        assert (hold["release_reason"], hold["model"]) == ("provider_error", "gpt-4o-2024-08-06")
        assert hold["provider_request_id"] == provider.log[-1].request_id  # the provider's id of its last answer

    def test_stream_cut_half_way_charges_the_estimate_and_raises(self, oai, billing, provider, pg_engine) -> None:
        provider.script("chat", Reply(cut_after=2))  # the role chunk and "Foo", then the connection drops
        stream = oai.chat.completions.create(model="gpt-4o-2024-08-06", messages=PROMPT, stream=True)
        received = []
        with pytest.raises(openai.APIConnectionError):
            for chunk in stream:
                received.append(chunk.choices[0].delta.content)
        assert received == ["", "Foo"]
        # "Foo" served: prompt estimate 2 + 1 x 2 = 4
        assert_settled(billing, pg_engine, "cus_oai", funded=FUNDED, charged=4)
        assert "estimated: stream cut" in last_capture_reason(pg_engine, "cus_oai")

    def test_client_timeout_releases_and_records_the_call(self, billing, provider, provider_url, pg_engine) -> None:
        fund("cus_slow", FUNDED)
        slow = openai.OpenAI(base_url=f"{provider_url}/v1", api_key="sk-test", max_retries=0, timeout=0.3)
        oai = billing.wrap_openai(slow, customer_id="cus_slow")
        provider.script("chat", Reply(delay=1.0))
        with pytest.raises(openai.APITimeoutError):
            oai.chat.completions.create(model="gpt-4o-2024-08-06", messages=PROMPT)
        assert_settled(billing, pg_engine, "cus_slow", funded=FUNDED, charged=0)
        (hold,) = holds(pg_engine, "cus_slow")
        assert hold["status"] == "released"
        assert (hold["release_reason"], hold["provider"], hold["model"]) == (
            "provider_timeout",
            "openai",
            "gpt-4o-2024-08-06",
        )
        # The id the provider logged the call under, should it have served it after all.
        assert hold["provider_request_id"] == provider.log[0].headers["x-client-request-id"] == hold["request_id"]
        slow.close()

    def test_model_without_a_price_is_refused_before_the_provider_is_called(self, oai, provider, pg_engine) -> None:
        with pytest.raises(InvalidRequest, match="no price"):
            oai.chat.completions.create(model="gpt-unpriced", messages=PROMPT)
        assert provider.log == []
        assert holds(pg_engine, "cus_oai") == []

    def test_customer_without_enough_credits_is_refused_before_the_call(self, billing, openai_client, provider) -> None:
        fund("cus_poor", 100)
        oai = billing.wrap_openai(openai_client, customer_id="cus_poor")
        with pytest.raises(InsufficientCredits) as refused:
            oai.chat.completions.create(model="gpt-4o-2024-08-06", messages=PROMPT, max_tokens=100)
        assert (refused.value.available, refused.value.requested) == (100, 202)
        assert provider.log == []

    def test_a_copy_made_with_with_options_is_metered_too(self, oai, billing, provider, pg_engine) -> None:
        oai.with_options(max_retries=0).chat.completions.create(
            model="gpt-4o-2024-08-06", messages=PROMPT, max_tokens=100, n=2
        )
        (hold,) = holds(pg_engine, "cus_oai")
        # n=2 choices may each be 100 tokens long: prompt estimate 2 + 2 x 100 x 2 = 402 held
        assert (hold["units"], hold["captured_units"]) == (402, 88)
        assert_settled(billing, pg_engine, "cus_oai", funded=FUNDED, charged=88)


class CaptureUnreachable(httpx.HTTPTransport):
    """Captures never reach the server (an outage after the provider answered); everything else does."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/capture"):
            raise httpx.ConnectError("connection refused", request=request)
        return super().handle_request(request)


class TestSettlementFailure:
    def test_a_served_call_that_cannot_be_charged_raises_with_the_answer(
        self, billing_server: BillingServer, openai_client: openai.OpenAI, pg_engine: Engine
    ) -> None:
        fund("cus_out", FUNDED)
        http = httpx.Client(base_url=billing_server.url, transport=CaptureUnreachable())
        with Billing(billing_server.url, TOKEN, http=http, retries=1) as billing:
            oai = billing.wrap_openai(openai_client, customer_id="cus_out")
            with pytest.raises(SettlementFailed) as failed:
                oai.chat.completions.create(model="gpt-4o-2024-08-06", messages=PROMPT, max_tokens=100)
        assert failed.value.response.id == "chatcmpl-ABfvaueLEMLNYbT8YzpJxsmiQ6HSY"  # the caller keeps the answer
        assert isinstance(failed.value.cause, BillingUnavailable)
        # Nothing charged twice: the hold stays open until its time-to-live releases it.
        (hold,) = holds(pg_engine, "cus_out")
        assert (hold["status"], hold["request_id"]) == ("open", failed.value.request_id)


class TestResponses:
    def test_plain_call_charges_the_reported_usage(self, oai, billing, pg_engine) -> None:
        oai.responses.create(model="gpt-4o-mini-2024-07-18", input="Say Foo!", max_output_tokens=100)
        # usage: input 14 (0 cached), output 50 -> 14 + 100 = 114
        assert_settled(billing, pg_engine, "cus_oai", funded=FUNDED, charged=114)

    def test_reasoning_tokens_are_not_charged_twice(self, oai, billing, provider, pg_engine) -> None:
        provider.script("responses", Reply("openai.response.reasoning_tokens.oaispec.json"))
        oai.responses.create(model="o1-2024-12-17", input="Say Foo!", max_output_tokens=2000)
        # usage: input 81, output 1035 of which 832 reasoning (already in the 1035) -> 81 + 2070 = 2151
        assert_settled(billing, pg_engine, "cus_oai", funded=FUNDED, charged=2151)

    def test_stream_charges_the_completed_events_usage(self, oai, billing, pg_engine) -> None:
        stream = oai.responses.create(model="gpt-5.4", input="Say Foo!", stream=True)
        kinds = [event.type for event in stream]
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        # response.completed usage: input 37, output 11 -> 37 + 22 = 59
        assert_settled(billing, pg_engine, "cus_oai", funded=FUNDED, charged=59)

    def test_stream_abandoned_before_completed_is_estimated(self, oai, billing, pg_engine) -> None:
        stream = oai.responses.create(model="gpt-5.4", input="Say Foo!", stream=True)
        for event in stream:
            if event.type == "response.output_text.delta":
                break
        stream.close()
        # "Hi" received (2 characters: 1 token): prompt estimate 2 + 1 x 2 = 4
        assert_settled(billing, pg_engine, "cus_oai", funded=FUNDED, charged=4)


class TestBackgroundSettlement:
    def test_captures_off_the_callers_path_once_each(self, billing, openai_client, provider, pg_engine) -> None:
        fund("cus_bg", FUNDED)
        oai = billing.wrap_openai(openai_client, customer_id="cus_bg", settle="background")
        for _ in range(3):
            oai.chat.completions.create(model="gpt-4o-2024-08-06", messages=PROMPT, max_tokens=100)
        stream = oai.chat.completions.create(model="gpt-4o-2024-08-06", messages=PROMPT, stream=True)
        list(stream)
        billing.flush()
        # three plain calls (88 each) and a stream with its usage chunk (13)
        assert_settled(billing, pg_engine, "cus_bg", funded=FUNDED, charged=3 * 88 + 13)
