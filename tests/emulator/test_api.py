"""The emulator through the real ``stripe`` package: create, retrieve, list, page, filter, expand, errors."""

from __future__ import annotations

import httpx
import pytest
import stripe
from stripe_emulator import EmulatorServer, Store

from .conftest import START


def _customer_with_topups(store: Store, n: int, *, step: int = 60) -> str:
    customer = store.create_customer(email="buyer@example.com", name="Buyer")
    for _ in range(n):
        store.clock.advance(step)
        store.topup(customer, "price_credits_small")
    return customer.id


class TestRetrieve:
    def test_checkout_session_and_its_line_items_as_created_by_a_topup(
        self, store: Store, client: stripe.StripeClient
    ) -> None:
        customer = store.create_customer(email="a@example.com")
        session = store.topup(customer, "price_credits_large", quantity=2, metadata={"order": "42"})

        fetched = client.v1.checkout.sessions.retrieve(session.id)
        items = client.v1.checkout.sessions.line_items.list(session.id)

        assert fetched.id.startswith("cs_test_")
        assert (fetched.mode, fetched.status, fetched.payment_status) == ("payment", "complete", "paid")
        assert fetched.amount_total == 20000 and fetched.currency == "usd"
        assert fetched.customer == customer.id and fetched.metadata["order"] == "42"
        assert [(i.price.id, i.quantity, i.amount_total) for i in items.data] == [("price_credits_large", 2, 20000)]
        payment_intent = client.v1.payment_intents.retrieve(fetched.payment_intent)
        assert (payment_intent.status, payment_intent.amount_received) == ("succeeded", 20000)
        charge = client.v1.charges.retrieve(payment_intent.latest_charge)
        assert (charge.amount, charge.paid, charge.customer) == (20000, True, customer.id)
        txn = client.v1.balance_transactions.retrieve(charge.balance_transaction)
        assert (txn.amount, txn.source, txn.type) == (20000, charge.id, "charge")
        assert txn.net == txn.amount - txn.fee

    def test_create_customer_through_the_api_records_customer_created(
        self, store: Store, client: stripe.StripeClient
    ) -> None:
        created = client.v1.customers.create(params={"email": "n@example.com", "metadata": {"plan": "pro"}})

        assert created.id.startswith("cus_") and created.metadata["plan"] == "pro"
        assert client.v1.customers.retrieve(created.id).email == "n@example.com"
        assert [e["type"] for e in store.events()] == ["customer.created"]


class TestLists:
    def test_auto_paging_walks_every_charge_newest_first(self, store: Store, client: stripe.StripeClient) -> None:
        _customer_with_topups(store, 23)

        first = client.v1.charges.list(params={"limit": 10})
        every = list(first.auto_paging_iter())

        assert len(first.data) == 10 and first.has_more is True and first.url == "/v1/charges"
        assert len(every) == 23 and len({c.id for c in every}) == 23
        assert [c.created for c in every] == sorted((c.created for c in every), reverse=True)

    def test_ending_before_pages_backwards(self, store: Store, client: stripe.StripeClient) -> None:
        _customer_with_topups(store, 7)
        everything = [c.id for c in client.v1.charges.list(params={"limit": 100}).data]

        page = client.v1.charges.list(params={"limit": 2, "ending_before": everything[5]})

        assert [c.id for c in page.data] == everything[3:5]
        assert page.has_more is True

    def test_created_filters_bound_the_window(self, store: Store, client: stripe.StripeClient) -> None:
        _customer_with_topups(store, 10, step=100)  # charges at START+100 .. START+1000

        gte_lt = client.v1.charges.list(params={"created": {"gte": START + 300, "lt": START + 700}, "limit": 100})
        gt_lte = client.v1.charges.list(params={"created": {"gt": START + 300, "lte": START + 700}, "limit": 100})

        assert sorted(c.created - START for c in gte_lt.data) == [300, 400, 500, 600]
        assert sorted(c.created - START for c in gt_lte.data) == [400, 500, 600, 700]

    def test_customer_filter_and_limit_bounds(self, store: Store, client: stripe.StripeClient) -> None:
        mine = _customer_with_topups(store, 3)
        _customer_with_topups(store, 4)

        charges = client.v1.charges.list(params={"customer": mine, "limit": 100})

        assert len(charges.data) == 3 and {c.customer for c in charges.data} == {mine}
        with pytest.raises(stripe.InvalidRequestError) as too_many:
            client.v1.charges.list(params={"limit": 101})
        assert too_many.value.http_status == 400 and too_many.value.param == "limit"

    def test_expand_line_items_on_a_list_and_latest_charge_on_a_retrieve(
        self, store: Store, client: stripe.StripeClient
    ) -> None:
        _customer_with_topups(store, 2)

        sessions = client.v1.checkout.sessions.list(params={"expand": ["data.line_items", "data.payment_intent"]})
        intent = client.v1.payment_intents.retrieve(
            sessions.data[0].payment_intent.id, params={"expand": ["latest_charge.balance_transaction"]}
        )

        assert all(s.line_items.data[0].price.id == "price_credits_small" for s in sessions.data)
        assert intent.latest_charge.balance_transaction.amount == 1000

    def test_events_list_filters_by_type_and_types(self, store: Store, client: stripe.StripeClient) -> None:
        _customer_with_topups(store, 3)

        completed = client.v1.events.list(params={"type": "checkout.session.completed"})
        both = client.v1.events.list(params={"types": ["charge.succeeded", "customer.created"], "limit": 100})
        wildcard = client.v1.events.list(params={"type": "payment_intent.*", "limit": 100})

        assert len(completed.data) == 3
        assert sorted(e.type for e in both.data) == ["charge.succeeded"] * 3 + ["customer.created"]
        assert {e.type for e in wildcard.data} == {"payment_intent.created", "payment_intent.succeeded"}
        assert completed.data[0].data.object.object == "checkout.session"

    def test_events_older_than_thirty_days_are_gone_from_the_api(
        self, store: Store, client: stripe.StripeClient
    ) -> None:
        old = store.create_customer(email="old@example.com")
        store.clock.advance(days=31)
        store.create_customer(email="new@example.com")

        events = client.v1.events.list()

        assert [e.data.object.email for e in events.data] == ["new@example.com"]
        assert store.event_records(object_id=old.id)  # still recorded, only the API hides it


class TestErrors:
    def test_missing_object_is_a_404_with_stripe_error_body(self, server: EmulatorServer) -> None:
        response = httpx.get(f"{server.url}/v1/charges/ch_missing", headers={"Authorization": "Bearer sk_test_x"})

        assert response.status_code == 404
        assert response.headers["Request-Id"].startswith("req_")
        assert response.json()["error"] == {
            "code": "resource_missing",
            "doc_url": "https://stripe.com/docs/error-codes/resource-missing",
            "message": "No such charge: 'ch_missing'",
            "param": "id",
            "request_log_url": "https://dashboard.stripe.com/test/logs",
            "type": "invalid_request_error",
        }

    def test_missing_api_key_is_a_401(self, server: EmulatorServer) -> None:
        response = httpx.get(f"{server.url}/v1/charges")

        assert response.status_code == 401
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert "did not provide an API key" in response.json()["error"]["message"]

    def test_live_key_is_refused_by_the_client_as_authentication_error(self, server: EmulatorServer) -> None:
        client = stripe.StripeClient("sk_live_abcdefghijkl", base_addresses={"api": server.url})

        with pytest.raises(stripe.AuthenticationError) as refused:
            client.v1.customers.list()
        assert refused.value.http_status == 401

    def test_unknown_list_parameter_is_a_400(self, client: stripe.StripeClient) -> None:
        with pytest.raises(stripe.InvalidRequestError) as bad:
            client.v1.charges.list(params={"colour": "red"})  # type: ignore[typeddict-unknown-key]
        assert bad.value.param == "colour"


class TestNestedLists:
    def test_invoice_lines_and_charge_refunds_on_request(self, store: Store, client: stripe.StripeClient) -> None:
        subscription = store.create_subscription(store.create_customer())
        invoice_id = subscription.latest_invoice or ""
        charge = store.create_payment(store.create_customer(), 3000)
        store.refund(charge, 1000)
        store.refund(charge, 500)

        lines = client.v1.invoices.line_items.list(invoice_id)
        expanded = client.v1.charges.retrieve(charge.id, params={"expand": ["refunds"]})
        plain = client.v1.charges.retrieve(charge.id)

        assert [line.amount for line in lines.data] == [2000] and lines.url == f"/v1/invoices/{invoice_id}/lines"
        assert [r.amount for r in expanded.refunds.data] == [500, 1000]
        assert "refunds" not in plain

    def test_unknown_expansion_is_a_400(self, store: Store, client: stripe.StripeClient) -> None:
        charge = store.create_payment(store.create_customer(), 3000)

        with pytest.raises(stripe.InvalidRequestError) as bad:
            client.v1.charges.retrieve(charge.id, params={"expand": ["status"]})
        assert bad.value.param == "expand"


class TestFiltersOnFieldsSetLater:
    def test_checkout_sessions_filter_by_the_payment_intent_they_got_on_completion(
        self, store: Store, client: stripe.StripeClient
    ) -> None:
        customer = store.create_customer(email="a@example.com")
        session = store.topup(customer)
        assert session.payment_intent is not None
        found = client.v1.checkout.sessions.list(params={"payment_intent": session.payment_intent})
        assert [s.id for s in found.data] == [session.id]
