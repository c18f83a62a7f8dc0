"""Hostile input at the HTTP edge is a 4xx, never a 5xx: the usage API's values, and signed Stripe events whose
fields the rest of the system cannot handle (refused at the door, so nothing odd is stored for the worker, the
CLI or a page to trip over later)."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import pytest
from sqlalchemy import Engine, select, text
from starlette.testclient import TestClient
from webhook_helpers import API_TOKEN, signed_headers, stored_count

from ledger.accounts import open_account
from ledger.db import unit_of_work
from ledger.grants import grant_credits
from ledger.models import GrantSource
from ledger.queries import balance_summary

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
# The daily roll-up keeps provider cost as BIGINT 10^-10 USD: about $922 million per row.
ROLLUP_MAX_USD = Decimal(2**63 - 1) / 10**10


def fund(customer_id: str, units: int) -> None:
    with unit_of_work() as session:
        open_account(session, customer_id)
        grant_credits(session, customer_id, units=units, source=GrantSource.TOP_UP, idempotency_key=f"{customer_id}:f")


def usage(key: str, **fields: object) -> dict[str, object]:
    return {
        "customer_id": "cus_h",
        "request_id": key,
        "units": 1,
        "provider": "openai",
        "model": "gpt-4o-2024-08-06",
        "provider_cost_usd": "0.0075",
        **fields,
    }


class TestUsageCost:
    @pytest.mark.parametrize("cost", ["10001", "9999999999.9999999999", str(ROLLUP_MAX_USD.quantize(Decimal(1)))])
    def test_a_cost_no_roll_up_can_sum_is_422(self, client: TestClient, cost: str) -> None:
        fund("cus_h", 100)
        response = client.post("/v1/usage", json=usage("r_big", provider_cost_usd=cost), headers=AUTH)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "invalid_request"

    def test_the_largest_accepted_cost_is_recorded(self, client: TestClient) -> None:
        fund("cus_h", 100)
        response = client.post("/v1/usage", json=usage("r_max", provider_cost_usd="10000"), headers=AUTH)
        assert response.status_code == 201, response.text

    def test_a_day_whose_total_is_full_refuses_with_422_and_writes_nothing(
        self, client: TestClient, engine: Engine
    ) -> None:
        fund("cus_h", 100)
        assert client.post("/v1/usage", json=usage("r_1"), headers=AUTH).status_code == 201
        # The day's row as if many calls had filled it to the brim.
        with engine.begin() as conn:
            conn.execute(text("UPDATE usage_daily SET provider_cost_usd = :v"), {"v": 2**63 - 10})
        response = client.post("/v1/usage", json=usage("r_2", provider_cost_usd="1"), headers=AUTH)
        if engine.dialect.name == "sqlite":
            # SQLite's integers widen to REAL instead of failing: nothing to refuse.
            assert response.status_code == 201, response.text
            return
        assert response.status_code == 422, response.text
        # The ledger reports a value the database cannot hold as an invalid request; any other path's DataError
        # is value_out_of_range (webhooks.app). Either way a 422, never a 500.
        assert response.json()["error"]["code"] in ("invalid_request", "value_out_of_range")
        with unit_of_work() as session:
            assert balance_summary(session, "cus_h").balance == 99  # the refused call charged nothing
        # And the next ordinary call of another day-key is unaffected.
        other = usage("r_3", model="gpt-4o-mini")
        assert client.post("/v1/usage", json=other, headers=AUTH).status_code == 201


HOSTILE_IDS = ["a\x00b", "x" * 300, "9" * 40, "../etc", "%00", "\x1b", "é"]


class TestReadRoutes:
    @pytest.mark.parametrize("value", HOSTILE_IDS)
    def test_path_values(self, client: TestClient, value: str) -> None:
        for path in ("balance", "entries", "usage"):
            response = client.get(f"/v1/customers/{quote(value, safe='')}/{path}", headers=AUTH)
            assert 400 <= response.status_code < 500, (path, response.status_code)
        response = client.post(f"/v1/holds/{quote(value, safe='')}/release", headers=AUTH)
        assert 400 <= response.status_code < 500

    @pytest.mark.parametrize(
        "query",
        [
            "before=9223372036854775808",
            "before=-1",
            "limit=99999999999999999999",
            "since=0001-01-01T00:00:00Z",
            "until=9999-12-31T23:59:59-14:00",
            "since=10000-01-01T00:00:00Z",
            "since=%00",
            "group_by=%00",
        ],
    )
    def test_query_values(self, client: TestClient, query: str) -> None:
        fund("cus_h", 10)
        for path in ("entries", "usage"):
            response = client.get(f"/v1/customers/cus_h/{path}?{query}", headers=AUTH)
            assert response.status_code < 500, (path, query, response.text)

    def test_nul_in_a_body_string(self, client: TestClient) -> None:
        fund("cus_h", 10)
        for field in ("customer_id", "feature", "request_id", "reason"):
            response = client.post("/v1/usage", json=usage("r_nul", **{field: "a\x00b"}), headers=AUTH)
            assert response.status_code == 422, (field, response.text)


def event(**fields: Any) -> dict[str, Any]:
    return {
        "id": "evt_hostile_1",
        "object": "event",
        "type": "customer.updated",
        "created": 1_760_000_000,
        "livemode": False,
        "data": {"object": {"id": "cus_1", "object": "customer"}},
        **fields,
    }


class TestSignedButOddEvents:
    @pytest.mark.parametrize(
        "created",
        [
            -62135596800,  # 0001-01-01: Python holds it, a day before it does not
            253402300799,  # 9999-12-31T23:59:59
            2**62,
            -(2**62),
            0,  # 1970: years before Stripe existed
            4_102_444_800,  # 2100-01-01
            "0001-01-01T00:00:00+14:00",
            "9999-12-31T23:59:59-14:00",
        ],
    )
    def test_a_created_the_system_cannot_handle_is_400(self, client: TestClient, engine: Engine, created: Any) -> None:
        raw = json.dumps(event(created=created)).encode()
        response = client.post("/webhooks/stripe", content=raw, headers=signed_headers(raw))
        assert response.status_code == 400, response.text
        assert stored_count(engine) == 0

    @pytest.mark.parametrize(
        "fields",
        [
            {"id": "evt_\u0000x"},
            {"type": "customer.\u0000updated"},
            {"api_version": "2024\u0000"},
            {"account": "acct_\u0000"},
            {"data": {"object": {"id": "cus_1", "object": "customer", "email": "a\u0000@b.c"}}},
            {"data": {"object": {"id": "cus_\u0000", "object": "customer"}}},
        ],
        ids=["id", "type", "api_version", "account", "deep field", "object id"],
    )
    def test_nul_anywhere_is_400(self, client: TestClient, engine: Engine, fields: dict[str, Any]) -> None:
        raw = json.dumps(event(**fields)).encode()
        response = client.post("/webhooks/stripe", content=raw, headers=signed_headers(raw))
        assert response.status_code == 400, response.text
        assert stored_count(engine) == 0

    def test_a_backslash_before_u0000_in_text_is_not_a_nul(self, client: TestClient, engine: Engine) -> None:
        body = event(data={"object": {"id": "cus_1", "object": "customer", "description": "C:\\u0000dir"}})
        raw = json.dumps(body).encode()
        assert b"\\\\u0000" in raw  # an escaped backslash, then the letters u0000
        response = client.post("/webhooks/stripe", content=raw, headers=signed_headers(raw))
        assert response.status_code == 200, response.text
        assert stored_count(engine) == 1

    def test_an_ordinary_event_is_stored(self, client: TestClient, engine: Engine) -> None:
        raw = json.dumps(event()).encode()
        assert client.post("/webhooks/stripe", content=raw, headers=signed_headers(raw)).status_code == 200
        with engine.connect() as conn:
            assert conn.scalar(select(text("count(*)")).select_from(text("stripe_events"))) == 1
