"""The ``billing-reconciler`` command: one Typer app, each package registering its own commands.

Every mistake a person can make before a command does its work (a bad setting, a database that cannot be reached
or is not migrated, no Stripe key for a command that reads Stripe, a busy port) ends in one line that names the
problem and the fix, and exit code 2; with ``--json``, one JSON error object on stdout. Anything else is a bug or
an outage: one line and exit code 70 (EXIT_UNEXPECTED), the traceback only with ``--debug`` or LOG_LEVEL=DEBUG.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from pydantic import ValidationError

# Typer vendors click (typer._click); its usage errors are ClickException from there.
from typer._click import Context
from typer._click import exceptions as click_exceptions
from typer.core import TyperGroup

from ledger.cli import CommandFailed
from ledger.config import ConfigError, get_billing_config
from ledger.logs import configure_logging, redact_text
from ledger.settings import describe_validation_error, get_settings

# Outside the contract's 0-5 on purpose (sysexits' EX_SOFTWARE): a script can tell "the command failed in a way
# nobody planned for" from every documented outcome.
EXIT_UNEXPECTED = 70
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Commands that must run whatever state the database is in (they create or replace it, or only print).
NO_DATABASE_CHECK = frozenset({"migrate", "demo"})


def classify(exc: BaseException) -> CommandFailed:
    """The one-line explanation of an exception that escaped a command, with its code and exit code."""
    from ledger.db import describe_connection_error
    from ledger.migrate import DatabaseNotReady
    from reconciliation.gateway import StripeKeyMissing

    if isinstance(exc, CommandFailed):
        return exc
    if isinstance(exc, DatabaseNotReady):
        return CommandFailed(exc.code, str(exc))
    if isinstance(exc, StripeKeyMissing):
        return CommandFailed("stripe_key_missing", str(exc))
    if isinstance(exc, ConfigError):
        return CommandFailed("config_error", f"configuration: {exc}")
    if isinstance(exc, ValidationError):
        return CommandFailed("config_error", f"configuration: {describe_validation_error(exc)}")
    described = describe_connection_error(exc)
    if described is not None:
        return CommandFailed("database_unreachable", described)
    lines = [line for line in str(exc).splitlines() if line.strip()]
    # Redacted like a log line: an exception's text may quote a key or a token.
    detail = f": {redact_text(lines[0][:300])}" if lines else ""
    return CommandFailed(
        "unexpected_error",
        f"unexpected {type(exc).__name__}{detail} (run `billing-reconciler --debug ...` or set LOG_LEVEL=DEBUG "
        "for the traceback)",
        EXIT_UNEXPECTED,
    )


def report_failure(failure: CommandFailed, *, as_json: bool) -> None:
    """Print the failure: one JSON object on stdout with --json, else one line on stderr."""
    # One line whatever the message quotes (a driver's or a library's text may run to several).
    failure.message = " ".join(part.strip() for part in failure.message.splitlines() if part.strip())
    if as_json:
        typer.echo(json.dumps({"ok": False, "code": failure.code, "error": failure.message}, sort_keys=True))
    else:
        typer.echo(f"error: {failure.message}", err=True)


def _debugging(argv: Sequence[str]) -> bool:
    if "--debug" in argv:
        return True
    try:
        return get_settings().log_level.upper() == "DEBUG"
    except ValidationError:
        return False


class BillingGroup(TyperGroup):
    """The root group: turns whatever escapes a command into one line (or one JSON object) and an exit code."""

    argv: tuple[str, ...] = ()

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        self.argv = tuple(argv)
        if "--json" not in argv:
            return super().main(argv, prog_name, complete_var, standalone_mode, **extra)
        # --json: a usage error is one JSON object too, not click's usage text.
        try:
            code = super().main(argv, prog_name, complete_var, False, **extra)
        except click_exceptions.ClickException as exc:
            report_failure(CommandFailed("usage_error", exc.format_message(), exc.exit_code), as_json=True)
            code = exc.exit_code
        except typer.Abort:
            code = EXIT_INTERRUPTED
        if standalone_mode:
            sys.exit(code if isinstance(code, int) else 0)
        return code

    def invoke(self, ctx: Context) -> Any:
        from ledger import db

        try:
            return super().invoke(ctx)
        except (typer.Exit, click_exceptions.ClickException, typer.Abort, KeyboardInterrupt, EOFError):
            raise
        except Exception as exc:
            failure = classify(exc)
            if _debugging(self.argv):
                traceback.print_exception(exc, file=sys.stderr)
            report_failure(failure, as_json="--json" in self.argv)
            raise typer.Exit(failure.exit_code) from None
        finally:
            # The check belongs to this command; code that runs the CLI in-process (tests) starts clean next time.
            db.check_on_first_use(None)


app = typer.Typer(
    name="billing-reconciler",
    help="A Stripe-synchronized credit ledger and billing reconciler for AI products.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=BillingGroup,
)


@app.callback()
def _startup(
    ctx: typer.Context,
    debug: Annotated[
        bool, typer.Option("--debug", help="Print the traceback of an unexpected error (as LOG_LEVEL=DEBUG does).")
    ] = False,
) -> None:
    """Read and validate settings and the billing config once, before any command runs."""
    from ledger import db
    from ledger.migrate import require_current_schema

    try:
        settings = get_settings()
        get_billing_config()
    except ValidationError as exc:
        raise CommandFailed("config_error", f"configuration: {describe_validation_error(exc)}") from None
    except ConfigError as exc:
        raise CommandFailed("config_error", f"configuration: {exc}") from None
    configure_logging("DEBUG" if debug else settings.log_level, json=settings.log_json)
    # The database is checked when a command first uses it (so --help and commands without one never pay):
    # reachable, and at this code's migration head.
    db.check_on_first_use(None if ctx.invoked_subcommand in NO_DATABASE_CHECK else require_current_schema)


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
