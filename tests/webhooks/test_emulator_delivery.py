"""End to end with the Stripe emulator: a month of activity delivered like Stripe does, to a real server."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import Engine
from stripe_emulator import Clock, Store
from stripe_emulator.scenarios import demo_month
from webhook_helpers import SECRET, HandOverRecorder, stored_payloads


@pytest.mark.postgres
@pytest.mark.slow
class TestEmulatorDelivery:
    def test_shuffled_duplicated_month_is_stored_once_byte_for_byte(
        self, live_server: str, pg_engine: Engine, hand_over: HandOverRecorder
    ) -> None:
        store = Store(clock=Clock())
        demo_month(store)
        events = [store.render(event) for event in store.event_records()]
        assert len(events) > 20
        report = store.deliver_webhooks(
            f"{live_server}/webhooks/stripe", SECRET, events, duplicates=0.3, shuffle=True, seed=7
        )
        assert report.failed == []
        assert sum(1 for d in report.deliveries if d.duplicate) > 0
        stored = stored_payloads(pg_engine)
        assert set(stored) == {event["id"] for event in events}
        # Stored verbatim: the very bytes the emulator signed and sent.
        for event in events:
            assert stored[event["id"]] == json.dumps(event, indent=2).encode()
        assert sorted(hand_over.wait_for(len(events))) == sorted(set(hand_over.ids))
        assert len(hand_over.ids) == len(events)

    def test_a_delivery_signed_with_another_secret_is_refused(self, live_server: str, pg_engine: Engine) -> None:
        store = Store(clock=Clock())
        store.create_customer(email="a@example.com")
        report = store.deliver_webhooks(f"{live_server}/webhooks/stripe", "whsec_not_ours", retries=0)
        assert {d.statuses for d in report.deliveries} == {(400,)}
        assert stored_payloads(pg_engine) == {}
