"""``billing-reconciler serve`` as a user runs it: several worker processes, metrics merged across them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine
from webhook_helpers import SECRET, signed_headers, stored_count

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def served(pg_engine: Engine, tmp_path: Path) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **{k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},  # serve makes its own
        "DATABASE_URL": pg_engine.url.render_as_string(hide_password=False),
        "STRIPE_WEBHOOK_SECRETS": SECRET,
        "LOG_LEVEL": "WARNING",
    }
    command = [sys.executable, "-c", "from worker.cli import main; main()", "serve", "--port", str(port)]
    process = subprocess.Popen([*command, "--workers", "2"], env=env, cwd=REPO)
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
            pytest.fail("billing-reconciler serve did not start")
        yield url
    finally:
        process.terminate()
        process.wait(20)


@pytest.mark.postgres
@pytest.mark.slow
class TestServe:
    def test_two_workers_store_every_event_and_metrics_add_up(self, served: str, pg_engine: Engine) -> None:
        bodies = [
            json.dumps(
                {
                    "id": f"evt_serve_{n}",
                    "object": "event",
                    "type": "customer.created",
                    "created": 1_760_000_000,
                    "data": {"object": {"id": f"cus_{n}", "object": "customer"}},
                }
            ).encode()
            for n in range(40)
        ]
        with httpx.Client(base_url=served, timeout=10) as http:
            for raw in bodies + bodies[:10]:
                # A new connection each time, so both worker processes take deliveries.
                response = http.post(
                    "/webhooks/stripe", content=raw, headers=signed_headers(raw) | {"Connection": "close"}
                )
                assert response.status_code == 200
            metrics = http.get("/metrics").text
        assert stored_count(pg_engine) == 40

        def value(name: str) -> float:
            return sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name + " "))

        assert value("webhook_events_received_total") == 50
        assert value("webhook_events_stored_total") == 40
        assert value("webhook_events_duplicate_total") == 10
