"""The events CLI: list, show, replay; exit codes for unknown events and bad usage."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

from ledger.inbox import EventStatus
from ledger.settings import get_settings
from tests.worker.conftest import event_row, load_fixture, store
from worker import tasks
from worker.celery_app import configure
from worker.cli import app
from worker.processing import process_events

runner = CliRunner()


@pytest.fixture
def cli_db(db: Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    monkeypatch.setenv("CELERY_TASK_ALWAYS_EAGER", "true")
    monkeypatch.setattr(tasks, "task_gateway", lambda: None)
    get_settings.cache_clear()
    configure()
    yield db
    monkeypatch.delenv("CELERY_TASK_ALWAYS_EAGER")
    get_settings.cache_clear()
    configure()


class TestList:
    def test_lists_by_status_and_type_as_json(self, cli_db: Engine) -> None:
        ignored = store(load_fixture("customer.created.srm.json"))
        pending = store(load_fixture("invoice.paid.subscription_cycle.sse.json"))
        process_events([ignored])
        result = runner.invoke(app, ["events", "list", "--status", "ignored", "--json"])
        assert result.exit_code == 0, result.output
        (line,) = result.output.splitlines()  # one JSON object, the list under "events"
        rows = json.loads(line)["events"]
        assert [r["id"] for r in rows] == [ignored]
        assert rows[0]["status_reason"]
        result = runner.invoke(app, ["events", "list", "--type", "invoice.paid"])
        assert result.exit_code == 0
        assert "invoice.paid" in result.output and str(pending) in result.output

    def test_an_unknown_status_is_a_usage_error(self, cli_db: Engine) -> None:
        assert runner.invoke(app, ["events", "list", "--status", "lost"]).exit_code == 2


class TestShow:
    def test_shows_the_outcome_and_raw_payload(self, cli_db: Engine) -> None:
        event = load_fixture("invoice.paid.subscription_cycle.sse.json")
        row_id = store(event)
        process_events([row_id])
        for ident in (str(row_id), event["id"]):
            result = runner.invoke(app, ["events", "show", ident])
            assert result.exit_code == 0, result.output
            shown = json.loads(result.output)
            assert shown["status"] == "processed" and shown["payload"]["id"] == event["id"]

    def test_an_unknown_event_exits_5(self, cli_db: Engine) -> None:
        result = runner.invoke(app, ["events", "show", "evt_nope"])
        assert result.exit_code == 5
        assert "no stored event" in result.output


class TestReplay:
    def test_replay_runs_a_failed_event_again_after_the_config_is_fixed(
        self, cli_db: Engine, billing_config_file: object
    ) -> None:
        event = load_fixture("invoice.paid.subscription_cycle.sse.json")
        for line in event["data"]["object"]["lines"]["data"]:
            line["price"]["id"] = line["plan"]["id"] = "price_added_later"
        row_id = store(event)
        process_events([row_id])
        assert event_row(row_id).status == EventStatus.FAILED
        from tests.worker.conftest import WORKER_BILLING_CONFIG

        billing_config_file(  # type: ignore[operator]
            WORKER_BILLING_CONFIG + '\n[[plans]]\nprice = "price_added_later"\ncredits_per_period = 77\n'
        )
        result = runner.invoke(app, ["events", "replay", event["id"]])
        assert result.exit_code == 0, result.output
        row = event_row(row_id)
        assert row.status == EventStatus.PROCESSED and row.attempts == 2

    def test_replay_since_reruns_without_repeating_effects(self, cli_db: Engine) -> None:
        row_id = store(load_fixture("invoice.paid.subscription_cycle.sse.json"))
        process_events([row_id])
        result = runner.invoke(app, ["events", "replay", "--since", "2020-01-01T00:00:00Z"])
        assert result.exit_code == 0, result.output
        assert "replaying 1 event" in result.output
        assert "already granted" in (event_row(row_id).status_reason or "")

    def test_replay_needs_exactly_one_of_id_and_since(self, cli_db: Engine) -> None:
        assert runner.invoke(app, ["events", "replay"]).exit_code == 2
        assert runner.invoke(app, ["events", "replay", "1", "--since", "2020-01-01"]).exit_code == 2
        assert runner.invoke(app, ["events", "replay", "--since", "yesterday"]).exit_code == 2


class TestShowDeepEvents:
    def test_an_event_nested_as_deep_as_the_receiver_allows_is_shown(self, cli_db: Engine) -> None:
        # Written by hand: 1,000 levels inside the envelope, within the 1,024 the receiver's parser accepts.
        deep = '{"a": ' * 1000 + '{"id": "cus_deep"}' + "}" * 1000
        raw = (
            '{"id": "evt_deep_cli", "object": "event", "type": "customer.updated", "created": 1760000000, '
            '"data": {"object": {"id": "cus_deep", "object": "customer", "nested": ' + deep + "}}}"
        ).encode()
        store(raw)
        shown = runner.invoke(app, ["events", "show", "evt_deep_cli"])
        assert shown.exit_code == 0, shown.output
        assert "cus_deep" in shown.output
        as_json = runner.invoke(app, ["events", "show", "evt_deep_cli", "--json"])
        assert as_json.exit_code == 0, as_json.output
        body = json.loads(as_json.stdout)
        assert body["ok"] is True and body["event_id"] == "evt_deep_cli" and "cus_deep" in body["payload"]
