"""Group commit at the HTTP edge: concurrent requests' writes applied together, each answered after its commit.

A writer takes everything that queued while the previous transaction was in flight and commits it in one
transaction on a thread of its own; then it answers each caller with that caller's outcome. One transaction per
request would cost a commit (a WAL flush) and a thread hand-off each; under light load a batch is one request, so
nothing waits for company. The Stripe inbox (:mod:`webhooks.inbox_writer`) and the usage API
(:mod:`webhooks.usage_writer`) are the two users; each says what a batch's commit is.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Outcome = TypeVar("Outcome")
T = TypeVar("T")


@dataclass(slots=True)
class Pending(Generic[Item, Outcome]):
    """One caller's write, waiting for its batch's commit."""

    item: Item
    future: asyncio.Future[Outcome] = field(repr=False)


class GroupCommit(Generic[Item, Outcome]):
    """Collects concurrent writes into group-committed batches; one per event loop (server process)."""

    def __init__(self, *, writers: int, max_batch: int, timeout_seconds: float, threads: int, name: str) -> None:
        self._writers = writers
        self._max_batch = max_batch
        self._timeout = timeout_seconds
        self._threads = threads
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Pending[Item, Outcome]] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pool: ThreadPoolExecutor | None = None

    # --- what a user says ----------------------------------------------------------------------------------------

    async def _commit(self, batch: list[Pending[Item, Outcome]]) -> None:
        """Write the batch in one transaction (on :meth:`run`'s threads) and answer every future."""
        raise NotImplementedError

    def _timed_out(self) -> Exception:
        """The error of a caller whose write took longer than the time-out."""
        raise NotImplementedError

    def _started(self, loop: asyncio.AbstractEventLoop) -> list[asyncio.Task[None]]:
        """More tasks to run beside the writers on a new event loop (none by default)."""
        return []

    def _stopped(self) -> None:
        """Free what :meth:`_started` took (nothing by default)."""

    # --- the machinery -------------------------------------------------------------------------------------------

    def _start(self) -> asyncio.Queue[Pending[Item, Outcome]]:
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._queue is not None:
            return self._queue
        # First use, or a new event loop (a test client's): start the writers on this loop.
        self._loop = loop
        self._queue = asyncio.Queue()
        self._pool = self._pool or ThreadPoolExecutor(self._threads, thread_name_prefix=self._name)
        self._tasks = [loop.create_task(self._run_writer()) for _ in range(self._writers)]
        self._tasks.extend(self._started(loop))
        return self._queue

    async def submit(self, item: Item) -> Outcome:
        """Queue one write; return its outcome once its batch committed (or raise the batch's error)."""
        queue = self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        queue.put_nowait(Pending(item, future))
        # A plain timer, not asyncio.wait_for: this runs thousands of times a second.
        timer = loop.call_later(self._timeout, self._expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    async def run(self, write: Callable[..., T], *args: Any) -> T:
        """Run one blocking unit of work on the writers' threads."""
        self._start()
        return await asyncio.get_running_loop().run_in_executor(self._pool, write, *args)

    def _expire(self, future: asyncio.Future[Outcome]) -> None:
        # The write may still commit later; every write here is idempotent, so the caller's retry is safe.
        if not future.done():
            future.set_exception(self._timed_out())

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

    async def _drain_queue(self, timeout_seconds: float) -> None:
        if self._queue is None or self._loop is not asyncio.get_running_loop():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout_seconds)

    async def drain(self, timeout_seconds: float = 10.0) -> None:
        """Wait until every queued write is committed."""
        await self._drain_queue(timeout_seconds)

    async def aclose(self) -> None:
        """Drain, then stop the tasks and their threads."""
        await self.drain()
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
        self._stopped()
