"""The emulator as its own process: ``python scripts/stripe_emulator --port N`` and ``python -m stripe_emulator``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import stripe

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_up(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read() if process.stderr else b""
        try:
            httpx.get(f"{url}/_emulator/health", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("the emulator did not start")


class TestStandaloneProcess:
    def test_run_as_a_directory_with_a_loaded_dataset(self) -> None:
        port = _free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
        process = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "scripts" / "stripe_emulator"),
                "--port",
                str(port),
                "--load",
                "emulator.dataset:build",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_until_up(url, process)
            client = stripe.StripeClient("sk_test_x", base_addresses={"api": url})

            customers = client.v1.customers.list()
            sessions = client.v1.checkout.sessions.list(params={"expand": ["data.line_items"]})

            assert sorted(c.email for c in customers.data) == [f"loaded{i}@example.com" for i in range(3)]
            assert [s.line_items.data[0].price.id for s in sessions.data] == ["price_credits_small"] * 3
        finally:
            process.terminate()
            process.wait(timeout=10)

    def test_run_as_a_module(self) -> None:
        port = _free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO / "scripts")}
        process = subprocess.Popen(
            [sys.executable, "-m", "stripe_emulator", "--port", str(port), "--api-version", "2024-06-20"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_until_up(url, process)
            health = httpx.get(f"{url}/_emulator/health").json()
            assert health["api_version"] == "2024-06-20" and health["ok"] is True
        finally:
            process.terminate()
            process.wait(timeout=10)
