"""Group commit for the webhook inbox.

Concurrent deliveries are collected while the previous transaction is in flight, written together with one
``INSERT ... ON CONFLICT DO NOTHING RETURNING`` in one transaction, and each request is answered only after that
transaction has committed. The new rows are then handed to the worker in one ``hand_over`` call per batch (or
fewer: hand-overs that pile up while one is in flight are merged). Batching is what makes thousands of events per
second possible: one transaction and one broker round trip per request cost more than the rest of the request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum

import structlog
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from ledger.db import unit_of_work
from ledger.inbox import EventEnvelope, EventSource, store_events
from webhooks import metrics
from webhooks.group_commit import GroupCommit, Pending

log = structlog.get_logger(__name__)

StoreBatch = Callable[[Sequence[tuple[bytes, EventEnvelope]]], tuple[dict[str, int], dict[str, Exception]]]
HandOver = Callable[[Sequence[int]], None]


class StoreOutcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"


class InboxUnavailable(Exception):
    """The event could not be stored now (database unreachable, write failed or timed out); try again later."""


def store_batch(items: Sequence[tuple[bytes, EventEnvelope]]) -> tuple[dict[str, int], dict[str, Exception]]:
    """Store events in one transaction; return the new row ids by event id and the events that cannot be stored.

    If the batch fails for a reason other than the connection, each event is retried in its own transaction, so
    one event the database refuses cannot fail the deliveries that happened to share its batch.
    """
    try:
        with unit_of_work() as session:
            return store_events(session, items, source=EventSource.WEBHOOK), {}
    except (OperationalError, InterfaceError):
        raise  # the database is unreachable: every delivery in the batch fails alike
    except DBAPIError as exc:
        if len(items) == 1:
            return {}, {items[0][1].event_id: exc}
    stored: dict[str, int] = {}
    failed: dict[str, Exception] = {}
    for item in items:
        try:
            with unit_of_work() as session:
                stored.update(store_events(session, [item], source=EventSource.WEBHOOK))
        except (OperationalError, InterfaceError):
            raise
        except DBAPIError as exc:
            failed[item[1].event_id] = exc
    return stored, failed


def default_hand_over(event_row_ids: Sequence[int]) -> None:
    """Hand over through ``worker.enqueue.hand_over``, looked up at call time."""
    from worker import enqueue

    enqueue.hand_over(event_row_ids)


class InboxWriter(GroupCommit[tuple[bytes, EventEnvelope], StoreOutcome]):
    """Collects concurrent deliveries into group-committed batches; one per event loop (server process)."""

    def __init__(
        self,
        *,
        store: StoreBatch = store_batch,
        hand_over: HandOver = default_hand_over,
        writers: int = 1,
        max_batch: int = 500,
        max_handover: int = 2000,
        handover_linger_seconds: float = 0.01,
        timeout_seconds: float = 10.0,
    ) -> None:
        super().__init__(
            writers=writers, max_batch=max_batch, timeout_seconds=timeout_seconds, threads=writers,
            name="inbox-writer",
        )  # fmt: skip
        self._store = store
        self._hand_over = hand_over
        self._max_handover = max_handover
        self._handover_linger = handover_linger_seconds
        self._handover_ids: list[int] = []
        self._handover_wakeup: asyncio.Event | None = None
        self._handover_busy = False
        self._handover_failure_logged_at = -1e9
        self._handover_failed_unlogged = 0
        self._broker_pool: ThreadPoolExecutor | None = None

    def _started(self, loop: asyncio.AbstractEventLoop) -> list[asyncio.Task[None]]:
        self._handover_wakeup = asyncio.Event()
        self._handover_ids = []
        self._broker_pool = self._broker_pool or ThreadPoolExecutor(1, thread_name_prefix="inbox-handover")
        return [loop.create_task(self._run_handover())]

    def _stopped(self) -> None:
        if self._broker_pool is not None:
            self._broker_pool.shutdown(wait=False)
            self._broker_pool = None

    async def submit(self, raw: bytes, envelope: EventEnvelope) -> StoreOutcome:  # type: ignore[override]
        """Store one delivery; return once its row (or the earlier one) is committed. Raises InboxUnavailable."""
        return await super().submit((raw, envelope))

    def _timed_out(self) -> Exception:
        # The write may still commit later; answering 503 then only costs Stripe a redelivery (a no-op).
        return InboxUnavailable(f"storing the event took longer than {self._timeout:g}s")

    async def _commit(self, batch: list[Pending[tuple[bytes, EventEnvelope], StoreOutcome]]) -> None:
        first: dict[str, Pending[tuple[bytes, EventEnvelope], StoreOutcome]] = {}
        for delivery in batch:
            first.setdefault(delivery.item[1].event_id, delivery)
        items = [d.item for d in first.values()]
        try:
            stored, failed = await self.run(self._store, items)
        except Exception as exc:
            log.warning("inbox write failed", events=len(items), error=repr(exc))
            for delivery in batch:
                if not delivery.future.done():
                    delivery.future.set_exception(InboxUnavailable("the database cannot store events right now"))
            return
        metrics.COMMIT_BATCH_SIZE.observe(len(items))
        new_ids: list[int] = []
        for delivery in batch:
            event_id = delivery.item[1].event_id
            if delivery.future.done():
                continue
            if event_id in failed:
                log.error("event could not be stored", event_id=event_id, error=repr(failed[event_id]))
                delivery.future.set_exception(InboxUnavailable(f"event {event_id} could not be stored"))
            elif event_id in stored and first[event_id] is delivery:
                new_ids.append(stored[event_id])
                delivery.future.set_result(StoreOutcome.STORED)
            else:
                delivery.future.set_result(StoreOutcome.DUPLICATE)
        if new_ids:
            self._handover_ids.extend(new_ids)
            assert self._handover_wakeup is not None
            self._handover_wakeup.set()

    async def _run_handover(self) -> None:
        assert self._handover_wakeup is not None
        wakeup = self._handover_wakeup
        loop = asyncio.get_running_loop()
        while True:
            await wakeup.wait()
            # Let a few more batches' ids gather: one broker message per ~10 ms instead of per commit costs the
            # worker nothing and saves a good share of the receiver's CPU. The responses are already sent.
            self._handover_busy = True
            await asyncio.sleep(self._handover_linger)
            wakeup.clear()
            while self._handover_ids:
                ids = self._handover_ids[: self._max_handover]
                del self._handover_ids[: self._max_handover]
                try:
                    await loop.run_in_executor(self._broker_pool, self._hand_over, ids)
                except Exception as exc:
                    # Stored and acknowledged all the same: the worker's sweep picks up stored, unhandled events.
                    metrics.HANDOVER_FAILED.inc(len(ids))
                    self._log_handover_failure(len(ids), exc)
                else:
                    metrics.EVENTS_HANDED_OVER.inc(len(ids))
            self._handover_busy = False

    def _log_handover_failure(self, events: int, exc: Exception) -> None:
        # At most one line a minute while the broker stays down (every 10 ms otherwise), with the count since.
        self._handover_failed_unlogged += events
        now = time.monotonic()
        if now - self._handover_failure_logged_at >= 60.0:
            log.warning(
                "hand-over to the worker failed; the sweep will pick the events up",
                events=self._handover_failed_unlogged,
                error=repr(exc),
            )
            self._handover_failure_logged_at = now
            self._handover_failed_unlogged = 0

    async def drain(self, timeout_seconds: float = 10.0) -> None:
        """Wait until every queued delivery is written and every new row handed over."""
        deadline = time.monotonic() + timeout_seconds
        await self._drain_queue(timeout_seconds)
        while (self._handover_ids or self._handover_busy) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
