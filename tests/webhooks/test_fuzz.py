"""Fuzzing: schemathesis against /openapi.json, and signed random bodies at the webhook. Never a 5xx."""

from __future__ import annotations

import json
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine
from starlette.testclient import TestClient
from webhook_helpers import API_TOKEN, HandOverRecorder, signed_headers, stored_count

from ledger.settings import get_settings
from webhooks.app import create_app
from webhooks.inbox_writer import InboxWriter


@pytest.fixture
def api_schema(pg_engine: Engine, webhook_env: None) -> Any:
    get_settings.cache_clear()
    app = create_app(writer=InboxWriter(hand_over=HandOverRecorder()))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.mark.postgres
@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_operation_answers_a_server_error(case: Any) -> None:
    response = case.call(headers={"Authorization": f"Bearer {API_TOKEN}"})
    assert response.status_code < 500, (case.method, case.path, case.body, response.text)


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
event_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.sampled_from(["evt_1", "evt_" + "x" * 300, "", "evt_\u0000", "cus_1"]) | st.text(max_size=20),
        "object": st.sampled_from(["event", "v2.core.event", "customer"]) | json_scalars,
        "type": st.sampled_from(["charge.succeeded", "", "x" * 200, "a\u0000b"]) | json_values,
        "created": st.integers(-(2**70), 2**70)
        | st.sampled_from(["2026-01-01T00:00:00Z", "yesterday", ""])
        | json_scalars,
        "api_version": st.text(max_size=80) | json_scalars,
        "livemode": json_scalars,
        "account": st.text(max_size=300) | json_scalars,
        "data": st.fixed_dictionaries(
            {}, optional={"object": st.dictionaries(st.sampled_from(["id", "object", "customer"]), json_values)}
        )
        | json_values,
        "related_object": st.dictionaries(st.sampled_from(["id", "type"]), json_values) | json_scalars,
    },
)


VALID = {
    "id": "evt_fuzz",
    "object": "event",
    "type": "charge.succeeded",
    "created": 1_760_000_000,
    "api_version": "2026-04-22.dahlia",
    "livemode": False,
    "data": {"object": {"id": "ch_1", "object": "charge", "customer": "cus_1"}},
}
# A well-formed event with one field (top level or in data.object) set to anything: reaches the deep paths.
one_field_off = st.builds(
    lambda key, value, unique: {**VALID, "id": f"evt_fuzz_{unique}", key: value},
    st.sampled_from(sorted(VALID)),
    json_values | st.integers(-(2**80), 2**80),
    st.uuids(),
) | st.builds(
    lambda key, value, unique: {**VALID, "id": f"evt_fuzz_{unique}", "data": {"object": {"id": "ch_1", key: value}}},
    st.sampled_from(["id", "object", "customer"]),
    json_values,
    st.uuids(),
)


@pytest.mark.postgres
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=one_field_off | event_like | json_values)
def test_signed_random_bodies_are_stored_or_refused_never_a_server_error(
    pg_client: TestClient, pg_engine: Engine, body: Any
) -> None:
    before = stored_count(pg_engine)
    raw = json.dumps(body).encode()
    response = pg_client.post("/webhooks/stripe", content=raw, headers=signed_headers(raw))
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert response.json()["error"]["code"] in ("not_a_stripe_event", "invalid_json")
        assert stored_count(pg_engine) == before
