"""``billing-reconciler notifications``: the delivery log, redelivery, and customers' low-balance thresholds."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from ledger.cli import EXIT_UNKNOWN, EXIT_USAGE
from ledger.db import unit_of_work
from ledger.errors import LedgerError, UnknownCustomer
from ledger.limits import customer_plans
from ledger.models import DeliveryStatus
from ledger.outbox import list_deliveries, set_low_balance_threshold
from worker.notifications import UnknownDelivery, redeliver

notifications_app = typer.Typer(
    help="Outbound notifications: the delivery log, redelivery, low-balance thresholds.", no_args_is_help=True
)
JsonFlag = Annotated[bool, typer.Option("--json", help="JSON output (one object per line for lists).")]


@notifications_app.command("list")
def list_command(
    status: Annotated[DeliveryStatus | None, typer.Option(help="Only deliveries with this status.")] = None,
    customer: Annotated[str | None, typer.Option(help="Only this customer's notifications.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    as_json: JsonFlag = False,
) -> None:
    """The delivery log, newest first: event, endpoint, status, attempts, last status code, latency, error."""
    with unit_of_work() as session:
        rows = list_deliveries(session, status=status, customer_id=customer, limit=limit)
    for row in rows:
        if as_json:
            typer.echo(json.dumps(row, sort_keys=True))
        else:
            code = row["last_status_code"] if row["last_status_code"] is not None else "-"
            latency = f"{row['last_latency_ms']}ms" if row["last_latency_ms"] is not None else "-"
            typer.echo(
                f"{row['id']:>6}  {row['status']:<9} {row['type']:<20} {row['event_id']}  "
                f"{row['customer_id'] or '-':<20} attempts={row['attempts']} last={code} {latency}  "
                f"{row['endpoint']}" + (f"  error: {row['last_error']}" if row["last_error"] else "")
            )
    if not rows and not as_json:
        typer.echo("no deliveries")


@notifications_app.command("redeliver")
def redeliver_command(
    ident: Annotated[str, typer.Argument(metavar="ID", help="A delivery id, or an event id (evt_...) for all.")],
    as_json: JsonFlag = False,
) -> None:
    """Send a delivery again (re-enabling its endpoint if it was disabled); the next delivery pass sends it."""
    try:
        with unit_of_work() as session:
            ids = redeliver(session, ident, now=datetime.now(UTC))
    except UnknownDelivery as exc:
        _out(as_json, {"ok": False, "code": "unknown_delivery", "error": str(exc)}, f"error: {exc}", err=True)
        raise typer.Exit(EXIT_UNKNOWN) from None
    _out(as_json, {"ok": True, "deliveries": ids}, f"queued for redelivery: {', '.join(map(str, ids))}")


@notifications_app.command("threshold")
def threshold_command(
    customer: Annotated[str, typer.Argument(help="Stripe customer id.")],
    units: Annotated[int | None, typer.Option("--units", min=0, help="Warn below this many units.")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Use the plan's threshold again.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Set a customer's own low-balance threshold (balance.low below it), or --clear it."""
    if (units is None) == (not clear):
        _out(as_json, {"ok": False, "code": "usage_error", "error": "give --units N or --clear"},
             "error: give --units N or --clear", err=True)  # fmt: skip
        raise typer.Exit(EXIT_USAGE)
    try:
        with unit_of_work() as session:
            plans = customer_plans(session, customer, datetime.now(UTC)).plans
            effective = set_low_balance_threshold(session, customer, None if clear else units, plans=plans)
    except UnknownCustomer as exc:
        _out(as_json, {"ok": False, "code": exc.code, "error": str(exc)}, f"error: {exc}", err=True)
        raise typer.Exit(EXIT_UNKNOWN) from None
    except LedgerError as exc:
        _out(as_json, {"ok": False, "code": exc.code, "error": str(exc)}, f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    _out(as_json, {"ok": True, "customer_id": customer, "threshold": effective},
         f"{customer}: low-balance threshold {effective if effective is not None else 'none'}")  # fmt: skip


def _out(as_json: bool, payload: dict[str, Any], text: str, *, err: bool = False) -> None:
    typer.echo(json.dumps(payload, sort_keys=True) if as_json else text, err=err)


def register(app: typer.Typer) -> None:
    """Add this package's notification commands to the root CLI."""
    app.add_typer(notifications_app, name="notifications")
