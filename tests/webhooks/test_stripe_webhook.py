"""POST /webhooks/stripe: every real fixture stored byte for byte, once; every bad input refused, nothing stored."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from starlette.testclient import TestClient
from webhook_helpers import OLD_SECRET, SECRET, HandOverRecorder, sign, signed_headers, stored_count, stored_payloads

from ledger.inbox import EventSource, EventStatus, StripeEvent

URL = "/webhooks/stripe"


def _event(event_id: str = "evt_test_0001", **extra: object) -> bytes:
    body = {
        "id": event_id,
        "object": "event",
        "api_version": "2026-04-22.dahlia",
        "created": 1_760_000_000,
        "livemode": False,
        "type": "customer.created",
        "data": {"object": {"id": "cus_test_1", "object": "customer"}},
        **extra,
    }
    return json.dumps(body, indent=2).encode()


class TestFixtureEvents:
    def test_every_fixture_is_stored_byte_for_byte(
        self, client: TestClient, engine: Engine, stripe_event_files: list[Path], hand_over: HandOverRecorder
    ) -> None:
        expected: dict[str, bytes] = {}
        for path in stripe_event_files:
            raw = path.read_bytes()
            response = client.post(URL, content=raw, headers=signed_headers(raw))
            assert response.status_code == 200, (path.name, response.text)
            assert response.json() == {"received": True, "duplicate": False}
            expected[json.loads(raw)["id"]] = raw
        assert len(expected) == len(stripe_event_files)
        assert stored_payloads(engine) == expected
        with engine.connect() as conn:
            rows = conn.execute(select(StripeEvent.id, StripeEvent.status, StripeEvent.source)).all()
        assert {(status, source) for _, status, source in rows} == {(EventStatus.PENDING, EventSource.WEBHOOK)}
        assert sorted(hand_over.wait_for(len(rows))) == sorted(row_id for row_id, _, _ in rows)

    def test_envelope_is_indexed(self, client: TestClient, engine: Engine, stripe_event_files: list[Path]) -> None:
        thin = next(p for p in stripe_event_files if "thin" in p.name)
        raw = thin.read_bytes()
        assert client.post(URL, content=raw, headers=signed_headers(raw)).status_code == 200
        with engine.connect() as conn:
            row = conn.execute(select(StripeEvent)).one()
        assert row.object_kind == "v2.core.event"
        assert row.type == "v1.billing.meter.error_report_triggered"
        assert row.object_id == "mtr_test_constructed0001"

    def test_each_fixture_posted_three_times_concurrently_is_stored_once(
        self, client: TestClient, engine: Engine, stripe_event_files: list[Path], hand_over: HandOverRecorder
    ) -> None:
        bodies = [p.read_bytes() for p in stripe_event_files] * 3

        def post(raw: bytes) -> tuple[int, bool]:
            response = client.post(URL, content=raw, headers=signed_headers(raw))
            return response.status_code, response.json().get("duplicate")

        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(post, bodies))
        assert {status for status, _ in results} == {200}
        assert sum(1 for _, duplicate in results if not duplicate) == len(stripe_event_files)
        assert stored_count(engine) == len(stripe_event_files)
        ids = hand_over.wait_for(len(stripe_event_files))
        time.sleep(0.05)
        assert len(hand_over.ids) == len(set(ids)) == len(stripe_event_files)


class TestRedelivery:
    def test_redelivery_answers_200_and_stores_nothing_new(
        self, client: TestClient, engine: Engine, hand_over: HandOverRecorder
    ) -> None:
        raw = _event()
        first = client.post(URL, content=raw, headers=signed_headers(raw))
        again = client.post(URL, content=raw, headers=signed_headers(raw, timestamp=int(time.time()) - 60))
        assert (first.status_code, again.status_code) == (200, 200)
        assert again.json() == {"received": True, "duplicate": True}
        assert stored_count(engine) == 1
        hand_over.wait_for(1)
        time.sleep(0.05)
        assert len(hand_over.ids) == 1

    def test_previous_secret_is_accepted_while_rolling(self, client: TestClient, engine: Engine) -> None:
        raw = _event()
        assert client.post(URL, content=raw, headers=signed_headers(raw, secret=OLD_SECRET)).status_code == 200
        assert stored_count(engine) == 1

    def test_header_with_several_signatures_matches_any(self, client: TestClient, engine: Engine) -> None:
        raw = _event()
        now = int(time.time())
        good = sign(raw, timestamp=now).split(",")[1]
        header = f"t={now},v1={'0' * 64},{good},v0=deadbeef"
        assert client.post(URL, content=raw, headers={"Stripe-Signature": header}).status_code == 200


class TestHandOver:
    def test_failed_hand_over_still_acknowledges_and_keeps_the_event(
        self, client: TestClient, engine: Engine, hand_over: HandOverRecorder
    ) -> None:
        hand_over.fail = True
        raw = _event()
        response = client.post(URL, content=raw, headers=signed_headers(raw))
        assert response.status_code == 200
        assert stored_count(engine) == 1
        assert hand_over.calls == []
        time.sleep(0.05)
        metrics = client.get("/metrics").text
        assert "webhook_handover_failed_events_total" in metrics

    def test_hand_over_happens_after_commit(self, pg_engine: Engine, make_client: Callable[..., TestClient]) -> None:
        seen: list[int] = []

        def check_committed(ids: list[int]) -> None:
            # A separate connection sees the rows: they were committed before the hand-over.
            with pg_engine.connect() as conn:
                found = conn.execute(select(StripeEvent.id).where(StripeEvent.id.in_(ids))).scalars().all()
            assert sorted(found) == sorted(ids)
            seen.extend(ids)

        from webhooks.app import create_app
        from webhooks.inbox_writer import InboxWriter

        with TestClient(create_app(writer=InboxWriter(hand_over=check_committed))) as client:
            for n in range(5):
                raw = _event(f"evt_test_{n}")
                assert client.post(URL, content=raw, headers=signed_headers(raw)).status_code == 200
        assert len(seen) == 5


NOT_EVENT = b'{"id": "cus_1", "object": "customer"}'


def _bad_requests() -> list[tuple[str, Callable[[], tuple[bytes, dict[str, str]]], int, str]]:
    def ok_body() -> bytes:
        return _event()

    return [
        ("wrong secret", lambda: (ok_body(), signed_headers(ok_body(), secret="whsec_x")), 400, "signature_mismatch"),
        (
            "old timestamp",
            lambda: (ok_body(), signed_headers(ok_body(), timestamp=int(time.time()) - 301)),
            400,
            "signature_timestamp_out_of_tolerance",
        ),
        (
            "future timestamp",
            lambda: (ok_body(), signed_headers(ok_body(), timestamp=int(time.time()) + 400)),
            400,
            "signature_timestamp_out_of_tolerance",
        ),
        ("missing header", lambda: (ok_body(), {}), 400, "signature_missing"),
        ("empty header", lambda: (ok_body(), {"Stripe-Signature": ""}), 400, "signature_missing"),
        ("no timestamp", lambda: (ok_body(), {"Stripe-Signature": "v1=abc"}), 400, "signature_malformed"),
        ("no v1", lambda: (ok_body(), {"Stripe-Signature": f"t={int(time.time())},v0=ab"}), 400, "signature_malformed"),
        ("garbage header", lambda: (ok_body(), {"Stripe-Signature": "garbage"}), 400, "signature_malformed"),
        ("bad timestamp", lambda: (ok_body(), {"Stripe-Signature": "t=abc,v1=00"}), 400, "signature_malformed"),
        (
            "body altered after signing",
            lambda: (ok_body().replace(b"customer.created", b"customer.deleted"), signed_headers(ok_body())),
            400,
            "signature_mismatch",
        ),
        ("not JSON", lambda: (b"not json {", signed_headers(b"not json {")), 400, "invalid_json"),
        ("JSON array", lambda: (b"[1, 2]", signed_headers(b"[1, 2]")), 400, "not_a_stripe_event"),
        (
            "JSON object that is no event",
            lambda: (NOT_EVENT, signed_headers(NOT_EVENT)),
            400,
            "not_a_stripe_event",
        ),
        (
            "event without data.object",
            lambda: (_event(data={}), signed_headers(_event(data={}))),
            400,
            "not_a_stripe_event",
        ),
        (
            "api_version too long",
            lambda: (_event(api_version="x" * 65), signed_headers(_event(api_version="x" * 65))),
            400,
            "not_a_stripe_event",
        ),
        (
            "created out of range",
            lambda: (_event(created=2**40), signed_headers(_event(created=2**40))),
            400,
            "not_a_stripe_event",
        ),
        (
            "created beyond 64 bits",
            lambda: (_event(created=2**70), signed_headers(_event(created=2**70))),
            400,
            "not_a_stripe_event",
        ),
        (
            "NUL in type",
            lambda: (_event(type="customer.\u0000created"), signed_headers(_event(type="customer.\u0000created"))),
            400,
            "not_a_stripe_event",
        ),
    ]


BAD = _bad_requests()


class TestBadInput:
    @pytest.mark.parametrize(("name", "build", "status", "code"), BAD, ids=[b[0] for b in BAD])
    def test_refused_with_nothing_stored(
        self,
        client: TestClient,
        engine: Engine,
        hand_over: HandOverRecorder,
        name: str,
        build: Callable[[], tuple[bytes, dict[str, str]]],
        status: int,
        code: str,
    ) -> None:
        body, headers = build()
        response = client.post(URL, content=body, headers=headers)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code
        assert error["message"]
        assert stored_count(engine) == 0
        assert hand_over.calls == []
        assert f'webhook_events_rejected_total{{reason="{code}"}}' in client.get("/metrics").text

    def test_two_mebibyte_body_is_413(self, client: TestClient, engine: Engine) -> None:
        raw = _event(padding="x" * (2 * 1024 * 1024))
        response = client.post(URL, content=raw, headers=signed_headers(raw))
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "body_too_large"
        assert stored_count(engine) == 0

    def test_oversized_body_without_content_length_is_413(self, client: TestClient, engine: Engine) -> None:
        raw = _event(padding="x" * (2 * 1024 * 1024))

        def chunks() -> object:
            for start in range(0, len(raw), 65536):
                yield raw[start : start + 65536]

        response = client.post(URL, content=chunks(), headers=signed_headers(raw))  # type: ignore[arg-type]
        assert response.status_code == 413
        assert stored_count(engine) == 0

    def test_body_at_the_limit_is_accepted(
        self, engine: Engine, make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("WEBHOOK_MAX_BODY_BYTES", "4096")
        client = make_client()
        base = _event(padding="")
        raw = _event(padding="x" * (4096 - len(base)))
        assert len(raw) == 4096
        assert client.post(URL, content=raw, headers=signed_headers(raw)).status_code == 200
        bigger = _event(padding="x" * (4097 - len(base)))
        assert client.post(URL, content=bigger, headers=signed_headers(bigger)).status_code == 413
        assert stored_count(engine) == 1

    def test_get_is_not_allowed(self, client: TestClient) -> None:
        assert client.get(URL).status_code == 405

    def test_no_secret_configured_is_503(
        self, engine: Engine, make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("STRIPE_WEBHOOK_SECRETS", "")
        client = make_client()
        raw = _event()
        response = client.post(URL, content=raw, headers=signed_headers(raw, secret=SECRET))
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "webhook_not_configured"
        assert stored_count(engine) == 0
