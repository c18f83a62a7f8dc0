"""Benchmark the Stripe webhook receiver: verified, stored and handed-over events per second, and latency.

Starts ``billing-reconciler serve`` on PostgreSQL + Redis (real hand-over to the Celery broker), then drives it
from a load generator in a second process (asyncio + uvloop, raw HTTP/1.1 keep-alive, 64 connections, every
request a fresh event signed with Stripe's scheme). In the same run it measures the same server's trivial
endpoint (/healthz) and an INSERT-only pgbench script into a copy of the events table, and prints the ratios.

    DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/br_webhooks \\
    CELERY_BROKER_URL=redis://127.0.0.1:6379/2 python scripts/bench_webhooks.py

``--compare-servers`` runs the receiver under uvicorn and granian with one and two workers (how the default
server of ``serve`` was chosen). Figures on a shared machine are only comparable as ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import Server, figure, libpq_url, machine_load, run_pgbench  # noqa: E402

# Sizes for scripts/bench_all.py (smoke: the test suite's run; quick: its default; full: its --full).
BENCH_ALL = {
    "smoke": ["--smoke"],
    "quick": ["--duration", "5", "--warmup", "1"],
    "full": [],
    "uses": ["redis"],  # the receiver hands events over to the "events" queue
}
FIXTURE = REPO.parent / "shared" / "fixtures" / "stripe" / "events" / "charge.succeeded.srm.json"
SECRET = "whsec_bench_secret"
TARGET_RATE = 3000.0
TARGET_P99_MS = 50.0
OPEN_LOOP_SHARES = (0.5, 0.8)  # open-loop arrival rates, as shares of the closed loop's maximum


# --- load generator (runs in its own process) ------------------------------------------------------------------


def _event_template() -> tuple[bytes, bytes]:
    event = json.loads(FIXTURE.read_bytes()) if FIXTURE.exists() else _synthetic_event()
    event["id"] = "evt_PLACEHOLDER"
    raw = json.dumps(event, indent=2).encode()
    prefix, suffix = raw.split(b"evt_PLACEHOLDER")
    return prefix, suffix


def _synthetic_event() -> dict[str, Any]:
    return {
        "object": "event",
        "type": "charge.succeeded",
        "created": int(time.time()),
        "api_version": "2026-04-22.dahlia",
        "livemode": False,
        "data": {"object": {"id": "ch_bench", "object": "charge", "amount": 2000, "customer": "cus_bench"}},
    }


def _drive(options: dict[str, Any]) -> dict[str, Any]:
    """One load run (closed loop, or open loop at ``options['rate']``) against /webhooks/stripe or /healthz."""
    from loadgen import closed_loop, open_loop

    mode = options["mode"]
    run = uuid.uuid4().hex[:10]
    prefix, suffix = _event_template()
    secret = options["secret"].encode()

    def webhook_request(n: int) -> bytes:
        body = b"%sevt_bench_%s_%d%s" % (prefix, run.encode(), n, suffix)
        ts = int(time.time())
        sig = hmac.new(secret, b"%d.%s" % (ts, body), hashlib.sha256).hexdigest()
        return (
            b"POST /webhooks/stripe HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Stripe-Signature: t=%d,v1=%s\r\nContent-Length: %d\r\n\r\n%s" % (ts, sig.encode(), len(body), body)
        )

    trivial = b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n"

    def classify(status: int, body: bytes) -> str:
        if status == 200 and mode == "webhook":
            return "stored" if b'"duplicate":false' in body else "duplicate"
        return str(status)

    make = webhook_request if mode == "webhook" else (lambda _n: trivial)
    common: dict[str, Any] = {
        "duration": options["duration"],
        "warmup": options["warmup"],
        "connections": options["connections"],
        "classify": classify,
        "ok": ("stored",) if mode == "webhook" else ("200",),
    }
    if options.get("rate"):
        result = open_loop(options["host"], options["port"], make, rate=options["rate"], **common)
    else:
        result = closed_loop(options["host"], options["port"], make, **common)
    out = result.as_dict()
    out.update(mode=mode, run=run, statuses=out["counts"], ok=sum(out["counts"].get(k, 0) for k in common["ok"]))
    return out


def loadgen_main(options_json: str) -> None:
    print(json.dumps(_drive(json.loads(options_json))))


def run_loadgen(mode: str, port: int, args: argparse.Namespace, rate: float | None = None) -> dict[str, Any]:
    """Run the load generator in a second process (closed loop, or open loop at ``rate``); return its figures."""
    options = {
        "rate": rate,
        "host": "127.0.0.1",
        "port": port,
        "mode": mode,
        "connections": args.connections,
        "duration": args.duration,
        "warmup": args.warmup,
        "secret": SECRET,
    }
    out = subprocess.run(
        [sys.executable, __file__, "--loadgen", json.dumps(options)], capture_output=True, text=True, check=True
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# --- server and database ----------------------------------------------------------------------------------------


def start_server(args: argparse.Namespace, server: str, workers: int) -> Server:
    """``serve`` on the benchmark's database, handing events over to the real broker."""
    env = {
        "DATABASE_URL": args.database_url,
        "CELERY_BROKER_URL": args.broker_url,
        "STRIPE_WEBHOOK_SECRETS": SECRET,
        "LOG_LEVEL": "WARNING",
    }
    return Server(env, workers=workers, server=server)


def stored_with_prefix(args: argparse.Namespace, run: str) -> int:
    import psycopg

    with psycopg.connect(libpq_url(args.database_url)) as conn:
        row = conn.execute(
            "SELECT count(*) FROM stripe_events WHERE event_id LIKE %s", (f"evt_bench_{run}_%",)
        ).fetchone()
    return int(row[0]) if row else 0


def pgbench_insert_baseline(args: argparse.Namespace, payload_bytes: int) -> dict[str, Any]:
    """INSERT-only pgbench into a copy of stripe_events (same columns and indexes), one event per transaction."""
    import psycopg

    url = libpq_url(args.database_url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_pgbench_events")
        conn.execute("CREATE TABLE bench_pgbench_events (LIKE stripe_events INCLUDING DEFAULTS INCLUDING INDEXES)")
        # Its own id sequence, not stripe_events' (LIKE ... INCLUDING DEFAULTS shares that one).
        conn.execute("ALTER TABLE bench_pgbench_events ALTER COLUMN id DROP DEFAULT")
        conn.execute("ALTER TABLE bench_pgbench_events ALTER COLUMN id ADD GENERATED BY DEFAULT AS IDENTITY")
    script = (
        "INSERT INTO bench_pgbench_events (event_id, type, api_version, created, livemode, object_kind, object_id,"
        " customer_id, payload, source, status, received_at) VALUES ('evt_pgb_' || gen_random_uuid(),"
        " 'charge.succeeded', '2020-08-27', now(), false, 'event', 'ch_1', 'cus_1',"
        f" convert_to(repeat('x', {payload_bytes}), 'UTF8'), 'webhook', 'pending', now())"
        " ON CONFLICT (event_id) DO NOTHING;\n"
    )
    try:
        result = run_pgbench(url, script, args.pgbench_clients, args.duration, threads=2)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS bench_pgbench_events")
    return {"rate": result.tps, "latency_avg": result.latency_avg}


# --- main --------------------------------------------------------------------------------------------------------


def _prepare(args: argparse.Namespace) -> None:
    os.environ["DATABASE_URL"] = args.database_url
    sys.path.insert(0, str(REPO))
    from ledger.migrate import migrate

    migrate()


def measure_server(args: argparse.Namespace, server: str, workers: int) -> dict[str, Any]:
    srv = start_server(args, server, workers)
    try:
        trivial = run_loadgen("healthz", srv.port, args)
        handed_before = srv.metric("webhook_events_handed_over_total")
        cpu_before = srv.cpu_seconds()
        hook = run_loadgen("webhook", srv.port, args)
        time.sleep(1.0)  # hand-over runs after the response
        hook["server_cpu_seconds"] = srv.cpu_seconds() - cpu_before
        hook["stored_in_db"] = stored_with_prefix(args, hook["run"])
        hook["cpu_us_per_event"] = hook["server_cpu_seconds"] / max(1, hook["stored_in_db"]) * 1e6
        hook["handed_over"] = srv.metric("webhook_events_handed_over_total") - handed_before
        hook["handover_failed"] = srv.metric("webhook_handover_failed_events_total")
        # Open loop at fixed shares of the maximum just measured: latency at a given arrival rate, queueing included.
        open_runs = [run_loadgen("webhook", srv.port, args, rate=share * hook["rate"]) for share in OPEN_LOOP_SHARES]
    finally:
        srv.stop()
    return {"server": server, "workers": workers, "trivial": trivial, "webhook": hook, "open": open_runs}


def _row(label: str, rate: float, p50: float, p99: float, ref: float | None = None) -> str:
    ratio = f"{rate / ref:6.2f}" if ref else "      "
    return f"{label:<44}{rate:>10,.0f}/s  p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  {ratio}"


def report(result: dict[str, Any], pgbench: dict[str, Any] | None) -> None:
    trivial, hook = result["trivial"], result["webhook"]
    name = f"{result['server']}, {result['workers']} worker(s)"
    print(f"\n== {name}; {hook['requests']:,} webhook requests, statuses {hook['statuses']}")
    print(f"{'':<44}{'rate':>12}  {'':>15}  {'':>15}  ratio to /healthz")
    print(_row("GET /healthz (trivial endpoint)", trivial["rate"], trivial["p50_ms"], trivial["p99_ms"]))
    print(
        _row(
            "POST /webhooks/stripe (verified+stored)",
            hook["rate"],
            hook["p50_ms"],
            hook["p99_ms"],
            trivial["rate"],
        )
    )
    if pgbench:
        print(
            f"{'pgbench INSERT-only (1 event per commit)':<44}{pgbench['rate']:>10,.0f}/s  avg {pgbench['latency_avg']}"
        )
        print(f"webhook / pgbench ratio: {hook['rate'] / pgbench['rate']:.2f}")
    print(
        f"stored in the database: {hook['stored_in_db']:,} (answered 200 new: {hook['ok']:,} during the measured"
        f" window, plus warm-up); handed over to the broker: {hook['handed_over']:,.0f};"
        f" hand-over failures: {hook['handover_failed']:,.0f}"
    )
    print(
        f"server CPU per stored event (whole server, all threads and workers): {hook['cpu_us_per_event']:.0f} us,"
        f" i.e. {1e6 / hook['cpu_us_per_event']:,.0f} events per server CPU-second (capacity on one idle core)"
    )
    for share, run in zip(OPEN_LOOP_SHARES, result["open"], strict=True):
        print(
            _row(f"open loop at {share:.0%} of max ({run['offered_rate']:,.0f}/s)", run["rate"], run["p50_ms"],
                 run["p99_ms"])
            + f"  (generator lag max {run['max_send_lag_ms']:.1f} ms, answers {run['counts']})"
        )  # fmt: skip
    hook_work = (
        f"POST /webhooks/stripe, {name}: a signed Stripe event verified, stored (INSERT ON CONFLICT) and handed"
        " over to Redis, closed loop"
    )
    figure(
        f"webhook receiver, {name}, closed loop",
        f"{hook['rate']:,.0f} events/s, p50 {hook['p50_ms']:.1f} ms, p99 {hook['p99_ms']:.1f} ms",
        baseline=f"/healthz {trivial['rate']:,.0f}/s", ratio=hook["rate"] / trivial["rate"], work=hook_work,
        baseline_work="GET /healthz on the same server and connections (no database, no verification)",
    )  # fmt: skip
    if pgbench:
        figure(
            f"webhook receiver, {name}, vs INSERT-only pgbench",
            f"{hook['rate']:,.0f} events/s",
            baseline=f"pgbench {pgbench['rate']:,.0f}/s",
            ratio=hook["rate"] / pgbench["rate"],
            work=hook_work,
            baseline_work="pgbench -M prepared: the same INSERT ON CONFLICT of a same-sized event, one per commit",
        )
    for share, run in zip(OPEN_LOOP_SHARES, result["open"], strict=True):
        figure(
            f"webhook receiver, {name}, open loop at {share:.0%} of its max",
            f"p50 {run['p50_ms']:.1f} ms, p99 {run['p99_ms']:.1f} ms at {run['offered_rate']:,.0f}/s offered,"
            f" {run['rate']:,.0f}/s stored",
            baseline=f"closed-loop max {hook['rate']:,.0f}/s",
            ratio=share,
            work="the same POST at a constant arrival rate; latency from each request's due time (queueing counted)",
            baseline_work="the closed loop's maximum stored events/s",
        )
    met = hook["rate"] >= TARGET_RATE and hook["p99_ms"] < TARGET_P99_MS
    print(
        f"target >= {TARGET_RATE:,.0f} events/s with p99 < {TARGET_P99_MS:.0f} ms: {'MET' if met else 'NOT MET'}"
        " (on a shared machine: judge by the ratios)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loadgen", help=argparse.SUPPRESS)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""))
    parser.add_argument("--broker-url", default=os.environ.get("CELERY_BROKER_URL", ""))
    parser.add_argument("--duration", type=int, default=12, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each phase")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", type=int, help="server processes (default: measure 1 and 2)")
    parser.add_argument("--server", default="uvicorn", choices=["uvicorn", "granian"])
    parser.add_argument("--pgbench-clients", type=int, default=16)
    parser.add_argument("--skip-pgbench", action="store_true")
    parser.add_argument("--compare-servers", action="store_true", help="uvicorn and granian, 1 and 2 workers")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: 1 s phases, 1 worker, 8 connections")
    args = parser.parse_args()
    if args.smoke:
        args.duration, args.warmup, args.connections, args.workers, args.pgbench_clients = 1, 0.3, 8, 1, 4
    if args.loadgen:
        loadgen_main(args.loadgen)
        return
    if not args.database_url.startswith("postgresql"):
        raise SystemExit("set DATABASE_URL to a PostgreSQL database (the benchmark measures the production path)")
    if not args.broker_url.startswith("redis"):
        raise SystemExit("set CELERY_BROKER_URL to a Redis broker (hand-over goes to the real broker)")
    _prepare(args)
    combos = (
        [("uvicorn", 1), ("granian", 1), ("uvicorn", 2), ("granian", 2)]
        if args.compare_servers
        else [(args.server, workers) for workers in ([args.workers] if args.workers else [1, 2])]
    )
    results = [measure_server(args, server, workers) for server, workers in combos]
    pgbench = None if args.skip_pgbench else pgbench_insert_baseline(args, len(b"".join(_event_template())) + 40)
    for result in results:
        report(result, pgbench)
    if len(results) > 1:
        print("\n== servers compared (webhook events stored/s, p99)")
        for r in results:
            h = r["webhook"]
            print(
                f"{r['server']:<8} {r['workers']} worker(s): {h['rate']:>8,.0f}/s  p99 {h['p99_ms']:.1f} ms"
                f"  server CPU {h['cpu_us_per_event']:.0f} us/event   /healthz {r['trivial']['rate']:>8,.0f}/s"
            )
    print(f"machine: {machine_load()} at the end")


if __name__ == "__main__":
    main()
