"""The usage API (/v1): auth, idempotent consumption and holds, the read side, and status codes."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import Engine
from starlette.testclient import TestClient
from webhook_helpers import API_TOKEN

from ledger.accounts import open_account, set_access_state
from ledger.check import check_ledger
from ledger.db import unit_of_work
from ledger.grants import grant_credits
from ledger.models import AccessState, GrantSource

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


def fund(customer_id: str, units: int, key: str = "seed") -> None:
    with unit_of_work() as session:
        open_account(session, customer_id)
        grant_credits(
            session, customer_id, units=units, source=GrantSource.TOP_UP, idempotency_key=f"{customer_id}:{key}"
        )


def usage(**fields: object) -> dict[str, object]:
    body: dict[str, object] = {
        "customer_id": "cus_a",
        "user_id": "u_1",
        "feature": "chat",
        "provider": "openai",
        "model": "gpt-4o-2024-08-06",
        "input_tokens": 1000,
        "output_tokens": 500,
        "provider_cost_usd": "0.0075",
    }
    body.update(fields)
    return body


class TestAuth:
    @pytest.mark.parametrize(
        "headers",
        [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dG9rOng="}, {"Authorization": API_TOKEN}],
        ids=["none", "wrong token", "basic", "no scheme"],
    )
    def test_without_a_valid_token_is_401(self, client: TestClient, headers: dict[str, str]) -> None:
        response = client.get("/v1/customers/cus_a/balance", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"

    def test_second_configured_token_is_accepted(self, client: TestClient) -> None:
        fund("cus_a", 10)
        response = client.get("/v1/customers/cus_a/balance", headers={"Authorization": "Bearer tok_test_2"})
        assert response.status_code == 200


class TestConsume:
    def test_created_then_replayed_with_the_original_response(self, client: TestClient, engine: Engine) -> None:
        fund("cus_a", 100)
        first = client.post("/v1/usage", json=usage(units=7), headers={**AUTH, "Idempotency-Key": "req-1"})
        assert first.status_code == 201, first.text
        body = first.json()
        assert body["units"] == 7 and body["balance_after"] == 93 and body["request_id"] == "req-1"
        again = client.post("/v1/usage", json=usage(units=7), headers={**AUTH, "Idempotency-Key": "req-1"})
        assert again.status_code == 200
        assert again.json() == body
        assert again.headers["idempotent-replayed"] == "true"
        balance = client.get("/v1/customers/cus_a/balance", headers=AUTH).json()
        assert balance["balance"] == 93
        with unit_of_work() as session:
            assert check_ledger(session) == []

    def test_request_id_in_the_body_works_like_the_header(self, client: TestClient) -> None:
        fund("cus_a", 100)
        assert client.post("/v1/usage", json=usage(units=1, request_id="r-9"), headers=AUTH).status_code == 201
        assert (
            client.post("/v1/usage", json=usage(units=1), headers={**AUTH, "Idempotency-Key": "r-9"}).status_code == 200
        )

    def test_same_key_other_body_is_409(self, client: TestClient) -> None:
        fund("cus_a", 100)
        assert client.post("/v1/usage", json=usage(units=5, request_id="k"), headers=AUTH).status_code == 201
        response = client.post("/v1/usage", json=usage(units=6, request_id="k"), headers=AUTH)
        assert response.status_code == 409
        assert response.json()["error"]["code"] == "idempotency_conflict"

    def test_priced_from_the_model_when_units_are_omitted(self, client: TestClient) -> None:
        fund("cus_a", 100)
        response = client.post("/v1/usage", json=usage(request_id="p"), headers=AUTH)
        assert response.status_code == 201, response.text
        # 1000 input at 500/M and 500 output at 2000/M: 0.5 + 1.0 credits, rounded up.
        assert response.json()["units"] == 2

    def test_insufficient_credits_is_402_with_available(self, client: TestClient) -> None:
        fund("cus_a", 5)
        response = client.post("/v1/usage", json=usage(units=6, request_id="big"), headers=AUTH)
        assert response.status_code == 402
        error = response.json()["error"]
        assert error["code"] == "insufficient_credits"
        assert error["available"] == 5

    def test_access_refused_is_403(self, client: TestClient) -> None:
        fund("cus_a", 5)
        from datetime import UTC, datetime

        with unit_of_work() as session:
            set_access_state(session, "cus_a", AccessState.SUSPENDED, as_of=datetime.now(UTC), source="test")
        response = client.post("/v1/usage", json=usage(units=1, request_id="s"), headers=AUTH)
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "access_refused"

    def test_unknown_customer_is_404(self, client: TestClient) -> None:
        response = client.post("/v1/usage", json=usage(customer_id="cus_nobody", units=1, request_id="x"), headers=AUTH)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "unknown_customer"
        assert client.get("/v1/customers/cus_nobody/balance", headers=AUTH).status_code == 404

    @pytest.mark.parametrize(
        "body",
        [
            usage(units=1),  # no key at all
            usage(units=-1, request_id="n"),
            usage(units=1.5, request_id="n"),
            usage(units="1", request_id="n"),
            usage(units=1, request_id="n", provider_cost_usd=0.1),  # float money
            usage(units=1, request_id="n", input_tokens=-3),
            usage(units=1, request_id="n", environment="staging"),
            usage(units=1, request_id="n", unknown_field=1),
            usage(units=1, request_id="n", occurred_at="2026-01-01T00:00:00"),  # no time zone
            {"request_id": "n", "units": 1},
            usage(units=1, request_id="n", customer_id="cus_\u0000a"),
            usage(units=1, request_id="n", feature="chat\u0000"),
            usage(units=1, request_id="n", reason="why\u0000"),
            usage(units=1, request_id="n\u0000"),
        ],
        ids=[
            "no key",
            "negative",
            "float units",
            "string units",
            "float money",
            "negative tokens",
            "environment",
            "unknown field",
            "naive time",
            "no customer",
            "NUL in customer",
            "NUL in feature",
            "NUL in reason",
            "NUL in key",
        ],
    )
    def test_invalid_body_is_422_and_charges_nothing(self, client: TestClient, body: dict[str, object]) -> None:
        fund("cus_a", 100)
        response = client.post("/v1/usage", json=body, headers=AUTH)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] in ("invalid_request",)
        assert client.get("/v1/customers/cus_a/balance", headers=AUTH).json()["balance"] == 100

    def test_header_and_body_keys_must_agree(self, client: TestClient) -> None:
        fund("cus_a", 100)
        response = client.post(
            "/v1/usage", json=usage(units=1, request_id="a"), headers={**AUTH, "Idempotency-Key": "b"}
        )
        assert response.status_code == 422


class TestHolds:
    def test_hold_capture_less_gives_the_rest_back(self, client: TestClient) -> None:
        fund("cus_a", 100)
        hold = client.post(
            "/v1/holds", json={"customer_id": "cus_a", "units": 30}, headers={**AUTH, "Idempotency-Key": "h1"}
        )
        assert hold.status_code == 201, hold.text
        assert hold.json()["status"] == "open"
        again = client.post(
            "/v1/holds", json={"customer_id": "cus_a", "units": 30}, headers={**AUTH, "Idempotency-Key": "h1"}
        )
        assert again.status_code == 200 and again.json() == hold.json()
        captured = client.post("/v1/holds/h1/capture", json={"units": 12}, headers=AUTH)
        assert captured.status_code == 200, captured.text
        assert captured.json() | {"balance_after": 0} == {
            "request_id": "h1",
            "customer_id": "cus_a",
            "held": 30,
            "captured": 12,
            "released": 18,
            "shortfall": 0,
            "balance_after": 0,
        }
        assert client.get("/v1/customers/cus_a/balance", headers=AUTH).json()["balance"] == 88
        replay = client.post("/v1/holds/h1/capture", json={"units": 12}, headers=AUTH)
        assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true"
        assert replay.json() == captured.json()
        assert client.post("/v1/holds/h1/release", headers=AUTH).status_code == 409

    def test_release_gives_everything_back(self, client: TestClient) -> None:
        fund("cus_a", 100)
        client.post("/v1/holds", json={"customer_id": "cus_a", "units": 30, "request_id": "h2"}, headers=AUTH)
        released = client.post("/v1/holds/h2/release", headers=AUTH)
        assert released.status_code == 200
        assert released.json()["status"] == "released"
        assert client.get("/v1/customers/cus_a/balance", headers=AUTH).json()["balance"] == 100

    def test_unknown_hold_is_404(self, client: TestClient) -> None:
        assert client.post("/v1/holds/nope/capture", json={}, headers=AUTH).status_code == 404
        assert client.post("/v1/holds/nope/release", headers=AUTH).json()["error"]["code"] == "unknown_hold"

    def test_hold_beyond_the_balance_is_402(self, client: TestClient) -> None:
        fund("cus_a", 10)
        response = client.post(
            "/v1/holds", json={"customer_id": "cus_a", "units": 11, "request_id": "h3"}, headers=AUTH
        )
        assert response.status_code == 402
        assert response.json()["error"]["available"] == 10


class TestReadSide:
    def test_entries_are_paged_by_cursor(self, client: TestClient) -> None:
        fund("cus_a", 100)
        for n in range(5):
            client.post("/v1/usage", json=usage(units=1, request_id=f"e{n}"), headers=AUTH)
        seen: list[int] = []
        cursor = None
        while True:
            params = {"limit": 2} | ({"before": cursor} if cursor else {})
            page = client.get("/v1/customers/cus_a/entries", params=params, headers=AUTH).json()
            seen += [e["id"] for e in page["data"]]
            if not page["has_more"]:
                assert page["next_cursor"] is None
                break
            cursor = page["next_cursor"]
        assert len(seen) == 6  # the grant and five consumptions
        assert seen == sorted(seen, reverse=True)

    def test_usage_report_with_decimal_strings(self, client: TestClient) -> None:
        fund("cus_a", 100)
        client.post("/v1/usage", json=usage(units=3, request_id="u1", feature="chat"), headers=AUTH)
        client.post("/v1/usage", json=usage(units=4, request_id="u2", feature="search"), headers=AUTH)
        report = client.get("/v1/customers/cus_a/usage", params={"group_by": "feature"}, headers=AUTH)
        assert report.status_code == 200, report.text
        rows = {r["key"]: r for r in report.json()["rows"]}
        assert set(rows) == {"chat", "search"}
        assert rows["chat"]["credits"] == 3 and rows["chat"]["input_tokens"] == 1000
        assert isinstance(rows["chat"]["provider_cost_usd"], str)
        assert Decimal(rows["chat"]["provider_cost_usd"]) == Decimal("0.0075")
        assert isinstance(rows["chat"]["margin"], str)
        for group in ("day", "model", "user"):
            assert client.get("/v1/customers/cus_a/usage", params={"group_by": group}, headers=AUTH).status_code == 200
        bad = client.get("/v1/customers/cus_a/usage", params={"group_by": "planet"}, headers=AUTH)
        assert bad.status_code == 422

    def test_usage_window(self, client: TestClient) -> None:
        fund("cus_a", 100)
        client.post("/v1/usage", json=usage(units=3, request_id="w1", occurred_at="2026-01-01T10:00:00Z"), headers=AUTH)
        client.post("/v1/usage", json=usage(units=4, request_id="w2", occurred_at="2026-02-01T10:00:00Z"), headers=AUTH)
        params = {"group_by": "day", "since": "2026-01-15T00:00:00Z", "until": "2026-03-01T00:00:00Z"}
        rows = client.get("/v1/customers/cus_a/usage", params=params, headers=AUTH).json()["rows"]
        assert [(r["key"], r["credits"]) for r in rows] == [("2026-02-01", 4)]
