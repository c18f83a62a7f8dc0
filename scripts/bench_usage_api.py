"""Benchmark the usage API: POST /v1/usage, a hold plus its capture, and POST /v1/usage/batch, over HTTP.

It starts ``billing-reconciler serve`` itself on a scratch PostgreSQL database seeded with 10,000 accounts, and
drives it from a load generator in a second process (asyncio, raw HTTP/1.1 keep-alive, closed loop: each
connection sends its next request when the last is answered). For 1 and 2 server workers it measures:

- ``/healthz`` through the same generator: the generator's own ceiling (if it is far above the API's rate, the
  generator is not what limits the API) and the server's trivial rate;
- ``POST /v1/usage`` at 64 connections: requests/s, p50, p99; each request charges 1 credit to a random account;
- a hold and its capture (``POST /v1/holds`` then ``POST /v1/holds/{id}/capture``) at 64 connections: pairs/s;
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
same calls against a server with no config; the two alternate, ``--rounds`` times each, 1 worker. Measured in the
steady state: the windows' counters (2 per customer, 1 per customer and user) exist beforehand, as they do after a
window's first calls (creating one is an insert instead of an update, once per scope value and window).

``--sqlite`` also measures the embedded default (a SQLite file, 1,000 accounts, 1 worker; no target). ``--quick``
uses small sizes (a smoke run: the figures mean little). Needs pgbench and PostgreSQL.

    python scripts/bench_usage_api.py
    python scripts/bench_usage_api.py --quick --json /tmp/usage.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

START_UNITS = 10**12
TOKEN = "tok_bench"
TARGET_USAGE_RATIO = 0.60
TARGET_P99_MS = 50.0
TARGET_HOLD_RATIO = 0.40
TARGET_BATCH_RATE = 20_000.0
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
    "full": [],
}


# --- load generator (runs in its own process) ------------------------------------------------------------------


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    start = lower.find(b"content-length:")
    length = int(lower[start + 15 : lower.find(b"\r\n", start)]) if start >= 0 else 0
    return status, (await reader.readexactly(length) if length else b"")


def _post(path: str, body: bytes) -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path.encode(), TOKEN.encode(), len(body), body)
    )


async def _drive(options: dict[str, Any]) -> dict[str, Any]:
    host, port, mode, accounts = options["host"], options["port"], options["mode"], options["accounts"]
    warmup_until = time.perf_counter() + options["warmup"]
    stop_at = warmup_until + options["duration"]
    run = uuid.uuid4().hex[:8]
    rng = random.Random(run)
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    done_units = 0

    def usage_body(conn: int, n: int, suffix: str = "") -> bytes:
        account = rng.randint(1, accounts)
        return b'{"customer_id":"bench_%d","request_id":"%s-%d-%d%s","units":1}' % (
            account, run.encode(), conn, n, suffix.encode()
        )

    def attributed_body(conn: int, n: int) -> bytes:
        # A call as a product reports it: who, what, which model, its tokens and provider cost.
        account = rng.randint(1, accounts)
        return (
            b'{"customer_id":"bench_%d","request_id":"%s-%d-%d","units":1,"operation":"chat","user_id":"u_%d",'
            b'"provider":"openai","model":"gpt-4o-2024-08-06","input_tokens":1200,"output_tokens":300,'
            b'"provider_cost_usd":"0.0072"}' % (account, run.encode(), conn, n, rng.randint(1, 20))
        )

    async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
        writer.write(request)
        return await _read_response(reader)

    async def connection(conn: int) -> None:
        nonlocal done_units
        reader, writer = await asyncio.open_connection(host, port)
        n = 0
        while (started := time.perf_counter()) < stop_at:
            n += 1
            if mode == "healthz":
                status, _ = await exchange(reader, writer, b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n")
                ok, units = status == 200, 1
            elif mode == "usage":
                status, _ = await exchange(reader, writer, _post("/v1/usage", usage_body(conn, n)))
                ok, units = status == 201, 1
            elif mode == "usage_attributed":
                status, _ = await exchange(reader, writer, _post("/v1/usage", attributed_body(conn, n)))
                ok, units = status == 201, 1
            elif mode == "hold_capture":
                status, _ = await exchange(reader, writer, _post("/v1/holds", usage_body(conn, n)))
                request_id = f"{run}-{conn}-{n}"
                if status == 201:
                    status, _ = await exchange(reader, writer, _post(f"/v1/holds/{request_id}/capture", b"{}"))
                ok, units = status == 200, 1
            else:
                events = b",".join(usage_body(conn, n, f"-{k}") for k in range(options["batch"]))
                status, body = await exchange(reader, writer, _post("/v1/usage/batch", b'{"events":[%s]}' % events))
                created = body.count(b'"status":201') if status == 200 else 0
                ok, units = created == options["batch"], created
            finished = time.perf_counter()
            if started >= warmup_until:
                latencies.append(finished - started)
                outcomes["ok" if ok else f"status {status}"] += 1
                done_units += units if ok else 0
        writer.close()

    cpu_before = time.process_time()
    await asyncio.gather(*(connection(c) for c in range(options["connections"])))
    cpu = time.process_time() - cpu_before
    latencies.sort()
    count = len(latencies)

    def pct(q: float) -> float:
        return latencies[min(count - 1, int(q * count))] * 1000 if count else float("nan")

    return {
        "mode": mode,
        "requests": count,
        "outcomes": dict(outcomes),
        "rate": done_units / options["duration"],
        "request_rate": outcomes["ok"] / options["duration"],
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "loadgen_cpu_share": cpu / (options["duration"] + options["warmup"]),
    }


def loadgen_main(options_json: str) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(_drive(json.loads(options_json)))))


def run_loadgen(port: int, mode: str, args: argparse.Namespace, *, connections: int, accounts: int) -> dict[str, Any]:
    """Run the load generator in a second process and return its figures."""
    options = {
        "host": "127.0.0.1", "port": port, "mode": mode, "connections": connections, "accounts": accounts,
        "duration": args.duration, "warmup": args.warmup, "batch": args.batch,
    }  # fmt: skip
    out = subprocess.run(
        [sys.executable, __file__, "--loadgen", json.dumps(options)], capture_output=True, text=True, check=True
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# --- server and database -----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``billing-reconciler serve`` in a subprocess."""

    def __init__(self, database_url: str, workers: int, billing_config: Path | None = None) -> None:
        self.port = _free_port()
        self.metrics_dir = tempfile.mkdtemp(prefix="bench-usage-metrics-")
        env = {**os.environ, "DATABASE_URL": database_url, "API_TOKENS": TOKEN, "LOG_LEVEL": "WARNING",
               "CELERY_BROKER_URL": ""}  # fmt: skip
        env.pop("BILLING_CONFIG", None)
        if billing_config is not None:
            env["BILLING_CONFIG"] = str(billing_config)
            env["BENCH_NOTIFY_SECRET"] = "whsec_bench"
        if workers > 1:
            env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        command = [sys.executable, "-c", "from worker.cli import main; main()", "serve", "--port", str(self.port)]
        self.process = subprocess.Popen([*command, "--workers", str(workers)], env=env, cwd=REPO)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1).read()
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise SystemExit(f"the server ({workers} workers) did not start")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def scratch_database(url: str, name: str) -> str:
    """Create (again) the database ``name`` on ``url``'s server; its SQLAlchemy URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    server = make_url(url)
    with psycopg.connect(_libpq(server.set(database="postgres").render_as_string(False)), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return server.set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    target = make_url(url)
    with psycopg.connect(_libpq(target.set(database="postgres").render_as_string(False)), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{target.database}" WITH (FORCE)')


def seed(url: str, accounts: int) -> None:
    """Migrate and seed ``accounts`` accounts ``bench_1``..., each with one large grant, keeping every invariant."""
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
  now() + interval '10 minutes');
SELECT status FROM ledger_capture('pgh-' || :client_id::text || '-' || :k::text, NULL, 'pgbench', 'pgbench',
  now(), NULL);
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


def run_pgbench(url: str, template: str, clients: int, args: argparse.Namespace, accounts: int) -> float:
    """Transactions per second pgbench reaches with ``template`` (prepared statements, ``clients`` clients)."""
    from sqlalchemy.engine import make_url

    target = make_url(url)
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as script:
        script.write(template.format(accounts=accounts, batch=args.batch))
    cmd = [
        "pgbench", "-n", "-M", "prepared", "-f", script.name, "-c", str(clients), "-j", str(min(clients, 4)),
        "-T", str(max(1, round(args.duration))), "-h", target.host or "127.0.0.1", "-p", str(target.port or 5432),
        "-U", target.username or "postgres", target.database or "",
    ]  # fmt: skip
    env = {**os.environ, **({"PGPASSWORD": target.password} if target.password else {})}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    os.unlink(script.name)
    match = re.search(r"tps = ([0-9.]+)", out.stdout)
    if out.returncode != 0 or match is None:
        raise SystemExit(f"pgbench failed: {out.stderr.strip() or out.stdout.strip()}")
    return float(match.group(1))


# --- the run -----------------------------------------------------------------------------------------------------


def measure_workers(url: str, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    server = Server(url, workers)
    try:
        figures: dict[str, Any] = {"workers": workers}
        figures["healthz"] = run_loadgen(server.port, "healthz", args, connections=args.connections,
                                         accounts=args.accounts)  # fmt: skip
        figures["usage"] = run_loadgen(server.port, "usage", args, connections=args.connections,
                                       accounts=args.accounts)  # fmt: skip
        figures["pgbench_consume"] = run_pgbench(url, PGBENCH_CONSUME, args.clients, args, args.accounts)
        figures["hold_capture"] = run_loadgen(server.port, "hold_capture", args, connections=args.connections,
                                              accounts=args.accounts)  # fmt: skip
        figures["pgbench_hold_capture"] = run_pgbench(url, PGBENCH_HOLD_CAPTURE, args.clients, args, args.accounts)
        figures["batch"] = run_loadgen(server.port, "batch", args, connections=args.batch_clients,
                                       accounts=args.accounts)  # fmt: skip
        figures["pgbench_batch_events"] = (
            run_pgbench(url, PGBENCH_BATCH, args.batch_clients, args, args.accounts) * args.batch
        )
    finally:
        server.stop()
    return figures


def measure_limits(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Attributed consumption against a server with three limits and one endpoint, and against one with none."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-usage-limits-"))
    config = workdir / "billing.toml"
    config.write_text(LIMITS_CONFIG, encoding="utf-8")
    runs: dict[str, list[dict[str, Any]]] = {"none": [], "limits": []}
    prime_counters(url, args.accounts)
    try:
        for _ in range(args.rounds):
            for side in ("none", "limits"):
                server = Server(url, 1, config if side == "limits" else None)
                try:
                    runs[side].append(run_loadgen(server.port, "usage_attributed", args,
                                                  connections=args.connections, accounts=args.accounts))  # fmt: skip
                finally:
                    server.stop()
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
    for side in ("none", "limits"):
        rates = ", ".join(f"{r['rate']:,.0f}" for r in runs[side])
        failed = {k: v for r in runs[side] for k, v in r["outcomes"].items() if k != "ok"}
        note = f"; not ok: {failed}" if failed else ""
        print(f"{side:>7}: {rates} req/s by round (p99 up to {p99[side]:.1f} ms){note}")
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
        server = Server(url, 1)
        try:
            return {
                "usage": run_loadgen(server.port, "usage", args, connections=16, accounts=1000),
                "hold_capture": run_loadgen(server.port, "hold_capture", args, connections=16, accounts=1000),
            }
        finally:
            server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def report(results: dict[str, Any]) -> list[str]:
    """Print the table and one verdict line per target; return the verdicts."""
    print(f"\nmachine load (1/5/15 min) at the end: {results['load']}")
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
        for name, figures in (("usage", u), ("hold_capture", hc), ("batch", b)):
            failed = {k: v for k, v in figures["outcomes"].items() if k != "ok"}
            if failed:
                print(f"   {name}: not ok: {failed}")
    one, two = by_workers.get(1), by_workers.get(2)
    if one:
        u = one["usage"]
        ratio = u["rate"] / one["pgbench_consume"]
        verdicts.append(f"usage, 1 worker: {ratio:.0%} of pgbench (target >= {TARGET_USAGE_RATIO:.0%}), "
                        f"p99 {u['p99_ms']:.1f} ms (target < {TARGET_P99_MS:.0f}): "
                        f"{'met' if ratio >= TARGET_USAGE_RATIO and u['p99_ms'] < TARGET_P99_MS else 'NOT met'}")
        hratio = one["hold_capture"]["rate"] / one["pgbench_hold_capture"]
        verdicts.append(f"hold + capture, 1 worker: {hratio:.0%} of pgbench (target >= {TARGET_HOLD_RATIO:.0%}): "
                        f"{'met' if hratio >= TARGET_HOLD_RATIO else 'NOT met'}")
        rate = max(f["batch"]["rate"] for f in by_workers.values())
        verdicts.append(f"batch: {rate:,.0f} events/s (target >= {TARGET_BATCH_RATE:,.0f}): "
                        f"{'met' if rate >= TARGET_BATCH_RATE else 'NOT met'}")
    if one and two:
        faster = two["usage"]["rate"] > one["usage"]["rate"]
        verdicts.append(f"usage, 2 workers {two['usage']['rate']:,.0f} vs 1 worker {one['usage']['rate']:,.0f} req/s: "
                        f"{'faster: met' if faster else 'NOT faster: NOT met'}")
    if "sqlite" in results:
        s = results["sqlite"]
        print(f"-- embedded SQLite, 1 worker, 16 connections: usage {s['usage']['rate']:,.0f} req/s "
              f"(p99 {s['usage']['p99_ms']:.1f} ms), hold + capture {s['hold_capture']['rate']:,.0f} pairs/s")
    for line in verdicts:
        print("verdict:", line)
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""),
                        help="a PostgreSQL URL; the benchmark creates and drops its own database on that server")
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
        "clients": args.clients, "batch_clients": args.batch_clients, "postgres": [],
    }  # fmt: skip
    try:
        seed(url, args.accounts)
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
