"""Benchmark the worker: stored Stripe events applied per second by one worker (prefork, concurrency 2) on
PostgreSQL + Redis, beside two baselines doing the same work without the worker's logic.

Events are a generated, real-shaped stream (top-ups, renewals, failed renewals, refunds, disputes,
cancellations: tests/worker/streams.py), stored in the inbox first, then handed over as the receiver does: ids
only, ``--batch`` (100) ids per message, and one id per message. Measured with the worker's commits
asynchronous (``synchronous_commit`` off, its default) and synchronous (``WORKER_SYNCHRONOUS_COMMIT=true``).

Baselines, each measured in the same run:
- no-op tasks: ``worker.noop`` receiving the very same ids, as many per message, sent the same way (the broker,
  the pool and the messages, without the work);
- the database's limit: the SQL statements applying a sample of the stream cost, recorded from the worker's own
  processing of it (every statement, with its parameters), replayed by pgbench (C client, one connection per
  worker process, the sample's statements in one transaction, rolled back so each pass finds the same state) on
  a copy of the database taken before the sample was applied.

    DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/br_worker \\
    CELERY_BROKER_URL=redis://127.0.0.1:6379/3 python scripts/bench_worker.py

It works in scratch databases created beside DATABASE_URL's and dropped at the end. Figures on a shared machine
are only comparable as ratios; the no-op and event runs alternate (``--rounds``) and the table pools them, so
that other load on the machine weighs on both alike.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from benchkit import drop_database, scratch_database  # noqa: E402

# Sizes for scripts/bench_all.py (smoke: the test suite's run; quick: its default; full: its --full).
BENCH_ALL = {
    "smoke": ["--smoke"],
    "quick": ["--customers", "120", "--single", "300"],
    "full": [],
    "uses": ["redis"],  # its worker consumes the "events" queue
}

BILLING_CONFIG = """
[[packs]]
price = "price_credits_small"
credits = 1000

[[plans]]
price = "price_1IDQm5JDPojXS6LNM31hxKzp"
credits_per_period = 10000

[[plans]]
price = "price_1234"
credits_per_period = 50000
period_end = "rollover"
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=400, help="customers in each round (about 12 events each)")
    parser.add_argument("--batch", type=int, default=100, help="event ids per message")
    parser.add_argument("--single", type=int, default=1000, help="events sent one id per message (0: skip)")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument(
        "--rounds", type=int, default=3, help="no-op and event runs, alternated so that other load hits both alike"
    )
    parser.add_argument("--sample", type=int, default=8, help="customers per worker process in the replayed sample")
    parser.add_argument("--replay-seconds", type=int, default=5, help="pgbench's replay time")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: 4 customers, 1 round, 24 single events")
    args = parser.parse_args()
    if args.smoke:
        args.customers, args.single, args.rounds, args.sample, args.replay_seconds = 4, 24, 1, 1, 1

    raw = os.environ.get("DATABASE_URL", "")
    if not raw.startswith("postgresql") or not os.environ.get("CELERY_BROKER_URL", "").startswith("redis"):
        print("error: set DATABASE_URL to PostgreSQL and CELERY_BROKER_URL to Redis", file=sys.stderr)
        return 2
    if shutil.which("pgbench") is None:
        print("error: bench_worker needs pgbench on PATH", file=sys.stderr)
        return 2
    from sqlalchemy.engine import make_url

    base = make_url(raw.replace("postgresql://", "postgresql+psycopg://", 1))
    scratch = base.set(database=f"bench_worker_{os.getpid()}")
    replicas = [base.set(database=f"bench_worker_replay_{os.getpid()}_{n}") for n in range(args.concurrency)]
    scratch_database(base.render_as_string(hide_password=False), str(scratch.database))
    os.environ["DATABASE_URL"] = scratch.render_as_string(hide_password=False)
    config = Path(tempfile.mkdtemp(prefix="bench-worker-")) / "billing.toml"
    config.write_text(BILLING_CONFIG, encoding="utf-8")
    os.environ["BILLING_CONFIG"] = str(config)
    os.environ.pop("CELERY_TASK_ALWAYS_EAGER", None)
    os.environ.pop("WORKER_SYNCHRONOUS_COMMIT", None)
    try:
        return run(args, scratch, replicas)
    finally:
        for url in [scratch, *replicas]:
            drop_database(url.render_as_string(hide_password=False))


def admin(url: Any, *statements: str) -> None:
    """Run statements on the server's postgres database, in autocommit."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        for statement in statements:
            conn.execute(text(statement))
    engine.dispose()


def record_statements(process: Any) -> tuple[list[str], int]:
    """The SQL statements ``process()`` sends (through SQLAlchemy and straight on the driver connection, as the
    ledger's functions are called), each with its parameters inlined; and how many transactions it committed.
    Session settings the worker sets around its batches are left out."""
    import psycopg

    statements: list[str] = []
    commits = [0]
    execute, executemany, commit = psycopg.Cursor.execute, psycopg.Cursor.executemany, psycopg.Connection.commit

    def keep(cursor: Any, query: Any, params: Any) -> None:
        text = query.as_string(cursor.connection) if hasattr(query, "as_string") else query
        text = text.decode() if isinstance(text, bytes) else str(text)
        if not re.match(r"\s*(SET|RESET)\s+synchronous_commit", text, re.IGNORECASE):
            statements.append(psycopg.ClientCursor(cursor.connection).mogrify(text, params or None))

    def recording_execute(cursor: Any, query: Any, params: Any = None, **kwargs: Any) -> Any:
        keep(cursor, query, params)
        return execute(cursor, query, params, **kwargs)

    def recording_executemany(cursor: Any, query: Any, params_seq: Any, **kwargs: Any) -> Any:
        params_seq = list(params_seq)
        for params in params_seq:
            keep(cursor, query, params)
        return executemany(cursor, query, params_seq, **kwargs)

    def counting_commit(conn: Any) -> Any:
        commits[0] += 1
        return commit(conn)

    psycopg.Cursor.execute = recording_execute  # type: ignore[method-assign]
    psycopg.Cursor.executemany = recording_executemany  # type: ignore[method-assign]
    psycopg.Connection.commit = counting_commit  # type: ignore[method-assign]
    try:
        process()
    finally:
        psycopg.Cursor.execute, psycopg.Cursor.executemany = execute, executemany  # type: ignore[method-assign]
        psycopg.Connection.commit = commit  # type: ignore[method-assign]
    return statements, commits[0]


def sequence_values() -> str:
    """Statements that set every sequence of the database back to where it is now."""
    from sqlalchemy import text

    from ledger.db import get_engine

    with get_engine().connect() as conn:
        rows = conn.execute(text("SELECT schemaname, sequencename, last_value FROM pg_sequences")).all()
    return "".join(
        f'SELECT setval(\'"{schema}"."{name}"\', {value if value is not None else 1}, {value is not None});\n'
        for schema, name, value in rows
    )


def replay(
    urls: list[Any], samples: list[tuple[list[str], int, str]], seconds: int, workdir: Path
) -> tuple[float, str]:
    """Events per second pgbench reaches replaying each sample's statements (one pgbench per sample, at once,
    each on its own copy of the database, its sequences set back before each pass so ids come out as recorded)."""
    procs = []
    for n, ((statements, _events, sequences), url) in enumerate(zip(samples, urls, strict=True)):
        script = workdir / f"replay_{n}.sql"
        body = "".join(s.strip().rstrip(";").replace("\\", "\\\\") + ";\n" for s in statements)
        script.write_text(
            f"BEGIN;\nSET LOCAL synchronous_commit TO off;\n{sequences}{body}ROLLBACK;\n", encoding="utf-8"
        )
        cmd = [
            "pgbench", "-n", "-c", "1", "-j", "1", "-T", str(seconds), "-f", str(script),
            "-h", url.host or "127.0.0.1", "-p", str(url.port or 5432), "-U", url.username or "postgres",
            url.database or "",
        ]  # fmt: skip
        env = dict(os.environ, PGPASSWORD=url.password or "")
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    rate = 0.0
    for proc, (_statements, events, _sequences) in zip(procs, samples, strict=True):
        out, err = proc.communicate()
        match = re.search(r"tps = ([0-9.]+)", out)
        if proc.returncode != 0 or match is None:
            raise RuntimeError(f"pgbench replay failed: {err.strip()[-2000:] or out.strip()[-2000:]}")
        rate += float(match.group(1)) * events
    return rate, f"{len(samples)} pgbench x 1 connection"


def run(args: argparse.Namespace, scratch: Any, replicas: list[Any]) -> int:
    import orjson
    import redis
    from benchkit import figure, machine_load
    from sqlalchemy import func, select
    from stripe_emulator import EmulatorServer, Store

    from ledger.db import get_engine, unit_of_work
    from ledger.inbox import EventStatus, StripeEvent, parse_envelope, store_events
    from ledger.migrate import migrate
    from ledger.settings import get_settings
    from tests.worker.streams import generate_stream
    from worker.celery_app import configure
    from worker.enqueue import hand_over
    from worker.gateway import StripeGateway
    from worker.processing import process_events
    from worker.tasks import noop

    settings = get_settings()
    migrate()
    app = configure()
    broker = redis.Redis.from_url(settings.celery_broker_url)
    broker.delete("events", "unacked", "unacked_index")

    emulator = EmulatorServer(Store()).start()
    gateway = StripeGateway(api_base=emulator.url)
    seed = random.randrange(10**6)
    modes = ("off", "on")

    def store_all(stream: list[dict[str, object]]) -> list[int]:
        ids: list[int] = []
        for start in range(0, len(stream), 500):
            items = [(orjson.dumps(e), parse_envelope(e)) for e in stream[start : start + 500]]
            with unit_of_work() as session:
                ids.extend(store_events(session, items).values())
        return ids

    def done(ids: list[int]) -> int:
        # A contiguous block of ids (what one store_all gives) is counted by range: polling with an IN list of
        # thousands of ids would cost the database more CPU than the work being measured can spare.
        low, high = min(ids), max(ids)
        among = StripeEvent.id.between(low, high) if high - low + 1 == len(set(ids)) else StripeEvent.id.in_(ids)
        finished = StripeEvent.status.in_([EventStatus.PROCESSED, EventStatus.IGNORED])
        with unit_of_work() as session:
            return int(session.scalar(select(func.count()).select_from(StripeEvent).where(among, finished)) or 0)

    def finished_at(ids: list[int]) -> float:
        """Wall time (epoch) when the last of these events was marked, read from the events themselves."""
        with unit_of_work() as session:
            last = session.scalar(select(func.max(StripeEvent.processed_at)).where(StripeEvent.id.in_(ids)))
        assert last is not None
        return float(last.timestamp())

    def wait_done(ids: list[int]) -> None:
        # Polled gently (a tight loop of big IN-list counts would steal the database's CPU from the worker).
        while done(ids) < len(ids):
            time.sleep(0.25)

    def drained() -> bool:
        return broker.llen("events") == 0 and broker.hlen("unacked") == 0

    # Fresh events for every measured run (each run applies its events once), then the replay sample.
    stored: dict[str, Any] = {}
    for m, mode in enumerate(modes):
        base_seed = seed + 100 * m
        stored[mode] = {
            "warmup": store_all(generate_stream(customers=2 if args.smoke else 20, seed=base_seed + 2)),
            "rounds": [
                store_all(generate_stream(customers=args.customers, seed=base_seed + 10 + n))
                for n in range(args.rounds)
            ],
            "single": store_all(generate_stream(customers=max(1, args.single // 12), seed=base_seed + 1))
            if args.single
            else [],
        }
    samples_ids = [
        store_all(generate_stream(customers=args.sample, seed=seed + 900 + n)) for n in range(args.concurrency)
    ]
    # The events were all just written: vacuum and analyze them now, rather than have autovacuum do it in the
    # middle of the first measured round. Then the replay's copy, taken before the sample is applied.
    with get_engine().connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE")
    get_engine().dispose()
    admin(scratch, *(f'CREATE DATABASE "{r.database}" TEMPLATE "{scratch.database}"' for r in replicas))
    samples = []
    for ids in samples_ids:
        # Each sample replays on its own copy: the others' rows are not there, and its ids must come out as
        # recorded, so its copy's sequences start each pass where this database's stand now.
        sequences = sequence_values()
        statements, commits = record_statements(lambda ids=ids: process_events(ids, gateway=gateway))
        samples.append((statements, len(ids), sequences))
        print(
            f"replay sample: {len(ids)} events applied in-process: {len(statements)} statements"
            f" ({len(statements) / len(ids):.1f} per event), {commits} commits"
        )

    rows: dict[tuple[str, str], tuple[int, float]] = {}  # (mode, workload) -> (count, seconds)
    ratios: dict[str, list[float]] = {}
    worker: subprocess.Popen[bytes] | None = None
    try:
        for mode in modes:
            env = dict(os.environ, STRIPE_API_BASE=emulator.url, WORKER_SYNCHRONOUS_COMMIT=str(mode == "on").lower())
            worker = subprocess.Popen(
                [
                    sys.executable, "-c", "from worker.cli import main; main()", "worker",
                    f"--concurrency={args.concurrency}", "--queues=events", "--loglevel=WARNING",
                ],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            # Warm up: the pool is forked and connected before any clock starts, and has applied some events
            # (statement caches and prepared statements warm, as the no-op path's are).
            for _ in range(20):
                noop.apply_async(args=[[0]])
            warmup = stored[mode]["warmup"]
            for start in range(0, len(warmup), args.batch):
                hand_over(warmup[start : start + args.batch])
            deadline = time.monotonic() + 120
            while not drained() and time.monotonic() < deadline:
                time.sleep(0.05)
            wait_done(warmup)

            def send_noop(ids: list[int], per_message: int) -> float:
                # The same messages the events get: the same ids, as many per message, sent the same way.
                started = time.perf_counter()
                for start in range(0, len(ids), per_message):
                    noop.apply_async(args=[ids[start : start + per_message]])
                while not drained():
                    time.sleep(0.01)
                return time.perf_counter() - started

            def send_events(ids: list[int], per_message: int) -> float:
                started = time.time()
                for start in range(0, len(ids), per_message):
                    hand_over(ids[start : start + per_message])
                wait_done(ids)
                return finished_at(ids) - started

            def add(key: tuple[str, str], count: int, seconds: float) -> None:
                c, s = rows.get(key, (0, 0.0))
                rows[key] = (c + count, s + seconds)

            for ids in stored[mode]["rounds"]:
                noop_s, events_s = send_noop(ids, args.batch), send_events(ids, args.batch)
                add((mode, "noop-batch"), len(ids), noop_s)
                add((mode, "events-batch"), len(ids), events_s)
                ratios.setdefault(mode, []).append(noop_s / events_s)
            single = stored[mode]["single"]
            if single:
                add((mode, "noop-single"), len(single), send_noop(single, 1))
                add((mode, "events-single"), len(single), send_events(single, 1))
            os.killpg(worker.pid, 9)
            worker.wait()
            worker = None
        with tempfile.TemporaryDirectory() as workdir:
            limit, layout = replay(replicas, samples, args.replay_seconds, Path(workdir))
    finally:
        if worker is not None:
            os.killpg(worker.pid, 9)
            worker.wait()
        emulator.stop()

    with unit_of_work() as session:
        failed = session.scalar(
            select(func.count())
            .select_from(StripeEvent)
            .where(StripeEvent.status.in_([EventStatus.FAILED, EventStatus.WAITING, EventStatus.PENDING]))
        )
    get_engine().dispose()
    rate = {key: count / seconds for key, (count, seconds) in rows.items()}
    where = app.conf.broker_url.split("@")[-1]
    print(f"worker benchmark: prefork concurrency {args.concurrency}, PostgreSQL + Redis ({where})")
    print(f"{'synchronous_commit':<20}{'workload':36} {'count':>7} {'seconds':>8} {'per second':>11}")
    names = {
        "noop-batch": f"no-op task, {args.batch} ids/message",
        "events-batch": f"events, {args.batch} ids/message",
        "noop-single": "no-op task, 1 id/message",
        "events-single": "events, 1 id/message",
    }
    for (mode, workload), (count, seconds) in rows.items():
        print(f"{mode:<20}{names[workload]:36} {count:>7} {seconds:>8.2f} {count / seconds:>11.0f}")
    print(f"{'(replay)':<20}{'pgbench, the statements of the sample':36} {'':>7} {'':>8} {limit:>11.0f}")
    for mode in modes:
        each = ", ".join(f"{r:.2f}x" for r in sorted(ratios.get(mode, [])))
        print(f"rounds, synchronous_commit {mode}: events vs no-op per round: {each}")
    event_work = (
        "stored Stripe events handed over {n} id(s) per message, applied (claim, handler, status) and committed"
    )
    for mode in modes:
        for n, suffix in ((args.batch, "batch"), (1, "single")):
            if (mode, f"events-{suffix}") not in rate:
                continue
            events, noops = rate[(mode, f"events-{suffix}")], rate[(mode, f"noop-{suffix}")]
            figure(
                f"worker, prefork {args.concurrency}, {n} id(s)/message, synchronous_commit {mode}",
                f"{events:,.0f} events/s",
                baseline=f"no-op {noops:,.0f} ids/s",
                ratio=events / noops,
                work=event_work.format(n=n) + f", synchronous_commit {mode}",
                baseline_work=f"worker.noop tasks receiving the same ids, {n} per message, doing nothing",
            )
    figure(
        f"worker, prefork {args.concurrency}, {args.batch} ids/message, synchronous_commit off, vs the database",
        f"{rate[('off', 'events-batch')]:,.0f} events/s",
        baseline=f"pgbench replay {limit:,.0f} events/s",
        ratio=rate[("off", "events-batch")] / limit,
        work=event_work.format(n=args.batch) + ", synchronous_commit off",
        baseline_work=f"the SQL statements the worker sent applying a sample of the stream, inlined and replayed by"
        f" {layout} ({args.concurrency} in all, as the worker's processes), the sample in one transaction rolled"
        " back (no commit wait: as with synchronous_commit off)",
    )
    on, off = rate[("on", "events-batch")], rate[("off", "events-batch")]
    figure(
        f"worker, {args.batch} ids/message, synchronous_commit on vs off",
        f"{on:,.0f} events/s on",
        baseline=f"{off:,.0f} events/s off",
        ratio=on / off,
        work="the same stream, the worker's commits waiting for the WAL flush",
        baseline_work="the worker's default: commits not waiting for the flush",
    )
    print(f"events not processed or ignored: {failed}")
    print(f"machine: {machine_load()} at the end")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
