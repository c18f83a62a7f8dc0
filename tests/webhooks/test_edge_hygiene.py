"""What the edge does about slow clients, secrets in logs and third-party assets.

- `serve` closes a connection whose request (headers or body) does not arrive within --request-timeout, and
  keeps serving others;
- a token in a query string is redacted from the logs (the access log prints the whole request target);
- /docs loads nothing from another host.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from ledger import db
from ledger.logs import configure_logging
from ledger.migrate import migrate
from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`serve --request-timeout 1 --max-connections 3` on a migrated SQLite database, in its own process."""
    path = tmp_path_factory.mktemp("serve") / "billing.db"
    engine = db.make_engine(f"sqlite:///{path}")
    migrate(engine)
    engine.dispose()
    port = free_port()
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{path}", "LOG_LEVEL": "WARNING", "PYTHONPATH": str(REPO)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    command = [sys.executable, "-c", "from worker.cli import main; main()", "serve", "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--request-timeout", "1", "--max-connections", "3"], env=env, cwd=REPO
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            pytest.fail("serve did not start")
        yield url
    finally:
        process.terminate()
        process.wait(20)


def closed_after(port: int, sent: bytes) -> float:
    """Send ``sent`` and nothing more; how long until the server closes the connection (answering nothing)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(sent)
        started = time.monotonic()
        assert sock.recv(100) == b""  # closed, no response
        return time.monotonic() - started


class TestSlowClients:
    @pytest.mark.parametrize(
        "sent",
        [
            b"",  # connects, says nothing
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n",  # headers never finished
            b"POST /v1/usage HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",  # body never finished
        ],
        ids=["silent", "slow headers", "slow body"],
    )
    def test_a_request_that_does_not_arrive_is_cut_off(self, served: str, sent: bytes) -> None:
        port = int(served.rsplit(":", 1)[1])
        assert closed_after(port, sent) < 5  # --request-timeout 1; was never (kept 200 s and more)

    def test_a_complete_request_is_answered_and_a_slow_one_does_not_block_others(self, served: str) -> None:
        port = int(served.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as slow:
            slow.sendall(b"GET /healthz HTTP/1.1\r\n")
            assert httpx.get(f"{served}/healthz", timeout=5).status_code == 200


class TestConnectionCap:
    def test_beyond_max_connections_requests_get_503(self, served: str) -> None:
        port = int(served.rsplit(":", 1)[1])
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            assert httpx.get(f"{served}/healthz", timeout=5).status_code == 503
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.3)
        assert httpx.get(f"{served}/healthz", timeout=5).status_code == 200


class TestRedaction:
    def test_a_token_in_a_query_string_is_redacted_from_the_access_log(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        # A live uvicorn started by an earlier test may have left its access logger disabled or detached, and
        # its parent "uvicorn" logger with a handler of its own that stops propagation before the root's.
        for name in ("uvicorn", "uvicorn.access"):
            logger = logging.getLogger(name)
            logger.disabled, logger.propagate, logger.handlers = False, True, []
            logger.setLevel(logging.NOTSET)
        for as_json in (False, True):
            configure_logging("INFO", json=as_json)
            logging.getLogger("uvicorn.access").info(
                '%s - "%s %s HTTP/%s" %d', "10.0.0.1:5", "GET", "/v1/customers/c/balance?token=tok_live_s3cret&x=1",
                "1.1", 200,
            )  # fmt: skip
            logging.getLogger("webhooks").info("calling /review/login?next=/a&api_key=k3y&password=pw")
            err = capsys.readouterr().err
            assert "tok_live_s3cret" not in err and "k3y" not in err and "=pw" not in err, err
            assert "token=[redacted]&x=1" in err and "next=/a" in err
        configure_logging("WARNING")


class TestDocs:
    def test_docs_load_nothing_from_another_host(self, client: TestClient) -> None:
        page = client.get("/docs")
        assert page.status_code == 200
        assert not re.findall(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", page.text)  # no absolute URL at all
        assets = re.findall(r"""(?:src|href)=["']([^"']+)""", page.text)
        assert any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets)
        for asset in assets:
            assert client.get(asset).status_code == 200, asset
        # The page's script turns Swagger UI's online validator (a request to validator.swagger.io) off.
        assert '"validatorUrl": null' in page.text.replace("'", '"')

    def test_redoc_is_off(self, client: TestClient) -> None:
        assert client.get("/redoc").status_code == 404


def test_readme_says_what_to_put_in_front() -> None:
    readme = Path(REPO / "README.md").read_text(encoding="utf-8")
    assert "--request-timeout" in readme and "reverse proxy" in readme
