"""Group commit for the usage API: concurrent consumptions applied together, each answered after its commit.

Every AI call a product makes is a ``POST /v1/usage``. One transaction per call costs PostgreSQL a commit (a WAL
flush) and the server a thread hand-off and a round trip per request, which is where the time went. Here, calls
that arrive while a batch is in flight wait in a queue; a writer takes them all and applies them with one
:func:`ledger.consume.consume_batch` (one statement, one commit on PostgreSQL), then answers each with its own
outcome. Each consumption is still its own idempotent unit: one call's refusal is its answer alone. Under light
load a batch is one call, so nothing waits for company.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from ledger.consume import ConsumeInput, ConsumeOutcome, consume_batch
from webhooks import metrics

log = structlog.get_logger(__name__)

T = TypeVar("T")
ApplyBatch = Callable[[Sequence[ConsumeInput]], list[ConsumeOutcome]]


class UsageUnavailable(Exception):
    """The consumption could not be applied in time; the request id makes a retry safe."""


@dataclass(slots=True)
class _Call:
    item: ConsumeInput
    future: asyncio.Future[ConsumeOutcome] = field(repr=False)


class UsageWriter:
    """Collects concurrent consumptions into group-committed batches; one per event loop (server process)."""

    def __init__(
        self,
        *,
        apply: ApplyBatch = consume_batch,
        writers: int = 4,
        max_batch: int = 256,
        timeout_seconds: float = 30.0,
    ) -> None:
        self._apply = apply
        self._writers = writers
        self._max_batch = max_batch
        self._timeout = timeout_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Call] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pool: ThreadPoolExecutor | None = None

    def _start(self) -> asyncio.Queue[_Call]:
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._queue is not None:
            return self._queue
        # First use, or a new event loop (a test client's): start the writers on this loop.
        self._loop = loop
        self._queue = asyncio.Queue()
        # One thread per writer, plus room for whole batches (POST /v1/usage/batch) applied beside them.
        self._pool = self._pool or ThreadPoolExecutor(self._writers * 2, thread_name_prefix="usage-writer")
        self._tasks = [loop.create_task(self._run_writer()) for _ in range(self._writers)]
        return self._queue

    async def submit(self, item: ConsumeInput) -> ConsumeOutcome:
        """Apply one consumption; return its outcome once committed. Raises UsageUnavailable or a database error."""
        queue = self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ConsumeOutcome] = loop.create_future()
        queue.put_nowait(_Call(item, future))
        # A plain timer, not asyncio.wait_for: this runs thousands of times a second.
        timer = loop.call_later(self._timeout, self._expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    async def apply_batch(self, items: Sequence[ConsumeInput]) -> list[ConsumeOutcome]:
        """Apply a batch the caller already formed (POST /v1/usage/batch) as one unit, on the writers' threads."""
        return await self.run(self._apply, items)

    async def run(self, write: Callable[..., T], *args: Any) -> T:
        """Run one blocking unit of work (a hold, a capture, a batch) on the writers' threads."""
        self._start()
        return await asyncio.get_running_loop().run_in_executor(self._pool, write, *args)

    def _expire(self, future: asyncio.Future[ConsumeOutcome]) -> None:
        # The batch may still commit later; a retry with the same request id then replays it (charged once).
        if not future.done():
            future.set_exception(UsageUnavailable(f"applying the usage took longer than {self._timeout:g}s"))

    async def _run_writer(self) -> None:
        assert self._queue is not None
        queue = self._queue
        while True:
            batch = [await queue.get()]
            while len(batch) < self._max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                await self._commit(batch)
            finally:
                for _ in batch:
                    queue.task_done()

    async def _commit(self, batch: list[_Call]) -> None:
        loop = asyncio.get_running_loop()
        try:
            outcomes = await loop.run_in_executor(self._pool, self._apply, [call.item for call in batch])
        except Exception as exc:
            # Nothing of the batch is known to be applied: each caller gets the error (a database that cannot be
            # reached answers 503); the request ids make their retries safe.
            log.warning("usage batch failed", calls=len(batch), error=repr(exc))
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(exc)
            return
        metrics.USAGE_BATCH_SIZE.observe(len(batch))
        for call, outcome in zip(batch, outcomes, strict=True):
            if not call.future.done():
                call.future.set_result(outcome)

    async def aclose(self) -> None:
        """Finish queued calls, then stop the writer tasks and their threads."""
        if self._queue is not None and self._loop is asyncio.get_running_loop():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), 10.0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await task
        self._tasks = []
        self._queue = None
        self._loop = None
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
