"""HTTP/1.1 load generators for the benchmarks: closed-loop (find the maximum) and open-loop (latency at a rate).

A closed loop keeps ``connections`` requests in flight, each connection sending its next request when the last
answer came: it finds the maximum rate, but its latencies hide queueing (a slow answer delays the next request
instead of making it wait). An open loop sends at a constant arrival rate whatever the answers do, like wrk2:
request ``i`` is due at ``start + i / rate`` and its latency counts from that due time, so a request that waited
for a free connection or behind a slow answer is charged for the wait (no coordinated omission). Report p50/p99 at
fractions of the closed loop's maximum (e.g. 50% and 80%)::

    from loadgen import closed_loop, open_loop

    def make_request(n: int) -> bytes:  # the whole request, bytes on the wire; n counts from 0
        return b"GET /healthz HTTP/1.1\\r\\nHost: bench\\r\\n\\r\\n"

    peak = closed_loop("127.0.0.1", 8000, make_request, duration=5, connections=64)
    for share in (0.5, 0.8):
        r = open_loop("127.0.0.1", 8000, make_request, rate=share * peak.rate, duration=5, connections=64)
        print(r.p50_ms, r.p99_ms, r.rate, r.counts)

``classify(status, body) -> str`` names each answer (default: the status code); ``ok`` says which names count
as successes for ``rate``.

A unit of work may take several requests on one connection (a hold, then its capture): ``make_request(n)`` then
returns a generator that yields each request's bytes and is sent each answer as ``(status, body)``; the unit's
latency runs from its first request (or due time) to its last answer, and its last answer is the one classified::

    def hold_then_capture(n: int) -> Exchange:
        status, _body = yield post("/v1/holds", hold_body(n))
        if status == 201:
            yield post(f"/v1/holds/hold-{n}/capture", b"{}")

Both functions block, running their own event loop (uvloop when installed); run them in a process of their own so
the generator does not share its interpreter with what it measures.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field
from typing import Any

# One unit of work of several requests on one connection: yields each request, is sent each answer.
Exchange = Generator[bytes, tuple[int, bytes], None]
MakeRequest = Callable[[int], bytes | Exchange]
Classify = Callable[[int, bytes], str]


@dataclass
class LoadResult:
    """What one load run measured; latencies in milliseconds, rates per second of the measured window."""

    mode: str  # "closed" or "open"
    duration: float
    offered_rate: float | None  # the open loop's arrival rate (None for a closed loop)
    requests: int  # answered in the measured window
    counts: dict[str, int] = field(default_factory=dict)  # answers by classify()'s name, plus "error"
    rate: float = 0.0  # successful answers per second
    p50_ms: float = float("nan")
    p90_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")
    max_send_lag_ms: float = 0.0  # open loop: how late the generator itself sent a request (its own limit)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    start = lower.find(b"content-length:")
    length = int(lower[start + 15 : lower.find(b"\r\n", start)]) if start >= 0 else 0
    body = await reader.readexactly(length) if length else b""
    return status, body, b"connection: close" in lower


async def _unit(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes | Exchange
) -> tuple[int, bytes, bool]:
    """Send one unit of work (a request, or an exchange of several) and read its answers; the last answer."""
    if isinstance(request, bytes):
        writer.write(request)
        return await _read_response(reader)
    status, body, close = 0, b"", False
    try:
        step = next(request)
        while True:
            writer.write(step)
            status, body, close = await _read_response(reader)
            if close:  # the server closes the connection: the exchange cannot go on on it
                return status, body, close
            step = request.send((status, body))
    except StopIteration:
        return status, body, close
    finally:
        request.close()


def _summary(
    mode: str, duration: float, offered: float | None, latencies: list[float], counts: Counter[str], ok: set[str]
) -> LoadResult:
    latencies.sort()
    n = len(latencies)

    def pct(q: float) -> float:
        return latencies[min(n - 1, int(q * n))] * 1000 if n else float("nan")

    return LoadResult(
        mode=mode,
        duration=duration,
        offered_rate=offered,
        requests=n,
        counts=dict(counts),
        rate=sum(v for k, v in counts.items() if k in ok) / duration,
        p50_ms=pct(0.50),
        p90_ms=pct(0.90),
        p99_ms=pct(0.99),
        max_ms=latencies[-1] * 1000 if n else float("nan"),
    )


def _default_classify(status: int, _body: bytes) -> str:
    return str(status)


async def _closed(
    host: str, port: int, make: MakeRequest, duration: float, warmup: float, connections: int, classify: Classify
) -> tuple[list[float], Counter[str]]:
    measure_from = time.perf_counter() + warmup
    stop_at = measure_from + duration
    latencies: list[float] = []
    counts: Counter[str] = Counter()
    sequence = iter(range(1 << 62))

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        while (sent := time.perf_counter()) < stop_at:
            try:
                status, body, close = await _unit(reader, writer, make(next(sequence)))
            except (asyncio.IncompleteReadError, ConnectionError):
                counts["error"] += sent >= measure_from
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            if sent >= measure_from:
                latencies.append(time.perf_counter() - sent)
                counts[classify(status, body)] += 1
            if close:
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
        writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return latencies, counts


async def _open(
    host: str,
    port: int,
    make: MakeRequest,
    rate: float,
    duration: float,
    warmup: float,
    connections: int,
    classify: Classify,
) -> tuple[list[float], Counter[str], float]:
    pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(await asyncio.open_connection(host, port))
    start = time.perf_counter() + 0.05
    measure_from = start + warmup
    total = int(rate * (warmup + duration))
    latencies: list[float] = []
    counts: Counter[str] = Counter()
    lag = 0.0
    inflight: set[asyncio.Task[None]] = set()

    async def one(n: int, due: float) -> None:
        reader, writer = await pool.get()  # waiting for a free connection is queueing: it counts
        try:
            status, body, close = await _unit(reader, writer, make(n))
        except (asyncio.IncompleteReadError, ConnectionError):
            counts["error"] += due >= measure_from
            writer.close()
            pool.put_nowait(await asyncio.open_connection(host, port))
            return
        if due >= measure_from:
            latencies.append(time.perf_counter() - due)  # from when it was due, not when it went out
            counts[classify(status, body)] += 1
        if close:
            writer.close()
            reader, writer = await asyncio.open_connection(host, port)
        pool.put_nowait((reader, writer))

    n = 0
    while n < total:
        now = time.perf_counter()
        while n < total and start + n / rate <= now:
            lag = max(lag, now - (start + n / rate))
            task = asyncio.create_task(one(n, start + n / rate))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            n += 1
        if n < total:
            await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
    if inflight:
        await asyncio.gather(*inflight)
    while not pool.empty():
        pool.get_nowait()[1].close()
    return latencies, counts, lag


def _run(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def closed_loop(
    host: str,
    port: int,
    make_request: MakeRequest,
    *,
    duration: float,
    warmup: float = 1.0,
    connections: int = 64,
    classify: Classify = _default_classify,
    ok: tuple[str, ...] = ("200",),
) -> LoadResult:
    """``connections`` connections each sending its next request when its answer came (the maximum rate)."""
    latencies, counts = _run(_closed(host, port, make_request, duration, warmup, connections, classify))
    return _summary("closed", duration, None, latencies, counts, set(ok))


def open_loop(
    host: str,
    port: int,
    make_request: MakeRequest,
    *,
    rate: float,
    duration: float,
    warmup: float = 1.0,
    connections: int = 64,
    classify: Classify = _default_classify,
    ok: tuple[str, ...] = ("200",),
) -> LoadResult:
    """Requests at a constant ``rate`` per second over up to ``connections`` connections; latency from each
    request's due time, so waiting for a connection or behind a slow answer is counted."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    latencies, counts, lag = _run(_open(host, port, make_request, rate, duration, warmup, connections, classify))
    result = _summary("open", duration, rate, latencies, counts, set(ok))
    result.max_send_lag_ms = lag * 1000
    return result
