"""Benchmark: ledger consumes per second on PostgreSQL, beside pgbench doing the same core work.

For 10,000 accounts and for one hot account, at 1, 8 and 32 concurrent workers, it measures
``ledger.consume.consume_standalone``, the public API the usage endpoint (``POST /v1/usage``) and the CLI call: one
consumption as a whole unit of work (idempotency, access, grant draw-down, allocations, entry, committed), which on
PostgreSQL is one ``ledger_consume`` statement in autocommit on a pooled connection. ``--session`` measures
``consume(session, ...)`` inside ``unit_of_work()`` instead (BEGIN, the call, COMMIT through an ORM session: the
path of a caller composing a larger unit of work). Beside it, the TPS that ``pgbench`` reaches on the same server
in the same run with an SQL script doing the core of it: a conditional balance update and a ledger insert with a
unique key. Both run against scratch databases this script creates and drops. It prints a table with the ratios
(target: >= 50% at 32 workers).

Workers are threads spread over one OS process per CPU (``--processes``): each worker holds its own connection,
like a pgbench client, and releases the GIL while it waits on PostgreSQL; the processes let Python use every
core. Measured here, that layout beats one process per worker by far (32 interpreters on 2 cores spend their
time being scheduled); ``--processes 0`` runs one process per worker for comparison.
Measurements alternate between the ledger and pgbench so that other load on the machine affects both alike.

    python scripts/bench_ledger.py                        # defaults: ~1.5 minutes
    python scripts/bench_ledger.py --seconds 10 --workers 1,8,32,64
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ledger import db
from ledger.settings import get_settings

HOT_CUSTOMER = "bench_1"
START_UNITS = 10**12


@dataclass(frozen=True)
class Scenario:
    name: str
    accounts: int  # consumers pick among the first ``accounts`` accounts


def admin_url(url: URL) -> URL:
    return url.set(database="postgres")


def create_database(url: URL, name: str) -> URL:
    engine = create_engine(admin_url(url), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return url.set(database=name)


def drop_database(url: URL) -> None:
    engine = create_engine(admin_url(url), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
    engine.dispose()


def seed_ledger(url: URL, accounts: int) -> None:
    """Migrate and seed ``accounts`` accounts, each with one large grant, keeping every invariant."""
    from ledger.migrate import migrate

    engine = db.make_engine(url.render_as_string(hide_password=False))
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO accounts (customer_id, balance) SELECT 'bench_' || g, :units FROM generate_series(1, :n) g"
            ),
            {"units": START_UNITS, "n": accounts},
        )
        conn.execute(
            text(
                "INSERT INTO grants (account_id, source, units, remaining, idempotency_key, reason, actor) "
                "SELECT id, 'top_up', :units, :units, 'bench-' || id, 'benchmark', 'bench' FROM accounts"
            ),
            {"units": START_UNITS},
        )
        conn.execute(
            text(
                "INSERT INTO entries (account_id, kind, units, balance_after, idempotency_key, grant_id, actor, reason)"
                " SELECT account_id, 'grant', units, units, 'grant:' || idempotency_key, id, 'bench', 'benchmark'"
                " FROM grants"
            )
        )
        conn.execute(
            text("INSERT INTO allocations (entry_id, grant_id, units) SELECT id, grant_id, units FROM entries")
        )
        conn.execute(text("ANALYZE"))
    engine.dispose()


def seed_pgbench(url: URL, accounts: int) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL)"))
        conn.execute(
            text(
                "CREATE TABLE entries (id bigserial PRIMARY KEY, account_id bigint NOT NULL, units bigint NOT NULL,"
                " balance_after bigint NOT NULL, idempotency_key text NOT NULL UNIQUE,"
                " created_at timestamptz NOT NULL DEFAULT now())"
            )
        )
        conn.execute(
            text("INSERT INTO accounts SELECT g, :units FROM generate_series(1, :n) g"),
            {"units": START_UNITS, "n": accounts},
        )
        conn.execute(text("ANALYZE"))
    engine.dispose()


PGBENCH_SCRIPT = """\\set aid random(1, {accounts})
\\set k random(1, 1000000000000)
BEGIN;
UPDATE accounts SET balance = balance - 1 WHERE id = :aid AND balance >= 1 RETURNING balance;
INSERT INTO entries (account_id, units, balance_after, idempotency_key)
  VALUES (:aid, -1, 0, :client_id || '-' || :k) ON CONFLICT (idempotency_key) DO NOTHING;
END;
"""


# The ledger's own work driven by pgbench's C client: what the server side costs without Python. Alone (what
# consume_standalone sends: the one statement, its own transaction), or in BEGIN ... END (consume in a session).
FUNCTION_CALL = """SELECT status FROM ledger_consume('bench_' || :aid, 'pgb-' || :client_id || '-' || :k,
  'consume:pgb-' || :client_id || '-' || :k, 1, 'pgbench', 'pgbench', '', now(), NULL);
"""
FUNCTION_SCRIPT = "\\set aid random(1, {accounts})\n\\set k random(1, 1000000000000)\n" + FUNCTION_CALL
FUNCTION_SCRIPT_IN_TRANSACTION = (
    "\\set aid random(1, {accounts})\n\\set k random(1, 1000000000000)\nBEGIN;\n" + FUNCTION_CALL + "END;\n"
)


def run_pgbench(
    url: URL, scenario: Scenario, workers: int, seconds: float, workdir: Path, template: str = PGBENCH_SCRIPT
) -> float:
    script = workdir / f"pgbench_{scenario.accounts}_{abs(hash(template))}.sql"
    script.write_text(template.format(accounts=scenario.accounts), encoding="utf-8")
    cmd = [
        "pgbench", "-n", "-f", str(script), "-c", str(workers), "-j", str(workers), "-T", str(max(1, round(seconds))),
        "-h", url.host or "127.0.0.1", "-p", str(url.port or 5432), "-U", url.username or "postgres",
        url.database or "",
    ]  # fmt: skip
    env = dict(os.environ)
    if url.password:
        env["PGPASSWORD"] = url.password
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    match = re.search(r"tps = ([0-9.]+)", out.stdout)
    if out.returncode != 0 or match is None:
        raise RuntimeError(f"pgbench failed: {out.stderr.strip() or out.stdout.strip()}")
    return float(match.group(1))


def _worker_process(
    url: str,
    threads: int,
    accounts: int,
    seed: int,
    start_at: float,
    stop_at: float,
    in_session: bool,
    results: mp.Queue[int],
) -> None:
    """One OS process running ``threads`` consumer threads; puts the number of consumes done in the window."""
    import random

    from ledger.consume import consume, consume_standalone

    engine = db.make_engine(url, pool_size=threads, max_overflow=0, pool_pre_ping=False)
    db.set_engine(engine)
    counts = [0] * threads

    def consumer(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        prefix = f"{seed}-{index}-{os.getpid()}-"
        i = 0
        warmed = False
        while True:
            now = time.time()
            if now >= stop_at:
                break
            if now < start_at and warmed:
                time.sleep(min(0.01, start_at - now))
                continue
            customer = f"bench_{rng.randint(1, accounts)}"
            if in_session:
                with db.unit_of_work() as session:
                    consume(session, customer, request_id=prefix + str(i), units=1)
            else:
                consume_standalone(customer, request_id=prefix + str(i), units=1)
            i += 1
            warmed = True
            if start_at <= time.time() < stop_at:
                counts[index] += 1

    pool = [threading.Thread(target=consumer, args=(t,)) for t in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    engine.dispose()
    results.put(sum(counts))


def run_ledger(
    url: URL, scenario: Scenario, workers: int, seconds: float, processes: int, in_session: bool
) -> tuple[float, str]:
    """Consumes per second with ``workers`` concurrent consumers spread over up to ``processes`` processes."""
    procs = min(workers, processes) if processes > 0 else workers
    layout = [workers // procs + (1 if p < workers % procs else 0) for p in range(procs)]
    ctx = mp.get_context("fork")
    results: mp.Queue[int] = ctx.Queue()
    start_at = time.time() + 1.5 + 0.05 * procs  # time to connect and warm up
    stop_at = start_at + seconds
    rendered = url.render_as_string(hide_password=False)
    children = [
        ctx.Process(
            target=_worker_process,
            args=(rendered, n, scenario.accounts, p, start_at, stop_at, in_session, results),
            daemon=True,
        )
        for p, n in enumerate(layout)
    ]
    for child in children:
        child.start()
    total = sum(results.get(timeout=seconds + 120) for _ in children)
    for child in children:
        child.join()
    return total / seconds, f"{procs}x{max(layout)}"


def check_consistency(url: URL) -> int:
    from ledger.check import check_ledger

    engine = db.make_engine(url.render_as_string(hide_password=False))
    db.set_engine(engine)
    with db.unit_of_work() as session:
        violations = check_ledger(session, HOT_CUSTOMER)
    db.set_engine(None)
    return len(violations)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=None, help="PostgreSQL server to use (default: DATABASE_URL)")
    parser.add_argument("--seconds", type=float, default=4.0, help="duration of each measurement")
    parser.add_argument("--workers", default="1,8,32", help="comma-separated concurrency levels")
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="OS processes the ledger's workers are spread over, as threads (default: one per CPU; "
                             "0: one process per worker)")  # fmt: skip
    parser.add_argument(
        "--session",
        action="store_true",
        help="measure consume(session, ...) in unit_of_work(), not consume_standalone()",
    )
    args = parser.parse_args()

    raw = args.database_url or get_settings().database_url
    if not raw.startswith("postgresql"):
        print("bench_ledger needs PostgreSQL: set DATABASE_URL or pass --database-url", file=sys.stderr)
        return 2
    if shutil.which("pgbench") is None:
        print("bench_ledger needs pgbench on PATH", file=sys.stderr)
        return 2
    base = make_url(raw.replace("postgresql://", "postgresql+psycopg://", 1))
    levels = [int(w) for w in args.workers.split(",")]
    scenarios = [Scenario(f"{args.accounts:,} accounts", args.accounts), Scenario("1 hot account", 1)]

    tag = f"{os.getpid()}"
    ledger_url = create_database(base, f"bench_ledger_{tag}")
    pgbench_url = create_database(base, f"bench_pgbench_{tag}")
    rows: list[tuple[str, int, float, float, float, str]] = []
    try:
        started = time.time()
        seed_ledger(ledger_url, args.accounts)
        seed_pgbench(pgbench_url, args.accounts)
        print(f"seeded {args.accounts:,} accounts in {time.time() - started:.1f}s; {args.seconds:g}s per measurement")
        function_script = FUNCTION_SCRIPT_IN_TRANSACTION if args.session else FUNCTION_SCRIPT
        with tempfile.TemporaryDirectory() as workdir:
            for scenario in scenarios:
                for workers in levels:
                    ledger_rate, layout = run_ledger(
                        ledger_url, scenario, workers, args.seconds, args.processes, args.session
                    )
                    pgbench_tps = run_pgbench(pgbench_url, scenario, workers, args.seconds, Path(workdir))
                    function_tps = run_pgbench(
                        ledger_url, scenario, workers, args.seconds, Path(workdir), function_script
                    )
                    rows.append((scenario.name, workers, ledger_rate, pgbench_tps, function_tps, layout))
                    print(
                        f"  {scenario.name:<16} {workers:>3} workers: ledger {ledger_rate:>8,.0f}/s  "
                        f"pgbench {pgbench_tps:>8,.0f} tps  ({ledger_rate / pgbench_tps:.0%})  "
                        f"pgbench->ledger_consume {function_tps:>8,.0f} tps",
                        flush=True,
                    )
        violations = check_consistency(ledger_url)
    finally:
        drop_database(ledger_url)
        drop_database(pgbench_url)

    print()
    print(
        f"{'scenario':<18}{'workers':>8}{'ledger consumes/s':>19}{'pgbench tps':>13}{'ratio':>7}"
        f"{'server-side only':>18}{'ratio':>7}  layout"
    )
    print("-" * 100)
    for name, workers, rate, tps, fn_tps, layout in rows:
        print(
            f"{name:<18}{workers:>8}{rate:>19,.0f}{tps:>13,.0f}{rate / tps:>7.0%}"
            f"{fn_tps:>18,.0f}{fn_tps / tps:>7.0%}  {layout} procs x threads"
        )
    print()
    if args.session:
        print("ledger consumes/s: consume(session, ...) in unit_of_work() (BEGIN; SELECT ledger_consume; COMMIT)")
        print("server-side only: pgbench's C client sending the same (BEGIN; SELECT ledger_consume; END)")
    else:
        print("ledger consumes/s: consume_standalone(), the usage API's call (SELECT ledger_consume in autocommit)")
        print("server-side only: pgbench's C client sending the same (SELECT ledger_consume, its own transaction)")
    print("pgbench tps: conditional balance update + ledger insert with a unique key (BEGIN; UPDATE; INSERT; END)")
    target = [r for r in rows if r[1] == 32]
    for name, _, rate, tps, _, _ in target:
        verdict = "meets" if rate >= 0.5 * tps else "below"
        print(f"target at 32 workers, {name}: {rate / tps:.1%} of pgbench ({verdict} the 50% target)")
    print(f"ledger check on the hot account after the run: {violations} violation(s)")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end")
    return 0 if violations == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
