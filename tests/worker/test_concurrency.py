"""Many workers on one stream at once (threads on real PostgreSQL): each event is applied exactly once."""

from __future__ import annotations

import random
import threading
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from ledger.db import unit_of_work
from ledger.inbox import StripeEvent
from tests.worker.conftest import store
from tests.worker.streams import generate_stream
from tests.worker.test_metamorphic import snapshot, wipe
from worker.processing import BatchReport, process_events

pytestmark = [pytest.mark.postgres]


@pytest.mark.slow
def test_eight_threads_racing_over_the_same_events_apply_each_once(pg_engine: Engine, worker_config: Any) -> None:
    events = generate_stream(customers=12, seed=21)
    for start in range(0, len(events), 50):
        process_events([store(e) for e in events[start : start + 50]])
    expected = snapshot()
    wipe(pg_engine)

    ids = [store(e) for e in events]
    reports: list[BatchReport] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def racer(seed: int) -> None:
        mine = ids[:]
        random.Random(seed).shuffle(mine)
        barrier.wait()
        try:
            for start in range(0, len(mine), 20):
                reports.append(process_events(mine[start : start + 20]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=racer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    # Some events waited for a grant another thread was making; run what is left, as the sweep would.
    process_events(ids)

    applied = sum(r.processed + r.ignored for r in reports)
    with unit_of_work() as session:
        attempts = session.scalar(select(func.sum(StripeEvent.attempts)))
        waited = sum(r.waiting for r in reports)
    got = snapshot()
    assert got["accounts"] == expected["accounts"]
    assert got["grants"] == expected["grants"]
    # Every event was marked done exactly once, whatever the 8 x len(ids) claims: the rest were skipped.
    assert applied <= len(ids) and sum(r.skipped for r in reports) >= 7 * len(ids) - waited
    assert attempts == len(ids) + waited + sum(len(r.retry) for r in reports)
