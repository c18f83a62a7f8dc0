"""The Stripe gateway against the local Stripe emulator: reads, lists, retries, idempotent writes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import stripe
from stripe_emulator import EmulatorServer, Store

from reconciliation.gateway import StripeGateway, is_transient_stripe_error


@pytest.fixture
def emulator() -> Iterator[EmulatorServer]:
    server = EmulatorServer(Store()).start()
    yield server
    server.stop()


def gateway(server: EmulatorServer, **kwargs: object) -> StripeGateway:
    return StripeGateway(api_base=server.url, wait_initial=0.01, wait_max=0.05, **kwargs)  # type: ignore[arg-type]


class TestReads:
    def test_retrieve_returns_plain_dicts(self, emulator: EmulatorServer) -> None:
        customer = emulator.store.create_customer(email="a@example.com")
        charge = emulator.store.create_payment(customer.id, 700)
        got = gateway(emulator).retrieve("charge", charge.id)
        assert type(got) is dict
        assert (got["id"], got["amount"], got["customer"]) == (charge.id, 700, customer.id)

    def test_checkout_line_items_name_the_price(self, emulator: EmulatorServer) -> None:
        customer = emulator.store.create_customer()
        session = emulator.store.topup(customer, "price_credits_large", quantity=2)
        [item] = gateway(emulator).retrieve_checkout_session_line_items(session.id)
        assert (item["price"]["id"], item["quantity"]) == ("price_credits_large", 2)

    def test_unknown_type_is_refused(self, emulator: EmulatorServer) -> None:
        with pytest.raises(ValueError, match="cannot retrieve"):
            gateway(emulator).retrieve("banana", "ba_1")

    def test_lists_page_lazily_through_everything(self, emulator: EmulatorServer) -> None:
        for _ in range(7):
            emulator.store.create_customer()
        gw = gateway(emulator)
        events = list(gw.list_events(limit=3))
        assert len(events) == 7 and len({e["id"] for e in events}) == 7
        assert all(e["type"] == "customer.created" for e in events)

    def test_checkout_sessions_filter_by_payment_intent(self, emulator: EmulatorServer) -> None:
        customer = emulator.store.create_customer()
        session = emulator.store.topup(customer)
        emulator.store.topup(customer)
        pi = emulator.store.render(session)["payment_intent"]
        assert [s["id"] for s in gateway(emulator).list_checkout_sessions(payment_intent=pi)] == [session.id]

    def test_checkout_sessions_filter_by_customer(self, emulator: EmulatorServer) -> None:
        customer = emulator.store.create_customer()
        session = emulator.store.topup(customer)
        emulator.store.topup(emulator.store.create_customer())
        found = list(gateway(emulator).list_checkout_sessions(customer=customer.id))
        assert [s["id"] for s in found] == [session.id]


class TestRetries:
    def test_rate_limits_and_5xx_are_retried(self, emulator: EmulatorServer) -> None:
        customer = emulator.store.create_customer()
        emulator.store.faults.fail_next(2, status=429)
        emulator.store.faults.fail_next(1, status=503)
        assert gateway(emulator).retrieve("customer", customer.id)["id"] == customer.id
        assert emulator.store.faults.injected == 3

    def test_a_dropped_connection_is_retried(self, emulator: EmulatorServer) -> None:
        customer = emulator.store.create_customer()
        emulator.store.faults.disconnect_next(1)
        assert gateway(emulator).retrieve("customer", customer.id)["id"] == customer.id

    def test_retries_stop_and_raise_a_transient_error(self, emulator: EmulatorServer) -> None:
        customer = emulator.store.create_customer()
        emulator.store.faults.fail_next(10, status=500)
        with pytest.raises(stripe.APIError) as caught:
            gateway(emulator, max_attempts=3).retrieve("customer", customer.id)
        assert is_transient_stripe_error(caught.value)
        assert emulator.store.faults.injected == 3

    def test_a_404_is_not_retried(self, emulator: EmulatorServer) -> None:
        with pytest.raises(stripe.InvalidRequestError) as caught:
            gateway(emulator).retrieve("charge", "ch_missing")
        assert not is_transient_stripe_error(caught.value)


class TestWrites:
    def test_a_retried_refund_with_the_same_key_refunds_once(self, emulator: EmulatorServer) -> None:
        customer = emulator.store.create_customer()
        charge = emulator.store.create_payment(customer.id, 1000)
        pi = emulator.store.render(charge)["payment_intent"]
        gw = gateway(emulator)
        first = gw.create_refund(payment_intent=pi, amount=400, idempotency_key="refund:grant-1:400")
        again = gw.create_refund(payment_intent=pi, amount=400, idempotency_key="refund:grant-1:400")
        assert first["id"] == again["id"]
        assert emulator.store.render(charge)["amount_refunded"] == 400
