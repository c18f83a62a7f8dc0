"""Reconciliation commands: ``reconcile`` and the ``mismatches`` review workflow.

Exit codes (ledger.cli): 0 done and nothing found; 1 the run found mismatches; 2 a usage, report or config
error; 5 an unknown mismatch; 7 the run failed and compared nothing (its row records the error); 8 a partial run
(some Stripe list could not be read, or a check stopped: the run compared the rest, and says what it missed).
A partial or failed run is never reported as 0 or 1. (6 is the ledger's limit_exceeded, 70 an unexpected error.)
"""

from __future__ import annotations

import csv
import getpass
import json
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ledger.cli import EXIT_CHECK_FAILED, EXIT_UNKNOWN, EXIT_USAGE, CommandFailed, print_json
from ledger.db import session_factory, unit_of_work
from ledger.errors import InvalidRequest
from ledger.money import format_amount, format_credits, format_money, format_usd, to_minor
from ledger.revenue import Period, revenue_report, verify
from reconciliation import services
from reconciliation.engine import RunSummary, previous_utc_day, reconcile
from reconciliation.models import MismatchKind, MismatchStatus, RunStatus
from reconciliation.providers import ReportError

if TYPE_CHECKING:
    from reconciliation.gateway import StripeGateway

# Beside ledger.cli's codes (6 is limit_exceeded there) and 70 for an unexpected error.
EXIT_RUN_FAILED = 7
EXIT_PARTIAL = 8

mismatches_app = typer.Typer(help="Review reconciliation mismatches.", no_args_is_help=True)

ActorOption = Annotated[
    str | None, typer.Option("--actor", help="Who is acting (default: the OS user).", show_default=False)
]
NoteOption = Annotated[str, typer.Option("--note", help="Why (required; kept in the audit trail).")]


def _actor(actor: str | None) -> str:
    if actor and actor.strip():
        return actor.strip()
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (containers): still say something true
        return "unknown"


def _parse_time(value: str, option: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not an ISO 8601 date or time", param_hint=option) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


_ERROR_CODES = {
    EXIT_USAGE: "usage_error",
    EXIT_UNKNOWN: "unknown_mismatch",
    EXIT_CHECK_FAILED: "run_failed",
    EXIT_RUN_FAILED: "run_failed",
}


def _fail(message: str, code: int) -> CommandFailed:
    # Printed by the root command: one line, or one JSON object with --json.
    return CommandFailed(_ERROR_CODES.get(code, "error"), message, code)


def _gateway() -> StripeGateway:
    # Imported when a command runs: the Stripe SDK costs ~0.7 s to load, which --help and the other commands skip.
    from reconciliation.gateway import get_gateway

    return get_gateway()


def _print_summary(summary: RunSummary) -> None:
    console = Console()
    console.print(
        f"run {summary.run_id} [{summary.since.isoformat()}, {summary.until.isoformat()}): "
        f"{summary.status.value}, {summary.total} mismatch(es), {summary.closed} closed"
    )
    if summary.counts:
        table = Table("kind", "count")
        for kind, n in sorted(summary.counts.items()):
            table.add_row(kind, str(n))
        console.print(table)
    if summary.outcomes:
        console.print("changes: " + ", ".join(f"{k} {v}" for k, v in sorted(summary.outcomes.items())))
    for source, why in sorted(summary.missed_sources.items()):
        console.print(f"not read from Stripe: {source}: {why}", soft_wrap=True)
    for check, why in sorted(summary.skipped_checks.items()):
        console.print(f"check {check} {why}", soft_wrap=True)


def reconcile_command(
    since: Annotated[str, typer.Option("--since", help="Window start (ISO 8601, UTC if no offset).")],
    until: Annotated[str, typer.Option("--until", help="Window end, exclusive (ISO 8601).")],
    provider_report: Annotated[
        list[Path] | None,
        typer.Option("--provider-report", help="An OpenAI or Anthropic cost/usage report (repeatable)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run summary as one JSON object.")] = False,
    actor: ActorOption = None,
) -> None:
    """Reconcile the ledger against Stripe and provider reports for [since, until)."""
    start, end = _parse_time(since, "--since"), _parse_time(until, "--until")
    if end <= start:
        raise _fail("--until must be after --since", EXIT_USAGE)
    err = Console(stderr=True)
    # Mistakes in the setup (no Stripe key, a database that cannot be used) stop here with their own message and
    # exit code 2, before the run starts; only what fails during the run is a failed run.
    gateway = _gateway()
    gateway.require_key()
    sessions = session_factory()
    try:
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TextColumn("{task.completed} rows"),
            TimeElapsedColumn(),
            console=err,
            transient=True,
            disable=not err.is_terminal,
        ) as bar:
            tasks: dict[str, Any] = {}

            def tick(step: str, n: int) -> None:
                if step not in tasks:
                    tasks[step] = bar.add_task(step, total=None)
                bar.advance(tasks[step], n)

            summary = reconcile(
                sessions,
                gateway,
                since=start,
                until=end,
                provider_reports=provider_report or [],
                actor=_actor(actor),
                progress=tick,
            )
    except ReportError as exc:
        raise _fail(str(exc), EXIT_USAGE) from exc
    except ValueError as exc:
        raise _fail(str(exc), EXIT_USAGE) from exc
    except Exception as exc:  # the database (or something unforeseen) failed mid-run: the run row says so too
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise _fail(f"reconciliation failed: {type(exc).__name__}: {first_line}", EXIT_RUN_FAILED) from exc
    if as_json:
        partial = summary.status is RunStatus.PARTIAL
        found = {"code": "partial_run"} if partial else {"code": "mismatches_found"} if summary.total else {}
        # "ok" is true exactly when the exit code is 0: a partial run is not ok even when it found nothing.
        print_json({**summary.as_dict(), **found}, ok=not summary.total and not partial)
    else:
        _print_summary(summary)
    if summary.status is RunStatus.PARTIAL:
        raise typer.Exit(EXIT_PARTIAL)
    if summary.total:
        raise typer.Exit(EXIT_CHECK_FAILED)


def run_nightly(now: datetime | None = None) -> RunSummary:
    """Reconcile the previous UTC day (the beat task's job); provider reports are not fetched here."""
    since, until = previous_utc_day(now or datetime.now(UTC))
    return reconcile(session_factory(), _gateway(), since=since, until=until, actor="nightly")


def margin_command(
    since: Annotated[str, typer.Option("--since", help="Window start (ISO 8601, UTC if no offset).")],
    until: Annotated[str, typer.Option("--until", help="Window end, exclusive (ISO 8601).")],
    customer: Annotated[str | None, typer.Option("--customer")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (errors too).")] = False,
) -> None:
    """Margin per customer, feature and model, and per plan: credits sold (gross, and net of Stripe's fees and
    refunds) against provider cost, for [since, until)."""
    from reconciliation.margin import margin_by_plan, margin_rows

    start, end = _parse_time(since, "--since"), _parse_time(until, "--until")
    if end <= start:
        raise _fail("--until must be after --since", EXIT_USAGE)
    with unit_of_work() as session:
        found = list(margin_rows(session, since=start, until=end, customer_id=customer))
    rows = [r.as_dict() for r in found]
    plans = [m.as_dict() for m in margin_by_plan(found)]
    if as_json:
        print_json({"rows": rows, "by_plan": plans})
        return
    table = Table(
        "customer", "plan", "feature", "model", "requests", "credits", "revenue", "net revenue", "cost", "margin",
        "net margin",
    )  # fmt: skip
    notes: dict[str, str] = {}

    def money(value: str, currency: str) -> str:
        amount = Decimal(value)
        return format_usd(amount) if currency == "usd" else format_money(to_minor(amount, currency), currency)

    for r in rows:
        currency = r["revenue_currency"]
        table.add_row(
            r["customer_id"],
            r["plan"] or "",
            r["feature"] or "",
            r["model"] or "",
            format_credits(r["requests"]),
            format_credits(r["units"]),
            money(r["revenue"], currency),
            money(r["revenue_net"], currency),
            format_usd(r["cost_usd"]),
            format_usd(r["margin_usd"]) if r["margin_usd"] is not None else "n/a",
            format_usd(r["net_margin_usd"]) if r["net_margin_usd"] is not None else "n/a",
        )
        if r["note"]:
            notes[r["customer_id"]] = r["note"]
    by_plan = Table("plan", "customers", "credits", "revenue", "net revenue", "cost", "margin", "net margin")
    for m in plans:
        currency = m["revenue_currency"]
        by_plan.add_row(
            m["plan"] or "(no subscription)",
            format_credits(m["customers"]),
            format_credits(m["units"]),
            money(m["revenue"], currency),
            money(m["revenue_net"], currency),
            format_usd(m["cost_usd"]),
            format_usd(m["margin_usd"]) if m["margin_usd"] is not None else "n/a",
            format_usd(m["net_margin_usd"]) if m["net_margin_usd"] is not None else "n/a",
        )
    console = Console(width=max(160, Console().width))
    console.print(table)
    if plans:
        console.print(by_plan)
    for customer_id, note in notes.items():
        console.print(f"{customer_id}: {note}", soft_wrap=True)


def revenue_command(
    since: Annotated[str, typer.Option("--since", help="Window start (ISO 8601, UTC if no offset).")],
    until: Annotated[str, typer.Option("--until", help="Window end, exclusive (ISO 8601).")],
    by: Annotated[Period, typer.Option("--by", help="One line per UTC day or month.")] = Period.MONTH,
    csv_path: Annotated[
        Path | None, typer.Option("--csv", help="Also write the lines to this CSV file (exact minor units).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Deferred revenue roll-forward: credits sold, revenue recognized, breakage (expired), clawed back, and the
    closing deferred balance, per period and currency; free credits apart. Exit 1 if it does not tie."""
    start, end = _parse_time(since, "--since"), _parse_time(until, "--until")
    if end <= start:
        raise _fail("--until must be after --since", EXIT_USAGE)
    with unit_of_work() as session:
        report = revenue_report(session, since=start, until=end, by=by)
        # The independent check compares the last closing balance with the grants' state now.
        problems = verify(session, report) if end >= datetime.now(UTC) else []
    if csv_path is not None:
        try:
            with csv_path.open("w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(REVENUE_COLUMNS))
                writer.writeheader()
                for line in [*report.money, *report.free_credits]:
                    writer.writerow(line.as_dict())
        except OSError as exc:
            raise _fail(f"cannot write {csv_path}: {exc.strerror or exc}", EXIT_USAGE) from exc
    if as_json:
        # The --json contract: one object on one line, "ok" true exactly when the exit code is 0.
        found = {"code": "revenue_does_not_tie"} if problems else {}
        print_json({**report.as_dict(), "problems": problems, **found}, ok=not problems)
    else:
        table = Table("period", "currency", *(c.replace("_", " ") for c in REVENUE_COLUMNS[3:]))
        for line in report.money:
            cells = [line.opening, line.sold, line.recognized, line.expired, line.clawed_back, line.adjusted]
            table.add_row(
                line.period_start.date().isoformat(),
                line.currency.upper(),
                *(format_money(v, line.currency) for v in [*cells, line.closing]),
            )
        for line in report.free_credits:
            cells = [line.opening, line.sold, line.recognized, line.expired, line.clawed_back, line.adjusted]
            table.add_row(
                line.period_start.date().isoformat(),
                "free credits",
                *(format_credits(v) for v in [*cells, line.closing]),
            )
        console = Console(width=max(160, Console().width))
        console.print(table)
        for problem in problems:
            console.print(f"does not tie: {problem}", soft_wrap=True)
    if problems:
        raise typer.Exit(EXIT_CHECK_FAILED)


def payouts_command(
    since: Annotated[
        str | None, typer.Option("--since", help="Payouts created at or after (ISO 8601, UTC if no offset).")
    ] = None,
    until: Annotated[str | None, typer.Option("--until", help="Payouts created before (ISO 8601).")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (errors too).")] = False,
) -> None:
    """Payouts the reconciliation runs tied out, newest first: amount, status, arrival, their balance transactions
    by type, and whether they tie out to the ledger. Exit 1 if one differs."""
    from reconciliation.payouts import list_payouts, payout_dict

    start = _parse_time(since, "--since") if since else None
    end = _parse_time(until, "--until") if until else None
    if start is not None and end is not None and end <= start:
        raise _fail("--until must be after --since", EXIT_USAGE)
    with unit_of_work() as session:
        rows = [payout_dict(p) for p in list_payouts(session, since=start, until=end, limit=limit)]
    differ = [r["payout"] for r in rows if r["tie_out"] == "differs"]
    if as_json:
        # One object on one line; "ok" true exactly when the exit code is 0.
        found = {"code": "payouts_differ"} if differ else {}
        print_json({"payouts": rows, **found}, ok=not differ)
    else:
        table = Table("payout", "created", "arrival", "status", "amount", "transactions", "their net", "by type",
                      "tie-out", "run")  # fmt: skip
        for r in rows:
            by_type = ", ".join(
                f"{kind} {t['count']}: {format_money(t['net'], r['currency'])}" for kind, t in r["by_type"].items()
            )
            tie = {"ties": "ties", "differs": f"{r['differences']} difference(s)"}.get(r["tie_out"], "not checked")
            table.add_row(
                r["payout"],
                (r["created"] or "")[:16],
                (r["arrival_date"] or "")[:10],
                r["status"],
                r["amount"],
                str(r["transactions"]),
                r["net"] or "",
                by_type,
                tie,
                str(r["run_id"]),
            )
        console = Console(width=max(160, Console().width))
        console.print(table)
        if not rows:
            console.print("no payout seen by a reconciliation run in this window")
    if differ:
        raise typer.Exit(EXIT_CHECK_FAILED)


# The CSV's columns: amounts in exact minor units of ``currency`` ("credits" for the free-credit lines).
REVENUE_COLUMNS = (
    "period_start",
    "period_end",
    "currency",
    "opening_deferred",
    "sold",
    "recognized",
    "expired",
    "clawed_back",
    "adjusted",
    "closing_deferred",
)


# --- mismatches ------------------------------------------------------------------------------------------------


@mismatches_app.command("list")
def list_command(
    status: Annotated[MismatchStatus | None, typer.Option("--status")] = None,
    kind: Annotated[MismatchKind | None, typer.Option("--kind")] = None,
    customer: Annotated[str | None, typer.Option("--customer")] = None,
    run: Annotated[int | None, typer.Option("--run", help="Last seen by this run.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1)] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (errors too).")] = False,
) -> None:
    """List mismatches, oldest first."""
    with unit_of_work() as session:
        rows = services.list_mismatches(
            session, status=status, kind=kind, customer_id=customer, run_id=run, limit=limit
        )
        data = [services.mismatch_dict(m) for m in rows]
    if as_json:
        print_json({"mismatches": data})
        return
    table = Table("id", "kind", "status", "customer", "expected", "actual", "unit", "summary")
    for m in data:
        table.add_row(
            str(m["id"]),
            m["kind"],
            m["status"],
            m["customer_id"] or "",
            format_amount(m["expected"], m["unit"], m["currency"]) if m["expected"] is not None else "",
            format_amount(m["actual"], m["unit"], m["currency"]) if m["actual"] is not None else "",
            m["unit"],
            m["summary"],
        )
    Console(width=max(160, Console().width)).print(table)


@mismatches_app.command("show")
def show_command(
    mismatch_id: Annotated[int, typer.Argument(metavar="ID")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (errors too).")] = False,
) -> None:
    """Show one mismatch with its evidence and audit trail."""
    with unit_of_work() as session:
        try:
            mismatch = services.get_mismatch(session, mismatch_id)
        except services.UnknownMismatch as exc:
            raise _fail(str(exc), EXIT_UNKNOWN) from exc
        data = services.mismatch_dict(mismatch)
        data["actions"] = [services.action_dict(a) for a in services.list_actions(session, mismatch_id)]
    if as_json:
        print_json(data)
        return
    console = Console()
    console.print(f"[bold]mismatch {data['id']}[/bold] {data['kind']} ({data['status']})")
    for key in ("expected", "actual"):
        shown = format_amount(data[key], data["unit"], data["currency"])
        console.print(f"  {key}: {shown}" + (f" (exact: {data[key]})" if data[key] is not None else ""))
    for key in (
        "summary",
        "customer_id",
        "currency",
        "unit",
        "occurred_at",
        "first_seen_run_id",
        "last_seen_run_id",
        "first_seen_at",
        "last_seen_at",
        "fingerprint",
    ):
        console.print(f"  {key}: {data[key]}")
    console.print("  evidence:")
    console.print_json(json.dumps(data["evidence"], default=str))
    console.print("  audit trail:")
    for a in data["actions"]:
        console.print(f"    {a['at']} {a['actor']} {a['action']} {a['from_status']} -> {a['to_status']}: {a['note']}")


def _act(action: str, mismatch_id: int, note: str, actor: str | None) -> None:
    fn = {"resolve": services.resolve, "ignore": services.ignore, "reopen": services.reopen}[action]
    try:
        with unit_of_work() as session:
            mismatch = fn(session, mismatch_id, actor=_actor(actor), note=note)
            status = mismatch.status.value
    except services.UnknownMismatch as exc:
        raise _fail(str(exc), EXIT_UNKNOWN) from exc
    except InvalidRequest as exc:
        raise _fail(str(exc), EXIT_USAGE) from exc
    typer.echo(f"mismatch {mismatch_id} is now {status}")


@mismatches_app.command("resolve")
def resolve_command(
    mismatch_id: Annotated[int, typer.Argument(metavar="ID")], note: NoteOption, actor: ActorOption = None
) -> None:
    """Mark a mismatch resolved, with a note."""
    _act("resolve", mismatch_id, note, actor)


@mismatches_app.command("ignore")
def ignore_command(
    mismatch_id: Annotated[int, typer.Argument(metavar="ID")], note: NoteOption, actor: ActorOption = None
) -> None:
    """Mark a mismatch ignored, with a note."""
    _act("ignore", mismatch_id, note, actor)


@mismatches_app.command("reopen")
def reopen_command(
    mismatch_id: Annotated[int, typer.Argument(metavar="ID")], note: NoteOption, actor: ActorOption = None
) -> None:
    """Reopen a resolved, ignored or closed mismatch, with a note."""
    _act("reopen", mismatch_id, note, actor)


@mismatches_app.command("export")
def export_command(
    csv_path: Annotated[Path, typer.Option("--csv", help="Write mismatches to this CSV file ('-' for stdout).")],
    status: Annotated[MismatchStatus | None, typer.Option("--status")] = None,
    kind: Annotated[MismatchKind | None, typer.Option("--kind")] = None,
    customer: Annotated[str | None, typer.Option("--customer")] = None,
    run: Annotated[int | None, typer.Option("--run")] = None,
) -> None:
    """Export mismatches (with their evidence as JSON) to CSV."""
    filters: dict[str, Any] = {"status": status, "kind": kind, "customer_id": customer, "run_id": run}
    with unit_of_work() as session:
        if str(csv_path) == "-":
            n = services.export_csv(session, sys.stdout, **filters)
        else:
            try:
                n = services.export_csv(session, csv_path, **filters)
            except OSError as exc:
                raise _fail(f"cannot write {csv_path}: {exc.strerror or exc}", EXIT_USAGE) from exc
    typer.echo(f"{n} mismatch(es) exported", err=str(csv_path) == "-")


def register(app: typer.Typer) -> None:
    """Add this package's commands to the root CLI."""
    app.command("reconcile")(reconcile_command)
    app.command("margin")(margin_command)
    app.command("revenue")(revenue_command)
    app.command("payouts")(payouts_command)
    app.add_typer(mismatches_app, name="mismatches")
