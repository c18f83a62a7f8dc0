"""``billing-reconciler demo``: one command that shows the whole system working, on a bare machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from ledger.cli import CommandFailed, print_json


def demo(
    workdir: Annotated[
        Path, typer.Option("--workdir", help="Work directory for the demo's files (recreated on each run).")
    ] = Path(".billing-demo"),
    port: Annotated[
        int | None,
        typer.Option(
            "--port",
            min=0,
            max=65535,
            help="Receiver port; 0: any free one. Default: 8000, or a free one when 8000 is taken.",
            show_default=False,
        ),
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to serve on.")] = "127.0.0.1",
    no_wait: Annotated[
        bool,
        typer.Option(
            "--no-wait", help="Exit once the summary is printed (stopping the servers) instead of serving until Ctrl-C."
        ),
    ] = False,
    reset: Annotated[
        bool, typer.Option("--reset", help="PostgreSQL only: empty the project's tables of a database holding data.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object at the end (progress on stderr).")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the scripted activity.")] = 7,
) -> None:
    """Run the whole system end to end: Stripe emulator, receiver, worker, usage API, reconciliation, review pages.

    With no DATABASE_URL it needs no server (SQLite in the work directory, an in-process worker). With a PostgreSQL
    DATABASE_URL and a Redis CELERY_BROKER_URL it runs a real worker process against them.
    """
    from worker.demo.environment import DemoError
    from worker.demo.run import DemoOptions, run_demo

    console = Console(stderr=as_json)
    if not console.is_terminal:
        console.width = max(console.width, 160)  # logs and pipes: keep the tables readable

    def emit(summary: dict[str, Any]) -> None:
        if as_json:
            print_json(summary)

    try:
        run_demo(
            DemoOptions(
                workdir=workdir, port=port, host=host, wait=not no_wait, reset=reset, seed=seed, console=console
            ),
            emit=emit,
        )
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        raise typer.Exit(130) from None
    except DemoError as exc:
        # One line (or, with --json, one JSON object), printed by the root command like every other mistake.
        raise CommandFailed("demo_failed", str(exc), exc.exit_code) from None


def register(app: typer.Typer) -> None:
    """Add ``demo`` to the root CLI."""
    app.command("demo")(demo)
