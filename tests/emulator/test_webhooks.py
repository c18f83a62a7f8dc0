"""Signed webhook delivery, verified with the stripe package's own signature checks."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import stripe
from stripe_emulator import Store, deliver_webhooks, sign_payload

SECRET = "whsec_test_secret"


class Receiver:
    """A tiny endpoint that verifies every delivery like a real receiver, and can be told to fail."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.fail_first = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                try:
                    event = stripe.Webhook.construct_event(body, self.headers["Stripe-Signature"], SECRET)
                except stripe.SignatureVerificationError:
                    self.send_response(400)
                    self.end_headers()
                    return
                if receiver.fail_first > 0:
                    receiver.fail_first -= 1
                    self.send_response(503)
                    self.end_headers()
                    return
                receiver.received.append(json.loads(body))
                assert event.id
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhooks/stripe"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    endpoint = Receiver()
    yield endpoint
    endpoint.server.shutdown()
    endpoint.server.server_close()


def _activity(store: Store) -> None:
    customer = store.create_customer(email="w@example.com")
    session = store.topup(customer)
    store.refund(session, 400)


class TestSignPayload:
    def test_header_verifies_with_stripe_webhook_signature(self) -> None:
        body = b'{"id": "evt_1", "object": "event"}'
        header = sign_payload(body, SECRET)

        assert stripe.WebhookSignature.verify_header(body.decode(), header, SECRET, tolerance=300)
        with pytest.raises(stripe.SignatureVerificationError):
            stripe.WebhookSignature.verify_header(body.decode(), header, "whsec_other", tolerance=300)

    def test_old_timestamp_is_refused_by_the_tolerance(self) -> None:
        body = b"{}"
        header = sign_payload(body, SECRET, timestamp=1_600_000_000)

        assert header.startswith("t=1600000000,v1=")
        with pytest.raises(stripe.SignatureVerificationError):
            stripe.WebhookSignature.verify_header(body.decode(), header, SECRET, tolerance=300)


class TestDeliverWebhooks:
    def test_every_event_arrives_signed_in_order(self, store: Store, receiver: Receiver) -> None:
        _activity(store)

        report = store.deliver_webhooks(receiver.url, SECRET)

        assert report.all_ok and len(report) == len(store.event_records())
        assert [e["id"] for e in receiver.received] == [e.id for e in store.event_records()]
        assert receiver.received[-1]["type"] == "refund.created"
        refunded = next(e for e in receiver.received if e["type"] == "charge.refunded")
        assert refunded["data"]["object"]["amount_refunded"] == 400
        assert refunded["data"]["previous_attributes"] == {"amount_refunded": 0}

    def test_duplicates_and_shuffle_are_reproducible_from_the_seed(self, store: Store, receiver: Receiver) -> None:
        _activity(store)
        events = store.events()

        report = deliver_webhooks(receiver.url, SECRET, events, duplicates=0.5, shuffle=True, seed=3)

        ids = [e["id"] for e in receiver.received]
        duplicated = [d.event_id for d in report.deliveries if d.duplicate]
        assert duplicated and len(ids) == len(events) + len(duplicated)
        assert set(ids) == {e["id"] for e in events}
        assert ids != [e["id"] for e in events if e["id"] in ids][: len(ids)]  # not in the original order
        again = deliver_webhooks(receiver.url, SECRET, events, duplicates=0.5, shuffle=True, seed=3)
        assert [d.event_id for d in again.deliveries] == [d.event_id for d in report.deliveries]

    def test_non_2xx_is_retried_and_reported(self, store: Store, receiver: Receiver) -> None:
        store.create_customer(email="r@example.com")
        receiver.fail_first = 1

        report = store.deliver_webhooks(receiver.url, SECRET, retry_delay=0)

        assert report.deliveries[0].statuses == (503, 200)
        assert report.all_ok

    def test_wrong_secret_gets_400_from_a_verifying_receiver(self, store: Store, receiver: Receiver) -> None:
        store.create_customer(email="r@example.com")

        report = store.deliver_webhooks(receiver.url, "whsec_wrong", retries=0)

        assert report.statuses == [400] and not report.all_ok and receiver.received == []

    def test_unreachable_endpoint_reports_status_zero(self, store: Store) -> None:
        store.create_customer(email="r@example.com")

        report = store.deliver_webhooks("http://127.0.0.1:9/nowhere", SECRET, retries=1, retry_delay=0)

        assert report.deliveries[0].statuses == (0, 0)


class TestIncrementalDelivery:
    def test_only_events_after_the_last_delivered_one(self, store: Store, receiver: Receiver) -> None:
        store.create_customer(email="1@example.com")
        first = store.deliver_webhooks(receiver.url, SECRET)
        store.create_customer(email="2@example.com")

        second = store.deliver_webhooks(receiver.url, SECRET, store.event_records(after=first.deliveries[-1].event_id))

        assert len(first) == 1 and len(second) == 1
        assert [e["data"]["object"]["email"] for e in receiver.received] == ["1@example.com", "2@example.com"]


class TestWebhookEndpoint:
    def test_new_events_are_delivered_in_the_background_as_they_happen(self, store: Store, receiver: Receiver) -> None:
        store.create_customer(email="before@example.com")  # made before the endpoint: not sent
        endpoint = store.add_webhook_endpoint(receiver.url, SECRET, enabled_events=["checkout.*", "charge.refunded"])
        try:
            session = store.topup(store.create_customer(email="after@example.com"))
            store.refund(session, 100)

            report = endpoint.flush()
        finally:
            endpoint.close()

        assert report.all_ok
        assert [e["type"] for e in receiver.received] == ["checkout.session.completed", "charge.refunded"]
