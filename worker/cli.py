"""The ``billing-reconciler`` command: one Typer app, each package registering its own commands."""

from __future__ import annotations

import sys

import typer
from pydantic import ValidationError

from ledger.config import ConfigError, get_billing_config
from ledger.logs import configure_logging
from ledger.settings import get_settings

app = typer.Typer(
    name="billing-reconciler",
    help="A Stripe-synchronized credit ledger and billing reconciler for AI products.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _startup() -> None:
    """Read and validate settings and the billing config once, before any command runs."""
    try:
        settings = get_settings()
        get_billing_config()
    except (ConfigError, ValidationError) as exc:
        typer.echo(f"error: configuration: {exc}", err=True)
        raise typer.Exit(2) from exc
    configure_logging(settings.log_level, json=settings.log_json)


def _register_all() -> None:
    from ledger import cli as ledger_cli
    from reconciliation import cli as reconciliation_cli
    from webhooks import cli as webhooks_cli
    from worker import commands as worker_commands
    from worker import demo as demo_cli
    from worker import notify_cli

    for module in (ledger_cli, webhooks_cli, worker_commands, reconciliation_cli, demo_cli, notify_cli):
        module.register(app)


_register_all()


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())
