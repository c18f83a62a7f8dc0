"""Command-line commands of this package: ``billing-reconciler serve``."""

from __future__ import annotations

import os
import tempfile
from enum import StrEnum

import typer

APP_FACTORY = "webhooks.app:create_app"


class Server(StrEnum):
    UVICORN = "uvicorn"
    GRANIAN = "granian"


# Chosen by measurement (scripts/bench_webhooks.py --compare-servers, 64 connections, same machine, same run):
# webhook events stored/s uvicorn 2,595 vs granian 2,300 (1 worker) and 2,618 vs 2,458 (2 workers); /healthz
# 8,915 vs 8,622 and 12,755 vs 9,433; server CPU per stored event 299 vs 305-373 us. Re-run it to re-decide.
DEFAULT_SERVER = Server.UVICORN


def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    workers: int = typer.Option(
        1, min=1, help="Server processes, each with its own inbox writer; one per CPU core for throughput."
    ),
    server: Server = typer.Option(DEFAULT_SERVER, help="ASGI server."),
    access_log: bool = typer.Option(False, help="Log every request (costs throughput)."),
) -> None:
    """Serve the webhook receiver, usage API, health, metrics and review pages."""
    from webhooks.metrics import multiprocess_mode

    if workers > 1 and not multiprocess_mode():
        # Several processes: prometheus_client must write samples to shared files, chosen before it is imported
        # in the workers (they inherit this environment).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="billing-reconciler-metrics-")
    if server is Server.GRANIAN:
        from granian import Granian
        from granian.constants import Interfaces, Loops

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
        http="httptools",
        access_log=access_log,
        backlog=2048,
        log_config=None,
    )


def register(app: typer.Typer) -> None:
    """Add this package's commands to the root CLI."""
    app.command("serve")(serve)
