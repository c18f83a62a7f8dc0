"""Crash tests on PostgreSQL + Redis with real `billing-reconciler worker` processes.

SIGKILL takes the worker down mid-stream (open transactions cut off, messages unacknowledged) several times;
Redis is killed and restarted mid-stream (its queue lost). Afterwards the sweep re-sends what the broker lost,
and the ledger must equal the one an undisturbed in-order run produces: every event exactly once in effect.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine
from stripe_emulator import Clock, EmulatorServer, Store

from ledger.settings import get_settings
from reconciliation.gateway import StripeGateway
from tests.conftest import redis_url
from tests.worker.conftest import store
from tests.worker.streams import EXPECTED_ACCESS, emulator_ties, generate_stream, same_second_ties
from tests.worker.test_metamorphic import snapshot, wipe
from tests.worker.workers import DONE, RedisServer, WorkerProcess, count_all, count_done, free_port, wait_until
from worker.celery_app import configure
from worker.enqueue import hand_over
from worker.processing import process_events
from worker.sweep import sweep

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def shared_redis() -> str:
    url = redis_url()
    if url is None:
        pytest.skip("no Redis configured: set CELERY_BROKER_URL=redis://... to run these")
    try:
        redis.Redis.from_url(url).ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis at CELERY_BROKER_URL does not answer: {exc}", pytrace=False)
    return url


@pytest.fixture
def emulator() -> Iterator[EmulatorServer]:
    # Its clock starts 40 days ago, so that its subscriptions' renewals (a month on) are in the past.
    server = EmulatorServer(Store(clock=Clock(datetime.now(UTC) - timedelta(days=40)))).start()
    yield server
    server.stop()


def use_broker(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("CELERY_BROKER_URL", url)
    monkeypatch.delenv("CELERY_TASK_ALWAYS_EAGER", raising=False)
    get_settings.cache_clear()
    configure()


def worker_env(broker: str, emulator: EmulatorServer) -> dict[str, str]:
    env = dict(os.environ)
    env.update(CELERY_BROKER_URL=broker, STRIPE_API_BASE=emulator.url, STRIPE_MAX_RETRIES="1")
    env.pop("CELERY_TASK_ALWAYS_EAGER", None)
    return env


def reference(events: list[dict[str, Any]], engine: Engine, gateway: StripeGateway) -> dict[str, Any]:
    """The ledger an undisturbed, in-order, in-process run produces; the database is wiped afterwards."""
    for start in range(0, len(events), 50):
        process_events([store(e) for e in events[start : start + 50]], gateway=gateway)
    result = snapshot()
    wipe(engine)
    return result


def deliveries(events: list[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    out = [e for e in events for _ in range(rng.randint(1, 2))]
    rng.shuffle(out)
    return out


def send(batch: list[dict[str, Any]]) -> list[int]:
    """What the receiver does: store, then hand over (a broker failure is survived: the sweep has it)."""
    ids = [store(e) for e in batch]
    with contextlib.suppress(Exception):
        hand_over(ids)
    return ids


def finish_with_sweep(total: int, log: Path, *, rounds: int = 15) -> None:
    """Wait for the workers; what never arrives (lost with a killed worker or broker) the sweep re-sends."""
    for _ in range(rounds):
        if wait_until(lambda: count_done() == total, timeout=6):
            return
        sweep(hand_over, older_than=timedelta(0))
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    assert count_done() == total, f"{total - count_done()} events never processed; worker log:\n{tail}"


@pytest.fixture
def crash_setup(
    pg_engine: Engine, worker_config: Path, emulator: EmulatorServer, shared_redis: str
) -> tuple[Engine, EmulatorServer, str]:
    redis.Redis.from_url(shared_redis).flushdb()
    return pg_engine, emulator, shared_redis


class TestWorkerKilled:
    def test_sigkill_mid_stream_then_restart_applies_each_event_once(
        self, crash_setup: tuple[Engine, EmulatorServer, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        engine, emulator, broker = crash_setup
        gateway = StripeGateway(api_base=emulator.url)
        # Besides the generated lives, subscriptions with several events in one second, made by the emulator
        # (which the killed and restarted workers ask to settle each tie).
        ties, live = emulator_ties(emulator.store, customers=3)
        assert same_second_ties(ties) >= 3
        events = sorted(generate_stream(customers=16, seed=5) + ties, key=lambda e: e["created"])
        expected = reference(events, engine, gateway)
        assert {c: expected["accounts"][c][3] for c in live} == {c: EXPECTED_ACCESS[s] for c, s in live.items()}

        use_broker(monkeypatch, broker)
        worker = WorkerProcess(worker_env(broker, emulator), tmp_path / "worker.log")
        rng = random.Random(5)
        stream = deliveries(events, rng)
        parts = [stream[i::5] for i in range(5)]
        mid_stream_kills = 0
        try:
            worker.start()
            for n, part in enumerate(parts):
                before = count_done()
                for start in range(0, len(part), 3):
                    send(part[start : start + 3])
                if n == len(parts) - 1:
                    break
                # Let the worker get going on this part, then kill it while events are still queued.
                assert wait_until(lambda b=before: count_done() > b, timeout=60, interval=0.01), "worker idle"
                time.sleep(rng.uniform(0.0, 0.03))
                if count_done() < count_all():
                    mid_stream_kills += 1
                worker.kill()
                worker.start()
            finish_with_sweep(len(events), tmp_path / "worker.log")
        finally:
            worker.stop()
        assert worker.kills >= 4 and mid_stream_kills >= 3, (worker.kills, mid_stream_kills)
        got = snapshot()
        assert got["statuses"] <= set(DONE)
        assert got["accounts"] == expected["accounts"]
        assert got["grants"] == expected["grants"]


class TestBrokerLost:
    def test_redis_killed_and_restarted_mid_stream_the_sweep_recovers(
        self, crash_setup: tuple[Engine, EmulatorServer, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        engine, emulator, _ = crash_setup
        gateway = StripeGateway(api_base=emulator.url)
        events = generate_stream(customers=12, seed=9)
        expected = reference(events, engine, gateway)

        port = 6390 if _port_free(6390) else free_port()
        own_redis = RedisServer(port, tmp_path)
        own_redis.start()
        use_broker(monkeypatch, own_redis.url)
        worker = WorkerProcess(worker_env(own_redis.url, emulator), tmp_path / "worker.log")
        rng = random.Random(9)
        stream = deliveries(events, rng)
        half = len(stream) // 2
        try:
            worker.start()
            for start in range(0, half, 3):
                send(stream[start : start + 3])
            # Mid-stream: the worker is consuming, and messages are still queued, when Redis dies.
            assert wait_until(lambda: count_done() > 0, timeout=60, interval=0.02), "worker idle"
            own_redis.kill()  # every queued message is gone
            for start in range(half, half + 30, 3):
                send(stream[start : start + 3])  # the broker is down: stored, not handed over
            own_redis.start()
            for start in range(half + 30, len(stream), 3):
                send(stream[start : start + 3])
            finish_with_sweep(len(events), tmp_path / "worker.log")
        finally:
            worker.stop()
            own_redis.kill()
        got = snapshot()
        assert got["accounts"] == expected["accounts"]
        assert got["grants"] == expected["grants"]


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
