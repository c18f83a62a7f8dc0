"""The receiver when the database or the broker is down, the readiness check, and the metrics."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, text, update
from starlette.testclient import TestClient
from webhook_helpers import HandOverRecorder, signed_headers, stored_count

from ledger import db
from ledger.inbox import EventStatus, StripeEvent, parse_envelope, store_events
from ledger.settings import get_settings

URL = "/webhooks/stripe"
CLOSED_PORT_URL = "postgresql+psycopg://postgres@127.0.0.1:1/unreachable"


def _event(event_id: str) -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": "invoice.paid",
            "created": 1_760_000_000,
            "data": {"object": {"id": "in_1", "object": "invoice", "customer": "cus_1"}},
        }
    ).encode()


@pytest.fixture
def unreachable_database(pg_engine: Engine) -> Iterator[Callable[[bool], None]]:
    """Switch the process-wide engine to a closed port and back."""
    closed = db.make_engine(CLOSED_PORT_URL, connect_args={"connect_timeout": 2})

    def down(is_down: bool) -> None:
        db._engine = closed if is_down else pg_engine
        db._factory = db.sessionmaker(db._engine, expire_on_commit=False)

    yield down
    down(False)
    closed.dispose()


@pytest.mark.postgres
class TestDatabaseUnreachable:
    def test_503_and_nothing_acknowledged_then_the_retry_is_stored_once(
        self,
        pg_client: TestClient,
        pg_engine: Engine,
        hand_over: HandOverRecorder,
        unreachable_database: Callable[[bool], None],
    ) -> None:
        raw = _event("evt_outage_1")
        unreachable_database(True)
        for _ in range(3):
            response = pg_client.post(URL, content=raw, headers=signed_headers(raw))
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "inbox_unavailable"
        assert hand_over.calls == []
        unreachable_database(False)
        assert stored_count(pg_engine) == 0
        retried = pg_client.post(URL, content=raw, headers=signed_headers(raw))
        assert retried.status_code == 200
        assert retried.json()["duplicate"] is False
        again = pg_client.post(URL, content=raw, headers=signed_headers(raw))
        assert again.json()["duplicate"] is True
        assert stored_count(pg_engine) == 1
        assert len(hand_over.wait_for(1)) == 1

    def test_usage_api_answers_503(self, pg_client: TestClient, unreachable_database: Callable[[bool], None]) -> None:
        unreachable_database(True)
        response = pg_client.get("/v1/customers/cus_a/balance", headers={"Authorization": "Bearer tok_test_1"})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "database_unavailable"

    def test_terminated_connections_are_replaced(self, pg_client: TestClient, pg_engine: Engine) -> None:
        first = _event("evt_before_restart")
        assert pg_client.post(URL, content=first, headers=signed_headers(first)).status_code == 200
        with pg_engine.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
        second = _event("evt_after_restart")
        response = pg_client.post(URL, content=second, headers=signed_headers(second))
        assert response.status_code in (200, 503)
        if response.status_code == 503:  # Stripe retries; the retry must land
            response = pg_client.post(URL, content=second, headers=signed_headers(second))
        assert response.status_code == 200
        assert stored_count(pg_engine) == 2


class TestReadiness:
    def test_ready(self, client: TestClient) -> None:
        response = client.get("/readyz")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "ready"
        assert body["unprocessed_events"]["count"] == 0

    def test_healthz(self, client: TestClient) -> None:
        assert client.get("/healthz").json() == {"status": "ok"}

    def test_stale_unprocessed_events_over_the_threshold(
        self, engine: Engine, make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("UNPROCESSED_EVENT_THRESHOLD", "2")
        monkeypatch.setenv("UNPROCESSED_EVENT_MINUTES", "15")
        client = make_client()
        with db.unit_of_work() as session:
            items = [(raw, parse_envelope(json.loads(raw))) for raw in (_event(f"evt_stale_{n}") for n in range(5))]
            ids = store_events(session, items)
            old = datetime.now(UTC) - timedelta(minutes=20)
            stale = [ids["evt_stale_0"], ids["evt_stale_1"], ids["evt_stale_2"], ids["evt_stale_3"]]
            session.execute(update(StripeEvent).where(StripeEvent.id.in_(stale)).values(received_at=old))
            # Processed and ignored events are not a backlog, however old.
            session.execute(update(StripeEvent).where(StripeEvent.id == stale[3]).values(status=EventStatus.PROCESSED))
        response = client.get("/readyz")
        assert response.status_code == 503
        backlog = response.json()["unprocessed_events"]
        assert backlog == {"count": 3, "older_than_minutes": 15, "threshold": 2, "ok": False}
        monkeypatch.setenv("UNPROCESSED_EVENT_THRESHOLD", "3")
        get_settings.cache_clear()
        assert client.get("/readyz").status_code == 200

    def test_broker_unreachable(
        self, engine: Engine, make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:1/0")
        client = make_client()
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["broker"]["ok"] is False

    @pytest.mark.postgres
    def test_database_unreachable(self, pg_client: TestClient, unreachable_database: Callable[[bool], None]) -> None:
        unreachable_database(True)
        response = pg_client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["database"]["ok"] is False


class TestMetrics:
    def test_counts_received_stored_duplicate_rejected_and_latency(self, client: TestClient) -> None:
        def value(text_: str, name: str) -> float:
            return sum(float(line.split()[-1]) for line in text_.splitlines() if line.startswith(name))

        before = client.get("/metrics").text
        raw = _event("evt_metrics_1")
        client.post(URL, content=raw, headers=signed_headers(raw))
        client.post(URL, content=raw, headers=signed_headers(raw))
        client.post(URL, content=raw, headers={"Stripe-Signature": "t=1,v1=00"})
        after = client.get("/metrics")
        assert after.headers["content-type"].startswith("text/plain")
        text_ = after.text
        for name, delta in [
            ("webhook_events_received_total", 3),
            ("webhook_events_stored_total", 1),
            ("webhook_events_duplicate_total", 1),
            ('webhook_events_rejected_total{reason="signature_mismatch"}', 1),
            ("webhook_request_duration_seconds_count", 3),
        ]:
            assert value(text_, name) - value(before, name) == delta, name
