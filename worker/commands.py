"""Command-line commands of this package: the worker itself and the event inbox (list, show, replay, backfill)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
import typer
from sqlalchemy import select, update

from ledger.cli import EXIT_UNKNOWN, CommandFailed, print_json
from ledger.db import unit_of_work
from ledger.inbox import EventStatus, StripeEvent, get_event

events_app = typer.Typer(help="Stored Stripe events: list, show, replay, backfill.", no_args_is_help=True)


def _parse_time(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise CommandFailed("usage_error", f"{value!r} is not an ISO 8601 time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _summary(row: StripeEvent) -> dict[str, Any]:
    return {
        "id": row.id,
        "event_id": row.event_id,
        "type": row.type,
        "api_version": row.api_version,
        "created": row.created.isoformat(),
        "object_id": row.object_id,
        "customer_id": row.customer_id,
        "source": row.source.value,
        "status": row.status.value,
        "attempts": row.attempts,
        "status_reason": row.status_reason,
        "last_error": row.last_error,
        "received_at": row.received_at.isoformat() if row.received_at else None,
        "processed_at": row.processed_at.isoformat() if row.processed_at else None,
        "next_attempt_at": row.next_attempt_at.isoformat() if row.next_attempt_at else None,
    }


@events_app.command("list")
def list_events(
    status: Annotated[EventStatus | None, typer.Option(help="Only events with this status.")] = None,
    type_: Annotated[str | None, typer.Option("--type", help="Only events of this Stripe type.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (errors too).")] = False,
) -> None:
    """List stored events, newest first."""
    with unit_of_work() as session:
        stmt = select(StripeEvent).order_by(StripeEvent.created.desc(), StripeEvent.id.desc()).limit(limit)
        if status is not None:
            stmt = stmt.where(StripeEvent.status == status)
        if type_:
            stmt = stmt.where(StripeEvent.type == type_)
        rows = [_summary(r) for r in session.scalars(stmt)]
    if as_json:
        print_json({"events": rows})
        return
    if not rows:
        typer.echo("no events")
        return
    typer.echo(f"{'id':>7}  {'status':9}  {'created':25}  {'type':40}  event_id / reason")
    for row in rows:
        detail = row["last_error"] or row["status_reason"] or ""
        typer.echo(
            f"{row['id']:>7}  {row['status']:9}  {row['created']:25}  {row['type']:40}  {row['event_id']}"
            + (f"  {detail[:80]}" if detail else "")
        )


@events_app.command("show")
def show_event(
    ident: Annotated[str, typer.Argument(help="Row id or Stripe event id (evt_...).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (errors too).")] = False,
) -> None:
    """Show one stored event: what we did with it, and its raw payload."""
    with unit_of_work() as session:
        row = get_event(session, ident)
        if row is None:
            raise CommandFailed("unknown_event", f"no stored event {ident!r}", EXIT_UNKNOWN)
        summary = _summary(row)
        raw = bytes(row.payload)
    try:
        summary["payload"] = orjson.loads(raw)
        text = orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode()
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        # Not JSON, or nested deeper than an encoder will go (a signed event may nest to 1,024 levels): the
        # payload as stored, as a string.
        summary["payload"] = raw.decode("utf-8", "replace")
        text = json.dumps(summary, indent=2)
    if as_json:
        print_json(summary)
        return
    typer.echo(text)


@events_app.command("replay")
def replay_events(
    ident: Annotated[str | None, typer.Argument(help="Row id or Stripe event id (evt_...).")] = None,
    since: Annotated[str | None, typer.Option(help="Replay every event created since this ISO time.")] = None,
) -> None:
    """Run stored events again (a fixed config, a failed event): effects already applied are not repeated."""
    from worker.enqueue import hand_over

    if (ident is None) == (since is None):
        raise CommandFailed("usage_error", "give an event id or --since, not both")
    with unit_of_work() as session:
        if ident is not None:
            row = get_event(session, ident)
            if row is None:
                raise CommandFailed("unknown_event", f"no stored event {ident!r}", EXIT_UNKNOWN)
            ids = [row.id]
        else:
            assert since is not None
            ids = list(
                session.scalars(
                    select(StripeEvent.id)
                    .where(StripeEvent.created >= _parse_time(since))
                    .order_by(StripeEvent.created, StripeEvent.id)
                )
            )
        for start in range(0, len(ids), 1000):
            session.execute(
                update(StripeEvent)
                .where(StripeEvent.id.in_(ids[start : start + 1000]))
                .values(status=EventStatus.PENDING, next_attempt_at=None)
            )
    # Hand over only after the rows are pending and committed.
    for start in range(0, len(ids), 500):
        hand_over(ids[start : start + 500])
    typer.echo(f"replaying {len(ids)} event(s)")


@events_app.command("backfill")
def backfill_events(
    since: Annotated[str, typer.Option(help="ISO time; Stripe keeps events for 30 days, so at most that far.")],
) -> None:
    """Fetch events from Stripe's Events API and store (and process) the ones the inbox misses."""
    from reconciliation.gateway import get_gateway
    from worker.backfill import backfill
    from worker.enqueue import hand_over

    gateway = get_gateway()
    gateway.require_key()
    report = backfill(gateway, since=_parse_time(since), hand_over=hand_over)
    if report.clamped:
        typer.echo(f"note: Stripe keeps 30 days of events; backfilling from {report.since.isoformat()}", err=True)
    typer.echo(
        f"seen {report.seen} event(s) since {report.since.isoformat()}, stored {report.stored} new, "
        f"{report.malformed} malformed"
    )


def worker(
    beat: Annotated[bool, typer.Option("--beat", help="Also run the beat scheduler in this process.")] = False,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1, help="Worker processes.")] = 2,
    queues: Annotated[str, typer.Option(help="Comma-separated queues to consume.")] = (
        "events,maintenance,reconciliation"
    ),
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Run the Celery worker that applies stored events (and, with --beat, the periodic jobs)."""
    from ledger.db import get_engine
    from worker.celery_app import get_app

    get_engine()  # the database is reachable and migrated, or one line says why not (before any process starts)
    argv = ["worker", f"--loglevel={loglevel}", f"--concurrency={concurrency}", f"--queues={queues}"]
    # Workers share their state through the database, never through broker broadcasts: without gossip, mingle and
    # event heartbeats they hold no fan-out channels, whose close while Redis was down once crashed the worker
    # (kombu's _connparams on a closed connection: 'NoneType' object has no attribute 'hostname', celery/kombu#582).
    argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    if beat:
        argv.append("--beat")
    get_app().worker_main(argv)


def register(app: typer.Typer) -> None:
    """Add this package's commands to the root CLI."""
    app.command("worker")(worker)
    app.add_typer(events_app, name="events")
