"""``python -m webhooks.review hash-password``: make a REVIEW_USERS entry without echoing the password."""

from __future__ import annotations

import typer

from webhooks.review.auth import hash_password

cli = typer.Typer(help="Review pages utilities.", no_args_is_help=True)


@cli.callback()
def _root() -> None:
    """Review pages utilities."""


@cli.command("hash-password")
def hash_password_command(
    name: str = typer.Argument(..., help="the reviewer's sign-in name"),
    password: str | None = typer.Option(
        None, help="The password (default: asked for, not echoed; on the command line it shows in `ps`)."
    ),
) -> None:
    """Print a ``name:hash`` pair for REVIEW_USERS (only the pair goes to stdout, so $(...) captures just it)."""
    if ":" in name or "," in name or not name.strip():
        typer.echo("name must be non-empty and contain no ':' or ','", err=True)
        raise typer.Exit(2)
    if password is None:
        # The prompts go to stderr: `export REVIEW_USERS="$(python -m webhooks.review hash-password alice)"` works.
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True, err=True)
    typer.echo(f"{name.strip()}:{hash_password(password)}")


if __name__ == "__main__":
    cli()
