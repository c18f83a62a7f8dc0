"""The Python API makes activity as Stripe would: the right objects, and the events Stripe sends, in order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import stripe
from stripe_emulator import PRE_BASIL_API_VERSION, Clock, EmulatorError, Store

from .conftest import START

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "stripe"


def _types(store: Store, since: int = 0) -> list[str]:
    return [e.type for e in store.event_records(since=since)]


def _last(store: Store, event_type: str) -> dict[str, Any]:
    return store.render(store.event_records(types=[event_type])[-1])


class TestTopup:
    def test_records_the_events_of_a_paid_checkout(self, store: Store) -> None:
        customer = store.create_customer(email="t@example.com")

        session = store.topup(customer, "price_credits_small", client_reference_id="acct-9")

        assert _types(store) == [
            "customer.created",
            "payment_intent.created",
            "charge.succeeded",
            "payment_intent.succeeded",
            "checkout.session.completed",
        ]
        completed = _last(store, "checkout.session.completed")
        assert completed["data"]["object"]["id"] == session.id
        assert completed["data"]["object"]["client_reference_id"] == "acct-9"
        assert completed["api_version"] == store.api_version and completed["created"] == START

    def test_failed_card_leaves_the_session_open(self, store: Store) -> None:
        session = store.create_checkout_session(store.create_customer(), "price_credits_small")

        store.complete_checkout_session(session, fail=True)

        assert session.status == "open" and session.payment_status == "unpaid"
        assert _types(store)[-2:] == ["charge.failed", "payment_intent.payment_failed"]
        assert _last(store, "payment_intent.payment_failed")["data"]["object"]["last_payment_error"]["code"] == (
            "card_declined"
        )


class TestSubscriptionLifecycle:
    def test_create_renew_fail_recover_cancel(self, store: Store) -> None:
        customer = store.create_customer(email="s@example.com")
        subscription = store.create_subscription(customer, "price_pro_monthly")
        first_period_end = subscription.current_period_end

        assert _types(store)[1:] == [
            "customer.subscription.created",
            "invoice.created",
            "invoice.finalized",
            "payment_intent.created",
            "charge.succeeded",
            "payment_intent.succeeded",
            "invoice_payment.paid",
            "invoice.paid",
            "invoice.payment_succeeded",
        ]
        assert _last(store, "invoice.paid")["data"]["object"]["billing_reason"] == "subscription_create"
        assert _last(store, "invoice_payment.paid")["data"]["object"]["amount_paid"] == 2000

        mark = store.clock.now()
        renewal = store.renew_subscription(subscription)
        assert renewal is not None and renewal.billing_reason == "subscription_cycle"
        assert store.clock.now() == first_period_end  # the clock jumped to the period's end
        assert subscription.current_period_start == first_period_end
        assert "invoice.paid" in _types(store, since=mark + 1)

        failed = store.renew_subscription(subscription, fail=True)
        assert failed is not None and failed.status == "open" and subscription.status == "past_due"
        payment_failed = _last(store, "invoice.payment_failed")["data"]["object"]
        assert payment_failed["attempt_count"] == 1 and payment_failed["next_payment_attempt"] is not None
        past_due = _last(store, "customer.subscription.updated")
        assert past_due["data"]["object"]["status"] == "past_due"
        assert past_due["data"]["previous_attributes"] == {"status": "active"}

        store.clock.advance(days=3)
        store.recover_subscription(subscription)
        assert failed.status == "paid" and failed.attempt_count == 2 and subscription.status == "active"
        recovered = _last(store, "customer.subscription.updated")
        assert recovered["data"]["previous_attributes"] == {"status": "past_due"}

        store.cancel_subscription(subscription)
        deleted = _last(store, "customer.subscription.deleted")["data"]["object"]
        assert deleted["status"] == "canceled" and deleted["ended_at"] == store.clock.now()

    def test_cancel_at_period_end_ends_it_at_renewal(self, store: Store) -> None:
        subscription = store.create_subscription(store.create_customer(), "price_team_monthly")

        store.cancel_subscription(subscription, at_period_end=True)
        result = store.renew_subscription(subscription)

        assert result is None and subscription.status == "canceled"
        updated = _last(store, "customer.subscription.updated")
        assert updated["data"]["previous_attributes"]["cancel_at_period_end"] is False
        assert _types(store)[-1] == "customer.subscription.deleted"

    def test_renewal_event_carries_the_period_change(self, store: Store) -> None:
        subscription = store.create_subscription(store.create_customer(), "price_pro_monthly")
        old_end = subscription.current_period_end

        store.renew_subscription(subscription)

        updated = _last(store, "customer.subscription.updated")
        item = updated["data"]["object"]["items"]["data"][0]
        previous_item = updated["data"]["previous_attributes"]["items"]["data"][0]
        assert item["current_period_start"] == old_end
        assert previous_item["current_period_end"] == old_end

    def test_listing_hides_canceled_subscriptions_unless_asked(self, store: Store, client: stripe.StripeClient) -> None:
        customer = store.create_customer()
        live = store.create_subscription(customer)
        ended = store.create_subscription(customer)
        store.cancel_subscription(ended)

        default = client.v1.subscriptions.list(params={"customer": customer.id})
        everything = client.v1.subscriptions.list(params={"customer": customer.id, "status": "all"})
        canceled = client.v1.subscriptions.list(params={"status": "canceled"})

        assert [s.id for s in default.data] == [live.id]
        assert {s.id for s in everything.data} == {live.id, ended.id}
        assert [s.id for s in canceled.data] == [ended.id]

    def test_invoices_filter_by_subscription_and_status(self, store: Store, client: stripe.StripeClient) -> None:
        subscription = store.create_subscription(store.create_customer())
        store.renew_subscription(subscription, fail=True)
        store.create_subscription(store.create_customer())

        mine = client.v1.invoices.list(params={"subscription": subscription.id})
        open_ones = client.v1.invoices.list(params={"status": "open"})

        assert len(mine.data) == 2
        assert [i.billing_reason for i in open_ones.data] == ["subscription_cycle"]


class TestApiVersions:
    def test_basil_shape_by_default(self, store: Store, client: stripe.StripeClient) -> None:
        subscription = store.create_subscription(store.create_customer())
        invoice_id = subscription.latest_invoice
        assert invoice_id is not None

        invoice = client.v1.invoices.retrieve(invoice_id, params={"expand": ["payments"]})
        fetched = client.v1.subscriptions.retrieve(subscription.id)

        assert invoice.parent.subscription_details.subscription == subscription.id
        assert "subscription" not in invoice and "charge" not in invoice
        assert invoice.lines.data[0].parent.subscription_item_details.subscription == subscription.id
        assert invoice.lines.data[0].pricing.price_details.price == "price_pro_monthly"
        assert invoice.payments.data[0].payment.payment_intent
        assert "current_period_end" not in fetched
        assert fetched["items"].data[0].current_period_end == subscription.current_period_end

    def test_pre_2025_shape_at_an_older_request_version(self, store: Store, server: Any) -> None:
        subscription = store.create_subscription(store.create_customer())
        old = stripe.StripeClient("sk_test_x", base_addresses={"api": server.url}, stripe_version=PRE_BASIL_API_VERSION)

        invoice = old.v1.invoices.retrieve(subscription.latest_invoice or "", params={"expand": ["charge"]})
        fetched = old.v1.subscriptions.retrieve(subscription.id)

        assert invoice.subscription == subscription.id and invoice.paid is True
        assert invoice.charge.amount == 2000 and invoice.charge.invoice == invoice.id
        assert invoice.lines.data[0].price.id == "price_pro_monthly"
        assert fetched.current_period_end == subscription.current_period_end

    def test_events_keep_the_store_version_they_were_made_at(self) -> None:
        store = Store(clock=Clock(START), api_version=PRE_BASIL_API_VERSION)
        store.create_subscription(store.create_customer())
        store.api_version = "2026-04-22.dahlia"
        store.renew_subscription(store.get(_last(store, "invoice.paid")["data"]["object"]["subscription"]))

        first, second = (store.render(e) for e in store.event_records(types=["invoice.paid"]))

        assert first["api_version"] == PRE_BASIL_API_VERSION and "subscription" in first["data"]["object"]
        assert second["api_version"] == "2026-04-22.dahlia"
        assert second["data"]["object"]["parent"]["subscription_details"]["subscription"]

    def test_charges_carry_refunds_only_before_2022_11_15(self, store: Store) -> None:
        session = store.topup(store.create_customer())
        store.refund(session, 100)
        charge = store.get(store.get(session.payment_intent or "").latest_charge)

        assert store.render(charge, "2020-08-27")["refunds"]["data"][0]["amount"] == 100
        assert "refunds" not in store.render(charge, "2026-04-22.dahlia")


class TestRefundsDisputesCreditNotes:
    def test_partial_refunds_accumulate_on_the_charge(self, store: Store, client: stripe.StripeClient) -> None:
        session = store.topup(store.create_customer(), "price_credits_large")
        charge_id = store.get(session.payment_intent or "").latest_charge

        store.refund(session, 2500)
        store.clock.advance(60)
        store.refund(charge_id)  # the rest

        refunded = [store.render(e) for e in store.event_records(types=["charge.refunded"])]
        assert [e["data"]["object"]["amount_refunded"] for e in refunded] == [2500, 10000]
        assert [e["data"]["object"]["refunded"] for e in refunded] == [False, True]
        assert refunded[1]["data"]["previous_attributes"] == {"amount_refunded": 2500, "refunded": False}
        refunds = client.v1.refunds.list(params={"charge": charge_id})
        assert [r.amount for r in refunds.data] == [7500, 2500]
        with pytest.raises(EmulatorError, match="already been refunded"):
            store.refund(charge_id)

    def test_refund_over_the_remaining_amount_is_refused_over_http(
        self, store: Store, client: stripe.StripeClient
    ) -> None:
        charge = store.create_payment(store.create_customer(), 1000)

        with pytest.raises(stripe.InvalidRequestError) as too_much:
            client.v1.refunds.create(params={"charge": charge.id, "amount": 1001})
        assert too_much.value.code == "amount_too_large" and too_much.value.param == "amount"

    def test_dispute_lost_and_won(self, store: Store, client: stripe.StripeClient) -> None:
        customer = store.create_customer()
        lost = store.create_dispute(store.topup(customer), reason="fraudulent")
        won = store.create_dispute(store.topup(customer), reason="product_not_received")

        store.close_dispute(lost, won=False)
        store.close_dispute(won, won=True)

        closed = [store.render(e) for e in store.event_records(types=["charge.dispute.closed"])]
        assert [e["data"]["object"]["status"] for e in closed] == ["lost", "won"]
        assert all(e["data"]["previous_attributes"] == {"status": "needs_response"} for e in closed)
        assert len(store.event_records(types=["charge.dispute.funds_reinstated"])) == 1
        fetched = client.v1.disputes.retrieve(won.id)
        assert [t.amount for t in fetched.balance_transactions] == [-1000, 1000]
        assert client.v1.charges.retrieve(lost.charge).disputed is True

    def test_credit_note_with_refund_on_a_paid_invoice(self, store: Store, client: stripe.StripeClient) -> None:
        subscription = store.create_subscription(store.create_customer())
        invoice_id = subscription.latest_invoice or ""

        note = store.create_credit_note(invoice_id, amount=500, refund=True, reason="order_change")

        fetched = client.v1.credit_notes.retrieve(note.id)
        assert (fetched.amount, fetched.type, fetched.invoice) == (500, "post_payment", invoice_id)
        assert fetched.refunds[0].refund == note.refund
        assert client.v1.invoices.retrieve(invoice_id).post_payment_credit_notes_amount == 500
        assert "credit_note.created" in _types(store) and "refund.created" in _types(store)
        assert [n.id for n in client.v1.credit_notes.list(params={"invoice": invoice_id}).data] == [note.id]


class TestShapes:
    """Our objects have the field set of stripe/openapi's fixtures3.json for the same resource."""

    # Fields real captures carry that the fixture does not, or that this API version no longer has.
    EXTRA = {
        "charge": {"destination", "dispute", "order", "radar_options"},
        "subscription": {"plan", "quantity"},
        "dispute": {"balance_transaction"},
    }
    MISSING = {"charge": {"refunds"}, "invoice": {"subscription"}}

    def test_field_sets_match_the_openapi_fixtures(self, store: Store) -> None:
        resources = json.loads((FIXTURES / "openapi" / "fixtures3.json").read_text())["resources"]
        customer = store.create_customer(email="f@example.com")
        session = store.topup(customer)
        subscription = store.create_subscription(customer)
        invoice = store.get(subscription.latest_invoice or "")
        intent = store.get(session.payment_intent or "")
        refund = store.refund(session, 100)
        objects = {
            "customer": customer,
            "checkout.session": session,
            "payment_intent": intent,
            "charge": store.get(intent.latest_charge),
            "refund": refund,
            "balance_transaction": store.get(refund.balance_transaction or ""),
            "subscription": subscription,
            "invoice": invoice,
            "invoice_payment": store.invoice_payments_of(invoice.id)[0],
            "dispute": store.create_dispute(session),
            "credit_note": store.create_credit_note(invoice, amount=100),
            "price": store.get("price_pro_monthly"),
            "product": store.get("prod_pro"),
        }
        for name, record in objects.items():
            ours, theirs = set(store.render(record)), set(resources[name])
            assert ours - theirs <= self.EXTRA.get(name, set()), name
            assert theirs - ours <= self.MISSING.get(name, set()), name

    def test_objects_carry_the_fields_the_real_event_captures_have(self, store: Store) -> None:
        capture = json.loads((FIXTURES / "events" / "invoice.paid.subscription_cycle.basil.derived.json").read_text())
        subscription = store.create_subscription(store.create_customer())
        store.renew_subscription(subscription)

        ours = _last(store, "invoice.paid")

        assert set(ours) == set(capture)
        assert set(capture["data"]["object"]) <= set(ours["data"]["object"]) | {"customer_account"}
        line_keys = set(capture["data"]["object"]["lines"]["data"][0])
        assert line_keys <= set(ours["data"]["object"]["lines"]["data"][0])


class TestClockAdvance:
    def test_a_month_of_renewals_like_a_test_clock(self, store: Store) -> None:
        monthly = store.create_subscription(store.create_customer(email="m@example.com"))
        store.clock.advance(days=10)
        failing = store.create_subscription(store.create_customer(email="f@example.com"))

        renewals = store.advance(days=65, fail={failing.customer})

        assert store.clock.now() == START + 75 * 86400
        assert [(i.subscription, i.status) for i in renewals] == [
            (monthly.id, "paid"),
            (failing.id, "open"),
            (monthly.id, "paid"),
            (failing.id, "open"),
        ]
        assert [i.created for i in renewals] == sorted(i.created for i in renewals)
        assert monthly.status == "active" and failing.status == "past_due"
        assert monthly.current_period_start <= store.clock.now() < monthly.current_period_end

    def test_months_keep_the_billing_anchor_day(self) -> None:
        store = Store(clock=Clock(1769817600))  # 2026-01-31T00:00:00Z
        subscription = store.create_subscription(store.create_customer())

        store.advance(days=61)

        ends = [e["data"]["object"]["period_end"] for e in store.events(types=["invoice.paid"])[1:]]
        assert ends == [1772236800, 1774915200]  # 2026-02-28, then back to the 31st: 2026-03-31
        assert subscription.current_period_end == 1777507200  # 2026-04-30, clamped


class TestTrialsAndAsyncPayments:
    def test_trial_then_first_paid_period(self, store: Store) -> None:
        subscription = store.create_subscription(store.create_customer(), "price_pro_monthly", trial_days=14)

        assert subscription.status == "trialing" and subscription.trial_end == START + 14 * 86400
        first_invoice = _last(store, "invoice.paid")["data"]["object"]
        assert (first_invoice["amount_paid"], first_invoice["billing_reason"]) == (0, "subscription_create")
        assert not store.event_records(types=["charge.*"])

        store.advance(days=15)

        assert _types(store, since=START + 11 * 86400)[0] == "customer.subscription.trial_will_end"
        assert subscription.status == "active" and subscription.current_period_start == START + 14 * 86400
        ended = _last(store, "customer.subscription.updated")
        assert ended["data"]["previous_attributes"]["status"] == "trialing"
        paid = _last(store, "invoice.paid")["data"]["object"]
        assert (paid["amount_paid"], paid["billing_reason"]) == (2000, "subscription_cycle")

    def test_bank_debit_completes_unpaid_then_settles(self, store: Store) -> None:
        session = store.topup(store.create_customer(), async_payment=True)

        completed = _last(store, "checkout.session.completed")["data"]["object"]
        assert (completed["status"], completed["payment_status"]) == ("complete", "unpaid")
        assert _types(store)[-3:] == ["payment_intent.processing", "charge.pending", "checkout.session.completed"]

        store.clock.advance(days=3)
        store.settle_async_payment(session)

        assert _types(store)[-3:] == [
            "charge.succeeded",
            "payment_intent.succeeded",
            "checkout.session.async_payment_succeeded",
        ]
        assert _last(store, "checkout.session.async_payment_succeeded")["data"]["object"]["payment_status"] == "paid"

    def test_bank_debit_that_fails(self, store: Store) -> None:
        session = store.topup(store.create_customer(), async_payment=True)

        store.settle_async_payment(session, succeeded=False)

        assert _types(store)[-1] == "checkout.session.async_payment_failed"
        assert session.payment_status == "unpaid"
        with pytest.raises(EmulatorError, match="no pending payment"):
            store.settle_async_payment(session)


class TestDecliningCards:
    def test_a_declining_card_fails_renewals_and_invoice_pay_is_a_402(
        self, store: Store, client: stripe.StripeClient
    ) -> None:
        customer = store.create_customer()
        subscription = store.create_subscription(customer)
        store.set_card_declines(customer)

        store.advance(days=32)
        invoice_id = subscription.latest_invoice or ""
        with pytest.raises(stripe.CardError) as declined:
            client.v1.invoices.pay(invoice_id)

        assert declined.value.http_status == 402 and declined.value.code == "card_declined"
        assert subscription.status == "past_due"
        assert [e["data"]["object"]["attempt_count"] for e in store.events(types=["invoice.payment_failed"])] == [1, 2]

        store.set_card_declines(customer, False)
        paid = client.v1.invoices.pay(invoice_id)
        assert paid.status == "paid" and subscription.status == "active"


class TestDemoMonth:
    def test_the_demo_month_has_every_case_the_demo_shows(self, store: Store) -> None:
        from stripe_emulator.scenarios import demo_month

        month = demo_month(store)

        assert len(month.customers) == 5 and len(month.topups) == 4
        assert all(store.get(s).status == "active" for s in month.subscriptions.values())
        failed = store.get(month.failed_invoice or "")
        assert (failed.status, failed.attempt_count) == ("paid", 2)
        assert store.get(month.refund or "").amount == 2500
        assert store.get(month.dispute or "").status == "lost"
        types = _types(store)
        for expected in ("invoice.payment_failed", "charge.refunded", "charge.dispute.closed", "invoice.paid"):
            assert expected in types
        assert (
            len(
                [
                    e
                    for e in store.events(types=["invoice.paid"])
                    if e["data"]["object"]["billing_reason"] == "subscription_cycle"
                ]
            )
            == 2
        )
        assert store.clock.now() - START < 33 * 86400


class TestOldVersions:
    def test_payment_intents_carry_their_charges_before_2022_11_15(self, store: Store) -> None:
        session = store.topup(store.create_customer())

        old = store.render(session.payment_intent or "", "2020-08-27")
        new = store.render(session.payment_intent or "", "2026-04-22.dahlia")

        assert [c["id"] for c in old["charges"]["data"]] == [old["latest_charge"]]
        assert "charges" not in new


class TestEventList:
    def test_events_render_lazily_but_read_like_a_list(self, store: Store) -> None:
        store.topup(store.create_customer())

        events = store.events()
        first, *rest = events

        assert len(events) == 5 and first["type"] == "customer.created" and len(rest) == 4
        assert events[-1]["type"] == "checkout.session.completed"
        assert [e["id"] for e in events[1:3]] == [r.id for r in events.records[1:3]]
