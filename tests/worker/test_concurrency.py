"""Many workers on one stream at once (threads on real PostgreSQL): each event is applied exactly once."""

from __future__ import annotations

import random
import threading
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from ledger.db import unit_of_work
from ledger.inbox import EventStatus, StripeEvent
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

    # What the racers applied themselves, before any final pass: every event marked done was marked by exactly
    # one racer, and the only events left are ones that waited for a prerequisite another racer was applying
    # at that moment (the sweep's business), none pending, failed or lost.
    applied = sum(r.processed + r.ignored for r in reports)
    waited = sum(r.waiting for r in reports)
    with unit_of_work() as session:
        statuses = dict(
            session.execute(select(StripeEvent.status, func.count()).group_by(StripeEvent.status)).tuples().all()
        )
        attempts = session.scalar(select(func.sum(StripeEvent.attempts)))
    done = statuses.get(EventStatus.PROCESSED, 0) + statuses.get(EventStatus.IGNORED, 0)
    left = statuses.get(EventStatus.WAITING, 0)
    assert done == applied, (statuses, applied)
    assert done + left == len(ids), statuses
    assert left <= waited, (left, waited)
    # Waiting is the exception: 8 racers over the whole stream leave at most a few events to the sweep.
    assert done >= len(ids) - 8, (done, len(ids), statuses)
    # Every claim beyond the one that applied an event was skipped (or recorded a wait or a retry).
    assert sum(r.skipped for r in reports) >= 8 * len(ids) - applied - waited - sum(len(r.retry) for r in reports)
    assert attempts == applied + waited + sum(len(r.retry) for r in reports)

    # Then what is left, as the sweep would, and the ledger is what one worker applying the stream gives.
    final = process_events(ids)
    assert final.processed + final.ignored == left
    got = snapshot()
    assert got["accounts"] == expected["accounts"]
    assert got["grants"] == expected["grants"]
