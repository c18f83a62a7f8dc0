"""Group commit for the usage API: concurrent consumptions applied together, each answered after its commit.

Every AI call a product makes is a ``POST /v1/usage``. Calls that arrive while a batch is in flight wait in a
queue; a writer takes them all and applies them with one :func:`ledger.consume.consume_batch` (one statement,
one commit on PostgreSQL), then answers each with its own outcome. Each consumption is still its own idempotent
unit: one call's refusal is its answer alone. Holds, captures, releases and whole batches run on the same
threads (:meth:`UsageWriter.run`), one unit of work each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import structlog
from sqlalchemy.exc import DBAPIError

from ledger.consume import ConsumeInput, ConsumeOutcome, consume_batch
from ledger.db import get_engine
from ledger.holds import Statement
from ledger.pgasync import AutocommitPool
from webhooks import metrics
from webhooks.group_commit import GroupCommit, Pending

log = structlog.get_logger(__name__)

R = TypeVar("R")
ApplyBatch = Callable[[Sequence[ConsumeInput]], list[ConsumeOutcome]]


class UsageUnavailable(Exception):
    """The consumption could not be applied in time; the request id makes a retry safe."""


class UsageWriter(GroupCommit[ConsumeInput, ConsumeOutcome]):
    """Collects concurrent consumptions into group-committed batches; one per event loop (server process)."""

    def __init__(
        self,
        *,
        apply: ApplyBatch = consume_batch,
        writers: int = 4,
        max_batch: int = 256,
        timeout_seconds: float = 30.0,
    ) -> None:
        # One thread per writer, plus room for holds and whole batches (POST /v1/usage/batch) beside them.
        super().__init__(
            writers=writers, max_batch=max_batch, timeout_seconds=timeout_seconds, threads=writers * 2,
            name="usage-writer",
        )  # fmt: skip
        self._apply = apply
        # Holds and captures sent from the event loop (ledger.pgasync); as many connections as threads above.
        self._statements: AutocommitPool | None = None
        self._statements_loop: asyncio.AbstractEventLoop | None = None

    async def apply_batch(self, items: Sequence[ConsumeInput]) -> list[ConsumeOutcome]:
        """Apply a batch the caller already formed (POST /v1/usage/batch) as one unit, on the writers' threads."""
        return await self.run(self._apply, items)

    async def run_statement(self, statement: Statement[R] | None, write: Callable[..., R], *args: Any) -> R:
        """A hold movement: its one statement sent from the event loop when it is one, else ``write(*args)`` on the
        writers' threads. Either way one transaction of its own, answered after its commit."""
        if statement is None:
            return await self.run(write, *args)
        pool = self._statement_pool()
        try:
            row = await pool.fetchone(statement.sql, statement.params)
        except DBAPIError as exc:
            refusal = statement.refusal(exc)
            if refusal is None:
                raise
            raise refusal from exc
        return statement.result(row)

    def _statement_pool(self) -> AutocommitPool:
        loop, engine = asyncio.get_running_loop(), get_engine()
        pool = self._statements
        if pool is None or pool.engine is not engine or self._statements_loop is not loop:
            if pool is not None:
                pool.abandon()  # another loop's (a test client's) or another engine's: not usable here
            pool = self._statements = AutocommitPool(engine, size=self._threads)
            self._statements_loop = loop
        return pool

    async def aclose(self) -> None:
        """Drain, stop the writers, and close the statements' connections."""
        await super().aclose()
        pool, self._statements, self._statements_loop = self._statements, None, None
        if pool is not None:
            await pool.aclose()

    def _timed_out(self) -> Exception:
        return UsageUnavailable(f"applying the usage took longer than {self._timeout:g}s")

    async def _commit(self, batch: list[Pending[ConsumeInput, ConsumeOutcome]]) -> None:
        try:
            outcomes = await self.run(self._apply, [call.item for call in batch])
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
