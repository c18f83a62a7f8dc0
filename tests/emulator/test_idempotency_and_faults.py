"""Idempotency keys on POSTs, and injected 429s, 500s, slow answers and dropped connections as the client sees them."""

from __future__ import annotations

import time

import httpx
import pytest
import stripe
from stripe_emulator import EmulatorServer, Store

AUTH = {"Authorization": "Bearer sk_test_emulator"}


class TestIdempotency:
    def test_same_key_same_params_replays_the_first_response(self, store: Store, client: stripe.StripeClient) -> None:
        options: stripe.RequestOptions = {"idempotency_key": "refund-1"}
        charge = store.create_payment(store.create_customer(), 5000)

        first = client.v1.refunds.create(params={"charge": charge.id, "amount": 1000}, options=options)
        again = client.v1.refunds.create(params={"charge": charge.id, "amount": 1000}, options=options)

        assert again.id == first.id
        assert store.get(charge.id).amount_refunded == 1000
        assert len(store.event_records(types=["refund.created"])) == 1

    def test_replay_is_marked_in_headers(self, store: Store, server: EmulatorServer) -> None:
        headers = {**AUTH, "Idempotency-Key": "cus-1"}
        first = httpx.post(f"{server.url}/v1/customers", data={"email": "a@example.com"}, headers=headers)
        second = httpx.post(f"{server.url}/v1/customers", data={"email": "a@example.com"}, headers=headers)

        assert first.json()["id"] == second.json()["id"]
        assert second.headers["Idempotent-Replayed"] == "true"
        assert "Idempotent-Replayed" not in first.headers

    def test_same_key_different_params_is_an_idempotency_error(self, client: stripe.StripeClient) -> None:
        options: stripe.RequestOptions = {"idempotency_key": "cus-2"}
        client.v1.customers.create(params={"email": "a@example.com"}, options=options)

        with pytest.raises(stripe.IdempotencyError) as reused:
            client.v1.customers.create(params={"email": "b@example.com"}, options=options)
        assert reused.value.http_status == 400
        assert reused.value.error is not None and reused.value.error.type == "idempotency_error"

    def test_errors_are_replayed_too_but_not_injected_failures(self, store: Store, server: EmulatorServer) -> None:
        headers = {**AUTH, "Idempotency-Key": "refund-missing"}
        store.faults.fail_next(1, status=500)
        injected = httpx.post(f"{server.url}/v1/refunds", data={"charge": "ch_nope"}, headers=headers)
        first = httpx.post(f"{server.url}/v1/refunds", data={"charge": "ch_nope"}, headers=headers)
        second = httpx.post(f"{server.url}/v1/refunds", data={"charge": "ch_nope"}, headers=headers)

        assert injected.status_code == 500
        assert (first.status_code, second.status_code) == (404, 404)
        assert second.headers["Idempotent-Replayed"] == "true"


class TestFaults:
    def test_injected_429_reaches_the_client_as_rate_limit_error(
        self, store: Store, client: stripe.StripeClient
    ) -> None:
        store.faults.fail_next(2, status=429, path_prefix="/v1/charges")

        for _ in range(2):
            with pytest.raises(stripe.RateLimitError) as limited:
                client.v1.charges.list()
            assert limited.value.http_status == 429
            assert limited.value.error is not None and limited.value.error.code == "rate_limit"
        assert client.v1.customers.list().data == []  # other paths were never affected
        assert client.v1.charges.list().data == []  # and the plan is used up
        assert store.faults.injected == 2

    def test_injected_500_is_an_api_error_and_the_client_retry_gets_through(
        self, store: Store, server: EmulatorServer
    ) -> None:
        store.create_customer(email="x@example.com")
        store.faults.fail_next(1, status=500)
        no_retry = stripe.StripeClient("sk_test_x", base_addresses={"api": server.url}, max_network_retries=0)
        with pytest.raises(stripe.APIError) as failed:
            no_retry.v1.customers.list()
        assert failed.value.http_status == 500

        store.faults.fail_next(1, status=500)
        retrying = stripe.StripeClient("sk_test_x", base_addresses={"api": server.url}, max_network_retries=2)
        assert len(retrying.v1.customers.list().data) == 1
        assert store.faults.injected == 2

    def test_dropped_connection_is_a_connection_error(self, store: Store, client: stripe.StripeClient) -> None:
        store.faults.disconnect_next(1)

        with pytest.raises(stripe.APIConnectionError):
            client.v1.customers.list()
        assert client.v1.customers.list().data == []

    def test_slow_responses_are_delayed(self, store: Store, client: stripe.StripeClient) -> None:
        store.faults.slow_next(1, delay_ms=300)

        started = time.monotonic()
        client.v1.customers.list()
        slowed = time.monotonic() - started
        started = time.monotonic()
        client.v1.customers.list()
        normal = time.monotonic() - started

        assert slowed >= 0.3 > normal
        store.faults.slow_ms = 150
        started = time.monotonic()
        client.v1.customers.list()
        assert time.monotonic() - started >= 0.15

    def test_random_failures_hit_about_the_given_share(self, store: Store, server: EmulatorServer) -> None:
        store.faults.set_random_failures(0.3, status=503, seed=1)

        with httpx.Client(headers=AUTH) as http:
            statuses = [http.get(f"{server.url}/v1/customers").status_code for _ in range(200)]

        assert set(statuses) == {200, 503}
        assert 30 <= statuses.count(503) <= 90
        store.faults.clear()
        assert httpx.get(f"{server.url}/v1/customers", headers=AUTH).status_code == 200

    def test_faults_can_be_programmed_over_http_for_a_separate_process(
        self, store: Store, server: EmulatorServer
    ) -> None:
        httpx.post(f"{server.url}/_emulator/faults", data={"fail_next": 1, "status": 429})

        assert httpx.get(f"{server.url}/v1/events", headers=AUTH).status_code == 429
        assert httpx.get(f"{server.url}/v1/events", headers=AUTH).status_code == 200


class TestEventRequests:
    def test_events_name_the_api_request_that_caused_them(self, store: Store, server: EmulatorServer) -> None:
        response = httpx.post(
            f"{server.url}/v1/customers", data={"email": "r@example.com"}, headers={**AUTH, "Idempotency-Key": "k1"}
        )
        store.create_customer(email="python@example.com")

        by_api, by_python = store.events()

        assert by_api["request"] == {"id": response.headers["Request-Id"], "idempotency_key": "k1"}
        assert by_python["request"] == {"id": None, "idempotency_key": None}
