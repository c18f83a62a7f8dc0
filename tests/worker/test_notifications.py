"""Outbound notifications against a real local HTTP receiver: signed, retried, ordered per customer, given up
after three days (the endpoint disabled and reviewed), listed and redelivered from the CLI."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import threading
import time
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import Engine, select
from typer.testing import CliRunner

from ledger.config import BillingConfig
from ledger.db import unit_of_work
from ledger.models import DeliveryStatus, NotificationDelivery, NotificationEndpointState
from ledger.outbox import emit
from reconciliation.models import Mismatch, MismatchKind
from worker import notifications
from worker.cli import app as cli_app
from worker.notifications import deliver_pending, retry_delay

SECRETS = ("whsec_old_secret", "whsec_new_secret")


class Receiver:
    """A local HTTP endpoint whose answers a test scripts: a status per request, an optional delay."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.statuses: list[int] = []  # answered in order; 200 once exhausted
        self.delay = 0.0
        self.fail_event_ids: dict[str, int] = {}  # event id -> how many more times to answer 500
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                event = json.loads(body)
                receiver.received.append({"headers": dict(self.headers), "body": body, "event": event})
                if receiver.delay:
                    time.sleep(receiver.delay)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                if receiver.fail_event_ids.get(event["id"], 0) > 0:
                    receiver.fail_event_ids[event["id"]] -= 1
                    status = 500
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                with contextlib.suppress(OSError):  # the sender gave up waiting
                    self.wfile.write(b"ok")

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def event_ids(self) -> list[str]:
        return [r["event"]["id"] for r in self.received]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(autouse=True)
def _secret_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("PRODUCT_WEBHOOK_SECRET", ",".join(SECRETS))
    notifications._secrets.cache_clear()
    yield
    notifications._secrets.cache_clear()


def endpoint_config(url: str, events: str = '["*"]') -> BillingConfig:
    return BillingConfig.model_validate(
        tomllib.loads(
            f'[[notifications.endpoints]]\nurl = "{url}"\nevents = {events}\nsecret_env = "PRODUCT_WEBHOOK_SECRET"\n'
        )
    )


def verify(header: str, body: bytes, secret: str, tolerance: int = 300) -> bool:
    """The receiving side's check, written from the documented scheme (not from the sender's code)."""
    items = [part.split("=", 1) for part in header.split(",")]
    timestamp = next(v for k, v in items if k == "t")
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    fresh = abs(time.time() - int(timestamp)) <= tolerance
    return fresh and any(k == "v1" and hmac.compare_digest(v, expected) for k, v in items)


def emit_committed(type_: str, customer_id: str | None, **data: Any) -> None:
    with unit_of_work() as session:
        emit(session, type_, customer_id, data)


def deliveries() -> list[NotificationDelivery]:
    with unit_of_work() as session:
        return list(session.scalars(select(NotificationDelivery).order_by(NotificationDelivery.id)))


class TestDelivery:
    def test_signed_with_every_secret_and_verified_independently(self, engine: Engine, receiver: Receiver) -> None:
        emit_committed("balance.low", "cus_a", balance=5)
        report = deliver_pending(config=endpoint_config(receiver.url))
        assert (report.dispatched, report.delivered) == (1, 1)
        (got,) = receiver.received
        header = got["headers"]["Billing-Signature"]
        assert header.count("v1=") == 2  # one per secret during the roll
        assert verify(header, got["body"], SECRETS[0]) and verify(header, got["body"], SECRETS[1])
        assert not verify(header, got["body"], "whsec_someone_else")
        assert not verify(header, got["body"] + b" ", SECRETS[1])  # a changed body fails
        assert got["event"]["type"] == "balance.low" and got["event"]["data"] == {"balance": 5}
        assert got["event"]["id"].startswith("evt_") and got["headers"]["Billing-Event-Id"] == got["event"]["id"]
        (row,) = deliveries()
        assert (row.status, row.attempts, row.last_status_code) == (DeliveryStatus.SUCCEEDED, 1, 200)
        # A second pass sends nothing again.
        assert deliver_pending(config=endpoint_config(receiver.url)).delivered == 0
        assert len(receiver.received) == 1

    def test_only_subscribed_types(self, engine: Engine, receiver: Receiver) -> None:
        emit_committed("balance.low", "cus_a", balance=5)
        emit_committed("credits.expired", "cus_a", units=3)
        deliver_pending(config=endpoint_config(receiver.url, '["credits.expired"]'))
        assert [r["event"]["type"] for r in receiver.received] == ["credits.expired"]

    def test_500_then_retried_after_backoff(self, engine: Engine, receiver: Receiver) -> None:
        cfg = endpoint_config(receiver.url)
        emit_committed("access.changed", "cus_a", access_state="suspended")
        t0 = datetime.now(UTC)
        receiver.statuses = [500]
        report = deliver_pending(config=cfg, now=t0)
        assert (report.delivered, report.retrying) == (0, 1)
        (row,) = deliveries()
        assert (row.status, row.attempts, row.last_status_code) == (DeliveryStatus.PENDING, 1, 500)
        assert "HTTP 500" in (row.last_error or "")
        assert deliver_pending(config=cfg, now=t0 + retry_delay(1) - timedelta(seconds=1)).delivered == 0
        assert len(receiver.received) == 1  # not due yet: nothing sent
        assert deliver_pending(config=cfg, now=t0 + retry_delay(1)).delivered == 1
        (row,) = deliveries()
        assert (row.status, row.attempts, row.last_status_code, row.last_error) == (
            DeliveryStatus.SUCCEEDED,
            2,
            200,
            None,
        )
        assert receiver.event_ids[0] == receiver.event_ids[1]  # the same event, at least once

    def test_slow_receiver_is_a_timeout(self, engine: Engine, receiver: Receiver) -> None:
        receiver.delay = 1.0
        emit_committed("balance.low", "cus_a", balance=5)
        report = deliver_pending(config=endpoint_config(receiver.url), timeout=0.2)
        assert report.retrying == 1
        (row,) = deliveries()
        assert row.last_error is not None and row.last_error.startswith("timeout after 0.2s")
        assert row.last_status_code is None and 150 <= (row.last_latency_ms or 0) < 1000

    def test_nobody_listening(self, engine: Engine) -> None:
        probe = Receiver()
        url = probe.url
        probe.close()  # the port is closed now: connections are refused
        emit_committed("balance.low", "cus_a", balance=5)
        assert deliver_pending(config=endpoint_config(url), timeout=1).retrying == 1
        (row,) = deliveries()
        assert row.status is DeliveryStatus.PENDING and "ConnectError" in (row.last_error or "")

    def test_creation_order_per_customer(self, engine: Engine, receiver: Receiver) -> None:
        cfg = endpoint_config(receiver.url)
        for n in range(3):
            emit_committed("balance.low", "cus_a", n=n)
            emit_committed("balance.low", "cus_b", n=n)
        with unit_of_work() as session:
            from ledger.models import OutboxEvent

            first_a = session.scalars(
                select(OutboxEvent.event_id).where(OutboxEvent.customer_id == "cus_a").order_by(OutboxEvent.id)
            ).first()
        assert first_a is not None
        receiver.fail_event_ids[first_a] = 1
        t0 = datetime.now(UTC)
        deliver_pending(config=cfg, now=t0)
        # cus_a's first failed: its later events wait behind it; cus_b's all went, in order.
        by_customer = [(r["event"]["customer_id"], r["event"]["data"]["n"]) for r in receiver.received]
        assert by_customer == [("cus_a", 0), ("cus_b", 0), ("cus_b", 1), ("cus_b", 2)]
        deliver_pending(config=cfg, now=t0 + retry_delay(1))
        a_order = [r["event"]["data"]["n"] for r in receiver.received if r["event"]["customer_id"] == "cus_a"]
        assert a_order == [0, 0, 1, 2]

    def test_given_up_after_three_days_endpoint_disabled_and_reviewed_then_redelivered(
        self, engine: Engine, receiver: Receiver
    ) -> None:
        cfg = endpoint_config(receiver.url)
        emit_committed("balance.depleted", "cus_a", balance=0)
        t0 = datetime.now(UTC)
        receiver.statuses = [503] * 100
        deliver_pending(config=cfg, now=t0)
        deliver_pending(config=cfg, now=t0 + timedelta(days=1))
        assert deliveries()[0].status is DeliveryStatus.PENDING
        report = deliver_pending(config=cfg, now=t0 + timedelta(days=3, minutes=1))
        assert report.failed == 1
        (row,) = deliveries()
        assert (row.status, row.attempts) == (DeliveryStatus.FAILED, 3)
        with unit_of_work() as session:
            state = session.scalars(select(NotificationEndpointState)).one()
            assert state.disabled_at is not None
            item = session.scalars(select(Mismatch)).one()
            assert item.kind is MismatchKind.NOTIFICATION_ENDPOINT_DISABLED and receiver.url in item.summary
        # Disabled: new events are not sent.
        emit_committed("balance.low", "cus_b", balance=1)
        sent = len(receiver.received)
        deliver_pending(config=cfg, now=t0 + timedelta(days=3, minutes=2))
        assert len(receiver.received) == sent
        # An operator redelivers from the CLI once the endpoint is fixed.
        receiver.statuses = []
        runner = CliRunner()
        listed = runner.invoke(cli_app, ["notifications", "list", "--json"])
        assert listed.exit_code == 0, listed.output
        logged = {json.loads(line)["type"]: json.loads(line)["status"] for line in listed.output.splitlines()}
        # The review item about the endpoint is itself a notification (mismatch.opened), waiting like cus_b's.
        assert logged == {"balance.low": "pending", "mismatch.opened": "pending", "balance.depleted": "failed"}
        result = runner.invoke(cli_app, ["notifications", "redeliver", str(row.id), "--json"], env={"X": "1"})
        assert result.exit_code == 0, result.output
        assert runner.invoke(cli_app, ["notifications", "redeliver", "nope"]).exit_code == 5
        threshold = runner.invoke(cli_app, ["notifications", "threshold", "cus_nobody", "--units", "5", "--json"])
        assert threshold.exit_code == 5 and json.loads(threshold.output)["code"] == "unknown_customer"
        assert runner.invoke(cli_app, ["notifications", "threshold", "cus_nobody"]).exit_code == 2
        report = deliver_pending(config=cfg, now=t0 + timedelta(days=3, minutes=3))
        assert report.delivered == 3  # the redelivered one, and the two waiting behind the re-enabled endpoint
        assert {d.status for d in deliveries()} == {DeliveryStatus.SUCCEEDED}
