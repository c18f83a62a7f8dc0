"""An ASGI app served by uvicorn on a thread of this process: the demo's receiver and its AI provider."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any, Self


class ThreadedServer:
    """``app`` served by uvicorn on a thread of this process, on a socket already bound (and listening or not)."""

    def __init__(self, app: Any, sock: socket.socket, *, name: str, **config: Any) -> None:
        import uvicorn

        self.sock = sock
        self.name = name
        settings = {"access_log": False, "log_config": None, **config}
        self.server = uvicorn.Server(uvicorn.Config(app, **settings))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    @property
    def url(self) -> str:
        """The base address (``http://host:port``)."""
        host, port = self.sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def not_started(self) -> Exception:
        """The error when the server did not come up (a subclass may name its own)."""
        return RuntimeError(f"the {self.name} did not start")

    def start(self, timeout: float = 20.0) -> Self:
        """Serve, and wait until the server accepts requests."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise self.not_started()
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Finish in-flight requests and stop."""
        self.server.should_exit = True
        self.thread.join(timeout=10)
        with contextlib.suppress(OSError):
            self.sock.close()
