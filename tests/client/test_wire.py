"""The sync client's keep-alive connections (webhooks.client._wire: urllib3's pool), against a local HTTP/1.1 server
that records what arrives: what is sent, connection reuse, a connection the server closed while idle, retries."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from webhooks.client import Billing, BillingUnavailable
from webhooks.client._base import Request
from webhooks.client._wire import suits


class Recorder(ThreadingHTTPServer):
    """Answers every request from ``answers`` (status, body) in order, then 200 {"ok": true}; records each request
    (method, path, headers, body) and counts the connections it accepted."""

    daemon_threads = True

    def __init__(self, *, close_after_each: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[dict[str, Any]] = []
        self.connections = 0
        self.closed = threading.Semaphore(0)  # released once per connection closed after its answer
        self.answers: list[tuple[int, dict[str, Any]]] = []
        self.close_after_each = close_after_each

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless said otherwise
    server: Recorder

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.requests.append(
            {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
        )
        status, answer = self.server.answers.pop(0) if self.server.answers else (200, {"ok": True})
        content = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(content)))
        if status == 503:
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(content)
        self.wfile.flush()
        if self.server.close_after_each:
            # As a server whose keep-alive time-out passed: the connection is closed without a word.
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            self.server.closed.release()

    do_GET = do_POST = _answer


def serve(**options: Any) -> Iterator[Recorder]:
    server = Recorder(**options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    yield from serve()


@pytest.fixture
def closing_recorder() -> Iterator[Recorder]:
    yield from serve(close_after_each=True)


def _json(response: httpx.Response) -> Any:
    return response.json()


class TestWire:
    def test_sends_the_request_under_the_base_path_and_reuses_one_connection(self, recorder: Recorder) -> None:
        with Billing(f"{recorder.url}/billing/", "tok_1") as billing:
            assert billing._wire is not None  # the lean path is the one under test
            first = billing.send(Request("POST", "/v1/holds", _json, json={"customer_id": "cus_1", "units": 5}))
            billing.send(Request("GET", "/v1/customers/cus_1/entries", _json, params={"limit": 2, "before": 9}))
            billing.send(Request("POST", "/v1/holds/h1/release", _json))
        assert first == {"ok": True}
        assert [(r["method"], r["path"]) for r in recorder.requests] == [
            ("POST", "/billing/v1/holds"),
            ("GET", "/billing/v1/customers/cus_1/entries?limit=2&before=9"),
            ("POST", "/billing/v1/holds/h1/release"),
        ]
        hold = recorder.requests[0]
        assert json.loads(hold["body"]) == {"customer_id": "cus_1", "units": 5}
        assert hold["headers"]["Content-Type"] == "application/json"
        assert all(r["headers"]["Authorization"] == "Bearer tok_1" for r in recorder.requests)
        assert recorder.requests[2]["body"] == b""
        assert recorder.connections == 1

    def test_a_connection_the_server_closed_while_idle_is_not_reused(self, closing_recorder: Recorder) -> None:
        with Billing(closing_recorder.url, "tok_1", retries=0) as billing:
            for i in range(3):
                assert billing.send(Request("POST", "/v1/usage", _json, json={"request_id": f"r{i}"})) == {"ok": True}
                # The next request goes once the server has closed this connection (as after a keep-alive
                # time-out), not in the instant between its answer and its close.
                assert closing_recorder.closed.acquire(timeout=5)
                time.sleep(0.05)
        # Each request once, each on a fresh connection, none lost to the closed one (no retries were allowed).
        assert [json.loads(r["body"])["request_id"] for r in closing_recorder.requests] == ["r0", "r1", "r2"]
        assert closing_recorder.connections == 3

    def test_an_overloaded_answer_is_retried_with_the_same_body(self, recorder: Recorder) -> None:
        recorder.answers = [(503, {"code": "unavailable", "message": "busy"})] * 2
        with Billing(recorder.url, "tok_1", retries=3) as billing:
            result = billing.send(Request("POST", "/v1/usage", _json, json={"request_id": "r_same"}))
        assert result == {"ok": True}
        assert [json.loads(r["body"]) for r in recorder.requests] == [{"request_id": "r_same"}] * 3

    def test_no_server_is_unavailable_after_the_retries(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # closed again: nothing listens there
        with Billing(f"http://127.0.0.1:{port}", "tok_1", retries=1) as billing, pytest.raises(BillingUnavailable):
            billing.send(Request("GET", "/v1/customers/cus_1/balance", _json))

    def test_a_proxy_in_the_environment_or_a_callers_client_keeps_httpx(
        self, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        with Billing(recorder.url, "tok_1", http=httpx.Client(base_url=recorder.url)) as billing:
            assert billing._wire is None
            assert billing.send(Request("GET", "/v1/x", _json)) == {"ok": True}
        assert suits("https://billing.internal")
        assert not suits("unix:///tmp/billing.sock")
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
        assert not suits("https://billing.internal")
