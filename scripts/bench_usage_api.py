"""Benchmark the usage API: POST /v1/usage, a hold plus its capture, and POST /v1/usage/batch, over HTTP.

It starts ``billing-reconciler serve`` itself on a scratch PostgreSQL database seeded with 10,000 accounts, and
drives it from a load generator in a second process (scripts/loadgen.py: asyncio, raw HTTP/1.1 keep-alive). The
closed loop (each connection sends its next request when the last is answered) finds the maximum; for 1 and 2
server workers it measures:

- ``/healthz`` through the same generator: the generator's own ceiling (if it is far above the API's rate, the
  generator is not what limits the API) and the server's trivial rate;
- ``POST /v1/usage`` at 64 connections: requests/s, p50, p99; each request charges 1 credit to a random account;
- the same ``POST /v1/usage`` open loop (a constant arrival rate, like wrk2) at 50% and 80% of that maximum: p50
  and p99 counted from each request's due time, so queueing at that rate is in them;
- a hold and its capture (``POST /v1/holds`` then ``POST /v1/holds/{id}/capture`` on the same connection, one
  unit of the generator) at 64 connections: pairs/s;
- ``POST /v1/usage/batch`` with 100 events a batch at 8 connections: events/s into the ledger.

Baselines, in the same run, alternating with the HTTP runs so other load on the machine weighs on both alike:
pgbench's C client driving the same ledger functions on the same database and accounts, prepared (``-M
prepared``), each statement its own transaction as the API sends it: ``ledger_consume`` once per transaction
(32 clients, the physical limit of the single call); ``ledger_hold`` then ``ledger_capture`` (32 clients; the
pair is pgbench's transaction); ``ledger_consume_many`` with 100 random accounts a call (8 clients). The ratios
say what share of the database's own rate the API delivers with HTTP, JSON, auth and Python on top.

``--limits`` measures instead what limits cost (issue 14's target: at most 15% of the consume rate):
``POST /v1/usage`` with attributed usage (operation, user, model, provider cost) at 64 connections, against a
server whose billing config has three limits that apply to every call (requests per customer per hour, tokens per
user per day, the cost of gpt-4* models per month; maxima never reached) and one notification endpoint, beside the
same calls against a server with no config; the two alternate, ``--rounds`` times each after one unmeasured round
each, 1 worker. Measured in the steady state: the windows' counters (2 per customer, 1 per customer and user)
exist beforehand, as they do after a window's first calls (creating one is an insert instead of an update, once per
scope value and window). Beside the rates it prints each round's CPU per call, the server's and PostgreSQL's (read
from /proc), which the machine's other load moves far less than the rates.

``--sqlite`` also measures the embedded default (a SQLite file, 1,000 accounts, 1 worker; no target). ``--quick``
uses small sizes (a smoke run: the figures mean little). Needs pgbench and PostgreSQL.

    python scripts/bench_usage_api.py
    python scripts/bench_usage_api.py --quick --json /tmp/usage.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import (  # noqa: E402
    Server,
    autovacuum,
    cpu_since,
    drop_database,
    figure,
    machine_load,
    postgres_cpu,
    run_pgbench,
    scratch_database,
    vacuum,
)

START_UNITS = 10**12
TOKEN = "tok_bench"
TARGET_USAGE_RATIO = 0.60
TARGET_P99_MS = 50.0
TARGET_HOLD_RATIO = 0.40
TARGET_BATCH_RATE = 20_000.0
OPEN_LOOP_SHARES = (0.5, 0.8)  # open-loop arrival rates of POST /v1/usage, as shares of the closed loop's maximum
TARGET_LIMITS_COST = 0.15
# Three limits every benchmark call falls under (maxima never reached) and one notification endpoint.
LIMITS_CONFIG = """
[[limits]]
name = "requests-per-customer-hourly"
window = "hour"
max_requests = 1000000000000

[[limits]]
name = "tokens-per-user-daily"
scope = "user"
window = "day"
max_tokens = 1000000000000000

[[limits]]
name = "gpt4-cost-monthly"
model = "gpt-4*"
window = "month"
max_cost_usd = "100000000"

[[notifications.endpoints]]
url = "http://127.0.0.1:9/billing-events"
events = ["*"]
secret_env = "BENCH_NOTIFY_SECRET"
"""

# Sizes for scripts/bench_all.py: smoke runs every path in seconds, with few connections (the test suite runs it
# beside other scripts on one PostgreSQL server).
BENCH_ALL = {
    "smoke": ["--quick", "--connections", "8", "--clients", "4", "--batch-clients", "2"],
    "quick": ["--quick"],
    "full": ["--sqlite"],
}


# --- load generator (runs in its own process) ------------------------------------------------------------------


def _post(path: str, body: bytes) -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path.encode(), TOKEN.encode(), len(body), body)
    )


def _drive(options: dict[str, Any]) -> dict[str, Any]:
    """One load run through scripts/loadgen.py: closed loop, or open loop at ``options['rate']`` requests/s."""
    from loadgen import Exchange, MakeRequest, closed_loop, open_loop

    mode, accounts, batch = options["mode"], options["accounts"], options["batch"]
    run = uuid.uuid4().hex[:8]
    rng = random.Random(run)

    def usage_body(n: int, suffix: str = "") -> bytes:
        account = rng.randint(1, accounts)
        return b'{"customer_id":"bench_%d","request_id":"%s-%d%s","units":1}' % (
            account, run.encode(), n, suffix.encode()
        )  # fmt: skip

    def healthz(_n: int) -> bytes:
        return b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n"

    def usage(n: int) -> bytes:
        return _post("/v1/usage", usage_body(n))

    def usage_attributed(n: int) -> bytes:
        # A call as a product reports it: who, what, which model, its tokens and provider cost.
        account = rng.randint(1, accounts)
        return _post(
            "/v1/usage",
            b'{"customer_id":"bench_%d","request_id":"%s-%d","units":1,"operation":"chat","user_id":"u_%d",'
            b'"provider":"openai","model":"gpt-4o-2024-08-06","input_tokens":1200,"output_tokens":300,'
            b'"provider_cost_usd":"0.0072"}' % (account, run.encode(), n, rng.randint(1, 20)),
        )

    def hold_capture(n: int) -> Exchange:
        status, _body = yield _post("/v1/holds", usage_body(n))
        if status == 201:  # the hold's id is its request id
            yield _post(f"/v1/holds/{run}-{n}/capture", b"{}")

    def usage_batch(n: int) -> bytes:
        events = b",".join(usage_body(n, f"-{k}") for k in range(batch))
        return _post("/v1/usage/batch", b'{"events":[%s]}' % events)

    wanted = {"healthz": 200, "usage": 201, "usage_attributed": 201, "hold_capture": 200, "batch": 200}[mode]

    def classify(status: int, body: bytes) -> str:
        if status == wanted and (mode != "batch" or body.count(b'"status":201') == batch):
            return "ok"
        return f"status {status}"

    makers: dict[str, MakeRequest] = {
        "healthz": healthz, "usage": usage, "usage_attributed": usage_attributed, "hold_capture": hold_capture,
        "batch": usage_batch,
    }  # fmt: skip
    make = makers[mode]
    common: dict[str, Any] = {
        "duration": options["duration"], "warmup": options["warmup"], "connections": options["connections"],
        "classify": classify, "ok": ("ok",),
    }  # fmt: skip
    cpu_before = time.process_time()
    if options.get("rate"):
        result = open_loop(options["host"], options["port"], make, rate=options["rate"], **common)
    else:
        result = closed_loop(options["host"], options["port"], make, **common)
    cpu = time.process_time() - cpu_before
    units = batch if mode == "batch" else 1  # a batch counts only when every one of its events was created
    return {
        "mode": mode,
        "loop": result.mode,
        "offered_rate": result.offered_rate,
        "requests": result.requests,
        "outcomes": result.counts,
        "rate": result.rate * units,
        "request_rate": result.rate,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "max_send_lag_ms": result.max_send_lag_ms,
        "loadgen_cpu_share": cpu / (options["duration"] + options["warmup"]),
    }


def loadgen_main(options_json: str) -> None:
    print(json.dumps(_drive(json.loads(options_json))))


def run_loadgen(
    port: int,
    mode: str,
    args: argparse.Namespace,
    *,
    connections: int,
    accounts: int,
    rate: float | None = None,
) -> dict[str, Any]:
    """Run the load generator in a second process (closed loop, or open loop at ``rate``); return its figures."""
    options = {
        "host": "127.0.0.1", "port": port, "mode": mode, "connections": connections, "accounts": accounts,
        "duration": args.duration, "warmup": args.warmup, "batch": args.batch, "rate": rate,
    }  # fmt: skip
    out = subprocess.run(
        [sys.executable, __file__, "--loadgen", json.dumps(options)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"the load generator ({mode}) failed: {out.stderr.strip()[-2000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# --- server and database -----------------------------------------------------------------------------------------


def server_env(database_url: str, billing_config: Path | None = None) -> dict[str, str]:
    """The server's settings: the database, the benchmark's API token, no broker, quiet logs (and a billing config
    with its notification secret, when given; else the shipped example's, which has no limits)."""
    env = {"DATABASE_URL": database_url, "API_TOKENS": TOKEN, "LOG_LEVEL": "WARNING", "CELERY_BROKER_URL": ""}
    if billing_config is not None:
        env.update(BILLING_CONFIG=str(billing_config), BENCH_NOTIFY_SECRET="whsec_bench")
    return env


def seed(url: str, accounts: int) -> None:
    """Migrate and seed ``accounts`` accounts ``bench_1``..., each with one large grant (and on PostgreSQL one
    captured hold), keeping every invariant."""
    from sqlalchemy import text

    from ledger import db
    from ledger.migrate import migrate

    engine = db.make_engine(url)
    migrate(engine)
    with engine.begin() as conn:
        for statement in (
            "WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < :n) "
            "INSERT INTO accounts (customer_id, balance) SELECT 'bench_' || g, :units FROM s",
            "INSERT INTO grants (account_id, source, units, remaining, idempotency_key, reason, actor) "
            "SELECT id, 'top_up', :units, :units, 'bench-' || id, 'benchmark', 'bench' FROM accounts",
            "INSERT INTO entries (account_id, kind, units, balance_after, idempotency_key, grant_id, actor, reason) "
            "SELECT account_id, 'grant', units, units, 'grant:' || idempotency_key, id, 'bench', 'benchmark' "
            "FROM grants",
        ):
            conn.execute(text(statement), {"units": START_UNITS, "n": accounts})
    if engine.dialect.name == "postgresql":
        # A history of holds, one captured hold per account, through the ledger's own functions: every run then
        # starts on a holds table with rows (as in production). Analyzed while empty, the holds table made every
        # lookup of a hold by its request id, and the entries' check of their hold, a sequential scan for the
        # rest of the run (measured under pgbench: 150 µs each instead of a few); the API's holds, measured before
        # pgbench's, were the only side to start so.
        with engine.begin() as conn:
            conn.execute(
                text(
                    "SELECT count(ledger_hold('bench_' || g, 'seed-h-' || g, 'hold:seed-h-' || g, 1, 'seed', 'bench',"
                    " now(), now() + interval '1 hour', NULL)) FROM generate_series(1, :n) g"
                ),
                {"n": accounts},
            )
            conn.execute(
                text(
                    "SELECT count(ledger_capture('seed-h-' || g, NULL, 'seed', 'bench', now(), NULL, NULL))"
                    " FROM generate_series(1, :n) g"
                ),
                {"n": accounts},
            )
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
    engine.dispose()


# pgbench scripts: the ledger functions the API calls, each statement its own transaction as the API sends it.
# (A colon inside a string literal followed by a letter would be read as a pgbench variable: 'consume:' || ...)
PGBENCH_CONSUME = """\\set aid random(1, {accounts})
\\set k random(1, 1000000000000)
SELECT status FROM ledger_consume('bench_' || :aid::text, 'pgb-' || :client_id::text || '-' || :k::text,
  'consume:' || 'pgb-' || :client_id::text || '-' || :k::text, 1, 'pgbench', 'pgbench', '', now(), NULL);
"""
PGBENCH_HOLD_CAPTURE = """\\set aid random(1, {accounts})
\\set k random(1, 1000000000000)
SELECT status FROM ledger_hold('bench_' || :aid::text, 'pgh-' || :client_id::text || '-' || :k::text,
  'hold:' || 'pgh-' || :client_id::text || '-' || :k::text, 1, 'pgbench', 'pgbench', now(),
  now() + interval '10 minutes', NULL);
SELECT status FROM ledger_capture('pgh-' || :client_id::text || '-' || :k::text, NULL, 'pgbench', 'pgbench',
  now(), NULL, NULL);
"""
PGBENCH_BATCH = """\\set k random(1, 1000000000000)
SELECT count(*) FROM (
  SELECT array_agg('bench_' || (1 + floor(random() * {accounts}))::int ORDER BY g) AS c,
         array_agg('pgm-' || :client_id::text || '-' || :k::text || '-' || g ORDER BY g) AS r
    FROM generate_series(1, {batch}) g) b,
  LATERAL ledger_consume_many(b.c, b.r, ARRAY(SELECT 'consume:' || x FROM unnest(b.r) x),
    array_fill(1::bigint, ARRAY[{batch}]), array_fill('pgbench'::text, ARRAY[{batch}]),
    array_fill('pgbench'::text, ARRAY[{batch}]), array_fill(''::text, ARRAY[{batch}]),
    array_fill(now(), ARRAY[{batch}]), array_fill(NULL::jsonb, ARRAY[{batch}]));
"""


def pgbench_tps(url: str, template: str, clients: int, args: argparse.Namespace, accounts: int) -> float:
    """Transactions per second pgbench reaches with ``template`` (prepared statements, ``clients`` clients)."""
    vacuum(url)
    return run_pgbench(url, template.format(accounts=accounts, batch=args.batch), clients, args.duration).tps


# --- the run -----------------------------------------------------------------------------------------------------


def measure_workers(url: str, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    with Server(server_env(url), workers=workers) as server:
        figures: dict[str, Any] = {"workers": workers}

        def load(mode: str, connections: int, rate: float | None = None) -> dict[str, Any]:
            vacuum(url)  # every run, HTTP or pgbench, starts on tables as autovacuum keeps them
            return run_loadgen(server.port, mode, args, connections=connections, accounts=args.accounts, rate=rate)

        figures["healthz"] = load("healthz", args.connections)
        figures["usage"] = load("usage", args.connections)
        # Open loop at fixed shares of the maximum just measured: latency at a given arrival rate, queueing counted.
        peak = figures["usage"]["request_rate"]
        figures["usage_open"] = (
            [load("usage", args.connections, rate=share * peak) for share in OPEN_LOOP_SHARES] if peak > 0 else []
        )
        figures["pgbench_consume"] = pgbench_tps(url, PGBENCH_CONSUME, args.clients, args, args.accounts)
        figures["hold_capture"] = load("hold_capture", args.connections)
        figures["pgbench_hold_capture"] = pgbench_tps(url, PGBENCH_HOLD_CAPTURE, args.clients, args, args.accounts)
        figures["batch"] = load("batch", args.batch_clients)
        figures["pgbench_batch_events"] = (
            pgbench_tps(url, PGBENCH_BATCH, args.batch_clients, args, args.accounts) * args.batch
        )
    return figures


def measure_limits(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Attributed consumption against a server with three limits and one endpoint, and against one with none."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-usage-limits-"))
    config = workdir / "billing.toml"
    config.write_text(LIMITS_CONFIG, encoding="utf-8")
    runs: dict[str, list[dict[str, Any]]] = {"none": [], "limits": []}
    prime_counters(url, args.accounts)
    os.environ.pop("BILLING_CONFIG", None)  # the side without limits runs on the shipped example (no limits)
    # One unmeasured round of each side first: the first calls after seeding run on cold caches (the first
    # round measured was always the slowest), which would weigh on whichever side came first.
    warmup = argparse.Namespace(**{**vars(args), "duration": min(args.duration, 3.0)})
    try:
        for measured, rounds in ((False, 1), (True, args.rounds)):
            for _ in range(rounds):
                for side in ("none", "limits"):
                    env = server_env(url, config if side == "limits" else None)
                    vacuum(url)  # the counters analyzed, as autovacuum keeps them (their plan must not depend on it)
                    with Server(env, workers=1) as server:
                        server_before, database_before = server.cpu_seconds(), postgres_cpu()
                        used = args if measured else warmup
                        run = run_loadgen(server.port, "usage_attributed", used, connections=args.connections,
                                          accounts=args.accounts)  # fmt: skip
                        # CPU per call (the warm-up inside the load generator's run included in both the CPU and
                        # the count): what each side costs the server and the database, which the machine's other
                        # load moves far less than the rates.
                        calls = run["request_rate"] * (used.duration + used.warmup)
                        run["server_cpu_us"] = 1e6 * (server.cpu_seconds() - server_before) / max(calls, 1)
                        run["database_cpu_us"] = 1e6 * cpu_since(database_before, postgres_cpu()) / max(calls, 1)
                    if measured:
                        runs[side].append(run)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as conn:
        counters = conn.execute(text("SELECT count(*), coalesce(sum(requests), 0) FROM limit_counters")).one()
    engine.dispose()
    return {"runs": runs, "counters": counters[0], "counted_requests": int(counters[1])}


def prime_counters(url: str, accounts: int) -> None:
    """Create this hour's, day's and month's counters of LIMITS_CONFIG at zero for every customer and user."""
    from datetime import UTC, datetime

    from sqlalchemy import create_engine, text

    from ledger.config import LimitWindow
    from ledger.limits import window_bounds

    now = datetime.now(UTC)
    bounds = {w: window_bounds(w, now) for w in (LimitWindow.HOUR, LimitWindow.DAY, LimitWindow.MONTH)}
    rows = [
        ("requests-per-customer-hourly", "", LimitWindow.HOUR, "requests", 10**12),
        ("gpt4-cost-monthly", "", LimitWindow.MONTH, "cost_usd", 10**18),
    ] + [("tokens-per-user-daily", f"/user:u_{u}", LimitWindow.DAY, "tokens", 10**15) for u in range(1, 21)]
    engine = create_engine(url)
    with engine.begin() as conn:
        for name, suffix, window, measure, maximum in rows:
            conn.execute(
                text(
                    "INSERT INTO limit_counters (limit_name, scope_value, window_start, window_end, measure, maximum) "
                    "SELECT :name, 'bench_' || g || :suffix, :start, :end, :measure, :maximum "
                    "FROM generate_series(1, :n) g ON CONFLICT DO NOTHING"
                ),
                {"name": name, "suffix": suffix, "start": bounds[window][0], "end": bounds[window][1],
                 "measure": measure, "maximum": maximum, "n": accounts},
            )  # fmt: skip
    engine.dispose()


def report_limits(results: dict[str, Any]) -> list[str]:
    """Print the limits comparison as figures and its verdict."""
    from benchkit import figure, machine_load

    runs = results["limits"]["runs"]
    total = {side: sum(r["rate"] for r in runs[side]) / len(runs[side]) for side in runs}
    p99 = {side: max(r["p99_ms"] for r in runs[side]) for side in runs}
    ratio = total["limits"] / total["none"]
    cost = 1 - ratio
    conns = results["connections"]
    print(f"\n{machine_load()}")
    print(f"server autovacuum: {results.get('autovacuum', '?')}; each round starts after VACUUM (ANALYZE) of the "
          "tables the calls update (the counters analyzed, as autovacuum keeps them)")  # fmt: skip
    for side in ("none", "limits"):
        rates = ", ".join(f"{r['rate']:,.0f}" for r in runs[side])
        failed = {k: v for r in runs[side] for k, v in r["outcomes"].items() if k != "ok"}
        note = f"; not ok: {failed}" if failed else ""
        print(f"{side:>7}: {rates} req/s by round (p99 up to {p99[side]:.1f} ms){note}")
        server_cpu = ", ".join(f"{r['server_cpu_us']:.0f}" for r in runs[side])
        database_cpu = ", ".join(f"{r['database_cpu_us']:.0f}" for r in runs[side])
        print(f"{'':>7}  CPU per call by round: server {server_cpu} µs; PostgreSQL {database_cpu} µs")
    work = (
        f"POST /v1/usage with attributed usage (operation, user, model, tokens, provider cost), {conns} "
        "connections, 1 worker; billing config with 3 limits on every call (requests/customer/hour, "
        "tokens/user/day, gpt-4* cost/month) and 1 notification endpoint: one ledger_consume statement that also "
        "takes the 3 counters"
    )
    baseline_work = (
        f"the same calls, {conns} connections, 1 worker, no billing config: one ledger_consume statement; "
        f"the two sides alternate, {len(runs['none'])} rounds each"
    )
    figure(
        "usage API consumption with 3 limits + 1 endpoint (req/s)",
        f"{total['limits']:,.0f}",
        baseline=f"{total['none']:,.0f} req/s without",
        ratio=ratio,
        work=work,
        baseline_work=baseline_work,
    )
    print(f"limit counters written: {results['limits']['counters']}, requests counted: "
          f"{results['limits']['counted_requests']:,}")  # fmt: skip
    verdict = (f"limits cost {cost:.1%} of the consume rate (target <= {TARGET_LIMITS_COST:.0%}): "
               f"{'met' if cost <= TARGET_LIMITS_COST else 'NOT met'}")  # fmt: skip
    print("verdict:", verdict)
    return [verdict]


def measure_sqlite(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-usage-sqlite-"))
    url = f"sqlite:///{workdir / 'billing.db'}"
    try:
        seed(url, 1000)
        with Server(server_env(url), workers=1) as server:
            return {
                "usage": run_loadgen(server.port, "usage", args, connections=16, accounts=1000),
                "hold_capture": run_loadgen(server.port, "hold_capture", args, connections=16, accounts=1000),
            }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def print_figures(results: dict[str, Any]) -> None:
    """The ``figure:`` lines bench_all.py reads: each figure beside its baseline, with both sides' work in words."""
    conns, clients, batch_clients = results["connections"], results["clients"], results["batch_clients"]
    accounts = f"{results['accounts']:,} accounts"
    by_workers = {f["workers"]: f for f in results["postgres"]}
    for workers, f in by_workers.items():
        h, u, hc, b = f["healthz"], f["usage"], f["hold_capture"], f["batch"]
        name = f"{workers} worker{'s' if workers > 1 else ''}"
        usage_work = (
            f"POST /v1/usage over HTTP, {name}, {conns} connections closed loop: auth, JSON, one ledger_consume() per"
            f" request charging 1 credit to a random one of {accounts}"
        )
        figure(
            f"usage API, load generator ceiling (GET /healthz), {name}",
            f"{h['rate']:,.0f}/s, p50 {h['p50_ms']:.1f} ms, p99 {h['p99_ms']:.1f} ms,"
            f" generator CPU {h['loadgen_cpu_share']:.0%} of a core",
            baseline=f"POST /v1/usage {u['rate']:,.0f}/s", ratio=h["rate"] / u["rate"] if u["rate"] else "",
            work=f"GET /healthz from the same generator process and {conns} connections (no auth, no database)",
            baseline_work=usage_work,
        )  # fmt: skip
        figure(
            f"usage API, POST /v1/usage, {name}, closed loop",
            f"{u['rate']:,.0f} req/s, p50 {u['p50_ms']:.1f} ms, p99 {u['p99_ms']:.1f} ms",
            baseline=f"pgbench {f['pgbench_consume']:,.0f} tps", ratio=u["rate"] / f["pgbench_consume"],
            work=usage_work,
            baseline_work=f"pgbench -M prepared, {clients} clients: SELECT ledger_consume(...) for 1 credit of a"
            f" random one of the same {accounts}, one statement per transaction as the API sends it",
        )  # fmt: skip
        for share, run in zip(OPEN_LOOP_SHARES, f["usage_open"], strict=False):
            figure(
                f"usage API, POST /v1/usage, {name}, open loop at {share:.0%} of its max",
                f"p50 {run['p50_ms']:.1f} ms, p99 {run['p99_ms']:.1f} ms at {run['offered_rate']:,.0f}/s offered,"
                f" {run['rate']:,.0f}/s answered 201",
                baseline=f"closed-loop max {u['request_rate']:,.0f}/s", ratio=share,
                work="the same POST /v1/usage at a constant arrival rate over up to"
                f" {conns} connections; latency from each request's due time (queueing counted)",
                baseline_work="the closed loop's maximum requests/s (above)",
            )  # fmt: skip
        figure(
            f"usage API, hold + capture, {name}, closed loop",
            f"{hc['rate']:,.0f} pairs/s, p50 {hc['p50_ms']:.1f} ms, p99 {hc['p99_ms']:.1f} ms",
            baseline=f"pgbench {f['pgbench_hold_capture']:,.0f} pairs/s",
            ratio=hc["rate"] / f["pgbench_hold_capture"],
            work=f"POST /v1/holds of 1 credit then POST /v1/holds/{{id}}/capture on the same connection, {name},"
            f" {conns} connections closed loop",
            baseline_work=f"pgbench -M prepared, {clients} clients: SELECT ledger_hold(...) then SELECT"
            " ledger_capture(...) of the same sizes, each its own transaction",
        )  # fmt: skip
        figure(
            f"usage API, POST /v1/usage/batch, {name}",
            f"{b['rate']:,.0f} events/s ({results['batch']} events a batch), p50 {b['p50_ms']:.1f} ms,"
            f" p99 {b['p99_ms']:.1f} ms",
            baseline=f"pgbench {f['pgbench_batch_events']:,.0f} events/s",
            ratio=b["rate"] / f["pgbench_batch_events"],
            work=f"POST /v1/usage/batch of {results['batch']} usage events of 1 credit on random accounts, {name},"
            f" {batch_clients} connections closed loop; counted when all were created",
            baseline_work=f"pgbench -M prepared, {batch_clients} clients: SELECT ledger_consume_many(...) of"
            f" {results['batch']} random accounts a call, one call per transaction",
        )  # fmt: skip
    one, two = by_workers.get(1), by_workers.get(2)
    if one and two:
        figure(
            "usage API, POST /v1/usage, 2 workers vs 1 worker, closed loop",
            f"{two['usage']['rate']:,.0f} req/s",
            baseline=f"1 worker {one['usage']['rate']:,.0f} req/s", ratio=two["usage"]["rate"] / one["usage"]["rate"],
            work=f"POST /v1/usage, serve --workers 2, {conns} connections closed loop",
            baseline_work="the same with serve --workers 1, in the same run",
        )  # fmt: skip
    if "sqlite" in results:
        s = results["sqlite"]
        figure(
            "usage API on the embedded SQLite default, 1 worker (no target)",
            f"usage {s['usage']['rate']:,.0f} req/s (p99 {s['usage']['p99_ms']:.1f} ms),"
            f" hold + capture {s['hold_capture']['rate']:,.0f} pairs/s",
            work="POST /v1/usage, and hold + capture, on a SQLite file with 1,000 accounts, 16 connections closed loop",
        )


def report(results: dict[str, Any]) -> list[str]:
    """Print the table, the figures and one verdict line per target; return the verdicts."""
    print(f"\nmachine load (1/5/15 min) at the end: {results['load']}")
    print(f"server autovacuum: {results.get('autovacuum', '?')}; every run (HTTP and pgbench) starts after VACUUM "
          "(ANALYZE) of the tables the runs update, as autovacuum keeps them")  # fmt: skip
    print(f"{'what':<52}{'rate':>12}{'p50 ms':>9}{'p99 ms':>9}  baseline in the same run")
    verdicts: list[str] = []
    by_workers = {f["workers"]: f for f in results["postgres"]}
    for workers, f in by_workers.items():
        h, u, hc, b = f["healthz"], f["usage"], f["hold_capture"], f["batch"]
        print(f"-- serve --workers {workers}")
        print(f"{'GET /healthz (load generator ceiling)':<52}{h['rate']:>12,.0f}{h['p50_ms']:>9.1f}{h['p99_ms']:>9.1f}"
              f"  generator CPU {h['loadgen_cpu_share']:.0%} of a core")  # fmt: skip
        ratio = u["rate"] / f["pgbench_consume"]
        conns = results["connections"]
        print(f"{f'POST /v1/usage, {conns} connections (req/s)':<52}{u['rate']:>12,.0f}{u['p50_ms']:>9.1f}"
              f"{u['p99_ms']:>9.1f}  pgbench ledger_consume, {results['clients']} clients: "
              f"{f['pgbench_consume']:,.0f} tps -> {ratio:.0%}")  # fmt: skip
        for share, run in zip(OPEN_LOOP_SHARES, f["usage_open"], strict=False):
            label = f"  open loop at {share:.0%} of max ({run['offered_rate']:,.0f}/s offered)"
            print(f"{label:<52}{run['rate']:>12,.0f}{run['p50_ms']:>9.1f}{run['p99_ms']:>9.1f}"
                  f"  generator lag max {run['max_send_lag_ms']:.1f} ms")  # fmt: skip
        if not f["usage_open"]:
            print("  no open loop: the closed loop answered no POST /v1/usage with 201")
        hratio = hc["rate"] / f["pgbench_hold_capture"]
        print(f"{f'hold + capture, {conns} connections (pairs/s)':<52}{hc['rate']:>12,.0f}{hc['p50_ms']:>9.1f}"
              f"{hc['p99_ms']:>9.1f}  pgbench ledger_hold + ledger_capture: {f['pgbench_hold_capture']:,.0f}/s"
              f" -> {hratio:.0%}")  # fmt: skip
        bratio = b["rate"] / f["pgbench_batch_events"]
        batch_label = f"POST /v1/usage/batch, 100 events, {results['batch_clients']} conns (events/s)"
        print(f"{batch_label:<52}{b['rate']:>12,.0f}{b['p50_ms']:>9.1f}"
              f"{b['p99_ms']:>9.1f}  pgbench ledger_consume_many x100, {results['batch_clients']} clients: "
              f"{f['pgbench_batch_events']:,.0f}"
              f" events/s -> {bratio:.0%}")  # fmt: skip
        runs = [("usage", u), *(("usage open loop", r) for r in f["usage_open"]), ("hold_capture", hc), ("batch", b)]
        for name, figures in runs:
            failed = {k: v for k, v in figures["outcomes"].items() if k != "ok"}
            if failed:
                print(f"   {name}: not ok: {failed}")
    one, two = by_workers.get(1), by_workers.get(2)
    if one:
        u = one["usage"]
        ratio = u["rate"] / one["pgbench_consume"]
        verdicts.append(
            f"usage, 1 worker: {ratio:.0%} of pgbench (target >= {TARGET_USAGE_RATIO:.0%}), "
            f"p99 {u['p99_ms']:.1f} ms (target < {TARGET_P99_MS:.0f}): "
            f"{'met' if ratio >= TARGET_USAGE_RATIO and u['p99_ms'] < TARGET_P99_MS else 'NOT met'}"
        )
        hratio = one["hold_capture"]["rate"] / one["pgbench_hold_capture"]
        verdicts.append(
            f"hold + capture, 1 worker: {hratio:.0%} of pgbench (target >= {TARGET_HOLD_RATIO:.0%}): "
            f"{'met' if hratio >= TARGET_HOLD_RATIO else 'NOT met'}"
        )
        rate = max(f["batch"]["rate"] for f in by_workers.values())
        verdicts.append(
            f"batch: {rate:,.0f} events/s (target >= {TARGET_BATCH_RATE:,.0f}): "
            f"{'met' if rate >= TARGET_BATCH_RATE else 'NOT met'}"
        )
    if one and two:
        faster = two["usage"]["rate"] > one["usage"]["rate"]
        verdicts.append(
            f"usage, 2 workers {two['usage']['rate']:,.0f} vs 1 worker {one['usage']['rate']:,.0f} req/s: "
            f"{'faster: met' if faster else 'NOT faster: NOT met'}"
        )
    if "sqlite" in results:
        s = results["sqlite"]
        print(
            f"-- embedded SQLite, 1 worker, 16 connections: usage {s['usage']['rate']:,.0f} req/s "
            f"(p99 {s['usage']['p99_ms']:.1f} ms), hold + capture {s['hold_capture']['rate']:,.0f} pairs/s"
        )
    print_figures(results)
    for line in verdicts:
        print("verdict:", line)
    print(f"machine: {machine_load()} at the end")
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", ""),
        help="a PostgreSQL URL; the benchmark creates and drops its own database on that server",
    )
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--batch", type=int, default=100, help="events per POST /v1/usage/batch")
    parser.add_argument("--clients", type=int, default=32, help="pgbench clients of the single-call baselines")
    parser.add_argument("--batch-clients", type=int, default=8, help="connections and pgbench clients of the batch")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--workers", default="1,2", help="server worker counts to measure")
    parser.add_argument("--sqlite", action="store_true", help="also measure the embedded SQLite default")
    parser.add_argument("--limits", action="store_true",
                        help="measure only what three limits and a notification endpoint cost the usage API")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of each side with --limits")
    parser.add_argument("--quick", action="store_true", help="smallest sizes: a smoke run")
    parser.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    parser.add_argument("--loadgen", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loadgen:
        loadgen_main(args.loadgen)
        return
    if args.quick:
        args.accounts, args.duration, args.warmup, args.workers = 1000, 2.0, 0.5, "1"
    if not args.database_url.startswith("postgresql"):
        args.database_url = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    if shutil.which("pgbench") is None:
        raise SystemExit("pgbench is needed for the baselines (Debian: postgresql-client)")
    url = scratch_database(args.database_url, f"bench_usage_api_{os.getpid()}")
    results: dict[str, Any] = {
        "accounts": args.accounts, "duration": args.duration, "connections": args.connections,
        "clients": args.clients, "batch_clients": args.batch_clients, "batch": args.batch, "postgres": [],
    }  # fmt: skip
    try:
        seed(url, args.accounts)
        results["autovacuum"] = autovacuum(url)
        if args.limits:
            results["limits"] = measure_limits(url, args)
            results["load"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
            results["verdicts"] = report_limits(results)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
            return
        for workers in (int(w) for w in args.workers.split(",")):
            results["postgres"].append(measure_workers(url, workers, args))
        if args.sqlite:
            results["sqlite"] = measure_sqlite(args)
    finally:
        drop_database(url)
    results["load"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results["verdicts"] = report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
