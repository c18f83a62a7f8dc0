"""Benchmark the worker: stored Stripe events applied per second by one worker (prefork, concurrency 2) on
PostgreSQL + Redis, beside the same worker's rate on a no-op task, and the ratio.

Events are a generated, real-shaped stream (top-ups, renewals, failed renewals, refunds, disputes,
cancellations: tests/worker/streams.py), stored in the inbox first, then handed over as the receiver does: ids
only, in batches (one message per batch). The no-op rate is one message per task, the worker's ceiling for
per-event tasks. A third row shows per-event messages (1 id per message) for comparison.

    DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/br_worker \\
    CELERY_BROKER_URL=redis://127.0.0.1:6379/3 python scripts/bench_worker.py

The events are added to that database (fresh ids each run); nothing is deleted. Figures on a shared machine are
only comparable as ratios; the no-op and batched runs alternate (``--rounds``) and the table pools them, so that
other load on the machine weighs on both alike.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

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
    parser.add_argument("--customers", type=int, default=400, help="customers in the stream (about 12 events each)")
    parser.add_argument("--batch", type=int, default=100, help="event ids per message")
    parser.add_argument("--single", type=int, default=1000, help="events sent one id per message (0: skip)")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument(
        "--rounds", type=int, default=3, help="no-op and batched runs, alternated so that other load hits both alike"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: 4 customers, 1 round, 24 single events")
    args = parser.parse_args()
    if args.smoke:
        args.customers, args.single, args.rounds = 4, 24, 1

    config = Path(tempfile.mkdtemp(prefix="bench-worker-")) / "billing.toml"
    config.write_text(BILLING_CONFIG, encoding="utf-8")
    os.environ["BILLING_CONFIG"] = str(config)
    os.environ.pop("CELERY_TASK_ALWAYS_EAGER", None)

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
    from worker.tasks import noop

    settings = get_settings()
    if not settings.is_postgres or not settings.celery_broker_url.startswith("redis"):
        print("error: set DATABASE_URL to PostgreSQL and CELERY_BROKER_URL to Redis", file=sys.stderr)
        return 2
    migrate()
    app = configure()
    broker = redis.Redis.from_url(settings.celery_broker_url)
    broker.delete("events", "unacked", "unacked_index")

    emulator = EmulatorServer(Store()).start()
    seed = random.randrange(10**6)
    streams = [generate_stream(customers=args.customers, seed=seed + 10 + n) for n in range(args.rounds)]
    single_events = generate_stream(customers=max(1, args.single // 12), seed=seed + 1) if args.single else []

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

    warmup_ids = store_all(generate_stream(customers=2 if args.smoke else 20, seed=seed + 2))
    round_ids = [store_all(stream) for stream in streams]
    event_ids = [event_id for ids in round_ids for event_id in ids]
    single_ids = store_all(single_events)
    # The events were all just written: vacuum and analyze them now, rather than have autovacuum do it in the
    # middle of the first measured round.
    with get_engine().connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE stripe_events")

    env = dict(os.environ, STRIPE_API_BASE=emulator.url)
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from worker.cli import main; main()",
            "worker",
            f"--concurrency={args.concurrency}",
            "--queues=events",
            "--loglevel=WARNING",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    rows: list[tuple[str, int, float]] = []

    def pooled(name: str, runs: list[tuple[int, float]]) -> tuple[str, int, float]:
        return name, sum(count for count, _ in runs), sum(seconds for _, seconds in runs)

    try:
        # Warm up: the pool is forked and connected before any clock starts...
        for _ in range(20):
            noop.apply_async(args=[[0]])
        # ... and has applied some events: its statement caches and prepared statements are warm, as the no-op
        # path's are, and the first measured round is not charged for them.
        for start in range(0, len(warmup_ids), args.batch):
            hand_over(warmup_ids[start : start + args.batch])
        deadline = time.monotonic() + 60
        while not drained() and time.monotonic() < deadline:
            time.sleep(0.05)
        wait_done(warmup_ids)

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

        noop_runs: list[tuple[int, float]] = []
        batched_runs: list[tuple[int, float]] = []
        for ids in round_ids:
            noop_runs.append((len(ids), send_noop(ids, args.batch)))
            batched_runs.append((len(ids), send_events(ids, args.batch)))
        rows.append(pooled(f"no-op task, {args.batch} ids/message", noop_runs))
        rows.append(pooled(f"events, {args.batch} ids/message", batched_runs))
        if single_ids:
            rows.append(pooled("no-op task, 1 id/message", [(len(single_ids), send_noop(single_ids, 1))]))
            rows.append(pooled("events, 1 id/message", [(len(single_ids), send_events(single_ids, 1))]))
    finally:
        os.killpg(worker.pid, 9)
        worker.wait()
        emulator.stop()

    with unit_of_work() as session:
        failed = session.scalar(
            select(func.count())
            .select_from(StripeEvent)
            .where(
                StripeEvent.id.in_(event_ids + single_ids),
                StripeEvent.status.in_([EventStatus.FAILED, EventStatus.WAITING, EventStatus.PENDING]),
            )
        )
    where = app.conf.broker_url.split("@")[-1]
    print(f"worker benchmark: prefork concurrency {args.concurrency}, PostgreSQL + Redis ({where})")
    print(f"{'workload':40} {'count':>7} {'seconds':>8} {'per second':>11}")
    for name, count, seconds in rows:
        print(f"{name:40} {count:>7} {seconds:>8.2f} {count / seconds:>11.0f}")
    rate = {name: count / seconds for name, count, seconds in rows}
    ratios = sorted((b / bs) / (n / ns) for (n, ns), (b, bs) in zip(noop_runs, batched_runs, strict=True))
    print(f"rounds: {args.rounds}; batched events vs no-op per round: {', '.join(f'{r:.2f}x' for r in ratios)}")
    for per_message in [args.batch] + ([1] if single_ids else []):
        events, noops = (
            rate[f"events, {per_message} ids/message" if per_message > 1 else "events, 1 id/message"],
            (rate[f"no-op task, {per_message} ids/message" if per_message > 1 else "no-op task, 1 id/message"]),
        )
        figure(
            f"worker, prefork {args.concurrency}, {per_message} id(s)/message",
            f"{events:,.0f} events/s",
            baseline=f"no-op {noops:,.0f} ids/s",
            ratio=events / noops,
            work=f"stored Stripe events handed over {per_message} id(s) per message, applied to the ledger"
            " (claim, handler, status) and committed",
            baseline_work=f"worker.noop tasks receiving the same ids, {per_message} per message, doing nothing",
        )
    print(f"events not processed or ignored: {failed}")
    print(f"machine: {machine_load()} at the end")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
