"""The reconciliation run: parse provider reports, page Stripe into staging, run every check, record what was
found, close what disappeared.

Provider reports are parsed before anything is written, so a bad file leaves no trace. The run row is committed
first (so a failed run is visible), staging and the checks follow, and staging rows are deleted at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from ledger.config import BillingConfig, get_billing_config
from reconciliation import checks
from reconciliation.models import MismatchKind, ReconciliationRun, RunStatus
from reconciliation.payouts import record_payouts
from reconciliation.providers import ProviderReport, parse_reports
from reconciliation.services import Finding, close_unseen, record_finding
from reconciliation.staging import ABANDONED_AFTER, Stager, analyze_staging, clear_abandoned_staging, clear_staging
from reconciliation.stripe_source import StripeSource, describe_source_error, is_source_error

# Kinds whose mismatches belong to a point in time (closed by a later run over the same window).
WINDOWED_KINDS = (
    MismatchKind.PAYMENT_WITHOUT_GRANT,
    MismatchKind.GRANT_WITHOUT_PAYMENT,
    MismatchKind.AMOUNT_MISMATCH,
    MismatchKind.DUPLICATE_GRANT,
    MismatchKind.REFUND_NOT_CLAWED_BACK,
    MismatchKind.DISPUTE_NOT_APPLIED,
    MismatchKind.MISSED_EVENT,
    MismatchKind.CUSTOMER_TOTAL_MISMATCH,
    MismatchKind.NEGATIVE_MARGIN,
    MismatchKind.NON_BILLABLE_PRODUCTION_USAGE,
    MismatchKind.CLAWBACK_DEBT,
    MismatchKind.PLAN_CHANGE_NOT_APPLIED,
    MismatchKind.FREE_CREDIT_COST,
    MismatchKind.BALANCE_TRANSACTION_MISMATCH,
    MismatchKind.PAYOUT_MISMATCH,
)
# Kinds about the current state: every run sees all of it.
GLOBAL_KINDS = (MismatchKind.ACCESS_STATE_DRIFT, MismatchKind.UNPROCESSED_EVENT)

CHECKS: tuple[tuple[str, Callable[[checks.CheckContext], Iterator[Finding]]], ...] = (
    ("payments", checks.check_payments),
    ("balance_transactions", checks.check_balance_transactions),
    ("grants", checks.check_grants),
    ("refunds", checks.check_refunds),
    ("disputes", checks.check_disputes),
    ("plan_changes", checks.check_plan_changes),
    ("access_state", checks.check_access_state),
    ("unprocessed_events", checks.check_unprocessed_events),
    ("missed_events", checks.check_missed_events),
    ("customer_totals", checks.check_customer_totals),
    ("providers", checks.check_providers),
    ("margin", checks.check_margin),
    ("clawback_debt", checks.check_clawback_debt),
    ("payouts", checks.check_payouts),
)


# The kinds each check observes: a check that did not run (or stopped) must not close its kinds' mismatches.
CHECK_KINDS: dict[str, tuple[MismatchKind, ...]] = {
    "payments": (MismatchKind.PAYMENT_WITHOUT_GRANT, MismatchKind.DUPLICATE_GRANT, MismatchKind.AMOUNT_MISMATCH),
    "balance_transactions": (MismatchKind.BALANCE_TRANSACTION_MISMATCH,),
    "grants": (MismatchKind.GRANT_WITHOUT_PAYMENT,),
    "refunds": (MismatchKind.REFUND_NOT_CLAWED_BACK,),
    "disputes": (MismatchKind.DISPUTE_NOT_APPLIED,),
    "plan_changes": (MismatchKind.PLAN_CHANGE_NOT_APPLIED,),
    "access_state": (MismatchKind.ACCESS_STATE_DRIFT,),
    "unprocessed_events": (MismatchKind.UNPROCESSED_EVENT,),
    "missed_events": (MismatchKind.MISSED_EVENT,),
    "customer_totals": (MismatchKind.CUSTOMER_TOTAL_MISMATCH,),
    "providers": (MismatchKind.PROVIDER_COST_DRIFT, MismatchKind.PROVIDER_USAGE_DRIFT),
    "margin": (
        MismatchKind.NEGATIVE_MARGIN,
        MismatchKind.NON_BILLABLE_PRODUCTION_USAGE,
        MismatchKind.FREE_CREDIT_COST,
    ),
    "clawback_debt": (MismatchKind.CLAWBACK_DEBT,),
    "payouts": (MismatchKind.PAYOUT_MISMATCH,),
}
# The Stripe lists each check compares: one that could not be read skips the check (it would report what it
# did not see as missing). Payments come from three lists, and grants are matched against all of them.
STRIPE_LISTS = ("checkout_session", "invoice", "charge", "refund", "dispute", "subscription", "event", "payout")
PAYMENT_SOURCES = ("checkout_session", "invoice", "charge")
CHECK_SOURCES: dict[str, tuple[str, ...]] = {
    "payments": PAYMENT_SOURCES,
    "grants": PAYMENT_SOURCES,
    "balance_transactions": ("charge", "refund"),
    "refunds": ("refund", *PAYMENT_SOURCES),
    "disputes": ("dispute", *PAYMENT_SOURCES),
    # Plan changes are staged from the window's subscription_update invoices.
    "plan_changes": ("invoice",),
    "access_state": ("subscription",),
    "missed_events": ("event",),
    "customer_totals": PAYMENT_SOURCES,
    "payouts": ("payout",),
}


class ReconcileError(Exception):
    """The run could not complete; the run row records the error."""


@dataclass
class RunSummary:
    """What a run did: its id and window, counts per kind, and what changed among stored mismatches."""

    run_id: int
    since: datetime
    until: datetime
    status: RunStatus
    counts: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    closed: int = 0
    stripe_objects: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    provider_reports: list[dict[str, Any]] = field(default_factory=list)
    # A partial run: the Stripe lists it could not read and the checks it skipped or that stopped, with why.
    missed_sources: dict[str, str] = field(default_factory=dict)
    skipped_checks: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Mismatches observed by the run."""
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "run_id": self.run_id,
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "status": self.status.value,
            "mismatches": self.total,
            "counts": dict(sorted(self.counts.items())),
            "outcomes": dict(sorted(self.outcomes.items())),
            "closed": self.closed,
            "stripe_objects": self.stripe_objects,
            "timings_seconds": {k: round(v, 3) for k, v in self.timings.items()},
            "provider_reports": self.provider_reports,
            "missed_sources": dict(sorted(self.missed_sources.items())),
            "skipped_checks": dict(sorted(self.skipped_checks.items())),
        }


Progress = Callable[[str, int], None]


def _aware(name: str, value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware")
    return value.astimezone(UTC)


@contextmanager
def _unit(target: Session | sessionmaker[Session]) -> Iterator[Session]:
    """A transaction from a factory (committed at the end), or the caller's session (flushed, never committed)."""
    if isinstance(target, Session):
        yield target
        target.flush()
        return
    with target.begin() as session:
        yield session


def _prepare(session: Session) -> None:
    """Set up the checks' transaction: statistics on the staged rows, planner settings, the run lock."""
    if session.get_bind().dialect.name != "postgresql":
        return
    # Statistics on every staged list (the stager analyzed the tables before the refunds, disputes and events).
    analyze_staging(session)
    # The checks stream their results through server-side cursors, which PostgreSQL plans for the first 10% of
    # rows by default (sorted, index-driven aggregates); we always read every row.
    session.execute(text("SET LOCAL cursor_tuple_fraction = 1.0"))
    # The window's usage is aggregated per account in memory: at the default 4 MB a million-entry window's sort
    # spills to disk. One batch connection, once a night.
    session.execute(text("SET LOCAL work_mem = '64MB'"))
    # Two runs at once would race on the same fingerprints: their write phases take turns.
    session.execute(text("SELECT pg_advisory_xact_lock(hashtext('billing-reconciler:reconcile'))"))


def _prefetch(
    target: Session | sessionmaker[Session],
    session: Session,
    background: ExitStack,
    *,
    since: datetime,
    until: datetime,
    reports: Sequence[ProviderReport],
    timings: dict[str, float],
    config: BillingConfig,
) -> dict[str, Future[Any]]:
    """Start the two checks' queries that aggregate the window's whole usage (and read nothing staged) on a
    second connection, so PostgreSQL works on them while this one runs the other checks.

    Only with a session factory on PostgreSQL: a caller's session may hold uncommitted rows another connection
    cannot see, and SQLite has one writer. Each check takes its result when it comes to it (CheckContext.fetched).
    """
    if isinstance(target, Session) or session.get_bind().dialect.name != "postgresql":
        return {}
    factory = target

    def run(name: str, compute: Callable[[Session], Any]) -> Any:
        started = time.perf_counter()
        with factory.begin() as other:
            other.execute(text("SET LOCAL work_mem = '64MB'"))
            result = compute(other)
        timings[f"background:{name}"] = time.perf_counter() - started  # beside the checks, not in their sum
        return result

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reconcile-prefetch")
    background.callback(pool.shutdown, wait=True, cancel_futures=True)
    return {
        "margin": pool.submit(
            run,
            "margin",
            lambda s: checks.margin_candidates(s, since, until, config.reconciliation.settlement_currency),
        ),
        "providers": pool.submit(run, "providers", lambda s: checks.provider_ledger_usage(s, reports)),
    }


def reconcile(
    target: Session | sessionmaker[Session],
    stripe: StripeSource,
    *,
    since: datetime,
    until: datetime,
    provider_reports: Sequence[Path | str] = (),
    actor: str = "system",
    now: datetime | None = None,
    config: BillingConfig | None = None,
    progress: Progress | None = None,
) -> RunSummary:
    """Reconcile the window [since, until) of the ledger against Stripe and the given provider reports."""
    since, until = _aware("since", since), _aware("until", until)
    if until <= since:
        raise ValueError("until must be after since")
    reports: list[ProviderReport] = parse_reports(provider_reports)  # raises before anything is written
    config = config or get_billing_config()
    now = _aware("now", now) if now else datetime.now(UTC)
    tick: Progress = progress or (lambda _step, _n: None)

    with _unit(target) as session:
        run = ReconciliationRun(
            since=since,
            until=until,
            started_at=datetime.now(UTC),
            status=RunStatus.RUNNING,
            actor=actor,
            counts={},
            stats={},
            provider_reports=[
                {
                    "path": str(r.path),
                    "format": r.format.value,
                    "rows": len(r.rows),
                    "days": sorted(d.isoformat() for d in r.days),
                }
                for r in reports
            ],
        )
        session.add(run)
        session.flush()
        run_id = run.id
        clear_abandoned_staging(session, older_than=datetime.now(UTC) - ABANDONED_AFTER)

    summary = RunSummary(run_id=run_id, since=since, until=until, status=RunStatus.RUNNING)
    summary.provider_reports = list(run.provider_reports)
    try:
        with _unit(target) as session:
            stager = Stager(session, run_id, stripe, config, on_page=lambda kind, n: tick(f"stripe:{kind}", n))
            stats = stager.stage_all(since, until)
            summary.stripe_objects = dict(stats.counts)
            summary.timings["stripe_paging"] = stats.seconds
            summary.missed_sources = dict(stats.missed)
            if len(stats.missed) == len(STRIPE_LISTS):
                # Nothing at all from Stripe (unreachable, a revoked key): a failed run, not a partial one.
                raise ReconcileError(f"no Stripe list could be read: {next(iter(stats.missed.values()))}")
        for name, sources in CHECK_SOURCES.items():
            unread = [x for x in sources if x in summary.missed_sources]
            if unread:
                summary.skipped_checks[name] = f"not run: Stripe's {', '.join(unread)} list could not be read"

        with _unit(target) as session, ExitStack() as background:
            started = time.perf_counter()
            background_timings: dict[str, float] = {}
            prefetched = _prefetch(
                target,
                session,
                background,
                since=since,
                until=until,
                reports=reports,
                timings=background_timings,
                config=config,
            )
            _prepare(session)
            run = session.get(ReconciliationRun, run_id)  # type: ignore[assignment]
            summary.timings["prepare"] = time.perf_counter() - started
            assert run is not None
            ctx = checks.CheckContext(
                session=session,
                run_id=run_id,
                since=since,
                until=until,
                now=now,
                config=config,
                stripe=stripe,
                reports=reports,
                prefetched=prefetched,
            )
            for name, check in CHECKS:
                if name in summary.skipped_checks:
                    ctx.prefetched.pop(name, None)
                    continue
                started = time.perf_counter()
                try:
                    for finding in check(ctx):
                        outcome = record_finding(session, run, finding, now=now)
                        summary.counts[finding.kind.value] = summary.counts.get(finding.kind.value, 0) + 1
                        summary.outcomes[outcome] = summary.outcomes.get(outcome, 0) + 1
                        tick(f"check:{name}", 1)
                except Exception as exc:
                    # A Stripe call inside the check failed: what it found so far stands, the rest is unknown.
                    if not is_source_error(exc):
                        raise
                    summary.skipped_checks[name] = f"stopped: {describe_source_error(exc)}"
                summary.timings[f"check:{name}"] = time.perf_counter() - started
                tick(f"check:{name}", 0)
            # Each payout's tie-out, kept for the review page and `billing-reconciler payouts` (upserted by id).
            record_payouts(session, run_id, [t for t in ctx.payouts if t.get("tie_out")], now=now)
            for future in ctx.prefetched.values():
                future.result()  # a skipped check's prefetch still finishes before the timings are read
            summary.timings.update(background_timings)  # every prefetch was taken by its check by now
            started = time.perf_counter()
            unobserved = {k for name in summary.skipped_checks for k in CHECK_KINDS.get(name, ())}
            summary.closed = close_unseen(
                session,
                run,
                windowed_kinds=[k for k in WINDOWED_KINDS if k not in unobserved],
                global_kinds=[k for k in GLOBAL_KINDS if k not in unobserved],
                scope_keys=sorted(ctx.provider_scope_keys),
                now=now,
            )
            clear_staging(session, run_id)
            summary.timings["close_and_clean"] = time.perf_counter() - started
            status = RunStatus.PARTIAL if summary.missed_sources or summary.skipped_checks else RunStatus.SUCCEEDED
            run.status = status
            run.finished_at = datetime.now(UTC)
            run.counts = dict(sorted(summary.counts.items()))
            run.stats = {
                "stripe_objects": summary.stripe_objects,
                "outcomes": summary.outcomes,
                "closed": summary.closed,
                "timings_seconds": {k: round(v, 3) for k, v in summary.timings.items()},
                "missed_sources": summary.missed_sources,
                "skipped_checks": summary.skipped_checks,
                "payouts": sum(1 for t in ctx.payouts if t.get("tie_out")),
            }
            if status is RunStatus.PARTIAL:
                run.error = (
                    "partial: "
                    + "; ".join(
                        [f"{k}: {v}" for k, v in sorted(summary.missed_sources.items())]
                        + [f"check {k} {v}" for k, v in sorted(summary.skipped_checks.items())]
                    )[:4000]
                )
        summary.status = status
        return summary
    except Exception as exc:
        if isinstance(target, Session):
            raise
        with _unit(target) as session:
            clear_staging(session, run_id)
            failed = session.get(ReconciliationRun, run_id)
            if failed is not None:
                failed.status = RunStatus.FAILED
                failed.finished_at = datetime.now(UTC)
                failed.error = f"{type(exc).__name__}: {exc}"[:4000]
        raise


def previous_utc_day(now: datetime) -> tuple[datetime, datetime]:
    """The window [yesterday 00:00, today 00:00) in UTC."""
    today = _aware("now", now).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=1), today
