"""Fault injection: many concurrent wrapped calls for one customer with a small balance, the billing server
killed (SIGKILL) and started again in the middle, and some provider calls failing."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from client_helpers import TOKEN, BillingServer, fund, holds
from fake_provider import FakeProvider, Reply
from sqlalchemy import Engine, text

from ledger.check import check_ledger
from ledger.db import unit_of_work
from webhooks.client import Billing, InsufficientCredits

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

PROMPT = [{"role": "user", "content": "Say Foo!"}]
FUNDED = 2_000
THREADS, CALLS = 8, 6
# What the provider serves: a plain answer (14 + 37 x 2 = 88 credits), a stream with its usage chunk (9 + 2 x 2).
SERVED_CHARGE = {False: 88, True: 13}


class TestBillingServerRestart:
    def test_no_charge_without_service_no_overdraft_no_open_hold(
        self, billing_server: BillingServer, provider: FakeProvider, provider_url: str, pg_engine: Engine
    ) -> None:
        fund("cus_fault", FUNDED)
        provider.script("chat", *[Reply(status=500)] * 4)  # four calls fail at the provider, whoever makes them
        outcomes: Counter[str] = Counter()
        restarted = threading.Event()

        def restart_once() -> None:
            while len(provider.log) < 12:
                time.sleep(0.005)
            billing_server.kill()
            time.sleep(0.3)
            billing_server.start()
            restarted.set()

        def calls(worker: int) -> None:
            with (
                Billing(billing_server.url, TOKEN, retries=20) as billing,
                openai.OpenAI(base_url=f"{provider_url}/v1", api_key="sk-test", max_retries=0, timeout=10) as client,
            ):
                oai = billing.wrap_openai(client, customer_id="cus_fault", user_id=f"u_{worker}")
                for n in range(CALLS):
                    stream = (worker + n) % 2 == 1
                    try:
                        answer = oai.chat.completions.create(
                            model="gpt-4o-2024-08-06", messages=PROMPT, max_tokens=100, stream=stream
                        )
                        if stream:
                            list(answer)
                        outcomes["served"] += 1
                    except InsufficientCredits:
                        outcomes["refused"] += 1
                    except openai.InternalServerError:
                        outcomes["provider_error"] += 1

        restarter = threading.Thread(target=restart_once, daemon=True)
        restarter.start()
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(calls, range(THREADS)))
        restarter.join(30)
        assert restarted.is_set(), "the billing server was not restarted during the run"
        assert sum(outcomes.values()) == THREADS * CALLS
        assert outcomes["provider_error"] == 4 and outcomes["refused"] > 0  # the small balance ran out

        stored = holds(pg_engine, "cus_fault")
        # Every hold ends captured or released; each stood for exactly one provider request (a refused hold
        # never reached the provider).
        assert Counter(h["status"] for h in stored).keys() <= {"captured", "released"}
        assert len(stored) == len(provider.log)
        by_request = {s.headers["x-client-request-id"]: s for s in provider.log}
        for hold in stored:
            served = by_request[str(hold["request_id"])]
            if served.outcome == "served":
                # Charged what the provider reported, once.
                stream = served.request.get("stream") is True
                assert (hold["status"], hold["captured_units"]) == ("captured", SERVED_CHARGE[stream])
            else:
                # Never charged for a call the provider did not serve.
                assert (hold["status"], hold["release_reason"]) == ("released", "provider_error")
        charged = sum(int(h["captured_units"]) for h in stored if h["status"] == "captured")  # type: ignore[call-overload]
        with pg_engine.connect() as conn:
            balance, debt, held = conn.execute(
                text("SELECT balance, debt, held FROM accounts WHERE customer_id = 'cus_fault'")
            ).one()
            lowest = conn.execute(
                text(
                    "SELECT MIN(e.balance_after) FROM entries e JOIN accounts a ON a.id = e.account_id"
                    " WHERE a.customer_id = 'cus_fault'"
                )
            ).scalar_one()
        assert (balance, debt, held) == (FUNDED - charged, 0, 0)
        assert lowest >= 0  # the balance never went negative, at any entry
        with unit_of_work() as session:
            assert check_ledger(session) == []
