"""Real worker processes for the crash tests: `billing-reconciler worker` started, SIGKILLed and restarted."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import func, select

from ledger.db import unit_of_work
from ledger.inbox import EventStatus, StripeEvent

DONE = (EventStatus.PROCESSED, EventStatus.IGNORED)


class WorkerProcess:
    """One `billing-reconciler worker` (prefork) in its own process group, so SIGKILL takes all of it."""

    def __init__(self, env: dict[str, str], log: Path, *, concurrency: int = 2) -> None:
        self.env = env
        self.log = log
        self.concurrency = concurrency
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        assert self.proc is None
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from worker.cli import main; main()",
                    "worker",
                    f"--concurrency={self.concurrency}",
                    "--queues=events",
                    "--loglevel=WARNING",
                ],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes: no shutdown, no acks, transactions cut off."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None
        self.kills += 1

    def stop(self) -> None:
        if self.proc is not None:
            self.kill()


def count_done(ids: list[int] | None = None) -> int:
    with unit_of_work() as session:
        stmt = select(func.count()).select_from(StripeEvent).where(StripeEvent.status.in_(DONE))
        if ids is not None:
            stmt = stmt.where(StripeEvent.id.in_(ids))
        return int(session.scalar(stmt) or 0)


def count_all() -> int:
    with unit_of_work() as session:
        return int(session.scalar(select(func.count()).select_from(StripeEvent)) or 0)


def wait_until(predicate: Callable[[], bool], *, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server (no persistence), so a restart loses every queued message."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port)
        assert wait_until(lambda: _pings(client), timeout=10), "redis-server did not start"

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


def _pings(client: object) -> bool:
    try:
        return bool(client.ping())  # type: ignore[attr-defined]
    except Exception:
        return False
