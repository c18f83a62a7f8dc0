"""``billing-reconciler demo``: the whole system, end to end, in one command.

The steps: start the Stripe emulator, the receiver and a worker; deliver two months of signed Stripe webhooks
(duplicated and shuffled, two pieces held back); meter AI calls made with the official openai and anthropic SDKs,
wrapped by the client, against the demo's own provider (and more usage through the client); reconcile against the
emulator and against the sample provider reports; print balances and mismatches; keep serving the review pages.
"""

from __future__ import annotations

import shlex
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from sqlalchemy import func, select

from ledger.check import check_ledger
from ledger.config import get_billing_config
from ledger.db import session_factory, unit_of_work
from ledger.inbox import EventStatus, StripeEvent
from ledger.logs import configure_logging
from ledger.models import Hold, HoldStatus
from ledger.queries import balance_summary
from worker.demo import environment as env
from worker.demo import metering, report
from worker.demo.environment import DemoError
from worker.demo.provider import ProviderServer, SyntheticProvider
from worker.demo.stripe_script import eve_loses_a_dispute, make_story, window_end

INBOX_TIMEOUT_SECONDS = 90.0
SWEEP_EVERY_SECONDS = 3.0


@dataclass(frozen=True)
class DemoOptions:
    workdir: Path
    port: int | None  # None: 8000, or any free port when 8000 is taken
    host: str
    wait: bool
    reset: bool
    seed: int
    console: Console


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


class Progress:
    """One line per step, as it goes."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.started = time.perf_counter()

    def done(self, text: str) -> None:
        """A finished step."""
        elapsed = time.perf_counter() - self.started
        self.console.print(f"[green]✓[/green] {text} [dim]({elapsed:.1f}s)[/dim]")

    def note(self, text: str) -> None:
        """Something the user should know."""
        self.console.print(f"[yellow]![/yellow] {text}")

    @contextmanager
    def step(self, text: str) -> Iterator[None]:
        """A spinner while a step runs."""
        with self.console.status(text, spinner="dots"):
            yield


def inbox_counts(event_ids: set[str]) -> tuple[int, dict[str, int]]:
    """How many of ``event_ids`` are stored, and every stored event's count by status."""
    with unit_of_work() as session:
        by_status = {
            str(status.value if hasattr(status, "value") else status): int(n)
            for status, n in session.execute(
                select(StripeEvent.status, func.count()).group_by(StripeEvent.status)
            ).all()
        }
        stored = 0
        ids = sorted(event_ids)
        for start in range(0, len(ids), 500):
            stored += int(
                session.scalar(select(func.count()).where(StripeEvent.event_id.in_(ids[start : start + 500]))) or 0
            )
    return stored, by_status


def wait_for_inbox(event_ids: set[str], *, alive: Callable[[], None], timeout: float) -> dict[str, int]:
    """Wait until every delivered event is stored and handled by the worker; run the sweep if some lag."""
    from worker.tasks import sweep_unprocessed

    started = time.monotonic()
    last_sweep = started
    last_open: int | None = None
    settled_since = started
    while True:
        alive()
        stored, by_status = inbox_counts(event_ids)
        pending = by_status.get(EventStatus.PENDING.value, 0)
        waiting = by_status.get(EventStatus.WAITING.value, 0)
        now = time.monotonic()
        if stored == len(event_ids) and pending == 0:
            if waiting == 0:
                return by_status
            # A waiting event whose prerequisite never comes stays waiting: after a while, report it as is.
            if last_open != waiting:
                last_open, settled_since = waiting, now
            elif now - settled_since > 10:
                return by_status
        if now - last_sweep > SWEEP_EVERY_SECONDS:
            # Events stored but not handed over (or whose message was lost) are sent again by the sweep.
            sweep_unprocessed.delay(0)
            last_sweep = now
        if now - started > timeout:
            raise DemoError(
                f"the worker did not process the events within {timeout:.0f}s: {stored}/{len(event_ids)} stored, "
                f"statuses {by_status}",
                exit_code=1,
            )
        time.sleep(0.2)


def wait_for_hold_release(request_id: str, *, alive: Callable[[], None], timeout: float = 30.0) -> HoldStatus:
    """Run the hold-expiry job on the worker and wait until the timed-out hold is released."""
    from worker.tasks import release_expired_holds

    started = time.monotonic()
    sent = False
    while True:
        alive()
        with unit_of_work() as session:
            hold = session.scalars(select(Hold).where(Hold.request_id == request_id)).one()
            status, expires_at = HoldStatus(hold.status), hold.expires_at
        if status is not HoldStatus.OPEN:
            return status
        expires = expires_at if expires_at.tzinfo else expires_at.replace(tzinfo=UTC)
        if not sent and datetime.now(UTC) > expires:
            release_expired_holds.delay()
            sent = True
        if time.monotonic() - started > timeout:
            raise DemoError(f"the timed-out hold {request_id} was not released within {timeout:.0f}s", exit_code=1)
        time.sleep(0.2)


def deliver(
    story_store: Any, receiver_url: str, secret: str, events: list[Any], *, duplicates: float, seed: int
) -> Any:
    """Sign and POST the events to the receiver, as Stripe would."""
    return story_store.deliver_webhooks(
        f"{receiver_url}/webhooks/stripe", secret, events, duplicates=duplicates, shuffle=duplicates > 0, seed=seed
    )


def export_line(backend: env.Backend) -> str:
    """The shell line that points the CLI at the demo's database (PostgreSQL: the one already in DATABASE_URL)."""
    if backend.postgres:
        return "export DATABASE_URL=...  (the demo used the PostgreSQL database your DATABASE_URL names)"
    return f"export DATABASE_URL={shlex.quote(backend.database_url)}"


def run_demo(options: DemoOptions, *, emit: Callable[[dict[str, Any]], None] = lambda _s: None) -> dict[str, Any]:
    """Run the demo; hand the summary to ``emit``, then keep serving until Ctrl-C when asked to wait."""
    console = options.console
    progress = Progress(console)
    # First, so that a port asked for and taken stops the demo before it changes anything.
    listening = env.bind_port(options.host, options.port)
    emulator_mod = env.load_emulator()
    workdir = env.prepare_workdir(options.workdir)
    backend = env.choose_backend(workdir)
    for note in env.ignored_settings(backend):
        progress.note(note)
    if backend.broker_url:
        env.check_broker(backend.broker_url)
    creds = env.make_credentials()

    with ExitStack() as stack:
        now = datetime.now(UTC).replace(microsecond=0)
        store, story = make_story(emulator_mod, now=now, seed=options.seed)
        emulator = emulator_mod.EmulatorServer(store).start()
        stack.callback(emulator.stop)
        env.apply_settings(backend, creds, stripe_api_base=emulator.url)
        stack.callback(env.drop_stripe_connections)
        configure_logging("ERROR")  # the progress lines tell the story; warnings would interleave
        env.prepare_database(backend, reset=options.reset)
        progress.done(f"database ready: {report.safe_url(backend.database_url)} ({backend.label})")

        receiver = env.Receiver(listening).start()
        stack.callback(receiver.stop)
        if options.port is None and not receiver.url.endswith(f":{env.DEFAULT_PORT}"):
            progress.note(f"port {env.DEFAULT_PORT} is taken: serving on {receiver.url} instead")
        worker_proc: env.WorkerProcess | None = None
        if backend.broker_url:
            if options.reset:
                from worker.celery_app import get_app

                get_app().control.purge()  # messages left by an earlier run name rows that no longer exist
            worker_proc = env.WorkerProcess(workdir / "worker.log").start()
            stack.callback(worker_proc.stop)
        alive: Callable[[], None] = worker_proc.check_alive if worker_proc else (lambda: None)
        progress.done(
            f"Stripe emulator at {emulator.url}, receiver at {receiver.url}, worker: "
            + (
                f"process {worker_proc.proc.pid if worker_proc.proc else '?'} on the broker"
                if worker_proc
                else "in-process"
            )
        )

        # --- Stripe: two months of activity, delivered as signed webhooks -------------------------------------
        all_events = store.event_records()
        delivered_events = [e for e in all_events if e.id not in story.withheld_ids]
        with progress.step(f"delivering {len(delivered_events)} signed webhooks (duplicates, shuffled)..."):
            delivery = deliver(
                store, receiver.url, creds.webhook_secret, delivered_events, duplicates=0.25, seed=options.seed
            )
        duplicates = sum(1 for d in delivery.deliveries if d.duplicate)
        rejected = [d for d in delivery.deliveries if not d.ok]
        if rejected:
            raise DemoError(f"the receiver refused {len(rejected)} deliveries: {rejected[:3]}", exit_code=1)
        progress.done(
            f"{len(story.customers)} customers, {len(all_events)} Stripe events; delivered {len(delivery)} "
            f"({duplicates} duplicates, shuffled); held back {len(story.withheld_ids)} on purpose"
        )
        delivered_ids = {e.id for e in delivered_events}
        with progress.step("waiting for the worker to apply every event..."):
            statuses = wait_for_inbox(delivered_ids, alive=alive, timeout=INBOX_TIMEOUT_SECONDS)
        progress.done("worker applied the events: " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))

        # --- AI calls through the wrapped SDKs, and the usage API through the client ------------------------
        ids = {c.key: c.customer_id for c in story.customers}
        ai_provider = SyntheticProvider()
        provider_server = ProviderServer(ai_provider.app(), host=options.host).start()
        stack.callback(provider_server.stop)
        usage_log = metering.UsageLog()
        client = metering.DemoClient(receiver.url, creds.api_token, ai_provider, provider_server.url, usage_log)
        stack.callback(client.close)
        live = metering.meter_live(client, ids)
        failed_calls = [c for c in usage_log.calls if c.label in metering.MUST_SUCCEED and c.status not in (200, 201)]
        if failed_calls:
            first = failed_calls[0]
            raise DemoError(
                f"the usage API refused {len(failed_calls)} call(s); first: {first.method} {first.path} -> "
                f"{first.status} {first.body}",
                exit_code=1,
            )
        progress.done(
            f"metered {len(usage_log.ai_calls)} AI calls made with the openai and anthropic SDKs wrapped by the "
            f"client, against the demo's provider at {provider_server.url}; a retried usage record: "
            f"{live.retry_first.status} then {live.retry_second.status}; Fay refused {live.refused_access.status} "
            f"(the provider never called), Dan's oversized call {live.refused_credits.status}"
        )
        with progress.step("waiting for the timed-out hold to be released by the expiry sweep..."):
            hold_status = wait_for_hold_release(live.expired_hold_id, alive=alive)
        progress.done(f"hold {live.expired_hold_id} timed out and the expiry sweep released it ({hold_status.value})")

        plan: metering.ProviderPlan | None = None
        fixtures = env.provider_fixture_dir()
        if fixtures.is_dir() and metering.provider_reports(fixtures):
            plan = metering.plan_provider_usage(fixtures, get_billing_config())
            # The reports' volumes are real-sized (tens of dollars a day): they go to the customers whose
            # credits cover them, the top-up buyer and the Team plan that rolls over.
            owners = {
                ("openai", "proj_Ab12Cd34Ef56Gh78"): ids["ada"],
                ("openai", None): ids["ada"],
                ("anthropic", None): ids["cleo"],
            }
            n = metering.meter_provider_days(client, plan, owners)
            progress.done(
                f"metered {n} calls dated {plan.since.date()}..{(plan.until - timedelta(days=1)).date()} to match "
                f"{len(plan.reports)} provider reports, with {len(plan.discrepancies)} deliberate discrepancies"
            )
        else:
            progress.note(f"no sample provider reports at {fixtures}: skipping the provider reconciliation")

        # --- after Eve spent her credits, she loses a dispute --------------------------------------------------
        late = eve_loses_a_dispute(store, story, now=datetime.now(UTC))
        deliver(store, receiver.url, creds.webhook_secret, late, duplicates=0.0, seed=options.seed)
        with progress.step("waiting for the late dispute events..."):
            statuses = wait_for_inbox(delivered_ids | set(late), alive=alive, timeout=INBOX_TIMEOUT_SECONDS)
        progress.done(f"Eve's dispute opened and lost after she spent her credits ({len(late)} more events)")

        # --- reconciliation ----------------------------------------------------------------------------------
        from reconciliation.engine import reconcile
        from reconciliation.gateway import get_gateway

        runs = []
        stripe_since = story.since.replace(hour=0)
        stripe_until = window_end(datetime.now(UTC))
        with progress.step("reconciling the ledger against Stripe..."):
            runs.append(
                reconcile(session_factory(), get_gateway(), since=stripe_since, until=stripe_until, actor="demo")
            )
        progress.done(
            f"reconciled [{stripe_since.date()}, {stripe_until.date()}) against the emulator: {runs[-1].total} findings"
        )
        if plan is not None:
            with progress.step("reconciling usage against the provider reports..."):
                runs.append(
                    reconcile(
                        session_factory(),
                        get_gateway(),
                        since=plan.since,
                        until=plan.until,
                        provider_reports=plan.reports,
                        actor="demo",
                    )
                )
            progress.done(
                f"reconciled [{plan.since.date()}, {plan.until.date()}) against {len(plan.reports)} provider reports: "
                f"{runs[-1].total} findings"
            )

        # --- the summary -------------------------------------------------------------------------------------
        with unit_of_work() as session:
            balances = [report.balance_row(balance_summary(session, c.customer_id), c) for c in story.customers]
            violations = check_ledger(session)
            mismatches = report.open_mismatches(session)
            usage_by_model = report.usage_by_model(session, [c.customer_id for c in story.customers])
            ai_calls = metering.settled_ai_calls(session, usage_log)
        summary: dict[str, Any] = {
            "backend": backend.label,
            "database_url": report.safe_url(backend.database_url),
            "workdir": str(workdir),
            "urls": {
                "receiver": receiver.url,
                "webhooks": f"{receiver.url}/webhooks/stripe",
                "usage_api": f"{receiver.url}/v1",
                "review": f"{receiver.url}/review/",
                "openapi": f"{receiver.url}/openapi.json",
                "stripe_emulator": emulator.url,
            },
            "review_login": {"user": env.DEMO_USER, "password": creds.review_password},
            "api_token": creds.api_token,
            "window": {"since": stripe_since.isoformat(), "until": stripe_until.isoformat()},
            "customers": balances,
            "events": {
                "made": len(store.event_records()),
                "delivered": len(delivery) + len(late),
                "duplicates": duplicates,
                "withheld": sorted(story.withheld_ids),
                "by_status": statuses,
            },
            "usage": {
                "retry": [live.retry_first.as_dict(), live.retry_second.as_dict()],
                "expired_hold": {"request_id": live.expired_hold_id, "status": hold_status.value},
                "refused": [live.refused_access.as_dict(), live.refused_credits.as_dict()],
                "calls": len(usage_log.calls),
                "provider": provider_server.url,
            },
            "ai_calls": ai_calls,
            "reconciliation": {
                "runs": [r.as_dict() for r in runs],
                "open_mismatches_by_kind": dict(sorted(Counter(m["kind"] for m in mismatches).items())),
                "mismatches": mismatches,
            },
            "deliberate": report.deliberate_findings(story, plan, mismatches),
            "usage_by_model": usage_by_model,
            "ledger_check": {"violations": [v.__dict__ for v in violations]},
        }
        summary["export"] = export_line(backend)
        report.print_summary(console, summary, story)
        console.print(
            "\nTo run CLI commands on the demo's data (billing-reconciler balance, mismatches list, ...) in another "
            f"shell:\n  [bold]{summary['export']}[/bold]",
            soft_wrap=True,
        )
        emit(summary)

        if options.wait:
            console.print(
                f"\nServing the review pages at [bold]{summary['urls']['review']}[/bold] "
                f"(user [bold]{env.DEMO_USER}[/bold], password [bold]{creds.review_password}[/bold]). "
                "Press Ctrl-C to stop."
            )
            # Ctrl-C, or a SIGTERM from a service manager: stop the receiver and the worker cleanly either way.
            signal.signal(signal.SIGTERM, _interrupt)
            signal.signal(signal.SIGINT, _interrupt)
            try:
                while True:
                    alive()
                    time.sleep(0.5)
            except KeyboardInterrupt:
                console.print("stopping...")
        return summary
