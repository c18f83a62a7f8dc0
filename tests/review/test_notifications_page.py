"""The notifications review page: the delivery log with its filters, and the endpoints' health."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Engine, insert
from starlette.testclient import TestClient

from ledger.db import unit_of_work
from ledger.models import DeliveryStatus, NotificationDelivery, NotificationEndpointState
from ledger.outbox import emit


def _seed() -> None:
    now = datetime.now(UTC)
    with unit_of_work() as session:
        emit(session, "balance.low", "cus_page_a", {"balance": 3})
        emit(session, "credits.expired", "cus_page_b", {"units": 9})
        session.execute(
            insert(NotificationDelivery),
            [
                {"outbox_id": 1, "endpoint_url": "https://product.example/hooks", "customer_id": "cus_page_a",
                 "status": DeliveryStatus.SUCCEEDED, "attempts": 1, "next_attempt_at": now, "last_status_code": 200,
                 "last_latency_ms": 42, "delivered_at": now, "created_at": now},
                {"outbox_id": 2, "endpoint_url": "https://product.example/hooks", "customer_id": "cus_page_b",
                 "status": DeliveryStatus.PENDING, "attempts": 4, "next_attempt_at": now, "last_status_code": 502,
                 "last_latency_ms": 1200, "last_error": "HTTP 502: bad gateway <script>", "created_at": now},
            ],
        )  # fmt: skip
        session.execute(
            insert(NotificationEndpointState).values(url="https://product.example/hooks", failing_since=now)
        )


class TestNotificationsPage:
    def test_log_filters_and_endpoint_state(self, engine: Engine, signed_in: TestClient) -> None:
        _seed()
        page = signed_in.get("/review/notifications")
        assert page.status_code == 200
        text = page.text
        assert "balance.low" in text and "credits.expired" in text and "42 ms" in text and "failing" in text
        assert "HTTP 502: bad gateway &lt;script&gt;" in text  # escaped
        pending = signed_in.get("/review/notifications", params={"status": "pending"}).text
        assert "credits.expired" in pending and "balance.low" not in pending
        by_customer = signed_in.get("/review/notifications", params={"customer": "cus_page_a"}).text
        assert "balance.low" in by_customer and "credits.expired" not in by_customer
        assert signed_in.get("/review/notifications", params={"status": "bogus"}).status_code == 400

    def test_needs_sign_in(self, engine: Engine, client: TestClient) -> None:
        response = client.get("/review/notifications", follow_redirects=False)
        assert response.status_code in (302, 303, 401)
