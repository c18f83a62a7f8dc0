"""Benchmark: reconcile 10k, 100k (and 1M) ledger entries against a proportional Stripe dataset in the emulator.

For each size it prints the wall time and peak memory of the reconciliation (run in a fresh subprocess, peak
memory = that process's VmHWM), the time spent paging Stripe, and beside it the time of one
``SELECT ... GROUP BY`` over the same ledger entries, with the ratios and the growth factors.

The Stripe side is what a real account shows: every charge and refund has its balance transaction (Stripe's fee,
net, settlement currency), one top-up in ``REFUND_EVERY`` is partly refunded (and clawed back in the ledger), and
payouts group the balance transactions, ``PAYOUT_EVERY`` top-ups each, so a payout's transactions are paged
(100 a page) like a busy account's daily payout. The run stages all of it: the charges' and refunds' balance
transactions (kept per grant in grant_settlements and refund_settlements), the payouts and what each paid out
(tied out and kept in the payouts table).

Target: 1M entries in at most 3x that query's time plus the Stripe paging time; peak memory flat (< 300 MB)
from 10k to 1M.

Ledger rows are generated in bulk with SQL (generate_series) and COPY, not through the ledger API, so setup is
fast. Needs PostgreSQL: DATABASE_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/br_recon_bench, created
if missing).

    python scripts/bench_reconcile.py                       # 10k and 100k
    python scripts/bench_reconcile.py --sizes 10000,100000,1000000
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from benchkit import figure, machine_load  # noqa: E402

# Sizes for scripts/bench_all.py (smoke: the test suite's run; quick: its default; full: its --full).
BENCH_ALL = {
    "smoke": ["--smoke"],
    "quick": ["--sizes", "10000,100000", "--seeded-customers", "200", "--seeded-faults", "3"],
    "full": ["--sizes", "10000,100000,1000000"],
}

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/br_recon_bench"
ENTRIES_PER_TOPUP = 100  # one Stripe top-up (session, payment intent, charge, ~4 events) per 100 ledger entries
TOPUPS_PER_CUSTOMER = 2
REFUND_EVERY = 20  # one top-up in 20 gets a quarter of its price refunded
PAYOUT_EVERY = 500  # top-ups (with their refunds) per payout: 1M entries make 20 payouts of ~525 transactions
USAGE_CHUNK = 1_000  # usage rows per transaction while seeding (the API writes one per transaction)
MODELS = (
    ("openai", "gpt-4o-2024-08-06", "proj_main", Decimal("0.0000025"), Decimal("0.00001")),
    ("openai", "gpt-4o-mini-2024-07-18", "proj_main", Decimal("0.00000015"), Decimal("0.0000006")),
    ("anthropic", "claude-sonnet-4-20250514", "wrkspc_main", Decimal("0.000003"), Decimal("0.000015")),
    ("anthropic", "claude-3-5-haiku-20241022", "wrkspc_main", Decimal("0.0000008"), Decimal("0.000004")),
)


def _ensure_database(url: str) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    target = make_url(url)
    admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": target.database}).first()
        if not exists:
            conn.execute(text(f'CREATE DATABASE "{target.database}"'))
    admin.dispose()


def _truncate(engine: Any) -> None:
    from sqlalchemy import text

    from ledger.db import Base

    names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))


# --- the Stripe side ---------------------------------------------------------------------------------------------


def build_stripe(store: Any, topups: int) -> list[dict[str, Any]]:
    """Customers and paid top-ups in the emulator; returns one row per top-up for the ledger's grants."""
    customers = max(1, topups // TOPUPS_PER_CUSTOMER)
    ids = [store.create_customer(email=f"b{i}@example.com").id for i in range(customers)]
    rows = []
    for i in range(topups):
        customer = ids[i % customers]
        price = "price_credits_large" if i % 3 == 0 else "price_credits_small"
        cs = store.topup(customer, price)
        store.clock.advance(seconds=60)
        units = 12000 if price == "price_credits_large" else 1000
        row = {"customer": customer, "pi": cs.payment_intent, "amount": cs.amount_total, "units": units}
        if i % REFUND_EVERY == 3:  # the fourth of every 20: the smoke run's ten top-ups have one
            refund = store.refund(cs, cs.amount_total // 4)
            # The worker's clawback: credits in proportion to the money refunded.
            row.update(refund=refund.id, refunded=refund.amount, clawed=units * refund.amount // cs.amount_total)
        rows.append(row)
        if (i + 1) % PAYOUT_EVERY == 0:
            store.create_payout()
    if topups % PAYOUT_EVERY:
        store.create_payout()
    return rows


# --- the ledger side, in bulk ----------------------------------------------------------------------------------


def build_ledger(engine: Any, store: Any, topups: list[dict[str, Any]], entries: int, since: datetime) -> None:
    """Accounts, grants and events by COPY; consumption entries and usage records by generate_series."""
    from sqlalchemy import text

    customers = sorted({t["customer"] for t in topups})
    account_of = {c: i + 1 for i, c in enumerate(customers)}
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        with cur.copy("COPY accounts (id, customer_id, balance) FROM STDIN") as copy:
            for c, i in account_of.items():
                copy.write_row((i, c, 0))
        with cur.copy(
            "COPY grants (id, account_id, source, units, remaining, stripe_object_id, stripe_object_type, "
            "amount_minor, currency, idempotency_key, reason, actor, clawed_back, refunded_minor) FROM STDIN"
        ) as copy:
            for n, t in enumerate(topups, start=1):
                clawed = t.get("clawed", 0)
                copy.write_row(
                    (
                        n,
                        account_of[t["customer"]],
                        "top_up",
                        t["units"],
                        t["units"] - clawed,
                        t["pi"],
                        "payment_intent",
                        t["amount"],
                        "usd",
                        f"topup:{t['pi']}",
                        "bench",
                        "bench",
                        clawed,
                        t.get("refunded", 0),
                    )
                )
        with cur.copy(
            "COPY entries (account_id, kind, units, balance_after, idempotency_key, grant_id, stripe_object_id, "
            "actor, reason) FROM STDIN"
        ) as copy:
            for n, t in enumerate(topups, start=1):
                copy.write_row(
                    (
                        account_of[t["customer"]],
                        "grant",
                        t["units"],
                        t["units"],
                        f"grant:topup:{t['pi']}",
                        n,
                        t["pi"],
                        "bench",
                        "",
                    )
                )
                if t.get("refund"):
                    # The refund's clawback, naming the refund as the worker's does.
                    copy.write_row(
                        (
                            account_of[t["customer"]],
                            "clawback",
                            -t["clawed"],
                            0,
                            f"clawback:{t['refund']}",
                            n,
                            t["refund"],
                            "bench",
                            "refund",
                        )
                    )
        with cur.copy(
            "COPY stripe_events (event_id, type, api_version, created, livemode, object_kind, object_id, "
            "customer_id, payload, source, status, received_at, processed_at) FROM STDIN"
        ) as copy:
            now = datetime.now(UTC)
            for ev in store.events():
                obj = ev["data"]["object"]
                customer = obj.get("customer") if isinstance(obj.get("customer"), str) else None
                copy.write_row(
                    (
                        ev["id"],
                        ev["type"],
                        ev.get("api_version"),
                        datetime.fromtimestamp(ev["created"], UTC),
                        False,
                        "event",
                        obj.get("id"),
                        customer,
                        json.dumps(ev).encode(),
                        "webhook",
                        "processed",
                        now,
                        now,
                    )
                )
        raw.commit()
    finally:
        raw.close()

    consumes = entries - len(topups) - sum(1 for t in topups if t.get("refund"))
    window_seconds = 27 * 86400
    n_accounts = len(customers)
    cases = " ".join(f"WHEN {i} THEN '{p}'" for i, (p, _m, _s, _ci, _co) in enumerate(MODELS))
    model_cases = " ".join(f"WHEN {i} THEN '{m}'" for i, (_p, m, _s, _ci, _co) in enumerate(MODELS))
    scope_cases = " ".join(f"WHEN {i} THEN '{s}'" for i, (_p, _m, s, _ci, _co) in enumerate(MODELS))
    cost_cases = " ".join(f"WHEN {i} THEN 1000 * {ci} + 200 * {co}" for i, (_p, _m, _s, ci, co) in enumerate(MODELS))
    usage = text(
        f"""
        INSERT INTO usage_records (id, account_id, request_id, user_id, workspace, feature, provider, model,
            input_tokens, output_tokens, cached_tokens, provider_cost_usd, units, billable, environment,
            occurred_at)
        SELECT i, 1 + (i % :accounts), 'req-' || i, 'u' || (i % 7), CASE i % 4 {scope_cases} END, 'chat',
            CASE i % 4 {cases} END, CASE i % 4 {model_cases} END, 1000, 200, 0,
            CASE i % 4 {cost_cases} END, 1, true, 'production',
            :since + make_interval(secs => (i * 7919) % :window)
        FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS i
        """
    )
    # Usage in many transactions, as the API writes it: the usage_daily trigger updates a roll-up row per usage
    # row, and one million-row transaction would keep every intermediate row version on disk (committed versions
    # are pruned as later transactions update the same rows).
    for first in range(1, consumes + 1, USAGE_CHUNK):
        with engine.begin() as conn:
            conn.execute(
                usage,
                {
                    "accounts": n_accounts,
                    "first": first,
                    "last": min(consumes, first + USAGE_CHUNK - 1),
                    "since": since + timedelta(days=1),
                    "window": window_seconds,
                },
            )
    with engine.begin() as conn:
        conn.execute(
            text(
                """
                INSERT INTO entries (account_id, kind, units, balance_after, idempotency_key, usage_id, actor, reason)
                SELECT 1 + (i % :accounts), 'consume', -1, 0, 'consume:req-' || i, i, 'bench', ''
                FROM generate_series(1::bigint, :n) AS i
                """
            ),
            {"accounts": n_accounts, "n": consumes},
        )
        conn.execute(text("SELECT setval(pg_get_serial_sequence('usage_records', 'id'), :n)"), {"n": consumes})
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))


def write_reports(engine: Any, out: Path) -> list[Path]:
    """OpenAI and Anthropic cost reports that agree with the ledger's usage (aggregated in SQL)."""
    from sqlalchemy import text

    rows = []
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT provider, (occurred_at AT TIME ZONE 'UTC')::date AS day, model, workspace, "
                "sum(provider_cost_usd) FROM usage_records GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4"
            )
        ).all()
    openai: dict[Any, list[str]] = {}
    anthropic: dict[Any, list[dict[str, Any]]] = {}
    for provider, day, model, scope, cost in rows:
        if provider == "openai":
            openai.setdefault(day, []).append(
                '{{"object": "organization.costs.result", "amount": {{"value": {}, "currency": "usd"}}, '
                '"line_item": "{}, input", "project_id": "{}"}}'.format(format(cost, "f"), model, scope)
            )
        else:
            anthropic.setdefault(day, []).append(
                {"currency": "USD", "amount": format(cost * 100, "f"), "model": model, "workspace_id": scope}
            )
    buckets = []
    for day, results in sorted(openai.items()):
        start = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())
        bucket = {"object": "bucket", "start_time": start, "end_time": start + 86400, "results": "@"}
        buckets.append(json.dumps(bucket).replace('"@"', "[" + ", ".join(results) + "]"))
    paths = [out / "openai_costs.json", out / "anthropic_cost.json"]
    paths[0].write_text('{{"object": "page", "data": [{}], "has_more": false}}'.format(", ".join(buckets)))
    paths[1].write_text(
        json.dumps(
            {
                "data": [
                    {"starting_at": f"{day.isoformat()}T00:00:00Z", "results": results}
                    for day, results in sorted(anthropic.items())
                ]
            }
        )
    )
    return paths


# --- the measured run, in its own process --------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a
    child forked from the (large) benchmark parent would report the parent's size."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TimedSource:
    """The Stripe gateway, timing every list call's pages (the Stripe fetch, apart from writing what it got)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not name.startswith("list_"):
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            items = iter(attr(*args, **kwargs))
            self.seconds += time.perf_counter() - started
            while True:
                started = time.perf_counter()
                try:
                    item = next(items)
                except StopIteration:
                    self.seconds += time.perf_counter() - started
                    return
                self.seconds += time.perf_counter() - started
                yield item

        return timed


# What the run keeps beyond its scratch rows: each paid grant's and refund's balance transaction, each payout.
KEPT_TABLES = ("grant_settlements", "refund_settlements", "payouts")


def kept_rows(engine: Any) -> dict[str, list[dict[str, Any]]]:
    """The rows the run wrote to the kept tables (the baseline inserts the same rows)."""
    from sqlalchemy import MetaData, select

    meta = MetaData()
    meta.reflect(engine, only=KEPT_TABLES)
    with engine.connect() as conn:
        return {name: [dict(r._mapping) for r in conn.execute(select(meta.tables[name]))] for name in KEPT_TABLES}


def time_plain_sql(
    engine: Any,
    pages: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]],
    kept: dict[str, list[dict[str, Any]]],
) -> dict[str, float]:
    """The baseline: the same staged rows inserted into tables of the same shape (same pages, same statements),
    the same settlement and payout rows inserted into copies of their tables (plain INSERT, 500 a statement),
    then the ledger's entries and the staged rows grouped by plain SQL, in one transaction."""
    from sqlalchemy import JSON, Column, MetaData, Table, insert, text
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    from reconciliation.models import StagedStripeAlias, StagedStripeObject

    def shaped(model: Any, name: str) -> Table:
        cols = [c for c in model.__table__.columns if not (c.primary_key and c.autoincrement is True)]
        return Table(name, MetaData(), *[Column(c.name, JSON if c.name == "detail" else c.type) for c in cols])

    objects, aliases = shaped(StagedStripeObject, "bench_staged_objects"), shaped(StagedStripeAlias, "bench_aliases")
    copies = {name: f"bench_{name}" for name in KEPT_TABLES}
    with engine.begin() as conn:
        for table, model in ((objects, StagedStripeObject), (aliases, StagedStripeAlias)):
            conn.execute(text(f"DROP TABLE IF EXISTS {table.name}"))
            conn.execute(text(f"CREATE TABLE {table.name} (LIKE {model.__tablename__} INCLUDING ALL)"))
        for name, copy in copies.items():
            conn.execute(text(f"DROP TABLE IF EXISTS {copy}"))
            conn.execute(text(f"CREATE TABLE {copy} (LIKE {name} INCLUDING ALL)"))
    meta = MetaData()
    meta.reflect(engine, only=list(copies.values()))
    with engine.begin() as conn:
        started = time.perf_counter()
        for rows, links in pages:
            if rows:
                conn.execute(insert(objects), rows)
            if links:
                conn.execute(pg_insert(aliases).on_conflict_do_nothing(index_elements=["run_id", "key"]), links)
        for name, copy in copies.items():
            rows = kept[name]
            for start in range(0, len(rows), 500):
                conn.execute(insert(meta.tables[copy]), rows[start : start + 500])
        inserted = time.perf_counter() - started
        started = time.perf_counter()
        conn.execute(text("SELECT account_id, kind, count(*), sum(units) FROM entries GROUP BY account_id, kind")).all()
        conn.execute(
            text(
                "SELECT customer_id, object_type, count(*), sum(amount) FROM bench_staged_objects"
                " GROUP BY customer_id, object_type"
            )
        ).all()
        grouped = time.perf_counter() - started
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE bench_staged_objects, bench_aliases, " + ", ".join(copies.values())))
    return {"insert": inserted, "group_by": grouped}


def child(args: argparse.Namespace) -> None:
    """Run one reconciliation and print its figures as JSON (peak memory is this process's VmHWM)."""
    from ledger.db import make_engine, session_factory, set_engine
    from reconciliation import staging
    from reconciliation.engine import reconcile
    from reconciliation.gateway import StripeGateway

    engine = make_engine(args.url)
    set_engine(engine)
    gateway = TimedSource(StripeGateway(api_key="sk_test_bench", api_base=args.api_base))
    # The staging writes, timed and kept (the baseline inserts the same rows).
    pages: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]] = []
    write_seconds = [0.0]
    flush = staging.Stager._flush

    def timed_flush(self: Any, kind: str, objects: list[dict[str, Any]], aliases: list[dict[str, Any]]) -> None:
        pages.append(([dict(o) for o in objects], [dict(a) for a in aliases if a]))
        started = time.perf_counter()
        flush(self, kind, objects, aliases)
        write_seconds[0] += time.perf_counter() - started

    staging.Stager._flush = timed_flush  # type: ignore[method-assign]

    write_by_step: dict[str, float] = {}

    def timed(fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - started
                write_seconds[0] += spent
                write_by_step[fn.__name__] = write_by_step.get(fn.__name__, 0.0) + spent

        return wrapper

    # The other staging writes: each grant's and refund's settlement (upserts), and the payouts table.
    kept_writers = {
        "record_settlements": staging.Stager.record_settlements,
        "record_refund_settlements": staging.Stager.record_refund_settlements,
    }
    for name, fn in kept_writers.items():
        setattr(staging.Stager, name, timed(fn))
    from reconciliation import engine as engine_module

    record_payouts = engine_module.record_payouts
    engine_module.record_payouts = timed(record_payouts)  # type: ignore[assignment]
    # The peak resident memory when each step ends, to tell which step grows if one does.
    memory_by_step: dict[str, float] = {}
    last: list[str] = [""]

    def tick(step: str, _n: int) -> None:
        if step != last[0]:
            if last[0]:
                memory_by_step[last[0]] = peak_rss_mb()
            last[0] = step

    memory_by_step["start"] = peak_rss_mb()
    started = time.perf_counter()
    summary = reconcile(
        session_factory(),
        gateway,
        progress=tick,
        since=datetime.fromisoformat(args.since),
        until=datetime.fromisoformat(args.until),
        provider_reports=[Path(p) for p in args.reports],
        actor="bench",
    )
    wall = time.perf_counter() - started
    memory_by_step[last[0] or "end"] = peak_rss_mb()
    peak_mb = peak_rss_mb()
    staging.Stager._flush = flush  # type: ignore[method-assign]
    for name, fn in kept_writers.items():
        setattr(staging.Stager, name, fn)
    engine_module.record_payouts = record_payouts  # type: ignore[assignment]
    timings = summary.timings
    comparison = sum(
        v for k, v in timings.items() if k == "prepare" or k.startswith("check:") or k == "close_and_clean"
    )
    kept = kept_rows(engine)
    baseline = time_plain_sql(engine, pages, kept)
    print(
        json.dumps(
            {
                "wall": wall,
                "paging": timings.get("stripe_paging", 0.0),
                "fetch": gateway.seconds,
                "write": write_seconds[0],
                "comparison": comparison,
                "staged_rows": sum(len(rows) + len(links) for rows, links in pages)
                + sum(len(v) for v in kept.values()),
                "kept_rows": {k: len(v) for k, v in kept.items()},
                "write_by_step": write_by_step,
                "baseline_insert": baseline["insert"],
                "baseline_group_by": baseline["group_by"],
                "peak_mb": peak_mb,
                "mismatches": summary.total,
                "counts": summary.counts,
                "stripe_objects": sum(summary.stripe_objects.values()),
                "timings": timings,
                "memory_by_step": memory_by_step,
            }
        )
    )


def run_child(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the measured reconciliation's process; on failure, show what it said."""
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"the reconciliation process failed (exit {out.returncode}); its output is above")
    return out


def run_size(entries: int, url: str, workdir: Path) -> dict[str, Any]:
    from stripe_emulator import Clock, EmulatorServer, Store

    from ledger.db import make_engine
    from ledger.migrate import migrate

    engine = make_engine(url)
    migrate(engine)
    _truncate(engine)
    since = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=28)
    until = since + timedelta(days=30)
    topups = max(1, entries // ENTRIES_PER_TOPUP)
    store = Store(clock=Clock(since))
    started = time.perf_counter()
    rows = build_stripe(store, topups)
    stripe_setup = time.perf_counter() - started
    started = time.perf_counter()
    build_ledger(engine, store, rows, entries, since)
    reports = write_reports(engine, workdir)
    ledger_setup = time.perf_counter() - started
    engine.dispose()

    server = EmulatorServer(store).start()
    try:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--url",
            url,
            "--api-base",
            server.url,
            "--since",
            since.isoformat(),
            "--until",
            until.isoformat(),
            "--reports",
            *map(str, reports),
        ]
        env = {**os.environ, "DATABASE_URL": url}
        out = run_child(cmd, env)
    finally:
        server.stop()
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(
        entries=entries,
        topups=topups,
        events=store.count("event"),
        stripe_setup=stripe_setup,
        ledger_setup=ledger_setup,
    )
    return result


def run_seeded(url: str, workdir: Path, customers: int, faults: int) -> dict[str, Any]:
    """A month for ``customers`` customers built through the ledger API with ``faults`` faults of each kind
    injected (tests/reconciliation/seeded.py), reconciled and timed; the mismatches found against those seeded."""
    from stripe_emulator import Clock, EmulatorServer, Store

    from ledger.config import get_billing_config
    from ledger.db import make_engine, set_engine
    from ledger.migrate import migrate
    from ledger.settings import get_settings
    from tests.reconciliation import seeded
    from tests.reconciliation.builders import TEST_BILLING_CONFIG

    config = workdir / "seeded_billing.toml"
    config.write_text(TEST_BILLING_CONFIG, encoding="utf-8")
    os.environ["BILLING_CONFIG"] = str(config)
    get_settings.cache_clear()  # settings name the config file: read both afresh
    get_billing_config.cache_clear()
    engine = make_engine(url)
    migrate(engine)
    _truncate(engine)
    set_engine(engine)
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=28)
    store = Store(clock=Clock(start))
    world = seeded.build(store, workdir, customers=customers, faults=faults)
    server = EmulatorServer(store).start()
    try:
        cmd = [
            sys.executable, __file__, "--child", "--url", url, "--api-base", server.url,
            "--since", world.since.isoformat(), "--until", world.until.isoformat(), "--reports",
            *map(str, world.reports),
        ]  # fmt: skip
        env = {**os.environ, "DATABASE_URL": url}
        out = run_child(cmd, env)
    finally:
        server.stop()
        set_engine(None)
        engine.dispose()
        os.environ.pop("BILLING_CONFIG", None)
        get_settings.cache_clear()
        get_billing_config.cache_clear()
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["seeded"] = {k.value: len(v) for k, v in world.expected.items()}
    result["customers"] = customers
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated ledger entry counts")
    parser.add_argument("--url", default=os.environ.get("BENCH_DATABASE_URL", DEFAULT_URL))
    parser.add_argument("--json", type=Path, help="also write every figure (all step timings) to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--api-base", help=argparse.SUPPRESS)
    parser.add_argument("--since", help=argparse.SUPPRESS)
    parser.add_argument("--until", help=argparse.SUPPRESS)
    parser.add_argument("--reports", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument(
        "--seeded-customers", type=int, default=200, help="customers of the seeded-faults run (0: skip)"
    )
    parser.add_argument("--seeded-faults", type=int, default=10, help="faults of each kind in the seeded run")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: 1,000 entries, no seeded run")
    args = parser.parse_args()
    if args.smoke:
        # The seeded run is left out: building its month through the ledger API and paging it takes tens of
        # seconds (tests/reconciliation/test_seeded_faults.py covers that path).
        args.sizes, args.seeded_customers = "1000", 0
    if args.child:
        child(args)
        return
    if not args.url.startswith("postgresql"):
        parser.error("the benchmark needs PostgreSQL (generate_series, COPY)")
    os.environ["DATABASE_URL"] = args.url
    _ensure_database(args.url)
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / "bench_reconcile"
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    header = (
        f"{'entries':>9} {'topups':>7} {'events':>7} {'reconcile s':>11} {'fetch s':>8} {'write s':>8} "
        f"{'compare s':>9} {'plain SQL s':>11} {'ratio':>6} {'peak MB':>8} {'mismatches':>10}"
    )
    print(header)
    ours = (
        "staging write + comparison: the reconciliation writing the staged Stripe rows (balance transactions and"
        " payouts included) and the kept settlements and payouts, then its checks"
    )
    plain = (
        "plain SQL: the same staged rows inserted into same-shaped tables (same pages), the same settlement and"
        " payout rows inserted into copies of their tables, then GROUP BY over the ledger's entries and over the"
        " staged rows"
    )
    for size in sizes:
        r = run_size(size, args.url, workdir)
        results.append(r)
        ours_s = r["write"] + r["comparison"]
        plain_s = r["baseline_insert"] + r["baseline_group_by"]
        r["ratio"] = ratio = ours_s / plain_s if plain_s else float("inf")
        print(
            f"{r['entries']:>9} {r['topups']:>7} {r['events']:>7} {r['wall']:>11.3f} {r['fetch']:>8.3f} "
            f"{r['write']:>8.3f} {r['comparison']:>9.3f} {plain_s:>11.3f} {ratio:>6.2f} {r['peak_mb']:>8.1f} "
            f"{r['mismatches']:>10}",
            flush=True,
        )
        kept = ", ".join(f"{k} {v:,}" for k, v in r["kept_rows"].items())
        kept_writes = ", ".join(f"{k} {v:.3f}s" for k, v in r["write_by_step"].items())
        print(f"           kept: {kept}; Stripe objects paged {r['stripe_objects']:,}", flush=True)
        print(f"           of the write: {kept_writes}; the rest is the staged pages' inserts", flush=True)
        slow = sorted(((v, k) for k, v in r["timings"].items() if k != "stripe_paging"), reverse=True)[:4]
        print("           slowest steps: " + ", ".join(f"{k} {v:.3f}s" for v, k in slow), flush=True)
        steps = list(r["memory_by_step"].items())
        growth = [(b[1] - a[1], b[0]) for a, b in itertools.pairwise(steps)]
        grew = ", ".join(f"{where} +{mb:.0f}" for mb, where in sorted(growth, reverse=True)[:3] if mb >= 1)
        print(f"           peak memory grew (MB) in: {grew or 'no step'}; at start {steps[0][1]:.0f} MB", flush=True)
        figure(
            f"reconcile {size:,} entries ({r['staged_rows']:,} staged rows, {r['kept_rows']['payouts']} payouts)",
            f"{ours_s:.3f} s (write {r['write']:.3f} + compare {r['comparison']:.3f}); Stripe fetch"
            f" {r['fetch']:.3f} s apart; wall {r['wall']:.3f} s; peak {r['peak_mb']:.0f} MB",
            baseline=f"plain SQL {plain_s:.3f} s (insert {r['baseline_insert']:.3f} + GROUP BY"
            f" {r['baseline_group_by']:.3f})",
            ratio=ratio,
            work=ours,
            baseline_work=plain,
        )
    print()
    print(
        "fetch = time inside the Stripe client's list calls (HTTP to the emulator, JSON); write = staging inserts"
        " and the settlement and payout upserts;"
    )
    print("compare = prepare + every check + closing unseen mismatches and clearing staging")
    print(f"ratio = (write + compare) / plain SQL, where {plain}   (target: <= 3)")
    if len(results) > 1:
        first, last = results[0], results[-1]
        scale = last["entries"] / first["entries"]
        time_growth = last["wall"] / first["wall"]
        memory_growth = last["peak_mb"] / first["peak_mb"]
        print(
            f"growth {first['entries']} -> {last['entries']} entries (x{scale:.0f}): reconcile time "
            f"x{time_growth:.1f}, peak memory x{memory_growth:.2f} "
            f"({first['peak_mb']:.0f} MB -> {last['peak_mb']:.0f} MB)"
        )
    worst = max(r["peak_mb"] for r in results)
    median_ratio = statistics.median(r["ratio"] for r in results)
    print(f"peak memory max {worst:.0f} MB (target < 300 MB, flat); median ratio {median_ratio:.2f}")
    if args.seeded_customers:
        r = run_seeded(args.url, workdir, args.seeded_customers, args.seeded_faults)
        expected = sum(r["seeded"].values())
        found = sum(r["counts"].values())
        ours_s = r["write"] + r["comparison"]
        plain_s = r["baseline_insert"] + r["baseline_group_by"]
        print(
            f"seeded faults: {r['customers']} customers, {expected} faults injected, {found} mismatches found;"
            f" reconcile {r['wall']:.3f} s (fetch {r['fetch']:.3f}, write {r['write']:.3f},"
            f" compare {r['comparison']:.3f}); plain SQL {plain_s:.3f} s"
        )
        figure(
            f"reconcile with seeded faults, {r['customers']} customers, {expected} faults",
            f"{ours_s:.3f} s (write {r['write']:.3f} + compare {r['comparison']:.3f}), {found} found;"
            f" Stripe fetch {r['fetch']:.3f} s apart",
            baseline=f"plain SQL {plain_s:.3f} s",
            ratio=ours_s / plain_s if plain_s else "inf",
            work=ours + " (a month built through the ledger API, faults of every kind injected)",
            baseline_work=plain,
        )
        r["ratio"] = ours_s / plain_s if plain_s else None
        results.append(r)
        if found != expected:
            print(
                f"seeded faults: found {found} mismatches, {expected} seeded: MISSED OR EXTRA"
                f" (found by kind {r['counts']}, seeded {r['seeded']})",
                file=sys.stderr,
            )
            sys.exit(1)
    print(f"machine: {machine_load()} at the end")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
