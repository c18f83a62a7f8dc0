"""``Billing`` against a live server on PostgreSQL: typed results, errors by code, retries charged once."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import pytest
from client_helpers import REPO, TOKEN, BillingServer, assert_settled, free_port, fund, holds
from sqlalchemy import Engine

from ledger.accounts import set_access_state
from ledger.db import unit_of_work
from ledger.holds import release_expired_holds
from ledger.models import AccessState
from webhooks.client import (
    AccessRefused,
    Billing,
    BillingUnavailable,
    Charge,
    HoldNotOpen,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidRequest,
    LimitExceeded,
    Unauthorized,
    UnknownCustomer,
    UnknownHold,
)

pytestmark = pytest.mark.postgres

GPT = {"provider": "openai", "model": "gpt-4o-2024-08-06"}


class DropFirstAnswer(httpx.HTTPTransport):
    """The first POST to a path ending in ``suffix`` reaches the server, but its answer is lost on the way back."""

    def __init__(self, suffix: str) -> None:
        super().__init__()
        self.suffix = suffix
        self.dropped = 0
        self.sent = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.method == "POST" and request.url.path.endswith(self.suffix):
            self.sent += 1
            if not self.dropped:
                self.dropped += 1
                response.read()
                response.close()
                raise httpx.ReadError("the connection dropped before the answer", request=request)
        return response


class TestResults:
    def test_record_usage_is_typed_and_a_replay_says_so(self, billing: Billing, pg_engine: Engine) -> None:
        fund("cus_a", 1000)
        first = billing.record_usage(
            "cus_a", request_id="r1", input_tokens=10, output_tokens=5, cost_usd=Decimal("0.0001"), **GPT
        )
        assert isinstance(first, Charge)
        # 10 input x 1 + 5 output x 2 = 20
        assert (first.units, first.balance_after, first.replayed) == (20, 980, False)
        assert first.funded_by[0].units == 20
        again = billing.record_usage(
            "cus_a", request_id="r1", input_tokens=10, output_tokens=5, cost_usd=Decimal("0.0001"), **GPT
        )
        assert again.replayed and again.entry_id == first.entry_id
        assert billing.balance("cus_a").balance == 980

    def test_hold_capture_release_and_reads(self, billing: Billing) -> None:
        fund("cus_a", 1000)
        hold = billing.place_hold("cus_a", request_id="h1", units=300, ttl_seconds=60, feature="chat")
        assert (hold.units, hold.status, hold.balance_after) == (300, "open", 700)
        assert hold.expires_at > datetime.now(UTC)
        capture = billing.capture_hold("h1", input_tokens=100, output_tokens=50, user_id="u_9", **GPT)
        # 100 + 50 x 2 = 200 captured of 300 held
        assert (capture.held, capture.captured, capture.released, capture.shortfall) == (300, 200, 100, 0)
        billing.place_hold("cus_a", request_id="h2", units=50)
        released = billing.release_hold("h2", reason="provider_error", **GPT)
        assert (released.status, released.balance_after) == ("released", 800)
        balance = billing.balance("cus_a")
        assert (balance.balance, balance.held, balance.available, balance.access_state) == (800, 0, 800, "active")
        assert balance.grants[0].remaining == 800
        kinds = [e.kind for e in billing.iter_entries("cus_a", page_size=2)]
        assert kinds == ["release", "hold", "release", "capture", "hold", "grant"]
        page = billing.entries("cus_a", limit=2)
        assert page.has_more and page.next_cursor == page.data[-1].id
        report = billing.usage_report("cus_a", group_by="user", since=datetime.now(UTC) - timedelta(hours=1))
        (row,) = report.rows
        assert (row.key, row.credits, row.input_tokens, row.output_tokens) == ("u_9", 200, 100, 50)
        # provider cost priced by the server from the configured cost: 100 x 2.50/M + 50 x 10.00/M
        assert row.provider_cost_usd == Decimal("0.00075")

    def test_money_as_a_float_is_refused_before_sending(self, billing: Billing) -> None:
        with pytest.raises(TypeError, match="never a float"):
            billing.record_usage("cus_a", request_id="r", cost_usd=0.1, **GPT)  # type: ignore[typeddict-item]


class TestErrors:
    def test_each_code_is_its_own_exception_with_the_bodys_fields(self, billing: Billing) -> None:
        fund("cus_a", 100)
        with pytest.raises(InsufficientCredits) as poor:
            billing.record_usage("cus_a", request_id="big", units=500)
        assert (poor.value.status, poor.value.available, poor.value.requested) == (402, 100, 500)
        with pytest.raises(UnknownCustomer) as unknown:
            billing.balance("cus_nobody")
        assert unknown.value.status == 404
        with pytest.raises(UnknownHold):
            billing.capture_hold("no_such_hold", units=1)
        billing.record_usage("cus_a", request_id="once", units=1)
        with pytest.raises(IdempotencyConflict):
            billing.record_usage("cus_a", request_id="once", units=2)
        billing.place_hold("cus_a", request_id="h", units=5)
        billing.capture_hold("h")
        with pytest.raises(HoldNotOpen):
            billing.release_hold("h")
        with pytest.raises(InvalidRequest, match="no price"):
            billing.record_usage("cus_a", request_id="m", provider="openai", model="gpt-unpriced")
        with unit_of_work() as session:
            set_access_state(session, "cus_a", AccessState.SUSPENDED, as_of=datetime.now(UTC), source="test")
        with pytest.raises(AccessRefused) as refused:
            billing.record_usage("cus_a", request_id="late", units=1)
        assert refused.value.access_state == "suspended"

    def test_a_wrong_token_is_unauthorized(self, billing_server: BillingServer) -> None:
        with Billing(billing_server.url, "wrong") as wrong, pytest.raises(Unauthorized):
            wrong.balance("cus_a")


class TestRetries:
    def test_a_lost_answer_is_retried_with_the_same_key_and_charged_once(
        self, billing_server: BillingServer, pg_engine: Engine
    ) -> None:
        fund("cus_a", 1000)
        transport = DropFirstAnswer("/v1/usage")
        with Billing(
            billing_server.url, TOKEN, http=httpx.Client(base_url=billing_server.url, transport=transport)
        ) as b:
            charge = b.record_usage("cus_a", request_id="r-lost", units=70)
        assert (transport.sent, transport.dropped) == (2, 1)
        assert charge.replayed  # the first attempt was charged; the retry got its original answer
        assert b.balance("cus_a").balance == 930

    def test_a_lost_capture_answer_is_retried_and_captures_once(
        self, billing_server: BillingServer, pg_engine: Engine
    ) -> None:
        fund("cus_a", 1000)
        transport = DropFirstAnswer("/capture")
        http = httpx.Client(base_url=billing_server.url, transport=transport)
        with Billing(billing_server.url, TOKEN, http=http) as b, b.metered("cus_a", estimate_units=300) as call:
            call.record(units=120)
        assert (transport.sent, call.outcome.captured, call.outcome.replayed) == (2, 120, True)
        assert_settled(b, pg_engine, "cus_a", funded=1000, charged=120)

    def test_no_server_is_billing_unavailable_after_the_retries(self) -> None:
        with Billing(f"http://127.0.0.1:{free_port()}", TOKEN, retries=2) as nowhere:
            with pytest.raises(BillingUnavailable, match="no answer after retries"):
                nowhere.record_usage("cus_a", request_id="r", units=1)


class TestMetered:
    def test_records_then_captures(self, billing: Billing, pg_engine: Engine) -> None:
        fund("cus_m", 1000)
        with billing.metered("cus_m", user_id="u_1", feature="chat", estimate_units=500, ttl_seconds=60) as call:
            assert call.hold is not None and call.hold.units == 500
            call.record(input_tokens=100, output_tokens=40, cached_tokens=30, **GPT)
        # 100 + 40 x 2 + 30 x 0.5 = 195
        assert call.outcome is not None and call.outcome.captured == 195
        assert_settled(billing, pg_engine, "cus_m", funded=1000, charged=195)

    def test_an_exception_before_record_releases(self, billing: Billing, pg_engine: Engine) -> None:
        fund("cus_m", 1000)
        with pytest.raises(RuntimeError), billing.metered("cus_m", estimate_units=500):
            raise RuntimeError("the provider call failed")
        assert_settled(billing, pg_engine, "cus_m", funded=1000, charged=0)
        assert holds(pg_engine, "cus_m")[0]["release_reason"] == "provider_error"

    def test_an_exception_after_record_still_captures(self, billing: Billing, pg_engine: Engine) -> None:
        fund("cus_m", 1000)
        with pytest.raises(RuntimeError), billing.metered("cus_m", estimate_units=500) as call:
            call.record(units=42)
            raise RuntimeError("the caller's own code failed after the call was served")
        assert_settled(billing, pg_engine, "cus_m", funded=1000, charged=42)

    def test_nothing_recorded_releases(self, billing: Billing, pg_engine: Engine) -> None:
        fund("cus_m", 1000)
        with billing.metered("cus_m", estimate_units=500):
            pass
        assert holds(pg_engine, "cus_m")[0]["release_reason"] == "nothing_recorded"
        assert_settled(billing, pg_engine, "cus_m", funded=1000, charged=0)

    def test_a_hold_that_expired_mid_call_is_charged_directly_once(self, billing: Billing, pg_engine: Engine) -> None:
        fund("cus_m", 1000)
        with billing.metered("cus_m", estimate_units=500, ttl_seconds=1, request_id="long-call") as call:
            with unit_of_work() as session:  # the expiry sweep runs while the call streams
                assert release_expired_holds(session, now=datetime.now(UTC) + timedelta(seconds=5)) == 1
            call.record(units=77)
        assert isinstance(call.outcome, Charge) and call.outcome.request_id == "long-call"
        balance = billing.balance("cus_m")
        assert (balance.balance, balance.held) == (923, 0)
        assert holds(pg_engine, "cus_m")[0]["status"] == "expired"

    def test_record_needs_something_to_price(self, billing: Billing) -> None:
        fund("cus_m", 1000)
        with billing.metered("cus_m", estimate_units=5) as call, pytest.raises(ValueError, match="record units"):
            call.record(input_tokens=3)


class TestLayering:
    def test_the_client_imports_nothing_of_the_server(self) -> None:
        code = (
            "import sys, webhooks.client; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & "
            "{'ledger', 'worker', 'reconciliation', 'sqlalchemy', 'fastapi', 'celery', 'stripe', 'openai',"
            " 'anthropic'}); "
            "print(','.join(bad))"
        )
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == ""


def _batch_served(server: BillingServer) -> bool:
    paths = httpx.get(f"{server.url}/openapi.json", timeout=10).json()["paths"]
    return "/v1/usage/batch" in paths


class TestBatch:
    def test_each_event_has_its_own_result_in_order(self, billing: Billing, billing_server: BillingServer) -> None:
        if not _batch_served(billing_server):
            pytest.skip("POST /v1/usage/batch is not served yet (issue 12, on main)")
        fund("cus_b", 100)
        events = [
            {"customer_id": "cus_b", "request_id": "b1", "units": 30},
            {"customer_id": "cus_b", "request_id": "b2", "units": 500},
            {"customer_id": "cus_nobody", "request_id": "b3", "units": 1},
            {
                "customer_id": "cus_b",
                "request_id": "b4",
                "provider": "openai",
                "model": "gpt-4o-2024-08-06",
                "input_tokens": 10,
                "output_tokens": 5,
            },
        ]
        results = billing.record_usage_batch(events)  # type: ignore[arg-type]
        assert [r.status for r in results] == [201, 402, 404, 201]
        assert results[0].charge is not None and results[0].charge.units == 30
        assert isinstance(results[1].error, InsufficientCredits) and results[1].error.available == 70
        assert isinstance(results[2].error, UnknownCustomer)
        assert results[3].charge is not None and results[3].charge.units == 20  # 10 + 5 x 2
        # The same batch again charges nothing: every event is a replay of its first answer.
        again = billing.record_usage_batch(events)  # type: ignore[arg-type]
        assert [r.status for r in again] == [200, 402, 404, 200]
        assert again[0].charge is not None and again[0].charge.replayed
        assert billing.balance("cus_b").balance == 50

    def test_a_batch_needs_events_with_their_own_request_ids(self, billing: Billing) -> None:
        with pytest.raises(ValueError, match="at least one"):
            billing.record_usage_batch([])
        with pytest.raises(ValueError, match="request_id"):
            billing.record_usage_batch([{"customer_id": "c", "units": 1}])


class AnswerFirst(httpx.HTTPTransport):
    """The first ``times`` requests are answered by a failing proxy in front of the server (never forwarded)."""

    def __init__(self, status: int, body: dict[str, object], times: int) -> None:
        super().__init__()
        self.status, self.body, self.times = status, body, times
        self.keys: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.keys.append(request.read().decode())
        if len(self.keys) <= self.times:
            return httpx.Response(self.status, json=self.body, headers={"Retry-After": "0"}, request=request)
        return super().handle_request(request)


class TestRetryOnStatus:
    @pytest.mark.parametrize(
        ("status", "code"), [(503, "database_unavailable"), (429, "overloaded"), (502, "bad_gateway")]
    )
    def test_overload_and_server_errors_are_retried_with_the_same_body(
        self, billing_server: BillingServer, status: int, code: str
    ) -> None:
        fund("cus_a", 1000)
        transport = AnswerFirst(status, {"error": {"code": code, "message": "try later"}}, times=2)
        http = httpx.Client(base_url=billing_server.url, transport=transport)
        with Billing(billing_server.url, TOKEN, http=http, retries=3) as b:
            charge = b.record_usage("cus_a", request_id="r-retried", units=5)
        assert (charge.replayed, charge.balance_after) == (False, 995)
        assert len(transport.keys) == 3 and len(set(transport.keys)) == 1  # the same body, the same request id

    def test_a_usage_limit_429_is_not_retried(self, billing_server: BillingServer) -> None:
        transport = AnswerFirst(429, {"error": {"code": "limit_exceeded", "message": "daily limit", "limit": 10}}, 1)
        http = httpx.Client(base_url=billing_server.url, transport=transport)
        with Billing(billing_server.url, TOKEN, http=http, retries=3) as b, pytest.raises(LimitExceeded) as exc:
            b.record_usage("cus_a", request_id="r-limit", units=5)
        assert (len(transport.keys), exc.value.limit) == (1, 10)
