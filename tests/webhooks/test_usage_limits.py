"""Limits enforced inside the consumption's own transaction: POST /v1/usage and its batch, on both backends,
and 64 concurrent clients at a limit of N on a live server (exactly N pass)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, func, select
from starlette.testclient import TestClient
from webhook_helpers import API_TOKEN

from ledger.accounts import open_account
from ledger.check import check_ledger
from ledger.db import unit_of_work
from ledger.grants import grant_credits
from ledger.models import Account, Entry, EntryKind, GrantSource, LimitCounter

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
IMAGES_PER_USER = 3
CONFIG = f"""
[operations]
text = 1
image = 20

[[limits]]
name = "images-per-user-daily"
scope = "user"
operation = "image"
window = "day"
max_requests = {IMAGES_PER_USER}
"""


@pytest.fixture
def limited(billing_config_file: Callable[[str], Path]) -> None:
    billing_config_file(CONFIG)


def fund(customer_id: str, units: int) -> None:
    with unit_of_work() as session:
        open_account(session, customer_id)
        grant_credits(session, customer_id, units=units, source=GrantSource.TOP_UP, idempotency_key=f"{customer_id}:s")


def consumed(customer_id: str) -> int:
    with unit_of_work() as session:
        return session.execute(
            select(func.count()).select_from(Entry).join(Account, Entry.account_id == Account.id)
            .where(Account.customer_id == customer_id, Entry.kind == EntryKind.CONSUME)
        ).scalar_one()  # fmt: skip


class TestLimitOnUsage:
    def test_a_user_past_the_limit_gets_429_and_nothing_is_written(
        self, limited: None, client: TestClient, engine: Engine
    ) -> None:
        fund("cus_l", 1000)
        image = {"customer_id": "cus_l", "operation": "image", "user_id": "u_1"}
        statuses = [
            client.post("/v1/usage", json={**image, "request_id": f"img-{n}"}, headers=AUTH).status_code
            for n in range(IMAGES_PER_USER + 2)
        ]
        assert statuses == [201] * IMAGES_PER_USER + [429, 429]
        refused = client.post("/v1/usage", json={"customer_id": "cus_l", "request_id": "img-9", "operation": "image",
                                                 "user_id": "u_1"}, headers=AUTH).json()["error"]  # fmt: skip
        assert refused["code"] == "limit_exceeded"
        # Another user has room of their own; text is not an image; a replay takes no room.
        other = {"customer_id": "cus_l", "request_id": "img-u2", "operation": "image", "user_id": "u_2"}
        assert client.post("/v1/usage", json=other, headers=AUTH).status_code == 201
        text = {"customer_id": "cus_l", "request_id": "txt-1", "operation": "text", "user_id": "u_1"}
        assert client.post("/v1/usage", json=text, headers=AUTH).status_code == 201
        replay = {"customer_id": "cus_l", "request_id": "img-0", "operation": "image", "user_id": "u_1"}
        assert client.post("/v1/usage", json=replay, headers=AUTH).status_code == 200
        assert consumed("cus_l") == IMAGES_PER_USER + 2
        with unit_of_work() as session:
            assert check_ledger(session) == []
            used = session.execute(select(func.sum(LimitCounter.requests))).scalar_one()
        assert used == IMAGES_PER_USER + 1  # u_1's three and u_2's one; refusals and the replay took none

    def test_a_batch_refuses_only_the_events_past_the_limit(
        self, limited: None, client: TestClient, engine: Engine
    ) -> None:
        fund("cus_b", 1000)
        events = [{"customer_id": "cus_b", "request_id": f"b-{n}", "operation": "image"} for n in range(5)]
        results = client.post("/v1/usage/batch", json={"events": events}, headers=AUTH).json()["results"]
        # No user_id: counted under the customer, not let through.
        assert [r["status"] for r in results] == [201] * IMAGES_PER_USER + [429, 429]
        assert results[-1]["body"]["error"]["code"] == "limit_exceeded"
        assert consumed("cus_b") == IMAGES_PER_USER


class TestLimitOnHolds:
    def test_holds_take_room_capture_settles_release_gives_back(
        self, limited: None, client: TestClient, engine: Engine
    ) -> None:
        fund("cus_h", 1000)

        def place(n: int) -> httpx.Response:
            body = {"customer_id": "cus_h", "request_id": f"h-{n}", "operation": "image", "user_id": "u_1",
                    "units": 50}  # fmt: skip
            return client.post("/v1/holds", json=body, headers=AUTH)

        assert [place(n).status_code for n in range(IMAGES_PER_USER + 1)] == [201] * IMAGES_PER_USER + [429]
        refused = place(9).json()["error"]
        assert (refused["code"], refused["limit"], refused["used"], refused["maximum"]) == (
            "limit_exceeded", "images-per-user-daily", IMAGES_PER_USER, IMAGES_PER_USER,
        )  # fmt: skip
        # A release gives its slot back (a repeated release does not give it twice); a capture keeps its slot.
        assert client.post("/v1/holds/h-0/release", headers=AUTH).status_code == 200
        assert client.post("/v1/holds/h-0/release", headers=AUTH).status_code == 200
        assert client.post("/v1/holds/h-1/capture", json={"units": 20}, headers=AUTH).status_code == 200
        assert place(10).status_code == 201
        assert place(11).status_code == 429
        with unit_of_work() as session:
            assert check_ledger(session) == []
            counter = session.execute(select(LimitCounter)).scalar_one()
        # h-1 captured 20 of 50, h-2 and h-10 hold 50 each: three requests, 120 units.
        assert (counter.requests, counter.units) == (IMAGES_PER_USER, 20 + 50 + 50)


@pytest.mark.postgres
@pytest.mark.slow
class TestLimitRace:
    def test_64_clients_at_a_limit_of_n_exactly_n_pass(
        self, limited: None, live_server: str, pg_engine: Engine
    ) -> None:
        fund("cus_race", 100_000)
        with httpx.Client(base_url=live_server, headers=AUTH, timeout=60,
                          limits=httpx.Limits(max_connections=64)) as http:  # fmt: skip

            def post(n: int) -> int:
                body = {"customer_id": "cus_race", "request_id": f"r-{n}", "operation": "image", "user_id": "u"}
                return http.post("/v1/usage", json=body).status_code

            with ThreadPoolExecutor(64) as pool:
                statuses = Counter(pool.map(post, range(200)))
        assert statuses == Counter({201: IMAGES_PER_USER, 429: 200 - IMAGES_PER_USER})
        assert consumed("cus_race") == IMAGES_PER_USER
        with unit_of_work() as session:
            assert check_ledger(session) == []
