"""The receiver's real hand-over: one message on the Redis broker's events queue, carrying the new row ids."""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator

import pytest
import redis
from sqlalchemy import Engine, select
from starlette.testclient import TestClient
from webhook_helpers import signed_headers

from ledger.inbox import StripeEvent
from ledger.settings import get_settings
from webhooks.app import create_app
from worker.celery_app import EVENTS_QUEUE


@pytest.fixture
def broker(webhook_env: None) -> Iterator[redis.Redis]:
    url = os.environ.get("CELERY_BROKER_URL", "")
    if not url.startswith("redis"):
        if os.environ.get("CI"):
            pytest.fail("CI must set CELERY_BROKER_URL to a Redis broker")
        pytest.skip("no Redis broker configured (CELERY_BROKER_URL)")
    client = redis.Redis.from_url(url)
    client.delete(EVENTS_QUEUE)
    yield client
    client.delete(EVENTS_QUEUE)
    client.close()


def _ids_in_queue(client: redis.Redis) -> list[int]:
    ids: list[int] = []
    for message in client.lrange(EVENTS_QUEUE, 0, -1):
        envelope = json.loads(message)
        body = json.loads(base64.b64decode(envelope["body"]))
        assert envelope["headers"]["task"] == "worker.process_events"
        ids.extend(body[0][0])
    return ids


@pytest.mark.postgres
@pytest.mark.redis
class TestHandOverToRedis:
    def test_stored_events_reach_the_events_queue_once(self, pg_engine: Engine, broker: redis.Redis) -> None:
        get_settings.cache_clear()
        bodies = [
            json.dumps(
                {
                    "id": f"evt_redis_{n}",
                    "object": "event",
                    "type": "customer.created",
                    "created": 1_760_000_000,
                    "data": {"object": {"id": f"cus_{n}", "object": "customer"}},
                }
            ).encode()
            for n in range(5)
        ]
        with TestClient(create_app()) as client:  # the default hand-over: worker.enqueue.hand_over
            for raw in bodies + bodies:
                assert client.post("/webhooks/stripe", content=raw, headers=signed_headers(raw)).status_code == 200
            deadline = time.monotonic() + 10
            while len(_ids_in_queue(broker)) < 5 and time.monotonic() < deadline:
                time.sleep(0.05)
        with pg_engine.connect() as conn:
            row_ids = sorted(conn.execute(select(StripeEvent.id)).scalars())
        assert sorted(_ids_in_queue(broker)) == row_ids
        assert len(row_ids) == 5
