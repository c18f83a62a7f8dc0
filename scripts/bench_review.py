"""Benchmark the review pages at volume: 100,000 mismatches and one customer with 1,000,000 ledger entries.

Creates a scratch PostgreSQL database next to the one DATABASE_URL names, migrates it, bulk-loads the volumes
with SQL (generate_series), then times each page through the app (ASGI, signed in, full rendering) and prints
min / median / p95 / max per page (min: least disturbed by a busy machine) and the ratios that show the
keyset pages do not grow with depth.

    DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/br_review python scripts/bench_review.py
    options: --mismatches N --entries N --repeat N --keep (leave the scratch database for inspection)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from reconciliation.models import MismatchKind

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import drop_database, scratch_database
from sqlalchemy import Engine, make_url, text

# Sizes for scripts/bench_all.py (smoke: the test suite's run; quick: its default; full: its --full).
BENCH_ALL = {
    "smoke": ["--mismatches", "500", "--entries", "2000", "--repeat", "2"],
    "quick": ["--mismatches", "20000", "--entries", "200000", "--repeat", "5"],
    "full": [],
}

CUSTOMER = "cus_big"
FLOOR = "floor: the login form (no database, same app and templates)"
DEEP_LIST = "mismatch list, open, deep keyset page (3/4 down)"
DEEP_LEDGER = "customer ledger, deep cursor page (99% down)"
OTHER_CUSTOMERS = 1000
RUNS = 365
KINDS = tuple(kind.value for kind in MismatchKind)


def _timed(label: str, fn: Callable[[], object]) -> None:
    start = time.perf_counter()
    fn()
    print(f"  {label:<58} {time.perf_counter() - start:7.1f} s", flush=True)


def load(engine: Engine, *, mismatches: int, entries: int) -> None:
    """Bulk-load accounts, the big customer's usage and ledger, runs, mismatches, audit rows and events."""
    kinds = "ARRAY[" + ",".join(f"'{k}'" for k in KINDS) + "]"
    steps: list[tuple[str, str]] = [
        (
            "accounts",
            f"""INSERT INTO accounts (customer_id, external_id, balance, held, debt, overdraft_limit, access_state)
            SELECT 'cus_' || g, 'user-' || g, 1000, 0, 0, 0, 'active' FROM generate_series(0, {OTHER_CUSTOMERS - 1}) g;
            INSERT INTO accounts (customer_id, external_id, balance, held, debt, overdraft_limit, access_state)
            VALUES ('{CUSTOMER}', 'big-co', 0, 0, 0, 0, 'active')""",
        ),
        (
            "grants (the big customer: one a month for a year)",
            f"""INSERT INTO grants (account_id, source, units, remaining, priority, expires_at, stripe_object_id,
                stripe_object_type, amount_minor, currency, idempotency_key, reason, actor, created_at)
            SELECT a.id, 'renewal', 100000000, 0, 10, now() + interval '30 days' - (g || ' months')::interval,
                'in_big_' || g, 'invoice', 100000, 'usd', 'bench:grant:' || g, 'Team plan', 'system',
                now() - (g || ' months')::interval
            FROM accounts a, generate_series(0, 11) g WHERE a.customer_id = '{CUSTOMER}'""",
        ),
        (
            f"usage_records ({entries:,}, over 365 days)",
            f"""INSERT INTO usage_records (account_id, request_id, user_id, workspace, feature, provider, model,
                operation, input_tokens, output_tokens, cached_tokens, provider_cost_usd, units, billable,
                environment, occurred_at)
            SELECT a.id, 'req_' || g, 'user_' || (g % 50), 'ws_' || (g % 5),
                (ARRAY['chat','search','summarize','report-writer','agent'])[1 + g % 5],
                CASE WHEN g % 3 = 0 THEN 'anthropic' ELSE 'openai' END,
                (ARRAY['gpt-4o-2024-08-06','claude-sonnet-4','gpt-4o-mini'])[1 + g % 3], NULL,
                500 + g % 2000, 100 + g % 700, g % 300, ((500 + g % 2000) * 0.0000025 + (100 + g % 700) * 0.00001),
                1 + g % 40, true, 'production',
                now() - interval '365 days' + (g::float8 / {entries} * 365) * interval '1 day'
            FROM accounts a, generate_series(1, {entries}) g WHERE a.customer_id = '{CUSTOMER}'""",
        ),
        (
            f"entries ({entries:,} for {CUSTOMER})",
            """INSERT INTO entries (account_id, kind, units, balance_after, idempotency_key, usage_id,
                stripe_object_id, actor, reason, created_at)
            SELECT u.account_id,
                CASE WHEN u.id % 5000 = 0 THEN 'adjustment' ELSE 'consume' END,
                -u.units, 1200000000 - sum(u.units) OVER (ORDER BY u.id), 'consume:' || u.request_id,
                u.id, NULL, 'api', '', u.occurred_at
            FROM usage_records u ORDER BY u.id""",
        ),
        (
            "balance",
            f"""UPDATE accounts SET balance = (SELECT coalesce(sum(units), 0) FROM entries e
                WHERE e.account_id = accounts.id) + 1200000000 WHERE customer_id = '{CUSTOMER}'""",
        ),
        (
            f"reconciliation_runs ({RUNS}, nightly)",
            f"""INSERT INTO reconciliation_runs (since, until, started_at, finished_at, status, actor, counts, stats,
                provider_reports)
            SELECT date_trunc('day', now()) - ((g + 1) || ' days')::interval,
                date_trunc('day', now()) - (g || ' days')::interval,
                date_trunc('day', now()) - (g || ' days')::interval + interval '5 minutes',
                date_trunc('day', now()) - (g || ' days')::interval + interval '9 minutes',
                'succeeded', 'system', '{{"amount_mismatch": 20, "payment_without_grant": 7}}', '{{}}', '[]'
            FROM generate_series({RUNS - 1}, 0, -1) g""",
        ),
        (
            f"mismatches ({mismatches:,})",
            f"""INSERT INTO mismatches (fingerprint, kind, status, customer_id, currency, unit, expected_amount,
                actual_amount, amounts_digest, summary, evidence, occurred_at, first_seen_run_id, last_seen_run_id,
                first_seen_at, last_seen_at, status_changed_at)
            SELECT md5('m' || g), ({kinds})[1 + g % {len(KINDS)}],
                CASE WHEN g % 50 < 40 THEN 'open' WHEN g % 50 < 45 THEN 'resolved'
                     WHEN g % 50 < 49 THEN 'ignored' ELSE 'closed' END,
                CASE WHEN g % 100 = 0 THEN '{CUSTOMER}' ELSE 'cus_' || (g % {OTHER_CUSTOMERS}) END,
                'usd', 'minor', 1000 + g % 9000, CASE WHEN g % 7 = 0 THEN NULL ELSE 1000 + (g * 37) % 11000 END,
                md5('a' || g), 'Stripe payment pi_bench_' || g || ' does not match the ledger',
                json_build_object('stripe', json_build_object('payment_intent', 'pi_bench_' || g,
                    'charge', 'ch_bench_' || g, 'amount', 1000 + g % 9000),
                    'ledger', json_build_object('grants', json_build_array(json_build_object('grant_id', 1 + g % 12)),
                    'entry_ids', json_build_array(g % {entries} + 1))),
                now() - ((g % {RUNS}) || ' days')::interval, 1 + (g % {RUNS}), {RUNS},
                now() - ((g % {RUNS}) || ' days')::interval + (g % 86400) * interval '1 second',
                now(), now()
            FROM generate_series(1, {mismatches}) g""",
        ),
        (
            "mismatch_actions (detected, plus a resolve/ignore where not open)",
            """INSERT INTO mismatch_actions (mismatch_id, run_id, actor, action, note, from_status, to_status, at)
            SELECT id, first_seen_run_id, 'system', 'detected', summary, NULL, 'open', first_seen_at FROM mismatches;
            INSERT INTO mismatch_actions (mismatch_id, run_id, actor, action, note, from_status, to_status, at)
            SELECT id, NULL, 'alice', CASE status WHEN 'resolved' THEN 'resolve' WHEN 'ignored' THEN 'ignore'
                ELSE 'auto_close' END, 'checked by hand', 'open', status, now()
            FROM mismatches WHERE status <> 'open'""",
        ),
        (
            "stripe_events (charge.succeeded, 20 a day for a year)",
            f"""INSERT INTO stripe_events (event_id, type, api_version, created, livemode, object_kind, object_id,
                customer_id, payload, source, received_at, status, attempts)
            SELECT 'evt_bench_' || g, 'charge.succeeded', '2024-06-20',
                now() - ((g % {RUNS}) || ' days')::interval, false, 'event', 'ch_bench_' || g,
                CASE WHEN g % 10 = 0 THEN '{CUSTOMER}' ELSE 'cus_' || (g % {OTHER_CUSTOMERS}) END,
                convert_to(json_build_object('id', 'evt_bench_' || g, 'object', 'event', 'type', 'charge.succeeded',
                    'data', json_build_object('object', json_build_object('id', 'ch_bench_' || g,
                    'object', 'charge', 'amount', 1000 + g % 9000, 'currency', 'usd',
                    'payment_intent', 'pi_bench_' || g)))::text, 'UTF8'),
                'webhook', now(), 'processed', 1
            FROM generate_series(1, {RUNS * 20}) g""",
        ),
    ]
    for label, sql in steps:

        def run(sql: str = sql) -> None:
            with engine.begin() as conn:
                for statement in sql.split(";\n"):
                    if statement.strip():
                        conn.execute(text(statement))

        _timed(label, run)

    def vacuum() -> None:
        # Steady state, as autovacuum leaves it: statistics and the visibility map for index-only scans.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))

    _timed("vacuum analyze", vacuum)


def measure(engine: Engine, *, repeat: int, entries: int, mismatches: int) -> list[tuple[str, list[float]]]:
    """Time each page, signed in, through the ASGI app; return (page, seconds per request)."""
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.testclient import TestClient

    from ledger import db
    from ledger.settings import get_settings
    from webhooks.review.app import create_review_app
    from webhooks.review.auth import hash_password

    os.environ["REVIEW_USERS"] = f"bench:{hash_password('bench-password')}"
    os.environ.setdefault("SECRET_KEY", "bench-secret")
    get_settings.cache_clear()
    db.set_engine(engine)
    app = Starlette(routes=[Mount("/review", app=create_review_app())])
    deep_row = int(mismatches * 0.8 * 0.75)  # three quarters down the open mismatches
    with engine.connect() as conn:
        mid_id = conn.execute(
            text("SELECT id FROM mismatches ORDER BY id LIMIT 1 OFFSET :n"), {"n": mismatches // 2}
        ).scalar()
        mid_seen = conn.execute(
            text(
                "SELECT first_seen_at, id FROM mismatches WHERE status = 'open' "
                "ORDER BY first_seen_at DESC, id DESC OFFSET :n LIMIT 1"
            ),
            {"n": deep_row},
        ).one()
        big = conn.execute(text("SELECT id FROM accounts WHERE customer_id = :c"), {"c": CUSTOMER}).scalar_one()
        deep_before = conn.execute(
            text("SELECT id FROM entries WHERE account_id = :a ORDER BY id OFFSET :n LIMIT 1"),
            {"a": big, "n": entries // 100},
        ).scalar_one()
    deep_cursor = quote(f"{mid_seen[0].isoformat()}~{mid_seen[1]}", safe="")
    pages = [
        (FLOOR, "/review/login"),
        ("mismatch list (newest, page 1)", "/review/mismatches"),
        ("mismatch list, status=open (newest)", "/review/mismatches?status=open"),
        ("mismatch list, status=open & sort=amount", "/review/mismatches?status=open&sort=amount"),
        ("mismatch list, status+kind+sort=oldest", "/review/mismatches?status=open&kind=amount_mismatch&sort=oldest"),
        ("mismatch list, one customer", "/review/mismatches?customer=cus_7"),
        ("mismatch list, date range + run", f"/review/mismatches?run={RUNS}&from=2026-01-01&to=2026-12-31"),
        (DEEP_LIST, f"/review/mismatches?status=open&sort=newest&after={deep_cursor}"),
        ("mismatch detail", f"/review/mismatches/{mid_id}"),
        ("runs page (365 runs, 30-day chart)", "/review/runs"),
        ("customer page (1M entries; ledger page 1, 30-day usage)", f"/review/customers/{CUSTOMER}"),
        (
            "customer ledger page 1 (usage window 1 day)",
            f"/review/customers/{CUSTOMER}?since=2026-11-01&until=2026-11-02",
        ),
        (
            DEEP_LEDGER,
            f"/review/customers/{CUSTOMER}?before={deep_before}&since=2026-11-01&until=2026-11-02",
        ),
        (
            "customer ledger, rare kind (adjustment)",
            f"/review/customers/{CUSTOMER}?kind=adjustment&since=2026-11-01&until=2026-11-02",
        ),
        (
            "customer ledger, find one request",
            f"/review/customers/{CUSTOMER}?find=req_123456&since=2026-11-01&until=2026-11-02",
        ),
        ("CSV export, one kind & open (~5,700 rows)", "/review/mismatches.csv?status=open&kind=amount_mismatch"),
    ]
    results: list[tuple[str, list[float]]] = []
    with TestClient(app, follow_redirects=False) as client:
        login = client.get("/review/login")
        token = login.text.split('name="csrf_token" value="')[1].split('"')[0]
        signed = client.post(
            "/review/login", data={"username": "bench", "password": "bench-password", "csrf_token": token}
        )
        assert signed.status_code == 303, signed.text
        for label, url in pages:
            first = client.get(url)  # warm-up (and a check)
            assert first.status_code == 200, (url, first.status_code, first.text[:500])
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                response = client.get(url)
                times.append(time.perf_counter() - start)
                assert response.status_code == 200
            results.append((label, times))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mismatches", type=int, default=100_000)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args()

    from ledger.db import make_engine
    from ledger.migrate import migrate
    from ledger.settings import get_settings

    url = make_url(get_settings().database_url)
    if not url.drivername.startswith("postgresql"):
        sys.exit("bench_review.py needs DATABASE_URL to name a PostgreSQL server (it creates a scratch database)")
    scratch = f"bench_review_{os.getpid()}"
    scratch_url = scratch_database(url.render_as_string(hide_password=False), scratch)
    engine = make_engine(scratch_url, pool_size=5)
    try:
        print(f"scratch database {scratch}: {args.mismatches:,} mismatches, {args.entries:,} entries for {CUSTOMER}")
        _timed("migrate", lambda: migrate(engine))
        load(engine, mismatches=args.mismatches, entries=args.entries)
        results = measure(engine, repeat=args.repeat, entries=args.entries, mismatches=args.mismatches)
        print(f"\nresponse times over {args.repeat} requests each (signed in, full page render):")
        print(f"  {'page':<58} {'min':>9} {'median':>9} {'p95':>9} {'max':>9}")
        medians: dict[str, float] = {}
        for label, times in results:
            ordered = sorted(times)
            p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
            medians[label] = statistics.median(times)
            print(
                f"  {label:<58} {ordered[0] * 1000:7.1f}ms {medians[label] * 1000:7.1f}ms"
                f" {p95 * 1000:7.1f}ms {ordered[-1] * 1000:7.1f}ms"
            )
        print("\nratios (1.0 = the deep page costs what the first does):")
        deep_list = medians[DEEP_LIST]
        first_list = medians["mismatch list, status=open (newest)"]
        deep_ledger = medians[DEEP_LEDGER]
        first_ledger = medians["customer ledger page 1 (usage window 1 day)"]
        print(f"  mismatch list deep page / page 1      {deep_list / first_list:5.2f}")
        print(f"  customer ledger deep page / page 1    {deep_ledger / first_ledger:5.2f}")
        floor = medians[FLOOR]
        customer_page = medians["customer page (1M entries; ledger page 1, 30-day usage)"]
        print(f"  customer page / floor                 {customer_page / floor:5.1f}")
        print(f"  mismatch list page 1 / floor          {medians['mismatch list (newest, page 1)'] / floor:5.1f}")
        load_average = os.getloadavg()[0]
        print(f"  load average during the run           {load_average:5.1f} (2 cores: above ~2, figures inflate)")
        slowest = max(medians, key=lambda k: medians[k])
        print(f"  slowest page: {slowest} ({medians[slowest] * 1000:.1f} ms median)")
    finally:
        engine.dispose()
        if not args.keep:
            drop_database(scratch_url)
        else:
            print(f"kept scratch database {scratch}")


if __name__ == "__main__":
    main()
