"""POST /v1/usage/batch, the idempotency of the whole request, and ``usage import``: each event its own unit."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func, select
from starlette.testclient import TestClient
from typer.testing import CliRunner
from webhook_helpers import API_TOKEN

from ledger.accounts import open_account, set_access_state
from ledger.check import check_ledger
from ledger.db import unit_of_work
from ledger.grants import grant_credits
from ledger.models import AccessState, Account, Entry, EntryKind, GrantSource
from webhooks.api import UsageBatchResponse
from worker.cli import app as cli

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


def fund(customer_id: str, units: int) -> None:
    with unit_of_work() as session:
        open_account(session, customer_id)
        grant_credits(session, customer_id, units=units, source=GrantSource.TOP_UP, idempotency_key=f"{customer_id}:s")


def balance(customer_id: str) -> int:
    with unit_of_work() as session:
        return session.execute(select(Account.balance).where(Account.customer_id == customer_id)).scalar_one()


class TestBatchResults:
    def test_each_event_gets_the_status_and_body_of_the_single_call(self, client: TestClient) -> None:
        fund("cus_a", 100)
        fund("cus_off", 100)
        with unit_of_work() as session:
            set_access_state(session, "cus_off", AccessState.SUSPENDED, as_of=datetime.now(UTC), source="test")
        assert client.post("/v1/usage", json={"customer_id": "cus_a", "request_id": "old", "units": 5},
                           headers=AUTH).status_code == 201  # fmt: skip
        events: list[dict[str, Any]] = [
            {"customer_id": "cus_a", "request_id": "new", "units": 10, "feature": "chat"},  # 201, balance 85
            {"customer_id": "cus_a", "request_id": "old", "units": 5},  # 200: a replay of the earlier call
            {"customer_id": "cus_a", "request_id": "big", "units": 1000},  # 402 with available 85
            {"customer_id": "cus_off", "request_id": "off", "units": 1},  # 403, suspended
            {"customer_id": "cus_nobody", "request_id": "who", "units": 1},  # 404
            {"customer_id": "cus_a", "request_id": "old", "units": 6},  # 409: the id was used with other units
            {"customer_id": "cus_a", "request_id": "new", "units": 10, "reason": "changed"},  # 409: other reason
            {"customer_id": "cus_a", "units": 1},  # 422: no request_id
            {"customer_id": "cus_a", "request_id": "f", "units": 1, "provider_cost_usd": 0.5},  # 422: float money
            {"customer_id": "cus_a", "request_id": "neg", "units": -1},  # 422
        ]
        response = client.post("/v1/usage/batch", json={"events": events}, headers=AUTH)
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert [r["status"] for r in results] == [201, 200, 402, 403, 404, 409, 409, 422, 422, 422]
        codes = [r["body"].get("error", {}).get("code") for r in results]
        assert codes == [None, None, "insufficient_credits", "access_refused", "unknown_customer",
                         "idempotency_conflict", "idempotency_conflict", "invalid_request", "invalid_request",
                         "invalid_request"]  # fmt: skip
        assert results[0]["body"]["balance_after"] == 85
        # The answer is exactly what the response model serializes (it is built from plain dicts).
        assert UsageBatchResponse.model_validate_json(response.content).model_dump_json().encode() == response.content
        assert results[2]["body"]["error"]["available"] == 85 and results[2]["body"]["error"]["requested"] == 1000
        assert results[3]["body"]["error"]["access_state"] == "suspended"
        # The single call now answers what the batch answered (a created event is replayed: 200, the same body).
        for event, result in zip(events, results, strict=True):
            single = client.post("/v1/usage", json=event, headers=AUTH)
            assert single.status_code == (200 if result["status"] == 201 else result["status"]), event
            if result["status"] != 422:  # validation details name the body's place, which differs
                assert single.json() == result["body"], event
        assert balance("cus_a") == 85
        with unit_of_work() as session:
            assert check_ledger(session) == []

    def test_a_resent_batch_charges_nothing_twice(self, client: TestClient) -> None:
        fund("cus_a", 100)
        events = [{"customer_id": "cus_a", "request_id": f"r{n}", "units": n} for n in range(1, 6)]
        first = client.post("/v1/usage/batch", json={"events": events}, headers=AUTH).json()["results"]
        again = client.post("/v1/usage/batch", json={"events": events}, headers=AUTH).json()["results"]
        assert [r["status"] for r in first] == [201] * 5 and [r["status"] for r in again] == [200] * 5
        assert [r["body"] for r in first] == [r["body"] for r in again]
        assert balance("cus_a") == 100 - 15

    @pytest.mark.parametrize(
        ("body", "status"),
        [
            (b"not json", 422),
            (json.dumps({"events": []}).encode(), 422),
            (json.dumps({"events": [{"customer_id": "c", "request_id": f"{n}"} for n in range(1001)]}).encode(), 422),
            (json.dumps({"items": []}).encode(), 422),
            (json.dumps([{"customer_id": "c"}]).encode(), 422),
        ],
        ids=["not json", "no events", "over 1000", "no events key", "a bare list"],
    )
    def test_a_body_that_is_not_a_batch_is_refused_whole(self, client: TestClient, body: bytes, status: int) -> None:
        response = client.post("/v1/usage/batch", content=body, headers={**AUTH, "Content-Type": "application/json"})
        assert response.status_code == status
        assert response.json()["error"]["code"] == "invalid_request"

    def test_without_a_token_is_401(self, client: TestClient) -> None:
        response = client.post("/v1/usage/batch", json={"events": [{"customer_id": "c", "request_id": "r"}]})
        assert response.status_code == 401


class TestWholeRequestIdempotency:
    @pytest.mark.parametrize(
        "change",
        [{"reason": "other"}, {"feature": "search"}, {"user_id": "u_2"}, {"units": 4}, {"customer_id": "cus_b"}],
        ids=["reason", "feature", "user", "units", "customer"],
    )
    def test_a_replay_that_would_record_something_else_is_409(self, client: TestClient, change: dict[str, Any]) -> None:
        fund("cus_a", 100)
        fund("cus_b", 100)
        body = {"customer_id": "cus_a", "request_id": "r-1", "units": 3, "feature": "chat", "user_id": "u_1"}
        assert client.post("/v1/usage", json=body, headers=AUTH).status_code == 201
        response = client.post("/v1/usage", json={**body, **change}, headers=AUTH)
        assert response.status_code == 409
        assert response.json()["error"]["code"] == "idempotency_conflict"
        assert balance("cus_a") == 97 and balance("cus_b") == 100


class TestUsageImport:
    def test_imports_good_lines_reports_bad_ones_by_number_and_a_reimport_changes_nothing(
        self, engine: Engine, tmp_path: Path
    ) -> None:
        fund("cus_a", 100)
        lines = [
            json.dumps({"customer_id": "cus_a", "request_id": "i1", "units": 10}),
            "{not json",
            json.dumps({"customer_id": "cus_a", "request_id": "i2", "units": 5, "model": "gpt-4o-2024-08-06"}),
            json.dumps({"customer_id": "cus_a", "request_id": "i1", "units": 10}),  # a repeat: replayed
            "",
            json.dumps({"customer_id": "cus_a", "units": 1}),  # no request_id
            json.dumps({"customer_id": "cus_zz", "request_id": "i3", "units": 1}),
            json.dumps({"customer_id": "cus_a", "request_id": "i4", "units": 500}),
        ]
        path = tmp_path / "usage.jsonl"
        path.write_text("\n".join(lines) + "\n")
        runner = CliRunner()
        first = runner.invoke(cli, ["usage", "import", str(path), "--json", "--batch-size", "2"])
        assert first.exit_code == 1, first.output
        report = json.loads(first.stdout)
        assert report["outcomes"] == {"applied": 2, "replayed": 1, "invalid_request": 2, "unknown_customer": 1,
                                      "insufficient_credits": 1}  # fmt: skip
        assert [(p["line"], p["code"]) for p in report["problems"]] == [
            (2, "invalid_request"), (6, "invalid_request"), (7, "unknown_customer"), (8, "insufficient_credits")
        ]  # fmt: skip
        assert balance("cus_a") == 85

        again = json.loads(runner.invoke(cli, ["usage", "import", str(path), "--json"]).stdout)
        assert again["outcomes"]["replayed"] == 3 and "applied" not in again["outcomes"]
        assert balance("cus_a") == 85
        with unit_of_work() as session:
            assert check_ledger(session) == []

    def test_an_unreadable_file_exits_2_with_one_line(self, engine: Engine, tmp_path: Path) -> None:
        result = CliRunner().invoke(cli, ["usage", "import", str(tmp_path / "missing.jsonl")])
        assert result.exit_code == 2
        assert result.output.strip().startswith("error: cannot read") and len(result.output.strip().splitlines()) == 1


@pytest.mark.postgres
@pytest.mark.slow
class TestBatchRace:
    def test_64_clients_with_overlapping_batches_charge_every_id_once(
        self, live_server: str, pg_engine: Engine
    ) -> None:
        customers = [f"cus_b{n}" for n in range(20)]
        funded = 100
        for customer in customers:
            fund(customer, funded)
        rng = random.Random(20261206)
        pool = [(f"id-{n}", rng.choice(customers)) for n in range(3000)]  # each id belongs to one customer
        batches = [rng.sample(pool, 50) for _ in range(64 * 6)]  # ids overlap across batches
        headers = {**AUTH}
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        with httpx.Client(base_url=live_server, headers=headers, limits=limits, timeout=120) as http:

            def send(batch: list[tuple[str, str]]) -> list[tuple[str, str, int, dict[str, Any]]]:
                events = [{"customer_id": c, "request_id": r, "units": 1} for r, c in batch]
                response = http.post("/v1/usage/batch", json={"events": events})
                assert response.status_code == 200, response.text
                return [(r, c, x["status"], x["body"]) for (r, c), x in zip(batch, response.json()["results"],
                                                                           strict=True)]  # fmt: skip

            with ThreadPoolExecutor(64) as threads:
                answers = [a for answers in threads.map(send, batches) for a in answers]

        by_id: dict[str, set[tuple[int, Any]]] = defaultdict(set)
        for request_id, _, status, body in answers:
            assert status in (200, 201, 402), (status, body)
            by_id[request_id].add((status == 402, body.get("entry_id")))
        # An id is either charged (one entry, every answer naming it) or refused every time: never both, never twice.
        assert all(len(outcomes) == 1 for outcomes in by_id.values())
        attempted: dict[str, set[str]] = defaultdict(set)
        for request_id, customer, _, _ in answers:
            attempted[customer].add(request_id)
        with unit_of_work() as session:
            for customer in customers:
                consumed = session.execute(
                    select(func.count()).select_from(Entry).join(Account, Entry.account_id == Account.id)
                    .where(Account.customer_id == customer, Entry.kind == EntryKind.CONSUME)
                ).scalar_one()  # fmt: skip
                # Balances only go down, so every new id is charged while credits last: min(funded, distinct).
                assert consumed == min(funded, len(attempted[customer])), customer
                assert balance(customer) == funded - consumed >= 0
            assert check_ledger(session) == []
