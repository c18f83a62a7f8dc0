"""GET /v1/customers/{id}/entitlements and POST /v1/check; the 429/403 shapes of limit and entitlement refusals,
and the CLI's exit code 6."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import typer
from sqlalchemy import Engine, func, select
from starlette.testclient import TestClient
from webhook_helpers import API_TOKEN

from ledger import cli as ledger_cli
from ledger.config import get_billing_config
from ledger.db import unit_of_work
from ledger.errors import LimitExceeded, NotEntitled
from ledger.grants import grant_credits
from ledger.limits import LimitRequest, reserve_limits
from ledger.models import GrantSource, LimitCounter
from webhooks.responses import ledger_error_response

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}

CONFIG = """
[operations]
text = 1
image = 20

[[models]]
provider = "openai"
model = "gpt-4o-2024-08-06"
credits_per_million_input = "500"
credits_per_million_output = "2000"

[[models]]
provider = "openai"
model = "gpt-4o-mini-2024-07-18"
credits_per_million_input = "30"
credits_per_million_output = "120"

[[plans]]
price = "price_free"
name = "Free"
credits_per_period = 100
allow_models = ["gpt-4o-mini*"]

[[plans]]
price = "price_pro"
name = "Pro"
credits_per_period = 2000

[[limits]]
name = "pro-images-per-user-daily"
plans = ["price_pro"]
scope = "user"
operation = "image"
window = "day"
max_requests = 2

[[limits]]
name = "monthly-spend"
window = "month"
max_cost_usd = "25.00"
"""


@pytest.fixture
def configured(billing_config_file: Callable[[str], Path]) -> None:
    billing_config_file(CONFIG)


def subscribe(customer_id: str, plan: str, units: int) -> None:
    now = datetime.now(UTC)
    with unit_of_work() as session:
        grant_credits(
            session, customer_id, units=units, source=GrantSource.RENEWAL, idempotency_key=f"{customer_id}:renewal",
            reason=f"{plan} subscription_cycle in_{customer_id} (subscription sub_1)",
            period_start=now - timedelta(days=3), period_end=now + timedelta(days=27),
        )  # fmt: skip


def counters() -> int:
    with unit_of_work() as session:
        return int(session.scalar(select(func.coalesce(func.sum(LimitCounter.requests), 0))) or 0)


@pytest.mark.usefixtures("configured")
class TestEntitlements:
    def test_one_call_has_access_balance_subscription_limits_and_entitlements(self, client: TestClient) -> None:
        subscribe("cus_pro", "Pro", 2000)
        with unit_of_work() as session:
            for _ in range(2):
                reserve_limits(session, "cus_pro", LimitRequest(operation="image", user_id="u1"), now=datetime.now(UTC))
        response = client.get("/v1/customers/cus_pro/entitlements", params={"user_id": "u1"}, headers=AUTH)
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["access_state"], body["usage_allowed"], body["suspended"]) == ("active", True, None)
        assert body["balance"]["available"] == 2000
        ((sub),) = body["subscriptions"]
        assert (sub["price"], sub["name"]) == ("price_pro", "Pro") and sub["current_period_end"] is not None
        limits = {limit["name"]: limit for limit in body["limits"]}
        images = limits["pro-images-per-user-daily"]
        assert (images["used"], images["maximum"], images["remaining"], images["scope_value"]) == (
            2,
            2,
            0,
            "cus_pro/user:u1",
        )
        tomorrow = (datetime.now(UTC) + timedelta(days=1)).date()
        assert datetime.fromisoformat(images["reset_at"]) == datetime(
            tomorrow.year, tomorrow.month, tomorrow.day, tzinfo=UTC
        )
        assert (limits["monthly-spend"]["maximum"], limits["monthly-spend"]["used"]) == ("25", "0")
        assert body["entitlements"] == {"operations": None, "features": None, "models": None}

    def test_free_plan_lists_what_it_allows_and_skips_pro_limits(self, client: TestClient) -> None:
        subscribe("cus_free", "Free", 100)
        body = client.get("/v1/customers/cus_free/entitlements", headers=AUTH).json()
        assert body["entitlements"]["models"] == ["gpt-4o-mini*"]
        assert [limit["name"] for limit in body["limits"]] == ["monthly-spend"]

    def test_own_threshold_set_shown_and_cleared(self, client: TestClient) -> None:
        subscribe("cus_pro", "Pro", 2000)
        url = "/v1/customers/cus_pro/low-balance-threshold"
        assert client.put(url, json={"units": 150}, headers=AUTH).json()["low_balance_threshold"] == 150
        body = client.get("/v1/customers/cus_pro/entitlements", headers=AUTH).json()
        assert body["low_balance_threshold"] == 150
        assert client.put(url, json={"units": None}, headers=AUTH).json()["low_balance_threshold"] is None
        assert client.put(url, json={"units": -1}, headers=AUTH).status_code == 422
        unknown = client.put("/v1/customers/cus_x/low-balance-threshold", json={"units": 1}, headers=AUTH)
        assert unknown.status_code == 404

    def test_unknown_customer_is_404(self, client: TestClient) -> None:
        response = client.get("/v1/customers/cus_nobody/entitlements", headers=AUTH)
        assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_customer"


@pytest.mark.usefixtures("configured")
class TestCheck:
    def test_limit_reached_says_which_and_when_and_consumes_nothing(self, client: TestClient) -> None:
        subscribe("cus_pro", "Pro", 2000)
        with unit_of_work() as session:
            for _ in range(2):
                reserve_limits(session, "cus_pro", LimitRequest(operation="image", user_id="u1"), now=datetime.now(UTC))
        before = counters()
        for _ in range(3):
            refused = client.post(
                "/v1/check", json={"customer_id": "cus_pro", "operation": "image", "user_id": "u1"}, headers=AUTH
            ).json()
        assert (refused["allowed"], refused["code"], refused["limit"]) == (
            False,
            "limit_exceeded",
            "pro-images-per-user-daily",
        )
        assert (refused["used"], refused["maximum"], refused["units"]) == (2, 2, 20)
        other = client.post(
            "/v1/check", json={"customer_id": "cus_pro", "operation": "image", "user_id": "u2"}, headers=AUTH
        ).json()
        assert (other["allowed"], other["code"], other["units"]) == (True, None, 20)
        assert counters() == before

    def test_not_entitled_model(self, client: TestClient) -> None:
        subscribe("cus_free", "Free", 100)
        body = {"customer_id": "cus_free", "provider": "openai", "input_tokens": 1000}
        big = client.post("/v1/check", json={**body, "model": "gpt-4o-2024-08-06"}, headers=AUTH).json()
        assert (big["allowed"], big["code"]) == (False, "not_entitled")
        mini = client.post("/v1/check", json={**body, "model": "gpt-4o-mini-2024-07-18"}, headers=AUTH).json()
        assert (mini["allowed"], mini["units"]) == (True, 1)

    def test_balance_too_low(self, client: TestClient) -> None:
        subscribe("cus_free", "Free", 100)
        body = client.post("/v1/check", json={"customer_id": "cus_free", "units": 101}, headers=AUTH).json()
        assert (body["allowed"], body["code"]) == (False, "insufficient_credits")

    def test_unknown_customer_and_bad_body(self, client: TestClient) -> None:
        assert client.post("/v1/check", json={"customer_id": "cus_x"}, headers=AUTH).status_code == 404
        assert client.post("/v1/check", json={"customer_id": "c", "units": -1}, headers=AUTH).status_code == 422
        assert client.post("/v1/check", json={"customer_id": "c"}).status_code == 401


class TestRefusalShapes:
    def test_limit_exceeded_is_429_with_the_limit_reset_used_and_maximum(self, engine: Engine) -> None:
        reset = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=2)
        exc = LimitExceeded(
            "cus_1", "daily", scope_value="cus_1/user:u", used=50, maximum=50, requested=1, reset_at=reset
        )
        response = ledger_error_response(exc)
        body = json.loads(bytes(response.body))["error"]
        assert response.status_code == 429
        assert (body["code"], body["limit"], body["used"], body["maximum"]) == ("limit_exceeded", "daily", 50, 50)
        assert datetime.fromisoformat(body["reset_at"]) == reset
        assert 7000 <= int(response.headers["Retry-After"]) <= 7201

    def test_not_entitled_is_403_naming_what(self, engine: Engine) -> None:
        response = ledger_error_response(NotEntitled("cus_1", what="model", value="gpt-4o", plans=["price_free"]))
        body = json.loads(bytes(response.body))["error"]
        assert response.status_code == 403 and body["not_allowed"] == {"kind": "model", "value": "gpt-4o"}

    def test_cli_exits_6_on_a_limit(self) -> None:
        reset = datetime.now(UTC)

        def work() -> tuple[dict[str, object], str]:
            raise LimitExceeded("cus_1", "daily", scope_value="cus_1", used=1, maximum=1, requested=1, reset_at=reset)

        with pytest.raises(typer.Exit) as info:
            ledger_cli._run_alone(True, work)
        assert info.value.exit_code == 6 == ledger_cli.EXIT_LIMIT
        assert get_billing_config() is not None


@pytest.mark.usefixtures("configured")
class TestReplayAfterPlanChange:
    def test_a_replay_gets_its_first_answer_though_the_plan_now_refuses_the_call(self, client: TestClient) -> None:
        from ledger.models import AccessState
        from ledger.subscriptions import SubscriptionFacts, record_subscription

        customer = "cus_replay_plan"
        subscribe(customer, "Pro", 500)
        body = {"customer_id": customer, "request_id": "req_1", "operation": "text", "provider": "openai",
                "model": "gpt-4o-2024-08-06", "input_tokens": 1000, "output_tokens": 100}  # fmt: skip
        first = client.post("/v1/usage", json=body, headers=AUTH)
        assert first.status_code == 201
        with unit_of_work() as session:  # now on Free (its subscription wins over the renewal), no gpt-4o
            record_subscription(session, customer, SubscriptionFacts("sub_2", "active", "price_free"),
                                access=AccessState.ACTIVE, as_of=datetime.now(UTC), source="test")  # fmt: skip
        again = client.post("/v1/usage", json=body, headers=AUTH)
        assert (again.status_code, again.headers.get("Idempotent-Replayed")) == (200, "true")
        assert again.json() == first.json()
        new = client.post("/v1/usage", json={**body, "request_id": "req_2"}, headers=AUTH)
        assert (new.status_code, new.json()["error"]["code"]) == (403, "not_entitled")
