"""Benchmark the metering client: the latency a wrapped AI call adds, and the client's throughput.

1. Wrapper overhead. The official ``openai`` package calls the fake provider (tests/client/fake_provider.py, its
   own process, replaying a recorded chat completion) directly, and through ``Billing.wrap_openai`` against
   ``billing-reconciler serve`` on PostgreSQL (its own process): the wrapped call adds a hold before and a capture
   after (``settle="background"``: only the hold; the capture runs after the answer). One caller, calls in
   alternating rounds so that other load on the machine weighs on all alike; the figure is p50(wrapped) -
   p50(unwrapped), target under 5 ms. The hold and capture round trips alone are shown.
2. Client throughput. ``Billing.record_usage`` from N threads, and ``AsyncBilling.record_usage`` with N tasks,
   against the same server, each beside a baseline in the same run that sends the same requests with bare httpx
   (same bodies, same connection pool size, no parsing, no retry layer): the ratio is what the client costs.
   Also ``record_usage_batch`` of 100 events.

It runs on a database of its own, created on DATABASE_URL's server and dropped at the end, and vacuums the tables
the calls update before each part: a database shared with earlier runs (this machine's PostgreSQL runs with
autovacuum off) kept every dead version of the same 100 accounts and gave each one more grant per run. (A full run
on such a database once measured +7.6 ms where the same code alone measured +4.3 ms; the machine's speed also
drifted then, so how much was the database is not known.)

    DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/br_bench python scripts/bench_client.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit import Server, drop_database, figure, free_port, scratch_database, vacuum  # noqa: E402

TOKEN = "tok_bench_client"
MODEL = "gpt-4o-2024-08-06"
PROMPT = [{"role": "user", "content": "Say Foo!"}]
TARGET_OVERHEAD_MS = 5.0

# Sizes for scripts/bench_all.py: smoke runs every path in seconds.
BENCH_ALL = {
    "smoke": ["--calls", "20", "--rounds", "1", "--seconds", "0.5", "--threads", "4"],
    "quick": ["--calls", "100", "--rounds", "2", "--seconds", "2"],
    "full": [],
}
CONFIG = f"""
[credits]
fallback_credits_per_minor_unit = "1"
[[models]]
provider = "openai"
model = "{MODEL}"
credits_per_million_input = "500"
credits_per_million_output = "2000"
credits_per_million_cached = "250"
cost_per_million_input_usd = "2.50"
cost_per_million_output_usd = "10.00"
cost_per_million_cached_usd = "1.25"
"""


def wait_until_up(url: str, process: subprocess.Popen[bytes]) -> None:
    """Wait until ``url`` answers (the fake provider has no /healthz)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url}: the server exited with {process.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def seed(customers: list[str]) -> None:
    """Open the customers' accounts with plenty of credits."""
    from ledger.accounts import open_account
    from ledger.db import get_engine, unit_of_work
    from ledger.grants import grant_credits
    from ledger.migrate import migrate
    from ledger.models import GrantSource

    migrate(get_engine())
    with unit_of_work() as session:
        for customer in customers:
            open_account(session, customer)
            grant_credits(
                session,
                customer,
                units=10**12,
                source=GrantSource.TOP_UP,
                idempotency_key=f"bench:{customer}:{uuid.uuid4().hex}",
            )


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- 1. wrapper overhead ------------------------------------------------------------------------------------------


def overhead(billing_url: str, provider_url: str, calls: int, rounds: int) -> dict[str, float]:
    import openai

    from webhooks.client import Billing

    plain_ms: list[float] = []
    wrapped_ms: list[float] = []
    background_ms: list[float] = []
    hold_ms: list[float] = []
    cpu: dict[str, float] = {"plain": 0.0, "wrapped": 0.0}
    capture_ms: list[float] = []
    # The stages of each wrapped call (inline settlement): its hold and capture requests (Billing.send) and the
    # provider call, timed where they happen; the rest of the call is the wrapper's own work.
    stage: dict[str, list[float]] = {"hold": [], "provider": [], "capture": [], "own": []}
    current: dict[str, float] | None = None
    with (
        Billing(billing_url, TOKEN) as billing,
        openai.OpenAI(base_url=f"{provider_url}/v1", api_key="sk-bench", max_retries=0) as client,
    ):
        send, create = billing.send, client.chat.completions.create

        def timed_send(request: Any) -> Any:
            start = time.perf_counter()
            try:
                return send(request)
            finally:
                if current is not None:
                    kind = "hold" if request.path == "/v1/holds" else "capture"
                    current[kind] = current.get(kind, 0.0) + (time.perf_counter() - start) * 1000

        def timed_create(_resource: Any, **request: Any) -> Any:
            start = time.perf_counter()
            try:
                return create(**request)
            finally:
                if current is not None:
                    current["provider"] = current.get("provider", 0.0) + (time.perf_counter() - start) * 1000

        # Instance attributes, set before wrapping: the unwrapped calls pay the same (negligible) timing.
        billing.send = timed_send  # type: ignore[method-assign]
        completions = client.chat.completions
        completions.create = types.MethodType(timed_create, completions)  # type: ignore[method-assign]
        wrapped = billing.wrap_openai(client, customer_id="cus_bench_0", feature="bench")
        background = billing.wrap_openai(client, customer_id="cus_bench_0", feature="bench", settle="background")

        def timed(fn: Callable[[], Any], into: list[float], cpu_key: str | None = None) -> None:
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            into.append((time.perf_counter() - start) * 1000)
            if cpu_key is not None:
                cpu[cpu_key] += time.process_time() - start_cpu

        for _ in range(20):  # warm both paths' connections and caches
            client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=100)
            wrapped.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=100)
        per_round = max(1, calls // rounds)
        for _ in range(rounds):
            for _ in range(per_round):
                timed(
                    lambda: client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=100),
                    plain_ms,
                    "plain",
                )
            for _ in range(per_round):
                current = {}
                timed(
                    lambda: wrapped.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=100),
                    wrapped_ms,
                    "wrapped",
                )
                for kind in ("hold", "provider", "capture"):
                    stage[kind].append(current.get(kind, 0.0))
                stage["own"].append(wrapped_ms[-1] - sum(current.values()))
                current = None
            for _ in range(per_round):
                timed(
                    lambda: background.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=100),
                    background_ms,
                )
                # Each call waits for the previous capture: the figure is the caller's latency, not a backlog.
                billing.flush()
        for _ in range(per_round):
            key = f"bench_{uuid.uuid4().hex}"
            timed(lambda key=key: billing.place_hold("cus_bench_0", request_id=key, units=300), hold_ms)
            timed(lambda key=key: billing.capture_hold(key, units=100), capture_ms)
    return {
        "plain_p50": statistics.median(plain_ms),
        "plain_p90": pct(plain_ms, 0.9),
        "wrapped_p50": statistics.median(wrapped_ms),
        "wrapped_p90": pct(wrapped_ms, 0.9),
        "background_p50": statistics.median(background_ms),
        "background_p90": pct(background_ms, 0.9),
        "hold_p50": statistics.median(hold_ms),
        "capture_p50": statistics.median(capture_ms),
        "n": float(len(plain_ms)),
        **{f"stage_{kind}_p50": statistics.median(values) for kind, values in stage.items()},
        # The caller's own CPU per call (this process): what the client costs, apart from waiting for servers.
        "plain_cpu": cpu["plain"] * 1000 / len(plain_ms),
        "wrapped_cpu": cpu["wrapped"] * 1000 / len(wrapped_ms),
    }


# --- 2. client throughput -----------------------------------------------------------------------------------------


def _body(customer: str) -> dict[str, Any]:
    return {
        "customer_id": customer,
        "request_id": f"bench_{uuid.uuid4().hex}",
        "provider": "openai",
        "model": MODEL,
        "input_tokens": 1200,
        "output_tokens": 350,
        "feature": "bench",
    }


def threads_rate(send: Callable[[dict[str, Any]], None], threads: int, seconds: float, customers: list[str]) -> float:
    done = [0] * threads
    stop = time.perf_counter() + seconds

    def work(i: int) -> None:
        while time.perf_counter() < stop:
            send(_body(customers[(i + done[i]) % len(customers)]))
            done[i] += 1

    start = time.perf_counter()
    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(done) / (time.perf_counter() - start)


def sync_throughput(url: str, threads: int, seconds: float, customers: list[str], rounds: int) -> tuple[float, float]:
    from webhooks.client import Billing

    limits = httpx.Limits(max_connections=threads, max_keepalive_connections=threads)
    client_rates, bare_rates = [], []
    with (
        Billing(url, TOKEN) as billing,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, limits=limits, timeout=10) as bare,
    ):

        def with_client(body: dict[str, Any]) -> None:
            customer = body.pop("customer_id")
            billing.record_usage(customer, **body)

        def with_bare(body: dict[str, Any]) -> None:
            bare.post("/v1/usage", json=body).raise_for_status()

        for _ in range(rounds):
            bare_rates.append(threads_rate(with_bare, threads, seconds, customers))
            client_rates.append(threads_rate(with_client, threads, seconds, customers))
    return statistics.mean(client_rates), statistics.mean(bare_rates)


async def _tasks_rate(send: Callable[[dict[str, Any]], Any], tasks: int, seconds: float, customers: list[str]) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def work(i: int) -> None:
        nonlocal done
        n = 0
        while time.perf_counter() < stop:
            await send(_body(customers[(i + n) % len(customers)]))
            n += 1
        done += n

    start = time.perf_counter()
    await asyncio.gather(*(work(i) for i in range(tasks)))
    return done / (time.perf_counter() - start)


async def async_throughput(
    url: str, tasks: int, seconds: float, customers: list[str], rounds: int
) -> tuple[float, float]:
    from webhooks.client import AsyncBilling

    limits = httpx.Limits(max_connections=tasks, max_keepalive_connections=tasks)
    client_rates, bare_rates = [], []
    async with (
        AsyncBilling(url, TOKEN, http=httpx.AsyncClient(base_url=url, limits=limits, timeout=10)) as billing,
        httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, limits=limits, timeout=10
        ) as bare,
    ):

        async def with_client(body: dict[str, Any]) -> None:
            customer = body.pop("customer_id")
            await billing.record_usage(customer, **body)

        async def with_bare(body: dict[str, Any]) -> None:
            (await bare.post("/v1/usage", json=body)).raise_for_status()

        for _ in range(rounds):
            bare_rates.append(await _tasks_rate(with_bare, tasks, seconds, customers))
            client_rates.append(await _tasks_rate(with_client, tasks, seconds, customers))
    return statistics.mean(client_rates), statistics.mean(bare_rates)


def batch_throughput(url: str, seconds: float, customers: list[str]) -> tuple[float, float]:
    from webhooks.client import Billing

    def rate(send: Callable[[list[dict[str, Any]]], None]) -> float:
        events, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            batch = [_body(customers[i % len(customers)]) for i in range(100)]
            send(batch)
            events += len(batch)
        return events / (time.perf_counter() - start)

    with (
        Billing(url, TOKEN) as billing,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as bare,
    ):
        bare_rate = rate(lambda batch: bare.post("/v1/usage/batch", json={"events": batch}).raise_for_status() and None)
        client_rate = rate(lambda batch: billing.record_usage_batch(batch) and None)  # type: ignore[arg-type,func-returns-value]
    return client_rate, bare_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per side for the overhead (default 300)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per throughput round (default 3)")
    parser.add_argument("--threads", type=int, default=16, help="threads / async tasks (default 16)")
    args = parser.parse_args()
    if not os.environ.get("DATABASE_URL", "").startswith("postgresql"):
        raise SystemExit("set DATABASE_URL=postgresql+psycopg://... (the usage API is measured on PostgreSQL)")

    database_url = scratch_database(os.environ["DATABASE_URL"], f"bench_client_{os.getpid()}")
    os.environ["DATABASE_URL"] = database_url
    workdir = Path(tempfile.mkdtemp(prefix="bench-client-"))
    (workdir / "billing.toml").write_text(CONFIG, encoding="utf-8")
    env = {
        **os.environ,
        "API_TOKENS": TOKEN,
        "BILLING_CONFIG": str(workdir / "billing.toml"),
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(REPO),
    }
    os.environ.update({k: env[k] for k in ("API_TOKENS", "BILLING_CONFIG")})
    customers = [f"cus_bench_{i}" for i in range(100)]

    provider_port = free_port()
    provider = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "client" / "fake_provider.py"), "--port", str(provider_port)], env=env
    )
    provider_url = f"http://127.0.0.1:{provider_port}"
    server: Server | None = None
    try:
        seed(customers)  # inside: its database is dropped whatever happens
        wait_until_up(f"{provider_url}/v1/messages", provider)
        server = Server(env, workers=1, start_timeout=60)
        billing_url = server.url
        load = os.getloadavg()
        print(f"machine: {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")

        vacuum(database_url)
        o = overhead(billing_url, provider_url, args.calls, args.rounds)
        added = o["wrapped_p50"] - o["plain_p50"]
        print(f"\n1. wrapped chat.completions.create vs the same call unwrapped ({int(o['n'])} calls each, 1 caller)")
        print(f"   unwrapped  p50 {o['plain_p50']:7.2f} ms   p90 {o['plain_p90']:7.2f} ms")
        print(f"   wrapped    p50 {o['wrapped_p50']:7.2f} ms   p90 {o['wrapped_p90']:7.2f} ms   (settle=inline)")
        print(
            f"   wrapped    p50 {o['background_p50']:7.2f} ms   p90 {o['background_p90']:7.2f} ms"
            "   (settle=background: the capture after the answer)"
        )
        added_background = o["background_p50"] - o["plain_p50"]
        print(
            f"   added at p50: {added:.2f} ms"
            f" (hold alone p50 {o['hold_p50']:.2f} ms, capture {o['capture_p50']:.2f} ms)"
        )
        print(
            f"   stages of a wrapped call, p50: hold {o['stage_hold_p50']:.2f} ms,"
            f" provider {o['stage_provider_p50']:.2f} ms (unwrapped {o['plain_p50']:.2f}),"
            f" capture {o['stage_capture_p50']:.2f} ms,"
            f" the wrapper's own work {o['stage_own_p50']:.2f} ms"
        )
        print(
            f"   caller CPU per call: unwrapped {o['plain_cpu']:.2f} ms, wrapped {o['wrapped_cpu']:.2f} ms"
            f" (+{o['wrapped_cpu'] - o['plain_cpu']:.2f} ms: two requests to the usage API and the wrapper's work)"
        )

        vacuum(database_url)
        client_rate, bare_rate = sync_throughput(billing_url, args.threads, args.seconds, customers, args.rounds)
        sync_client_rate, sync_bare_rate = client_rate, bare_rate
        print(f"\n2. POST /v1/usage, {args.threads} threads ({args.rounds} alternated rounds of {args.seconds:g} s)")
        print(
            f"   Billing.record_usage {client_rate:8.0f} req/s   bare httpx {bare_rate:8.0f} req/s"
            f"   ratio {client_rate / bare_rate:.2f}"
        )
        client_rate, bare_rate = asyncio.run(
            async_throughput(billing_url, args.threads, args.seconds, customers, args.rounds)
        )
        print(
            f"   AsyncBilling         {client_rate:8.0f} req/s   bare httpx {bare_rate:8.0f} req/s"
            f"   ratio {client_rate / bare_rate:.2f}   ({args.threads} tasks)"
        )
        client_rate, bare_rate = batch_throughput(billing_url, args.seconds, customers)
        print(
            f"   record_usage_batch   {client_rate:8.0f} events/s bare httpx {bare_rate:8.0f} events/s"
            f"   ratio {client_rate / bare_rate:.2f}   (batches of 100, 1 caller)"
        )
        print(f"   added at p50 with settle=background: {added_background:.2f} ms")
        figure(
            "metering wrapper, chat.completions.create, 1 caller: added latency at p50",
            f"+{added:.2f} ms (settle=background: +{added_background:.2f} ms)",
            baseline=f"the same call unwrapped: p50 {o['plain_p50']:.2f} ms",
            work="hold, the provider call, capture (the wrapper's whole dance) against the fake provider",
            baseline_work="the provider call alone against the fake provider",
        )
        figure(
            f"client Billing.record_usage, {args.threads} threads",
            f"{sync_client_rate:,.0f} req/s",
            baseline=f"bare httpx: {sync_bare_rate:,.0f} req/s",
            ratio=sync_client_rate / sync_bare_rate,
            work="POST /v1/usage through the typed client (retries, typed result)",
            baseline_work="the same POST /v1/usage bodies through a bare httpx client",
        )
        for mode, value in (("inline", added), ("background", added_background)):
            verdict = "met" if value < TARGET_OVERHEAD_MS else "NOT met"
            print(
                f"verdict: added latency (settle={mode}) at p50 {value:.2f} ms < {TARGET_OVERHEAD_MS:g} ms: {verdict}"
            )
    finally:
        if server is not None:
            server.stop()
        provider.terminate()
        provider.wait(20)
        drop_database(database_url)


if __name__ == "__main__":
    main()
