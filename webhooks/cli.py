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
) -> None:
    """Serve the webhook receiver, usage API, health, metrics and review pages."""
    from webhooks.metrics import multiprocess_mode

    if workers > 1 and not multiprocess_mode():
        # Several processes: prometheus_client must write samples to shared files, chosen before it is imported
        # in the workers (they inherit this environment).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="billing-reconciler-metrics-")
    if server is Server.GRANIAN:
        try:
            from granian import Granian
            from granian.constants import Interfaces, Loops
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
