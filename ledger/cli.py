"""Ledger commands of the CLI: migrate, balances, grants, consumption, holds, and the invariant check."""

from __future__ import annotations

import typer

from ledger.migrate import migrate as run_migrations

# Documented exit codes: the contract scripts rely on.
EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_INSUFFICIENT = 3
EXIT_ACCESS = 4
EXIT_UNKNOWN = 5


def migrate() -> None:
    """Apply the database migrations."""
    run_migrations()
    typer.echo("database is up to date")


def register(app: typer.Typer) -> None:
    """Add the ledger commands to the root CLI."""
    app.command("migrate")(migrate)
