"""The demo's moving parts: its settings, its database, the Stripe emulator, the receiver and the worker.

On the embedded default (no ``DATABASE_URL``) everything runs in this process: a fresh SQLite file in the work
directory, the emulator and the receiver in threads, and the worker as eager Celery execution (events are applied
in the receiver's hand-over thread, as ``CELERY_TASK_ALWAYS_EAGER`` does). With a PostgreSQL ``DATABASE_URL`` and
a ``CELERY_BROKER_URL``, a real ``billing-reconciler worker`` process consumes the broker.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from sqlalchemy import Engine, inspect, literal, select, text

import worker
from ledger import db
from ledger.config import EXAMPLE_CONFIG_PATH, get_billing_config
from ledger.migrate import migrate
from ledger.settings import DEFAULT_DATABASE_URL, get_settings
from worker.demo.serving import ThreadedServer

DEMO_USER = "demo"
WORKDIR_MARKER = ".billing-demo-workdir"


class DemoError(Exception):
    """The demo cannot run as asked; the message says why and what to do. ``exit_code`` follows ledger.cli."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def repo_root() -> Path:
    """The checkout the project is installed from (editable install): the parent of the ``worker`` package."""
    return Path(worker.__file__).resolve().parent.parent


def load_emulator() -> ModuleType:
    """Import ``stripe_emulator`` from the repository's ``scripts/`` directory (it is not a shipped package)."""
    scripts = repo_root() / "scripts"
    if not (scripts / "stripe_emulator" / "__init__.py").is_file():
        raise DemoError(
            f"the Stripe emulator is not at {scripts / 'stripe_emulator'}: the demo needs a source checkout "
            "installed in editable mode (pip install -e .)"
        )
    if str(scripts) not in sys.path:
        sys.path.insert(0, str(scripts))
    return importlib.import_module("stripe_emulator")


def provider_fixture_dir() -> Path:
    """Where the sample provider cost and usage reports live (beside the repository, in ../shared)."""
    return repo_root().parent / "shared" / "fixtures" / "providers"


DEFAULT_PORT = 8000


def bind_port(host: str, port: int | None) -> socket.socket:
    """A listening socket: on ``port`` when given (0: any free one), else on 8000 or any free port if it is taken.

    A port asked for by name that is taken is a mistake to report (exit 2), not something to work around.
    """
    if port is not None and port != 0:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise DemoError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}): stop what uses it, choose another --port, "
                "or leave --port out to take a free one"
            ) from None
        sock.listen(2048)
        sock.set_inheritable(True)
        return sock
    for candidate in (DEFAULT_PORT, 0) if port is None else (0,):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
        except OSError:
            sock.close()
            continue
        sock.listen(2048)
        sock.set_inheritable(True)
        return sock
    raise DemoError(f"no free port on {host}")


@dataclass(frozen=True)
class Backend:
    """Where the demo keeps its data and how events reach the worker."""

    database_url: str
    broker_url: str  # empty: the embedded default (eager, in-process)
    postgres: bool

    @property
    def label(self) -> str:
        """A human name for the backend."""
        if self.postgres:
            return "PostgreSQL + Redis (real worker process)" if self.broker_url else "PostgreSQL (in-process worker)"
        return "embedded SQLite (in-process worker)"


def choose_backend(workdir: Path) -> Backend:
    """PostgreSQL (and the broker) when the environment names them; otherwise a fresh SQLite file in ``workdir``."""
    settings = get_settings()
    if settings.is_postgres:
        return Backend(settings.database_url, settings.celery_broker_url, postgres=True)
    return Backend(f"sqlite:///{(workdir / 'billing.db').resolve()}", "", postgres=False)


def ignored_settings(backend: Backend) -> list[str]:
    """What the user's environment asks for that the demo does not use, said plainly."""
    settings = get_settings()
    notes = []
    if not backend.postgres and settings.database_url != DEFAULT_DATABASE_URL:
        notes.append("DATABASE_URL is not PostgreSQL: the demo uses its own SQLite file in the work directory")
    if not backend.postgres and settings.celery_broker_url:
        notes.append("CELERY_BROKER_URL is used only with a PostgreSQL DATABASE_URL: the worker runs in-process")
    if backend.postgres and not backend.broker_url:
        notes.append("no CELERY_BROKER_URL: the worker runs in-process (eager) against PostgreSQL")
    return notes


def prepare_workdir(workdir: Path) -> Path:
    """Recreate the work directory (the demo's own files only ever live there)."""
    workdir = workdir.resolve()
    if workdir.exists():
        # Only ever delete a directory an earlier demo made (it has the marker) or an empty one.
        if not workdir.is_dir() or (any(workdir.iterdir()) and not (workdir / WORKDIR_MARKER).exists()):
            raise DemoError(
                f"refusing to recreate {workdir}: it is not a demo work directory; choose another --workdir"
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / WORKDIR_MARKER).write_text(
        "made by `billing-reconciler demo`; recreated on each run\n", encoding="utf-8"
    )
    return workdir


@dataclass(frozen=True)
class Credentials:
    """Secrets made up for this run: nothing here is used outside the demo."""

    webhook_secret: str
    api_token: str
    secret_key: str
    review_password: str
    review_users: str


def make_credentials() -> Credentials:
    """Fresh secrets, and a review login hashed the way the review pages expect."""
    from webhooks.review.auth import hash_password

    password = secrets.token_urlsafe(12)
    return Credentials(
        webhook_secret="whsec_demo" + secrets.token_hex(16),
        api_token="demo_" + secrets.token_urlsafe(24),
        secret_key=secrets.token_urlsafe(32),
        review_password=password,
        review_users=f"{DEMO_USER}:{hash_password(password)}",
    )


def apply_settings(backend: Backend, creds: Credentials, *, stripe_api_base: str) -> dict[str, str]:
    """Set this process's (and its children's) environment for the demo, and drop every cached setting."""
    env = {
        "DATABASE_URL": backend.database_url,
        "CELERY_BROKER_URL": backend.broker_url,
        # No broker: tasks run where they are sent (the receiver's hand-over thread), so no server is needed.
        "CELERY_TASK_ALWAYS_EAGER": "false" if backend.broker_url else "true",
        "STRIPE_API_BASE": stripe_api_base,
        "STRIPE_API_KEY": "sk_test_demo",
        "STRIPE_WEBHOOK_SECRETS": creds.webhook_secret,
        "API_TOKENS": creds.api_token,
        "SECRET_KEY": creds.secret_key,
        "REVIEW_USERS": creds.review_users,
        # The emulator's catalogue matches the shipped example config.
        "BILLING_CONFIG": str(EXAMPLE_CONFIG_PATH),
        "UNPROCESSED_EVENT_MINUTES": "1",
    }
    os.environ.update(env)
    get_settings.cache_clear()
    get_billing_config.cache_clear()
    from reconciliation.gateway import get_gateway
    from worker.celery_app import configure

    get_gateway.cache_clear()
    db.set_engine(None)
    configure()
    return env


def drop_stripe_connections() -> None:
    """Close the gateway's keep-alive connections to the emulator before it stops.

    Left open, each holds an emulator request thread that the interpreter waits on for seconds at exit.
    """
    from reconciliation.gateway import get_gateway

    get_gateway.cache_clear()
    gc.collect()


# --- the database -----------------------------------------------------------------------------------------------


def project_tables() -> list[str]:
    """Every table of the project's models (ledger, inbox, worker, reconciliation, review)."""
    import reconciliation.models  # noqa: F401  (registers the models on Base)
    import webhooks.review.models  # noqa: F401
    import worker.models  # noqa: F401

    return [t.name for t in db.Base.metadata.sorted_tables]


def prepare_database(backend: Backend, *, reset: bool) -> Engine:
    """Migrate the demo's database; on PostgreSQL refuse one that holds data unless ``reset`` empties it."""
    engine = db.get_engine()
    if backend.postgres:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            described = db.describe_connection_error(exc, backend.database_url)
            raise DemoError(described or f"PostgreSQL at DATABASE_URL does not answer: {exc}") from exc
        existing = set(inspect(engine).get_table_names())
        ours = [t for t in project_tables() if t in existing]
        with engine.begin() as conn:
            tables = db.Base.metadata.tables
            non_empty = [
                t for t in ours if conn.execute(select(literal(1)).select_from(tables[t]).limit(1)).first() is not None
            ]
            if non_empty and not reset:
                raise DemoError(
                    f"the database at DATABASE_URL already holds data (tables {', '.join(non_empty[:5])}"
                    f"{'...' if len(non_empty) > 5 else ''}); the demo never touches a database in use. "
                    "Point DATABASE_URL at an empty database, or pass --reset to empty this one."
                )
            if ours and reset:
                names = ", ".join(f'"{t}"' for t in ours)
                conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    migrate(engine)
    return engine


def check_broker(url: str) -> None:
    """Fail clearly when the broker does not answer."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        raise DemoError(f"the broker at CELERY_BROKER_URL does not answer: {exc}") from exc


# --- the receiver -----------------------------------------------------------------------------------------------


class Receiver(ThreadedServer):
    """``webhooks.app`` served by uvicorn in a thread of this process."""

    def __init__(self, sock: socket.socket) -> None:
        from webhooks.app import create_app

        super().__init__(create_app(), sock, name="receiver", log_level="warning", lifespan="on", loop="asyncio")

    def not_started(self) -> Exception:
        return DemoError("the receiver did not start")


# --- the worker process (PostgreSQL + Redis) --------------------------------------------------------------------


def worker_command() -> list[str]:
    """``billing-reconciler worker``, run by this interpreter's installation."""
    script = Path(sys.executable).with_name("billing-reconciler")
    if script.is_file():
        return [str(script), "worker"]
    return [sys.executable, "-c", "from worker.cli import main; main()", "worker"]


class WorkerProcess:
    """A real Celery worker (``billing-reconciler worker``) as a child process, logging into the work directory."""

    def __init__(self, log_path: Path, concurrency: int = 2) -> None:
        self.log_path = log_path
        self.concurrency = concurrency
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: TextIO | None = None

    def start(self) -> WorkerProcess:
        """Start the worker; it inherits this process's demo settings."""
        self._log = self.log_path.open("w", encoding="utf-8")
        self.proc = subprocess.Popen(
            [*worker_command(), "--concurrency", str(self.concurrency), "--loglevel", "WARNING"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the terminal reaches the demo, which then stops the worker
        )
        return self

    def check_alive(self) -> None:
        """Raise if the worker died (its log says why)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise DemoError(f"the worker process exited with {self.proc.returncode}; see {self.log_path}")

    def stop(self, timeout: float = 15.0) -> None:
        """Warm shutdown (SIGTERM: finish the current task), then SIGKILL if it does not go."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None


def describe(obj: Any) -> str:
    """A short text for an exception in a progress line."""
    return f"{type(obj).__name__}: {obj}"
