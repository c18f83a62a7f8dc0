"""Command-line commands of this package: ``billing-reconciler serve``."""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from enum import StrEnum

import typer

from ledger.cli import CommandFailed
from ledger.settings import get_settings
from webhooks.server import DEFAULT_MAX_CONNECTIONS, ReadDeadlineProtocol

APP_FACTORY = "webhooks.app:create_app"


class Server(StrEnum):
    UVICORN = "uvicorn"
    GRANIAN = "granian"


# Chosen by measurement (scripts/bench_webhooks.py --compare-servers: 64 connections, PostgreSQL + Redis, same
# run, shared 2-core machine). Server CPU per stored event, the figure least disturbed by other load: uvicorn
# 166-176 us vs granian 195-214 us with one worker, 246-283 vs 266-274 with two, in every run. Throughput
# (events/s, 4 runs) varied with the machine's load: uvicorn 2,595-3,443 vs granian 2,300-3,296 with one
# worker; with two, granian was ahead in 3 of 4 runs (3,070-3,495 vs 2,577-3,184). Re-run it to re-decide.
DEFAULT_SERVER = Server.UVICORN


def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    workers: int = typer.Option(
        1, min=1, help="Server processes, each with its own inbox writer; one per CPU core for throughput."
    ),
    server: Server = typer.Option(DEFAULT_SERVER, help="ASGI server."),
    access_log: bool = typer.Option(False, help="Log every request (costs throughput)."),
    request_timeout: float | None = typer.Option(
        None,
        min=0.5,
        help="Seconds a client has to send a whole request (headers and body) before the connection is closed "
        "[default: REQUEST_READ_TIMEOUT_SECONDS, 10].",
        show_default=False,
    ),
    max_connections: int = typer.Option(
        DEFAULT_MAX_CONNECTIONS, min=1, help="Connections per server process beyond which requests get 503."
    ),
) -> None:
    """Serve the webhook receiver, usage API, health, metrics and review pages."""
    from ledger.db import get_engine
    from webhooks.metrics import multiprocess_mode

    require_free_port(host, port)
    if request_timeout is not None:
        # Through the environment, so that uvicorn's and granian's worker processes read it too.
        os.environ["REQUEST_READ_TIMEOUT_SECONDS"] = str(request_timeout)
        get_settings.cache_clear()
    timeout = get_settings().request_read_timeout_seconds
    get_engine()  # the database is reachable and migrated (checked on first use), or one line says why not

    if workers > 1 and not multiprocess_mode():
        # Several processes: prometheus_client must write samples to shared files, chosen before it is imported
        # in the workers (they inherit this environment).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="billing-reconciler-metrics-")
    if server is Server.GRANIAN:
        try:
            from granian import Granian
            from granian.constants import Interfaces, Loops
            from granian.http import HTTP1Settings
        except ImportError:
            raise typer.BadParameter(
                "granian is not installed: pip install 'billing-reconciler[granian]'", param_hint="--server"
            ) from None

        Granian(
            APP_FACTORY,
            factory=True,
            address=host,
            port=port,
            workers=workers,
            interface=Interfaces.ASGI,
            loop=Loops.uvloop,
            log_access=access_log,
            backlog=2048,
            backpressure=max_connections,
            http1_settings=HTTP1Settings(header_read_timeout=int(timeout * 1000)),
        ).serve()
        return
    import uvicorn

    uvicorn.run(
        APP_FACTORY,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http=ReadDeadlineProtocol,
        access_log=access_log,
        backlog=2048,
        limit_concurrency=max_connections,
        timeout_keep_alive=5,
        log_config=None,
    )


usage_app = typer.Typer(help="Usage metered after the fact.", no_args_is_help=True)


@usage_app.command("import")
def import_usage_file(
    path: str = typer.Argument(..., metavar="FILE", help="JSON Lines, one POST /v1/usage body a line; - for stdin."),
    batch_size: int = typer.Option(500, min=1, max=1000, help="Lines applied per transaction."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (errors too)."),
) -> None:
    """Import usage from JSON Lines through the batch path; each line once per request_id (re-import is a no-op).

    Exit 0 when every line is applied (now or before), 1 when some lines were refused or invalid (each listed
    by line number; the others are imported), 2 when the file cannot be read.
    """
    import json
    import sys

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from webhooks.usage_import import import_usage

    try:
        source = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        message = f"cannot read {path}: {exc.strerror}"
        payload = {"ok": False, "code": "usage_error", "error": message}
        typer.echo(json.dumps(payload) if as_json else f"error: {message}", err=not as_json)
        raise typer.Exit(2) from None
    total = None
    if path != "-":
        with open(path, "rb") as lines:
            total = sum(1 for _ in lines)
    console = Console(stderr=True)
    columns = (TextColumn("importing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with source, Progress(*columns, console=console, transient=True, disable=as_json) as bar:
        task = bar.add_task("import", total=total)
        report = import_usage(source, batch_size=batch_size, progress=lambda n: bar.advance(task, n))
    problems = [vars(p) for p in report.problems]
    if as_json:
        typer.echo(json.dumps({"ok": report.clean, "lines": report.lines, "outcomes": dict(report.outcomes),
                               "problems": problems}, sort_keys=True))  # fmt: skip
    else:
        table = Table(title=f"{report.lines:,} lines")
        table.add_column("outcome")
        table.add_column("lines", justify="right")
        for outcome, count in report.outcomes.most_common():
            table.add_row(outcome, f"{count:,}")
        Console().print(table)
        for problem in report.problems[:50]:
            typer.echo(f"line {problem.line}: {problem.code}: {problem.message}", err=True)
        if len(report.problems) > 50:
            typer.echo(f"... and {len(report.problems) - 50} more (--json lists them all)", err=True)
    raise typer.Exit(0 if report.clean else 1)


def require_free_port(host: str, port: int) -> None:
    """Raise CommandFailed (exit 2, one line) when ``host:port`` cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            busy = exc.errno == errno.EADDRINUSE
            raise CommandFailed(
                "port_in_use" if busy else "cannot_listen",
                f"cannot listen on {host}:{port} ({exc.strerror or exc}): "
                + ("stop what uses it or choose another --port" if busy else "choose another --host or --port"),
            ) from None


def register(app: typer.Typer) -> None:
    """Add this package's commands to the root CLI."""
    app.command("serve")(serve)
    app.add_typer(usage_app, name="usage")
