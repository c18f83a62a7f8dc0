"""scripts/loadgen.py against a small HTTP/1.1 server that logs every request it answers, per connection.

The server's log is the oracle: what the generator counted must be what the server saw, and an exchange (a hold,
then its capture when the hold was granted) must keep its order on one connection. Nothing here is timed.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from loadgen import Exchange, closed_loop, open_loop


class Recorder(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.log: list[tuple[int, str]] = []  # (client port, path), in the order answered
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the generator's connections carry many requests
    server: Recorder

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.log.append((self.client_address[1], self.path))
        # A hold for an even unit is granted (201), an odd one refused (402); a capture answers 200.
        granted = int(self.path.split("/")[3]) % 2 == 0
        status = 200 if self.path.endswith("/capture") else 201 if granted else 402
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def post(path: str) -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}" % path.encode()


def hold_then_capture(n: int) -> Exchange:
    status, _body = yield post(f"/v1/holds/{n}")
    if status == 201:
        yield post(f"/v1/holds/{n}/capture")


def check_exchanges(log: list[tuple[int, str]]) -> Counter[str]:
    """Every capture follows its own granted hold on the same connection; the units' outcomes as the server saw."""
    last_hold: dict[int, int] = {}
    outcomes: Counter[str] = Counter()
    for port, path in log:
        n = int(path.split("/")[3])
        if path.endswith("/capture"):
            assert last_hold.pop(port) == n, (port, path)
            assert n % 2 == 0
            outcomes["200"] += 1
        else:
            assert port not in last_hold or last_hold[port] % 2 == 1, "a new hold before the last one's capture"
            last_hold[port] = n
            if n % 2:
                outcomes["402"] += 1
    assert all(n % 2 == 1 for n in last_hold.values()), "a granted hold was never captured"
    return outcomes


class TestExchanges:
    def test_a_closed_loop_exchange_keeps_its_order_and_counts_what_the_server_answered(
        self, recorder: Recorder
    ) -> None:
        port = recorder.server_address[1]
        result = closed_loop("127.0.0.1", port, hold_then_capture, duration=0.3, warmup=0, connections=4)
        outcomes = check_exchanges(recorder.log)
        # Every unit was measured (no warm-up): one answer counted per unit, the last one of its exchange.
        assert result.counts == dict(outcomes)
        assert result.requests == outcomes["200"] + outcomes["402"] > 0
        assert len(recorder.log) == 2 * outcomes["200"] + outcomes["402"]

    def test_an_open_loop_exchange_sends_every_due_unit_whole(self, recorder: Recorder) -> None:
        port = recorder.server_address[1]
        result = open_loop(
            "127.0.0.1", port, hold_then_capture, rate=200, duration=0.25, warmup=0, connections=4, ok=("200",)
        )
        outcomes = check_exchanges(recorder.log)
        assert result.counts == dict(outcomes)
        # int(rate * duration) units were due, each sent whole: units 0..49, the even ones captured.
        assert result.requests == 50
        assert outcomes == Counter({"200": 25, "402": 25})
        assert result.rate == pytest.approx(25 / 0.25)

    def test_single_requests_still_work_beside_exchanges(self, recorder: Recorder) -> None:
        port = recorder.server_address[1]
        result = closed_loop(
            "127.0.0.1", port, lambda n: post(f"/v1/holds/{2 * n}"), duration=0.2, warmup=0, connections=2
        )
        assert set(result.counts) == {"201"}
        assert result.counts["201"] == len(recorder.log) > 0
