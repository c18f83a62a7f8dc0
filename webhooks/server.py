"""What the server does about slow or too many clients, beyond what uvicorn offers by itself.

uvicorn has no deadline for reading a request: a client that sends its headers or body a byte at a time holds a
connection (and, at the concurrency limit, a slot) for as long as it likes. ``ReadDeadlineProtocol`` gives each
request a deadline from the moment its connection is idle (new, or after the previous response) until the whole
request, headers and body, has arrived; past it the connection is closed. A request that has arrived is never cut
off while the application works on it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ledger.settings import get_settings

# Connections and in-flight requests per server process before uvicorn answers 503; `serve --max-connections`.
DEFAULT_MAX_CONNECTIONS = 1000


class ReadDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for receiving each request."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # From settings (REQUEST_READ_TIMEOUT_SECONDS, or `serve --request-timeout`), which worker processes
        # started by uvicorn read from the environment they inherit.
        self.request_timeout = get_settings().request_read_timeout_seconds
        self._read_deadline: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        self._read_deadline = self.loop.call_later(self.request_timeout, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if not self.transport.is_closing():
            self.logger.info("closing a connection whose request did not arrive within %.0f s", self.request_timeout)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the clock for the first request."""
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the clock."""
        self._disarm()
        super().connection_lost(exc)

    def on_message_complete(self) -> None:
        """The whole request arrived: the application may take its time now."""
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        """The connection is idle again: the next request has the same deadline (keep-alive closes it sooner)."""
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()
