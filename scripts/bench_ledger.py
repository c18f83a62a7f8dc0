"""Benchmark: ledger consumes per second on PostgreSQL, beside pgbench doing the same core work.

For 10,000 accounts, for one hot account, and for 10,000 accounts whose every consume draws across several
grants of different priorities and expiries, at 1, 8 and 32 concurrent workers, it measures
``ledger.consume.consume_standalone``, the public API the usage endpoint (``POST /v1/usage``) and the CLI call: one
consumption as a whole unit of work (idempotency, access, grant draw-down, allocations, entry, committed), which on
PostgreSQL is one ``ledger_consume`` statement in autocommit on a pooled connection. ``--session`` measures
``consume(session, ...)`` inside ``unit_of_work()`` instead (BEGIN, the call, COMMIT through an ORM session: the
path of a caller composing a larger unit of work). Beside it, the TPS that ``pgbench`` reaches on the same server
in the same run with an SQL script doing the core of it, sent the way the ledger sends its work: one prepared
statement per consume (``pgbench -M prepared``; the ledger's ``SELECT ledger_consume(...)`` is one prepared
statement in autocommit), a CTE that updates the balance conditionally and inserts the ledger entry under a unique
key; in the several-grants scenario it also picks the grants in draw order (priority, then expiry), draws each
and writes one allocation row per grant, as the ledger does. Both run against scratch databases this script
creates and drops. It prints a table with the ratios (target: >= 50% at 32 workers) and how many grants the
ledger's consumes really drew from, on average.

Workers are threads spread over one OS process per CPU (``--processes``): each worker holds its own connection,
like a pgbench client, and releases the GIL while it waits on PostgreSQL; the processes let Python use every
core. Measured here, that layout beats one process per worker by far (32 interpreters on 2 cores spend their
time being scheduled); ``--processes 0`` runs one process per worker for comparison.
Measurements alternate between the ledger and pgbench so that other load on the machine affects both alike.

    python scripts/bench_ledger.py                        # defaults: ~2.5 minutes
    python scripts/bench_ledger.py --seconds 10 --workers 1,8,32,64
    python scripts/bench_ledger.py --smoke                # every path once, tiny sizes (seconds)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import drop_database as drop_scratch_database
from benchkit import figure, machine_load, run_pgbench, scratch_database, vacuum

from ledger import db
from ledger.settings import get_settings

# Sizes for scripts/bench_all.py (smoke: the test suite's run; quick: its default; full: its --full).
BENCH_ALL = {
    "smoke": ["--smoke"],
    "quick": ["--seconds", "2", "--accounts", "2000"],
    "full": [],
}

HOT_CUSTOMER = "bench_1"
START_UNITS = 10**12
# The several-grants scenario: each account holds many small grants (priorities 0-3, expiries 1-4 days away or
# none) and one large fallback grant drawn last; each consume takes MULTI_UNITS, i.e. three small grants.
MULTI_PREFIX = "multi_"
MULTI_GRANT_UNITS = 2
MULTI_UNITS = 5


@dataclass(frozen=True)
class Scenario:
    name: str
    accounts: int  # consumers pick among the first ``accounts`` accounts
    prefix: str = "bench_"  # the accounts' customer ids
    units: int = 1  # units per consume


def create_database(url: URL, name: str) -> URL:
    """A fresh database ``name`` on ``url``'s server (dropped first if it exists)."""
    return make_url(scratch_database(url.render_as_string(hide_password=False), name))


def drop_database(url: URL) -> None:
    drop_scratch_database(url.render_as_string(hide_password=False))


def seed_ledger(url: URL, accounts: int, small_grants: int) -> None:
    """Migrate and seed ``accounts`` accounts with one large grant each, and as many with ``small_grants`` small
    grants of mixed priorities and expiries besides a large one drawn last; keeping every invariant."""
    from ledger.migrate import migrate

    engine = db.make_engine(url.render_as_string(hide_password=False))
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO accounts (customer_id, balance) SELECT 'bench_' || g, :units FROM generate_series(1, :n) g"
                " UNION ALL SELECT :multi || g, :units + :small * :grant_units FROM generate_series(1, :n) g"
            ),
            {"units": START_UNITS, "n": accounts, "multi": MULTI_PREFIX, "small": small_grants,
             "grant_units": MULTI_GRANT_UNITS},
        )  # fmt: skip
        conn.execute(
            text(
                "INSERT INTO grants (account_id, source, units, remaining, idempotency_key, reason, actor, priority) "
                "SELECT id, 'top_up', :units, :units, 'bench-' || id, 'benchmark', 'bench', -1 FROM accounts"
            ),
            {"units": START_UNITS},
        )
        # Small grants: priority cycles 3..0, expiry 1-4 days away or none, so the draw order interleaves them.
        conn.execute(
            text(
                "INSERT INTO grants (account_id, source, units, remaining, idempotency_key, reason, actor, priority,"
                " expires_at) SELECT a.id, 'promotion', :u, :u, 'bench-' || a.id || '-' || k, 'benchmark', 'bench',"
                " k % 4, CASE WHEN k % 5 = 0 THEN NULL ELSE now() + make_interval(days => 1 + k % 4) END"
                " FROM accounts a, generate_series(1, :small) k WHERE a.customer_id LIKE :multi || '%'"
            ),
            {"u": MULTI_GRANT_UNITS, "small": small_grants, "multi": MULTI_PREFIX},
        )
        conn.execute(
            text(
                "INSERT INTO entries (account_id, kind, units, balance_after, idempotency_key, grant_id, actor, reason)"
                " SELECT account_id, 'grant', units, sum(units) OVER (PARTITION BY account_id ORDER BY id),"
                " 'grant:' || idempotency_key, id, 'bench', 'benchmark' FROM grants ORDER BY id"
            )
        )
        conn.execute(
            text("INSERT INTO allocations (entry_id, grant_id, units) SELECT id, grant_id, units FROM entries")
        )
        conn.execute(text("ANALYZE"))
    engine.dispose()


def seed_pgbench(url: URL, accounts: int, small_grants: int) -> None:
    """The baseline's tables: accounts, entries with a unique key, grants and allocations, seeded like the ledger."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL)"))
        conn.execute(
            text(
                "CREATE TABLE entries (id bigserial PRIMARY KEY, account_id bigint NOT NULL, units bigint NOT NULL,"
                " balance_after bigint NOT NULL, idempotency_key text NOT NULL UNIQUE, grant_id bigint,"
                " created_at timestamptz NOT NULL DEFAULT now())"
            )
        )
        conn.execute(
            text(
                "CREATE TABLE grants (id bigserial PRIMARY KEY, account_id bigint NOT NULL, priority int NOT NULL,"
                " expires_at timestamptz, remaining bigint NOT NULL)"
            )
        )
        conn.execute(
            text("CREATE INDEX grants_draw ON grants (account_id, priority DESC, expires_at, id) WHERE remaining > 0")
        )
        conn.execute(
            text(
                "CREATE TABLE allocations (id bigserial PRIMARY KEY, entry_id bigint NOT NULL, grant_id bigint NOT"
                " NULL, units bigint NOT NULL)"
            )
        )
        # Accounts 1..n: one grant each; accounts n+1..2n: the several-grants scenario's.
        conn.execute(
            text("INSERT INTO accounts SELECT g, :units FROM generate_series(1, 2 * :n) g"),
            {"units": START_UNITS, "n": accounts},
        )
        conn.execute(
            text("INSERT INTO grants (account_id, priority, remaining) SELECT id, -1, :units FROM accounts"),
            {"units": START_UNITS},
        )
        conn.execute(
            text(
                "INSERT INTO grants (account_id, priority, expires_at, remaining) SELECT a.id, k % 4,"
                " CASE WHEN k % 5 = 0 THEN NULL ELSE now() + make_interval(days => 1 + k % 4) END, :u"
                " FROM accounts a, generate_series(1, :small) k WHERE a.id > :n"
            ),
            {"u": MULTI_GRANT_UNITS, "small": small_grants, "n": accounts},
        )
        conn.execute(text("ANALYZE"))
    engine.dispose()


# The baseline: one statement per consume, as the ledger sends one (pgbench -M prepared, like the ledger's
# prepared SELECT ledger_consume). A conditional balance update, the grants drawn in order (priority, expiry,
# id) up to the units, the entry under a unique key naming its grant, and, like the ledger, one allocation row per
# grant only when more than one grant funded it.
PGBENCH_SCRIPT = """\\set aid random({first}, {last})
\\set k random(1, 1000000000000)
WITH account AS (
  UPDATE accounts SET balance = balance - {units} WHERE id = :aid::bigint AND balance >= {units} RETURNING id, balance),
ordered AS (
  SELECT g.id, g.remaining, sum(g.remaining) OVER (ORDER BY g.priority DESC, g.expires_at ASC NULLS LAST, g.id
    ROWS UNBOUNDED PRECEDING) - g.remaining AS before
  FROM grants g WHERE g.account_id = :aid::bigint AND g.remaining > 0 AND (g.expires_at IS NULL OR g.expires_at > now())
  ORDER BY g.priority DESC, g.expires_at ASC NULLS LAST, g.id LIMIT {units}),
drawn AS (
  UPDATE grants SET remaining = grants.remaining - least(o.remaining, {units} - o.before)
  FROM ordered o, account WHERE grants.id = o.id AND o.before < {units}
  RETURNING grants.id, least(o.remaining, {units} - o.before) AS take),
entry AS (
  INSERT INTO entries (account_id, units, balance_after, idempotency_key, grant_id)
  SELECT id, -{units}, balance, :client_id::text || '-' || :k::text, (SELECT min(id) FROM drawn) FROM account
  ON CONFLICT (idempotency_key) DO NOTHING RETURNING id)
INSERT INTO allocations (entry_id, grant_id, units)
SELECT entry.id, drawn.id, -drawn.take FROM entry, drawn WHERE (SELECT count(*) FROM drawn) > 1;
"""


# The ledger's own work driven by pgbench's C client: what the server side costs without Python. Alone (what
# consume_standalone sends: the one statement, its own transaction), or in BEGIN ... END (consume in a session).
# (The key is spelled 'consume:' || 'pgb-...': pgbench would take ":pgb" inside one literal for a variable.)
FUNCTION_CALL = """SELECT status FROM ledger_consume('{prefix}' || :aid::text,
  'pgb-' || :client_id::text || '-' || :k::text, 'consume:' || 'pgb-' || :client_id::text || '-' || :k::text,
  {units}, 'pgbench', 'pgbench', '', now(), NULL);
"""
FUNCTION_SCRIPT = "\\set aid random(1, {accounts})\n\\set k random(1, 1000000000000)\n" + FUNCTION_CALL
FUNCTION_SCRIPT_IN_TRANSACTION = (
    "\\set aid random(1, {accounts})\n\\set k random(1, 1000000000000)\nBEGIN;\n" + FUNCTION_CALL + "END;\n"
)


def pgbench_tps(url: URL, scenario: Scenario, workers: int, seconds: float, template: str, base_accounts: int) -> float:
    """TPS of pgbench running ``template`` (one prepared statement per transaction) for this scenario."""
    first = base_accounts + 1 if scenario.prefix == MULTI_PREFIX else 1
    script = template.format(
        accounts=scenario.accounts, prefix=scenario.prefix, units=scenario.units,
        first=first, last=first + scenario.accounts - 1,
    )  # fmt: skip
    url_text = url.render_as_string(hide_password=False)
    return run_pgbench(url_text, script, workers, seconds, threads=workers).tps


def _worker_process(
    url: str,
    threads: int,
    accounts: int,
    prefix: str,
    units: int,
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
        request_prefix = f"{seed}-{index}-{os.getpid()}-"
        i = 0
        warmed = False
        while True:
            now = time.time()
            if now >= stop_at:
                break
            if now < start_at and warmed:
                time.sleep(min(0.01, start_at - now))
                continue
            customer = f"{prefix}{rng.randint(1, accounts)}"
            if in_session:
                with db.unit_of_work() as session:
                    consume(session, customer, request_id=request_prefix + str(i), units=units)
            else:
                consume_standalone(customer, request_id=request_prefix + str(i), units=units)
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
    url: URL, scenario: Scenario, workers: int, seconds: float, processes: int, in_session: bool, warmup: float = 1.5
) -> tuple[float, str]:
    """Consumes per second with ``workers`` concurrent consumers spread over up to ``processes`` processes."""
    procs = min(workers, processes) if processes > 0 else workers
    layout = [workers // procs + (1 if p < workers % procs else 0) for p in range(procs)]
    ctx = mp.get_context("fork")
    results: mp.Queue[int] = ctx.Queue()
    start_at = time.time() + warmup + 0.05 * procs  # time to connect and warm up
    stop_at = start_at + seconds
    rendered = url.render_as_string(hide_password=False)
    children = [
        ctx.Process(
            target=_worker_process,
            args=(
                rendered,
                n,
                scenario.accounts,
                scenario.prefix,
                scenario.units,
                p,
                start_at,
                stop_at,
                in_session,
                results,
            ),
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
        violations = check_ledger(session, HOT_CUSTOMER) + check_ledger(session, MULTI_PREFIX + "1")
    db.set_engine(None)
    engine.dispose()
    return len(violations)


def grants_per_consume(url: URL, prefix: str) -> float:
    """How many grants the ledger's consumes on these accounts drew from, on average (allocations per entry)."""
    engine = create_engine(url)
    with engine.connect() as conn:
        entries, grants = conn.execute(
            text(
                "SELECT count(*), coalesce(sum(greatest(1, (SELECT count(*) FROM allocations al"
                " WHERE al.entry_id = e.id))), 0) FROM entries e JOIN accounts a ON a.id = e.account_id"
                " WHERE e.kind = 'consume' AND a.customer_id LIKE :p || '%'"
            ),
            {"p": prefix},
        ).one()
    engine.dispose()
    return float(grants) / entries if entries else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default=None, help="PostgreSQL server to use (default: DATABASE_URL)")
    parser.add_argument("--seconds", type=float, default=4.0, help="duration of each measurement")
    parser.add_argument("--workers", default="1,8,32", help="comma-separated concurrency levels")
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument(
        "--small-grants", type=int, default=0,
        help="small grants per account in the several-grants scenario (default: enough for the run's consumes)",
    )  # fmt: skip
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="OS processes the ledger's workers are spread over, as threads (default: one per CPU; "
                             "0: one process per worker)")  # fmt: skip
    parser.add_argument(
        "--session",
        action="store_true",
        help="measure consume(session, ...) in unit_of_work(), not consume_standalone()",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: 1 s per measurement, 2 workers, 50 accounts")
    args = parser.parse_args()
    warmup = 1.5
    if args.smoke:
        args.seconds, args.workers, args.accounts, warmup = 1.0, "2", 50, 0.3

    raw = args.database_url or get_settings().database_url
    if not raw.startswith("postgresql"):
        print("bench_ledger needs PostgreSQL: set DATABASE_URL or pass --database-url", file=sys.stderr)
        return 2
    if shutil.which("pgbench") is None:
        print("bench_ledger needs pgbench on PATH", file=sys.stderr)
        return 2
    base = make_url(raw.replace("postgresql://", "postgresql+psycopg://", 1))
    levels = [int(w) for w in args.workers.split(",")]
    scenarios = [
        Scenario(f"{args.accounts:,} accounts", args.accounts),
        Scenario("1 hot account", 1),
        Scenario(f"{args.accounts:,} accounts, several grants", args.accounts, MULTI_PREFIX, MULTI_UNITS),
    ]
    # Enough small grants that the ledger's and the function's consumes (at a generous 4,000/s each) keep
    # drawing several of them to the end; past that they would draw the large fallback grant alone.
    small_grants = args.small_grants or max(
        20, int(2 * 4000 * args.seconds * len(levels) * MULTI_UNITS / MULTI_GRANT_UNITS / args.accounts) + 10
    )

    tag = f"{os.getpid()}"
    ledger_url = create_database(base, f"bench_ledger_{tag}")
    pgbench_url = create_database(base, f"bench_pgbench_{tag}")
    rows: list[tuple[Scenario, int, float, float, float, str]] = []
    try:
        started = time.time()
        seed_ledger(ledger_url, args.accounts, small_grants)
        seed_pgbench(pgbench_url, args.accounts, small_grants)
        print(
            f"seeded {args.accounts:,} accounts with one grant and {args.accounts:,} with {small_grants} small grants"
            f" in {time.time() - started:.1f}s; {args.seconds:g}s per measurement"
        )
        function_script = FUNCTION_SCRIPT_IN_TRANSACTION if args.session else FUNCTION_SCRIPT
        for scenario in scenarios:
            for workers in levels:
                # Each run starts on tables as autovacuum keeps them (this machine's server runs without it).
                vacuum(ledger_url.render_as_string(hide_password=False))
                ledger_rate, layout = run_ledger(
                    ledger_url, scenario, workers, args.seconds, args.processes, args.session, warmup
                )
                vacuum(pgbench_url.render_as_string(hide_password=False))
                baseline_tps = pgbench_tps(pgbench_url, scenario, workers, args.seconds, PGBENCH_SCRIPT, args.accounts)
                vacuum(ledger_url.render_as_string(hide_password=False))
                function_tps = pgbench_tps(ledger_url, scenario, workers, args.seconds, function_script, args.accounts)
                rows.append((scenario, workers, ledger_rate, baseline_tps, function_tps, layout))
                print(
                    f"  {scenario.name:<30} {workers:>3} workers: ledger {ledger_rate:>8,.0f}/s  "
                    f"pgbench {baseline_tps:>8,.0f} tps  ({ledger_rate / baseline_tps:.0%})  "
                    f"pgbench->ledger_consume {function_tps:>8,.0f} tps",
                    flush=True,
                )
        violations = check_consistency(ledger_url)
        drawn_from = grants_per_consume(ledger_url, MULTI_PREFIX)
    finally:
        drop_database(ledger_url)
        drop_database(pgbench_url)

    print()
    print(
        f"{'scenario':<32}{'workers':>8}{'ledger consumes/s':>19}{'pgbench tps':>13}{'ratio':>7}"
        f"{'server-side only':>18}{'ratio':>7}  layout"
    )
    print("-" * 112)
    for scenario, workers, rate, tps, fn_tps, layout in rows:
        print(
            f"{scenario.name:<32}{workers:>8}{rate:>19,.0f}{tps:>13,.0f}{rate / tps:>7.0%}"
            f"{fn_tps:>18,.0f}{fn_tps / tps:>7.0%}  {layout} procs x threads"
        )
    print()
    if args.session:
        ledger_work = "consume(session, ...) in unit_of_work(): BEGIN; SELECT ledger_consume(...); COMMIT"
        function_work = "pgbench's C client sending BEGIN; SELECT ledger_consume(...); END (prepared)"
    else:
        ledger_work = "consume_standalone(), the usage API's call: one prepared SELECT ledger_consume(...), autocommit"
        function_work = "pgbench's C client sending the same SELECT ledger_consume(...), prepared, autocommit"
    baseline_work = (
        "pgbench -M prepared, one statement per consume in autocommit: a CTE updating the balance conditionally,"
        " drawing grants in priority/expiry order, inserting the entry under a unique key (and allocation rows"
        " when several grants fund it)"
    )
    print(f"ledger consumes/s: {ledger_work}")
    print(f"server-side only: {function_work}")
    print(f"pgbench tps: {baseline_work}")
    print(
        f"several grants: each consume takes {MULTI_UNITS} units from grants of {MULTI_GRANT_UNITS} (priorities 0-3,"
        f" expiries 1-4 days or none); the ledger's consumes drew from {drawn_from:.2f} grants on average"
    )
    for scenario, workers, rate, tps, fn_tps, _ in rows:
        label = f"{scenario.name}, {workers} workers"
        figure(
            f"ledger consume, {label}", f"{rate:,.0f} consumes/s", baseline=f"pgbench {tps:,.0f} tps",
            ratio=f"{rate / tps:.0%}", work=ledger_work, baseline_work=baseline_work,
        )  # fmt: skip
        figure(
            f"ledger_consume() driven by pgbench, {label}", f"{fn_tps:,.0f} tps", baseline=f"pgbench {tps:,.0f} tps",
            ratio=f"{fn_tps / tps:.0%}", work=function_work, baseline_work=baseline_work,
        )  # fmt: skip
    top = max(levels)
    for scenario, workers, rate, tps, _, _ in rows:
        if workers == top:
            verdict = "meets" if rate >= 0.5 * tps else "BELOW"
            print(f"target at {top} workers, {scenario.name}: {rate / tps:.1%} of pgbench ({verdict} the 50% target)")
    print(f"ledger check on the hot account and a several-grants account after the run: {violations} violation(s)")
    print(f"machine: {machine_load()} at the end")
    return 0 if violations == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
