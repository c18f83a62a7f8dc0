"""The ledger's one-statement calls from an event loop: async psycopg connections in autocommit.

The usage API's hold and capture are each one call of a ledger function (``ledger_hold``, ``ledger_capture``), a
transaction of its own in autocommit (see :func:`ledger.pgfast.call_autocommit`). Run on a thread, each request
costs two thread hand-offs (event loop to thread and back, each a wake-up on a busy machine) and a SQLAlchemy pool
checkout around a statement that takes well under a millisecond. Here the event loop sends the statement itself and
waits for the answer on the connection's socket. The statement, its parameters, its atomicity and its durability
are the same: the answer is read only after PostgreSQL committed it (``synchronous_commit`` as configured).

Why not ``psycopg_pool``: its connections are opened by background workers that retry on their own schedule, so
during an outage a request waits out the pool's time-out; here a connection is opened by the request that needs
it, and a refused one is that request's 503 at once, as on the writers' threads (SQLAlchemy's pool).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

CONNECT_TIMEOUT_SECONDS = 10


def conninfo_of(engine: Engine) -> str:
    """libpq's connection string for ``engine``'s database (its URL without SQLAlchemy's driver name)."""
    url = engine.url.set(drivername="postgresql")
    conninfo = url.render_as_string(hide_password=False)
    if "connect_timeout" not in conninfo:
        # As the engine: fail in seconds on a host that drops packets, not after the OS's TCP timeout.
        conninfo += ("&" if "?" in conninfo else "?") + f"connect_timeout={CONNECT_TIMEOUT_SECONDS}"
    return conninfo


class AutocommitPool:
    """Up to ``size`` async connections to ``engine``'s database, in autocommit, used from one event loop.

    A connection goes back to the pool only when it is idle and healthy after its statement; a broken one, or one
    interrupted mid-statement (a cancelled request), is closed, so the next statement never meets its leftovers.
    """

    def __init__(self, engine: Engine, *, size: int) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self.engine = engine
        self._conninfo = conninfo_of(engine)
        self._size = size
        self._open = 0
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    async def fetchone(self, sql: str, params: tuple[Any, ...]) -> Any:
        """The one row of ``sql`` run as a transaction of its own; psycopg's errors as SQLAlchemy's (as the sync
        path), so the callers' error handling is the same whichever path ran the statement."""
        connection = await self._acquire()
        clean = False
        try:
            try:
                cursor = await connection.execute(sql, params, prepare=True)
                row = await cursor.fetchone()
            finally:
                clean = not connection.broken and connection.pgconn.transaction_status == TransactionStatus.IDLE
        except psycopg.Error as exc:
            if connection.broken:
                # The server went away (a restart): the idle connections are as stale as this one, as SQLAlchemy
                # discards its whole pool on a disconnect. The caller's retry (503) opens fresh ones.
                self._drop_idle()
            raise DBAPIError.instance(sql, params, exc, psycopg.Error, connection_invalidated=not clean) from exc
        finally:
            self._give_back(connection, clean)
        return row

    async def _acquire(self) -> psycopg.AsyncConnection[Any]:
        while True:
            if self._closed:
                closed = psycopg.OperationalError("the connection pool is closed (the server is stopping)")
                raise DBAPIError.instance(None, None, closed, psycopg.Error)
            if self._idle:
                return self._idle.pop()
            if self._open < self._size:
                self._open += 1
                try:
                    return await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
                except BaseException as exc:
                    self._open -= 1
                    self._wake_one()
                    if isinstance(exc, psycopg.Error):
                        raise DBAPIError.instance(None, None, exc, psycopg.Error) from exc
                    raise
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                # A wake-up this waiter can no longer use goes to the next one.
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _give_back(self, connection: psycopg.AsyncConnection[Any], clean: bool) -> None:
        if clean and not self._closed:
            self._idle.append(connection)
        else:
            self._open -= 1
            _discard(connection)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def aclose(self) -> None:
        """Close the idle connections; those in use are closed when they come back."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            self._open -= 1
            await connection.close()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def abandon(self) -> None:
        """Close every idle connection without the event loop (the loop it ran on is gone)."""
        self._closed = True
        self._drop_idle()

    def _drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            self._open -= 1
            _discard(connection)


def _discard(connection: psycopg.AsyncConnection[Any]) -> None:
    # Closes the socket at once (no round trip, no event loop needed); an unfinished transaction is rolled back
    # by the server.
    connection.pgconn.finish()
