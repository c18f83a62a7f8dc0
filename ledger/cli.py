"""Ledger commands of the CLI: migrate, balances, grants, consumption, holds, and the invariant check.

Each command is one unit of work. ``--json`` prints exactly one JSON object, errors included (with a stable
``code``). Exit codes are part of the contract: see the constants below.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum
from typing import Annotated, Any

import typer
from sqlalchemy.orm import Session

from ledger.config import ConfigError
from ledger.db import unit_of_work
from ledger.errors import (
    AccessRefused,
    HoldNotOpen,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidRequest,
    LedgerError,
    LimitExceeded,
    NotEntitled,
    UnknownCustomer,
    UnknownHold,
)
from ledger.migrate import migrate as run_migrations
from ledger.models import GrantSource, UsageEnvironment
from ledger.money import format_credits
from ledger.pricing import UsageInput

# Documented exit codes: the contract scripts rely on.
EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_INSUFFICIENT = 3
EXIT_ACCESS = 4
EXIT_UNKNOWN = 5
EXIT_LIMIT = 6  # a usage limit of the billing config is reached for its window

EXIT_CODES: dict[type[LedgerError], int] = {
    UnknownCustomer: EXIT_UNKNOWN,
    UnknownHold: EXIT_UNKNOWN,
    InsufficientCredits: EXIT_INSUFFICIENT,
    AccessRefused: EXIT_ACCESS,
    IdempotencyConflict: EXIT_USAGE,
    InvalidRequest: EXIT_USAGE,
    HoldNotOpen: EXIT_USAGE,
    LimitExceeded: EXIT_LIMIT,
    NotEntitled: EXIT_ACCESS,
}

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object (errors too).")]
RequestId = Annotated[str, typer.Option("--request-id", help="Idempotency key of this request.")]
Units = Annotated[int | None, typer.Option("--units", min=0, help="Credits, when not priced from usage.")]
Operation = Annotated[str | None, typer.Option("--operation", help="An operation priced in the billing config.")]
Model = Annotated[str | None, typer.Option("--model", help="A model priced per token in the billing config.")]
Provider = Annotated[str | None, typer.Option("--provider", help="The model's provider (openai, anthropic).")]
InputTokens = Annotated[int, typer.Option("--input-tokens", min=0)]
OutputTokens = Annotated[int, typer.Option("--output-tokens", min=0)]
CachedTokens = Annotated[int, typer.Option("--cached-tokens", min=0)]
Feature = Annotated[str | None, typer.Option("--feature", help="Product feature, for attribution.")]
User = Annotated[str | None, typer.Option("--user", help="End user, for attribution.")]
Workspace = Annotated[str | None, typer.Option("--workspace", help="Workspace, for attribution.")]
Environment = Annotated[
    UsageEnvironment, typer.Option("--environment", help="test and internal usage is recorded but free.")
]


class CommandFailed(Exception):
    """A mistake found before or while a command ran: one line for the person, a stable code, an exit code.

    The root command (worker.cli) prints it once, as a line on stderr or, with --json, one JSON object.
    """

    def __init__(self, code: str, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.exit_code = exit_code


class UsageError(Exception):
    """The command line asks for something that makes no sense (exit 2)."""

    code = "usage_error"


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


def print_json(payload: dict[str, Any], *, ok: bool = True) -> None:
    """The --json contract: exactly one JSON object on stdout, on one line, ``ok`` true exactly when exit is 0.

    Lists are one object with the items under a named key (``entries``, ``events``, ``mismatches``, ``rows``),
    never JSON Lines; errors are ``{"ok": false, "code": ..., "error": ...}``.
    """
    typer.echo(json.dumps(_jsonable({"ok": ok, **payload}), sort_keys=True, default=str))


def _emit(as_json: bool, payload: dict[str, Any], text: str, *, err: bool = False) -> None:
    if as_json:
        typer.echo(json.dumps(_jsonable(payload), sort_keys=True))
    else:
        typer.echo(text, err=err)


def _fail(as_json: bool, code: str, message: str, exit_code: int, **extra: Any) -> typer.Exit:
    _emit(as_json, {"ok": False, "code": code, "error": message, **extra}, f"error: {message}", err=True)
    return typer.Exit(exit_code)


def _run(as_json: bool, work: Callable[[Session], tuple[dict[str, Any], str]]) -> None:
    """Run ``work`` in one unit of work; print its result, or the error with its exit code."""

    def in_unit_of_work() -> tuple[dict[str, Any], str]:
        with unit_of_work() as session:
            return work(session)

    _run_alone(as_json, in_unit_of_work)


def _run_alone(as_json: bool, work: Callable[[], tuple[dict[str, Any], str]]) -> None:
    """Run ``work``, a unit of work of its own; print its result, or the error with its exit code."""
    try:
        payload, text = work()
    except InsufficientCredits as exc:
        raise _fail(
            as_json, exc.code, str(exc), EXIT_INSUFFICIENT, requested=exc.requested, available=exc.available
        ) from None
    except LedgerError as exc:
        raise _fail(as_json, exc.code, str(exc), EXIT_CODES.get(type(exc), EXIT_USAGE)) from None
    except (UsageError, ConfigError) as exc:
        raise _fail(as_json, "usage_error", str(exc), EXIT_USAGE) from None
    _emit(as_json, {"ok": True, **payload}, text)


def _usage(
    units: int | None,
    operation: str | None,
    model: str | None,
    provider: str | None,
    input_tokens: int,
    output_tokens: int,
    cached_tokens: int,
    feature: str | None,
    user: str | None,
    workspace: str | None,
    environment: UsageEnvironment,
    *,
    required: bool = True,
) -> tuple[int | None, UsageInput | None]:
    """Units or a usage to price, from exactly one of --units, --operation, --model."""
    given = [
        name
        for name, value in (("--units", units), ("--operation", operation), ("--model", model))
        if value is not None
    ]
    if len(given) > 1:
        raise UsageError(f"give only one of --units, --operation, --model (got {', '.join(given)})")
    if not given:
        if required:
            raise UsageError("give --units, --operation, or --model with token counts")
        return None, None
    has_attribution = any(v is not None for v in (feature, user, workspace)) or environment != "production"
    if units is not None and not has_attribution:
        return units, None
    usage = UsageInput(
        user_id=user,
        workspace=workspace,
        feature=feature,
        provider=provider,
        model=model,
        operation=operation,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_tokens=cached_tokens,
        environment=environment,
    )
    return units, usage


def _parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"{value!r} is not an ISO 8601 time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def migrate() -> None:
    """Apply the database migrations."""
    run_migrations()
    typer.echo("database is up to date")


def _credits(units: int) -> str:
    # Credits as people read them (1,234,567); --json keeps the plain integers.
    return format_credits(units)


def balance(customer: str, as_json: JsonFlag = False) -> None:
    """Show a customer's balance, holds, debt, access state and live grants."""
    from ledger.queries import balance_summary

    def work(session: Session) -> tuple[dict[str, Any], str]:
        summary = balance_summary(session, customer)
        lines = [
            f"customer   {summary.customer_id}",
            f"balance    {_credits(summary.balance)}",
            f"held       {_credits(summary.held)}",
            f"debt       {_credits(summary.debt)}",
            f"available  {_credits(summary.available)}",
            f"access     {summary.access_state.value}"
            + (f" (grace until {summary.grace_until.isoformat()})" if summary.grace_until else ""),
        ]
        for sub in summary.subscriptions:
            period = (
                f"{sub.current_period_start.isoformat()} .. {sub.current_period_end.isoformat()}"
                if sub.current_period_start and sub.current_period_end
                else "period unknown"
            )
            lines.append(
                f"  subscription {sub.subscription_id}: {sub.plan or sub.price or 'plan unknown'} x{sub.quantity}, "
                f"{sub.status or 'status unknown'} (access {sub.access_state.value}), {period}"
                + (", cancels at period end" if sub.cancel_at_period_end else "")
                + (f", collection paused ({sub.pause_collection})" if sub.pause_collection else "")
            )
        for g in summary.grants:
            expiry = g.expires_at.isoformat() if g.expires_at else "never"
            lines.append(
                f"  grant {g.grant_id}: {_credits(g.remaining)}/{_credits(g.units)} left, {_credits(g.frozen)} frozen, "
                f"{g.source.value}, priority {g.priority}, expires {expiry}"
            )
        return dataclasses.asdict(summary), "\n".join(lines)

    _run(as_json, work)


def ledger(
    customer: str,
    as_json: JsonFlag = False,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000, help="Entries to show.")] = 50,
    before: Annotated[int | None, typer.Option("--before", help="Only entries older than this id.")] = None,
) -> None:
    """List a customer's ledger entries, newest first."""
    from ledger.queries import list_entries

    def work(session: Session) -> tuple[dict[str, Any], str]:
        entries = list_entries(session, customer, limit=limit, before_id=before)
        rows: list[dict[str, Any]] = [
            {
                "id": e.id,
                "kind": e.kind.value,
                "units": e.units,
                "balance_after": e.balance_after,
                "debt_delta": e.debt_delta,
                "idempotency_key": e.idempotency_key,
                "grant_id": e.grant_id,
                "actor": e.actor,
                "reason": e.reason,
                "created_at": e.created_at,
            }
            for e in entries
        ]
        text = "\n".join(
            f"{r['id']:>8}  {r['kind']:<16} {_credits(r['units']):>10} -> {_credits(r['balance_after']):>10}  "
            f"{r['idempotency_key']}"
            for r in rows
        )
        return {"customer_id": customer, "entries": rows}, text or "(no entries)"

    _run(as_json, work)


def grant(
    customer: str,
    units: Annotated[int, typer.Option("--units", min=1, help="Credits to add.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the ledger).")],
    idempotency_key: Annotated[str, typer.Option("--idempotency-key", help="Repeat-safe key.")],
    expires_at: Annotated[str | None, typer.Option("--expires-at", help="ISO 8601 expiry.")] = None,
    priority: Annotated[int, typer.Option("--priority", help="Higher is drawn first.")] = 0,
    source: Annotated[GrantSource, typer.Option("--source")] = GrantSource.ADJUSTMENT,
    actor: Annotated[str, typer.Option("--actor")] = "cli",
    as_json: JsonFlag = False,
) -> None:
    """Grant credits to a customer (opening the account if needed)."""
    from ledger.grants import grant_credits

    def work(session: Session) -> tuple[dict[str, Any], str]:
        result = grant_credits(
            session,
            customer,
            units=units,
            source=source,
            idempotency_key=idempotency_key,
            reason=reason,
            actor=actor,
            priority=priority,
            expires_at=_parse_time(expires_at),
        )
        note = " (replayed)" if result.replayed else ""
        return dataclasses.asdict(result), (
            f"granted {_credits(result.units)} to {customer}: balance {_credits(result.balance_after)}{note}"
        )

    _run(as_json, work)


def consume(
    customer: str,
    request_id: RequestId,
    units: Units = None,
    operation: Operation = None,
    model: Model = None,
    provider: Provider = None,
    input_tokens: InputTokens = 0,
    output_tokens: OutputTokens = 0,
    cached_tokens: CachedTokens = 0,
    feature: Feature = None,
    user: User = None,
    workspace: Workspace = None,
    environment: Environment = UsageEnvironment.PRODUCTION,
    as_json: JsonFlag = False,
) -> None:
    """Consume credits once per request id (--units, or priced from --operation or --model and tokens)."""
    from ledger.consume import consume_standalone

    def work() -> tuple[dict[str, Any], str]:
        n, usage = _usage(
            units,
            operation,
            model,
            provider,
            input_tokens,
            output_tokens,
            cached_tokens,
            feature,
            user,
            workspace,
            environment,
        )
        # The consumption is the whole unit of work: consume_standalone commits it.
        result = consume_standalone(customer, request_id=request_id, units=n, usage=usage, actor="cli")
        note = " (replayed)" if result.replayed else ""
        return dataclasses.asdict(result), (
            f"consumed {_credits(result.units)}: balance {_credits(result.balance_after)}{note}"
        )

    _run_alone(as_json, work)


def hold(
    customer: str,
    request_id: RequestId,
    units: Units = None,
    operation: Operation = None,
    model: Model = None,
    provider: Provider = None,
    input_tokens: InputTokens = 0,
    output_tokens: OutputTokens = 0,
    cached_tokens: CachedTokens = 0,
    feature: Feature = None,
    user: User = None,
    workspace: Workspace = None,
    environment: Environment = UsageEnvironment.PRODUCTION,
    ttl: Annotated[int, typer.Option("--ttl", min=1, help="Seconds before the hold expires.")] = 600,
    as_json: JsonFlag = False,
) -> None:
    """Hold credits for a call that may time out, under its request id."""
    from ledger.holds import place_hold

    def work(session: Session) -> tuple[dict[str, Any], str]:
        n, usage = _usage(
            units,
            operation,
            model,
            provider,
            input_tokens,
            output_tokens,
            cached_tokens,
            feature,
            user,
            workspace,
            environment,
        )
        result = place_hold(
            session, customer, request_id=request_id, units=n, usage=usage, ttl_seconds=ttl, actor="cli"
        )
        note = " (replayed)" if result.replayed else ""
        text = (
            f"held {_credits(result.units)} until {result.expires_at.isoformat()}: "
            f"balance {_credits(result.balance_after)}{note}"
        )
        return dataclasses.asdict(result), text

    _run(as_json, work)


def capture(
    request_id: str,
    units: Units = None,
    operation: Operation = None,
    model: Model = None,
    provider: Provider = None,
    input_tokens: InputTokens = 0,
    output_tokens: OutputTokens = 0,
    cached_tokens: CachedTokens = 0,
    feature: Feature = None,
    user: User = None,
    workspace: Workspace = None,
    environment: Environment = UsageEnvironment.PRODUCTION,
    as_json: JsonFlag = False,
) -> None:
    """Capture a hold: the units used (default: all held); the rest is released."""
    from ledger.holds import capture_hold

    def work(session: Session) -> tuple[dict[str, Any], str]:
        n, usage = _usage(
            units,
            operation,
            model,
            provider,
            input_tokens,
            output_tokens,
            cached_tokens,
            feature,
            user,
            workspace,
            environment,
            required=False,
        )
        result = capture_hold(session, request_id, units=n, usage=usage, actor="cli")
        note = " (replayed)" if result.replayed else ""
        short = f", {_credits(result.shortfall)} short" if result.shortfall else ""
        text = (
            f"captured {_credits(result.captured)} of {_credits(result.held)} held, "
            f"released {_credits(result.released)}{short}: "
            f"balance {_credits(result.balance_after)}{note}"
        )
        return dataclasses.asdict(result), text

    _run(as_json, work)


def release(request_id: str, as_json: JsonFlag = False) -> None:
    """Release a hold: its units go back to the balance."""
    from ledger.holds import release_hold

    def work(session: Session) -> tuple[dict[str, Any], str]:
        result = release_hold(session, request_id, actor="cli")
        note = " (replayed)" if result.replayed else ""
        return dataclasses.asdict(result), (
            f"released {_credits(result.units)}: balance {_credits(result.balance_after)}{note}"
        )

    _run(as_json, work)


def check(customer: Annotated[str | None, typer.Argument()] = None, as_json: JsonFlag = False) -> None:
    """Verify every ledger invariant (exit 1 listing each broken one)."""
    from ledger.accounts import get_account
    from ledger.check import check_ledger

    try:
        with unit_of_work() as session:
            if customer is not None:
                get_account(session, customer)
            violations = check_ledger(session, customer)
    except UnknownCustomer as exc:
        raise _fail(as_json, exc.code, str(exc), EXIT_UNKNOWN) from None
    if not violations:
        _emit(as_json, {"ok": True, "violations": []}, "ledger is consistent")
        return
    lines = [f"{v.customer_id}: {v.invariant}: {v.detail}" for v in violations]
    _emit(
        as_json,
        {"ok": False, "code": "check_failed", "violations": [dataclasses.asdict(v) for v in violations]},
        "\n".join(lines),
    )
    raise typer.Exit(EXIT_CHECK_FAILED)


def register(app: typer.Typer) -> None:
    """Add the ledger commands to the root CLI."""
    app.command("migrate")(migrate)
    app.command("balance")(balance)
    app.command("ledger")(ledger)
    app.command("grant")(grant)
    app.command("consume")(consume)
    app.command("hold")(hold)
    app.command("capture")(capture)
    app.command("release")(release)
    app.command("check")(check)
