"""The usage API under a real concurrent load: 64 HTTP clients, a real uvicorn server, real PostgreSQL."""

from __future__ import annotations

import random
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func, select
from webhook_helpers import API_TOKEN

from ledger.accounts import open_account
from ledger.check import check_ledger
from ledger.db import unit_of_work
from ledger.grants import grant_credits
from ledger.models import Entry, EntryKind, GrantSource

CLIENTS = 64
REQUESTS = 2000
FUNDED_UNITS = 1000
REPEAT_SHARE = 0.3


@pytest.mark.postgres
@pytest.mark.slow
class TestConsumptionRace:
    def test_exactly_the_funded_units_are_consumed_and_repeats_get_the_original(
        self, live_server: str, pg_engine: Engine
    ) -> None:
        customer = "cus_race"
        with unit_of_work() as session:
            open_account(session, customer)
            grant_credits(session, customer, units=FUNDED_UNITS, source=GrantSource.TOP_UP, idempotency_key="race-seed")
        rng = random.Random(20261123)
        plan: list[str] = []
        fresh: list[str] = []
        for n in range(REQUESTS):
            if fresh and rng.random() < REPEAT_SHARE:
                plan.append(rng.choice(fresh))
            else:
                fresh.append(f"race-{n}")
                plan.append(fresh[-1])
        assert len(fresh) > FUNDED_UNITS  # more distinct requests than credits: some must be refused

        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
        with httpx.Client(base_url=live_server, headers=headers, limits=limits, timeout=60) as http:

            def post(key: str) -> tuple[str, int, Any]:
                body = {"customer_id": customer, "units": 1, "feature": "chat", "model": "m", "user_id": "u"}
                response = http.post("/v1/usage", json=body, headers={"Idempotency-Key": key})
                return key, response.status_code, response.json()

            with ThreadPoolExecutor(CLIENTS) as pool:
                results = list(pool.map(post, plan))

        by_key: dict[str, list[tuple[int, Any]]] = defaultdict(list)
        for key, status, body in results:
            by_key[key].append((status, body))
        assert {status for _, status, _ in results} <= {200, 201, 402}, {s for _, s, _ in results}
        funded = 0
        for key, responses in by_key.items():
            created = [body for status, body in responses if status == 201]
            if created:
                funded += 1
                assert len(created) == 1, key
                # Every other delivery of this key is a replay carrying the original response.
                assert all(status == 201 or (status == 200 and body == created[0]) for status, body in responses), key
            else:
                assert {status for status, _ in responses} == {402}, (key, responses)
                assert all(body["error"]["available"] == 0 for _, body in responses)
        assert funded == FUNDED_UNITS
        assert sum(1 for _, status, _ in results if status == 200) > 0  # repeats did happen

        balance = httpx.get(f"{live_server}/v1/customers/{customer}/balance", headers=headers).json()
        assert balance["balance"] == 0
        with unit_of_work() as session:
            consumed = session.scalar(select(func.sum(Entry.units)).where(Entry.kind == EntryKind.CONSUME))
            assert consumed == -FUNDED_UNITS
            assert check_ledger(session) == []
