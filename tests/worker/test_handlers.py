"""Every event type of the shared fixtures, on every API version there: handled, or ignored with a reason."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from ledger import grants as ledger_grants
from ledger.check import check_ledger
from ledger.db import unit_of_work
from ledger.inbox import EventStatus
from ledger.models import AccessState, Account, Grant, GrantSource
from ledger.queries import balance_summary
from tests.conftest import STRIPE_EVENTS
from tests.worker.conftest import WORKER_BILLING_CONFIG, FakeStripe, event_row, load_fixture, store
from worker.handlers import HANDLERS, IGNORED
from worker.payments import link_payment
from worker.processing import process_events


def run(event: dict[str, Any], gateway: Any = None) -> Any:
    row_id = store(event)
    process_events([row_id], gateway=gateway)
    return event_row(row_id)


def paid_grant(
    customer_id: str,
    *,
    key: str,
    units: int,
    amount_minor: int,
    links: list[str],
    source: GrantSource = GrantSource.TOP_UP,
) -> int:
    """A grant for a payment, as a processed top-up would have left it."""
    with unit_of_work() as session:
        result = ledger_grants.grant_credits(
            session,
            customer_id,
            units=units,
            source=source,
            idempotency_key=f"test:{key}",
            stripe_object_id=links[0],
            amount_minor=amount_minor,
            currency="usd",
        )
        link_payment(session, result.grant_id, customer_id, links)
        return result.grant_id


def aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive UTC datetimes."""
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def grant(grant_id: int) -> Grant:
    with unit_of_work() as session:
        g = session.get(Grant, grant_id)
        assert g is not None
        session.expunge(g)
        return g


def grants_of(customer_id: str) -> list[Grant]:
    with unit_of_work() as session:
        rows = list(
            session.scalars(
                select(Grant).join(Account, Account.id == Grant.account_id).where(Account.customer_id == customer_id)
            )
        )
        session.expunge_all()
        return rows


def summary(customer_id: str) -> Any:
    with unit_of_work() as session:
        return balance_summary(session, customer_id)


def assert_ledger_ok() -> None:
    with unit_of_work() as session:
        assert check_ledger(session) == []


class TestEveryFixtureIsCovered:
    def test_each_fixture_type_is_handled_or_ignored_with_a_reason(self, stripe_event_files: list[Any]) -> None:
        for path in stripe_event_files:
            event_type = load_fixture(path.name)["type"]
            assert event_type in HANDLERS or event_type in IGNORED, path.name


IGNORED_FIXTURES = [
    "billing.credit_balance_transaction.created.debit.constructed.json",
    "billing.credit_grant.created.constructed.json",
    "billing.credit_grant.updated.voided.constructed.json",
    "billing.meter.created.constructed.json",
    "charge.dispute.funds_reinstated.srm.json",
    "charge.dispute.funds_withdrawn.srm.json",
    "charge.refund.updated.srm.json",
    "charge.succeeded.dahlia.zulip.json",
    "charge.succeeded.invoice.sse.json",
    "charge.succeeded.srm.json",
    "checkout.session.completed.mode_subscription.payrails.wrapped.json",
    "credit_note.created.sse.json",
    "customer.created.srm.json",
    "customer.subscription.trial_will_end.trialing.srm.json",
    "invoice.created.subscription_create.srm.json",
    "invoice.finalized.manual.srm.json",
    "invoice.finalized.subscription_cycle.sse.json",
    "invoice.paid.manual.srm.json",
    "invoice.payment_failed.manual.srm.json",
    "invoice.payment_succeeded.manual.srm.json",
    "invoice_payment.paid.sse.json",
    "payment_intent.payment_failed.card_declined.srm.json",
    "v1.billing.meter.error_report_triggered.thin.constructed.json",
]


class TestIgnoredEvents:
    @pytest.mark.parametrize("name", IGNORED_FIXTURES)
    def test_is_ignored_with_a_reason_and_changes_nothing(self, db: Engine, name: str) -> None:
        row = run(load_fixture(name))
        assert row.status == EventStatus.IGNORED, row.last_error
        assert row.status_reason
        with unit_of_work() as session:
            assert session.scalar(select(func.count()).select_from(Grant)) == 0

    def test_an_unknown_type_is_ignored_naming_the_type(self, db: Engine) -> None:
        event = load_fixture("customer.created.srm.json")
        event["type"] = "radar.early_fraud_warning.created"
        row = run(event)
        assert row.status == EventStatus.IGNORED
        assert "radar.early_fraud_warning.created" in (row.status_reason or "")

    def test_a_replay_of_an_ignored_event_is_a_no_op(self, db: Engine) -> None:
        row_id = store(load_fixture("customer.created.srm.json"))
        process_events([row_id])
        report = process_events([row_id])
        assert report.skipped == 1 and report.ignored == 0
        assert event_row(row_id).attempts == 1


class TestTopUps:
    def test_checkout_session_grants_the_pack_from_its_line_items(self, db: Engine, fake_stripe: FakeStripe) -> None:
        event = load_fixture("checkout.session.completed.mode_payment.srm.json")
        session_id = event["data"]["object"]["id"]
        fake_stripe.line_items[session_id] = [{"id": "li_1", "price": {"id": "price_credits_small"}, "quantity": 2}]
        row = run(event, fake_stripe)
        assert row.status == EventStatus.PROCESSED, row.last_error
        [g] = grants_of("cus_00000000000000")
        assert (g.units, g.source, g.stripe_object_id, g.amount_minor) == (
            2000,
            GrantSource.TOP_UP,
            "pi_000000000000000000000000",
            3000,
        )
        assert summary("cus_00000000000000").balance == 2000
        assert_ledger_ok()

    def test_checkout_session_without_a_pack_uses_the_fallback_rate(self, db: Engine, fake_stripe: FakeStripe) -> None:
        row = run(load_fixture("checkout.session.completed.mode_payment.sse.json"), fake_stripe)
        assert row.status == EventStatus.PROCESSED, row.last_error
        [g] = grants_of("cus_IhGfebO16cMIGN")
        assert (g.units, g.currency) == (999, "eur")

    def test_checkout_session_metadata_names_the_pack_without_asking_stripe(self, db: Engine) -> None:
        event = load_fixture("checkout.session.completed.mode_payment.srm.json")
        event["data"]["object"]["metadata"] = {"price_id": "price_credits_large"}
        row = run(event, gateway=None)
        assert row.status == EventStatus.PROCESSED, row.last_error
        [g] = grants_of("cus_00000000000000")
        assert g.units == 12000
        assert g.expires_at is not None

    def test_checkout_session_needing_line_items_without_stripe_fails_visibly(self, db: Engine) -> None:
        row = run(load_fixture("checkout.session.completed.mode_payment.srm.json"), gateway=None)
        assert row.status == EventStatus.FAILED
        assert "line items" in (row.last_error or "")

    def test_unpaid_async_checkout_is_ignored_until_async_payment_succeeded(
        self, db: Engine, fake_stripe: FakeStripe
    ) -> None:
        event = load_fixture("checkout.session.completed.mode_payment.srm.json")
        event["data"]["object"]["payment_status"] = "unpaid"
        assert run(event, fake_stripe).status == EventStatus.IGNORED
        later = load_fixture("checkout.session.completed.mode_payment.srm.json")
        later["id"] = "evt_async_ok"
        later["type"] = "checkout.session.async_payment_succeeded"
        assert run(later, fake_stripe).status == EventStatus.PROCESSED
        assert [g.units for g in grants_of("cus_00000000000000")] == [3000]

    def test_payment_intent_without_a_customer_fails_with_the_reason(self, db: Engine) -> None:
        row = run(load_fixture("payment_intent.succeeded.srm.json"))
        assert row.status == EventStatus.FAILED
        assert "no Stripe customer" in (row.last_error or "")

    def test_payment_intent_of_a_customer_grants_at_the_fallback_rate(self, db: Engine) -> None:
        event = load_fixture("payment_intent.succeeded.srm.json")
        event["data"]["object"]["customer"] = "cus_pi"
        row = run(event)
        assert row.status == EventStatus.PROCESSED, row.last_error
        assert [g.units for g in grants_of("cus_pi")] == [2000]

    def test_session_and_payment_intent_of_one_payment_make_one_grant(
        self, db: Engine, fake_stripe: FakeStripe
    ) -> None:
        session_event = load_fixture("checkout.session.completed.mode_payment.srm.json")
        session_obj = session_event["data"]["object"]
        fake_stripe.line_items[session_obj["id"]] = [{"id": "li_1", "price": {"id": "price_credits_small"}}]
        fake_stripe.sessions.append(session_obj)
        pi_event = load_fixture("payment_intent.succeeded.srm.json")
        pi_event["data"]["object"]["customer"] = "cus_00000000000000"
        # Either order: the payment intent is priced from the same session's line items.
        assert run(pi_event, fake_stripe).status == EventStatus.PROCESSED
        assert run(session_event, fake_stripe).status == EventStatus.PROCESSED
        assert [g.units for g in grants_of("cus_00000000000000")] == [1000]
        assert summary("cus_00000000000000").balance == 1000

    def test_payment_intent_of_an_invoice_is_left_to_invoice_paid(self, db: Engine) -> None:
        event = load_fixture("payment_intent.succeeded.srm.json")
        event["data"]["object"].update(customer="cus_x", invoice="in_123")
        row = run(event)
        assert row.status == EventStatus.IGNORED
        assert grants_of("cus_x") == []


class TestRenewals:
    @pytest.mark.parametrize(
        ("name", "customer", "units", "expires"),
        [
            ("invoice.paid.subscription_create.derived.json", "cus_JsuO3bmrj0QlAw", 10000, True),
            ("invoice.paid.subscription_cycle.sse.json", "cus_JsuO3bmrj0QlAw", 10000, True),
            ("invoice.paid.subscription_cycle.basil.derived.json", "cus_1234", 50000, False),
        ],
    )
    def test_paid_period_grants_the_plan_credits(
        self, db: Engine, name: str, customer: str, units: int, expires: bool
    ) -> None:
        event = load_fixture(name)
        row = run(event)
        assert row.status == EventStatus.PROCESSED, row.last_error
        [g] = grants_of(customer)
        line = event["data"]["object"]["lines"]["data"][0]
        assert g.units == units and g.source == GrantSource.RENEWAL
        assert aware(g.period_end) == datetime.fromtimestamp(line["period"]["end"], tz=UTC)
        assert (aware(g.expires_at) == aware(g.period_end)) if expires else g.expires_at is None
        assert g.stripe_object_id == event["data"]["object"]["id"]

    def test_basil_shape_reads_the_subscription_from_parent(self, db: Engine) -> None:
        row = run(load_fixture("invoice.paid.subscription_cycle.basil.derived.json"))
        assert "sub_1234" in (grant(grants_of("cus_1234")[0].id).reason)
        assert row.status == EventStatus.PROCESSED

    def test_the_same_period_twice_grants_once(self, db: Engine) -> None:
        run(load_fixture("invoice.paid.subscription_cycle.sse.json"))
        again = load_fixture("invoice.paid.subscription_cycle.sse.json")
        again["id"] = "evt_redelivered_as_new_id"
        assert run(again).status == EventStatus.PROCESSED
        assert [g.units for g in grants_of("cus_JsuO3bmrj0QlAw")] == [10000]

    @pytest.mark.parametrize("change", ["more credits", "plan removed"])
    def test_a_period_redelivered_after_the_plan_changed_stays_granted_once(
        self, db: Engine, billing_config_file: Callable[[str], Path], change: str
    ) -> None:
        run(load_fixture("invoice.paid.subscription_cycle.sse.json"))
        if change == "more credits":
            billing_config_file(
                WORKER_BILLING_CONFIG.replace("credits_per_period = 10000", "credits_per_period = 20000")
            )
        else:
            billing_config_file(
                WORKER_BILLING_CONFIG.replace('price = "price_1IDQm5JDPojXS6LNM31hxKzp"', 'price = "x"')
            )
        again = load_fixture("invoice.paid.subscription_cycle.sse.json")
        again["id"] = "evt_redelivered_after_config_change"
        row = run(again)
        assert row.status == EventStatus.PROCESSED, row.last_error
        assert "already granted" in (row.status_reason or "")
        assert [g.units for g in grants_of("cus_JsuO3bmrj0QlAw")] == [10000]
        assert_ledger_ok()

    def test_an_unconfigured_plan_fails_naming_the_price(self, db: Engine) -> None:
        event = load_fixture("invoice.paid.subscription_cycle.sse.json")
        for line in event["data"]["object"]["lines"]["data"]:
            line["price"]["id"] = "price_unknown"
            line["plan"]["id"] = "price_unknown"
        row = run(event)
        assert row.status == EventStatus.FAILED
        assert "price_unknown" in (row.last_error or "")

    def test_failed_renewal_puts_the_account_past_due_with_grace(self, db: Engine) -> None:
        event = load_fixture("invoice.payment_failed.subscription_cycle.basil.payrails.wrapped.json")
        row = run(event)
        assert row.status == EventStatus.PROCESSED, row.last_error
        s = summary("cus_1234")
        assert s.access_state == AccessState.PAST_DUE
        assert aware(s.grace_until) == datetime.fromtimestamp(event["created"], tz=UTC) + timedelta(days=7)

    def test_paid_after_failed_restores_access_in_either_order(self, db: Engine) -> None:
        failed = load_fixture("invoice.payment_failed.subscription_cycle.basil.payrails.wrapped.json")
        paid = load_fixture("invoice.paid.subscription_cycle.basil.derived.json")
        assert paid["created"] > failed["created"]
        run(paid)
        run(failed)  # older: must not overwrite the newer state
        assert summary("cus_1234").access_state == AccessState.ACTIVE


SUBSCRIPTION_FIXTURES = [
    ("customer.subscription.created.active.srm.json", "cus_00000000000000", AccessState.ACTIVE),
    ("customer.subscription.updated.active.srm.json", "cus_00000000000000", AccessState.ACTIVE),
    ("customer.subscription.deleted.canceled.srm.json", "cus_00000000000000", AccessState.CANCELED),
    ("customer.subscription.created.active.dahlia.zulip.json", "cus_UZ11RVzkmLf6Cf", AccessState.ACTIVE),
    ("customer.subscription.updated.active_to_trialing.dahlia.zulip.json", "cus_UZ11RVzkmLf6Cf", AccessState.TRIALING),
    ("customer.subscription.updated.active_to_past_due.derived.json", "cus_UZ11RVzkmLf6Cf", AccessState.PAST_DUE),
    ("customer.subscription.updated.past_due_to_unpaid.derived.json", "cus_UZ11RVzkmLf6Cf", AccessState.SUSPENDED),
    ("customer.subscription.deleted.canceled.dahlia.zulip.json", "cus_UZ11RVzkmLf6Cf", AccessState.CANCELED),
]


class TestSubscriptionState:
    @pytest.mark.parametrize(("name", "customer", "state"), SUBSCRIPTION_FIXTURES)
    def test_status_maps_to_access_state(self, db: Engine, name: str, customer: str, state: AccessState) -> None:
        row = run(load_fixture(name))
        assert row.status == EventStatus.PROCESSED, row.last_error
        assert summary(customer).access_state == state

    def test_an_older_event_never_overwrites_a_newer_state(self, db: Engine) -> None:
        created = load_fixture("customer.subscription.created.active.dahlia.zulip.json")
        deleted = load_fixture("customer.subscription.deleted.canceled.dahlia.zulip.json")
        run(deleted)
        row = run(created)
        assert row.status == EventStatus.PROCESSED
        assert "newer" in (row.status_reason or "")
        assert summary("cus_UZ11RVzkmLf6Cf").access_state == AccessState.CANCELED

    def test_a_timestamp_tie_is_settled_by_stripes_current_object(self, db: Engine, fake_stripe: FakeStripe) -> None:
        active = load_fixture("customer.subscription.updated.active.srm.json")
        canceled = load_fixture("customer.subscription.updated.active.srm.json")
        canceled["id"] = "evt_same_second"
        canceled["data"]["object"]["status"] = "canceled"
        sub_id = active["data"]["object"]["id"]
        fake_stripe.objects[("subscription", sub_id)] = {"id": sub_id, "status": "active"}
        run(canceled, fake_stripe)
        row = run(active, fake_stripe)
        assert row.status == EventStatus.PROCESSED
        assert ("retrieve", sub_id) in fake_stripe.calls
        assert summary("cus_00000000000000").access_state == AccessState.ACTIVE


class TestRefunds:
    def test_full_refund_claws_back_the_whole_grant(self, db: Engine) -> None:
        event = load_fixture("charge.refunded.full.sse.json")
        obj = event["data"]["object"]
        gid = paid_grant("cus_J7Mkgr8mvbl1eK", key="r1", units=2500, amount_minor=2500, links=[obj["payment_intent"]])
        row = run(event)
        assert row.status == EventStatus.PROCESSED, row.last_error
        assert (grant(gid).remaining, grant(gid).clawed_back) == (0, 2500)
        assert summary("cus_J7Mkgr8mvbl1eK").balance == 0
        assert_ledger_ok()

    def test_legacy_full_refund_found_by_charge_id(self, db: Engine) -> None:
        gid = paid_grant("cus_legacy", key="r2", units=100, amount_minor=100, links=["ch_000000000000000000000000"])
        row = run(load_fixture("charge.refunded.full.srm.json"))
        assert row.status == EventStatus.PROCESSED, row.last_error
        assert grant(gid).clawed_back == 100

    def test_a_refund_naming_only_its_charge_asks_stripe_for_the_payment(
        self, db: Engine, fake_stripe: FakeStripe
    ) -> None:
        event = load_fixture("charge.refunded.full.srm.json")  # payment_intent null, as in older payloads
        gid = paid_grant("cus_ask", key="r8", units=100, amount_minor=100, links=["pi_behind_the_charge"])
        charge_id = event["data"]["object"]["id"]
        fake_stripe.objects[("charge", charge_id)] = {"id": charge_id, "payment_intent": "pi_behind_the_charge"}
        row = run(event, fake_stripe)
        assert row.status == EventStatus.PROCESSED, row.last_error
        assert ("retrieve", charge_id) in fake_stripe.calls
        assert grant(gid).clawed_back == 100

    def test_partial_refund_claws_back_in_proportion(self, db: Engine) -> None:
        event = load_fixture("charge.refunded.partial.payrails.wrapped.json")
        gid = paid_grant("cus_0dUMWLtzCTagWs", key="r3", units=3000, amount_minor=1500, links=["ch_chargeid"])
        row = run(event)
        assert row.status == EventStatus.PROCESSED, row.last_error
        assert grant(gid).clawed_back == 1000  # 500 of 1500 paid
        assert summary("cus_0dUMWLtzCTagWs").balance == 2000

    def test_cumulative_amount_refunded_claws_back_only_what_is_new(self, db: Engine) -> None:
        first = load_fixture("charge.refunded.partial.payrails.wrapped.json")
        gid = paid_grant("cus_0dUMWLtzCTagWs", key="r4", units=1500, amount_minor=1500, links=["ch_chargeid"])
        second = load_fixture("charge.refunded.partial.payrails.wrapped.json")
        second["id"] = "evt_second_refund"
        second["created"] += 60
        second["data"]["object"]["amount_refunded"] = 1200
        second["data"]["object"]["refunds"]["data"].append(
            {"id": "re_second", "object": "refund", "amount": 700, "status": "succeeded"}
        )
        run(second)
        run(first)  # older, smaller cumulative: nothing new
        run(second)  # a redelivery
        assert grant(gid).clawed_back == 1200
        assert_ledger_ok()

    def test_refund_created_and_charge_refunded_of_one_refund_count_once(self, db: Engine) -> None:
        refund = load_fixture("refund.created.sse.json")
        r = refund["data"]["object"]
        gid = paid_grant("cus_rf", key="r5", units=4000, amount_minor=2000, links=[r["payment_intent"], r["charge"]])
        assert run(refund).status == EventStatus.PROCESSED
        charge = load_fixture("charge.refunded.full.sse.json")
        c = charge["data"]["object"]
        c.update(id=r["charge"], payment_intent=r["payment_intent"], amount=2000, amount_refunded=1000, invoice=None)
        c["refunds"] = {"object": "list", "data": [{"id": r["id"], "amount": 1000, "status": "succeeded"}]}
        assert run(charge).status == EventStatus.PROCESSED
        assert grant(gid).clawed_back == 2000  # half the money, half the units: not twice

    def test_spent_credits_become_debt(self, db: Engine) -> None:
        from ledger.consume import consume

        event = load_fixture("charge.refunded.full.sse.json")
        gid = paid_grant(
            "cus_J7Mkgr8mvbl1eK", key="r6", units=2500, amount_minor=2500, links=["ch_3Kl36gJDPojXS6LN0DCM4A8l"]
        )
        with unit_of_work() as session:
            consume(session, "cus_J7Mkgr8mvbl1eK", request_id="spend-1", units=2000)
        row = run(event)
        assert row.status == EventStatus.PROCESSED, row.last_error
        assert "debt" in (row.status_reason or "")
        s = summary("cus_J7Mkgr8mvbl1eK")
        assert (s.debt, grant(gid).remaining) == (2000, 0)
        assert_ledger_ok()

    def test_refund_before_its_payment_waits_then_runs_when_the_grant_lands(
        self, db: Engine, fake_stripe: FakeStripe
    ) -> None:
        refund = load_fixture("refund.created.sse.json")
        row = run(refund)
        assert row.status == EventStatus.WAITING
        assert refund["data"]["object"]["payment_intent"] in (row.status_reason or "")
        payment = load_fixture("payment_intent.succeeded.srm.json")
        payment["data"]["object"].update(
            id=refund["data"]["object"]["payment_intent"], customer="cus_late", amount_received=2000
        )
        assert run(payment).status == EventStatus.PROCESSED
        assert event_row(row.id).status == EventStatus.PROCESSED
        [g] = grants_of("cus_late")
        assert g.clawed_back == 1000

    def test_pre_payment_credit_note_is_ignored(self, db: Engine) -> None:
        row = run(load_fixture("credit_note.created.sse.json"))
        assert row.status == EventStatus.IGNORED
        assert "pre_payment" in (row.status_reason or "")

    def test_post_payment_credit_note_claws_back_its_refund(self, db: Engine) -> None:
        event = load_fixture("credit_note.created.sse.json")
        note = event["data"]["object"]
        note.update(type="post_payment", refund_amount=1099, refunds=[{"refund": "re_cn", "amount_refunded": 1099}])
        gid = paid_grant(
            "cus_NjLgPhUokHubJC",
            key="r7",
            units=10000,
            amount_minor=2198,
            links=[note["invoice"]],
            source=GrantSource.RENEWAL,
        )
        row = run(event)
        assert row.status == EventStatus.PROCESSED, row.last_error
        assert grant(gid).clawed_back == 5000


DISPUTE_CREATED = [
    ("charge.dispute.created.srm.json", ["ch_000000000000000000000000"]),
    ("charge.dispute.created.sse.json", ["pi_1IqtG9JDPojXS6LNOGnYrIqq"]),
    ("charge.dispute.created.dahlia.zulip.json", ["pi_3TbG44JEe0yY0QKr0OnHpigY"]),
]


class TestDisputes:
    @pytest.mark.parametrize(("name", "links"), DISPUTE_CREATED)
    def test_opened_dispute_freezes_the_funded_grant(self, db: Engine, name: str, links: list[str]) -> None:
        gid = paid_grant("cus_d", key="d1", units=5000, amount_minor=5000, links=links)
        row = run(load_fixture(name))
        assert row.status == EventStatus.PROCESSED, row.last_error
        assert (grant(gid).frozen, grant(gid).remaining) == (5000, 0)
        assert summary("cus_d").balance == 0
        assert_ledger_ok()

    def test_lost_dispute_claws_back_the_disputed_share(self, db: Engine) -> None:
        gid = paid_grant("cus_d", key="d2", units=4400, amount_minor=4400, links=["pi_3TbG44JEe0yY0QKr0OnHpigY"])
        run(load_fixture("charge.dispute.created.dahlia.zulip.json"))
        row = run(load_fixture("charge.dispute.closed.lost.dahlia.zulip.json"))
        assert row.status == EventStatus.PROCESSED, row.last_error
        g = grant(gid)
        assert (g.clawed_back, g.frozen, g.remaining) == (2200, 0, 2200)  # 2200 disputed of 4400
        assert_ledger_ok()

    def test_lost_before_created_ends_the_same(self, db: Engine) -> None:
        gid = paid_grant("cus_d", key="d3", units=4400, amount_minor=4400, links=["pi_3TbG44JEe0yY0QKr0OnHpigY"])
        run(load_fixture("charge.dispute.closed.lost.dahlia.zulip.json"))
        row = run(load_fixture("charge.dispute.created.dahlia.zulip.json"))
        assert row.status == EventStatus.PROCESSED
        g = grant(gid)
        assert (g.clawed_back, g.frozen, g.remaining) == (2200, 0, 2200)

    def test_won_dispute_gives_the_units_back(self, db: Engine) -> None:
        gid = paid_grant("cus_d", key="d4", units=1000, amount_minor=1000, links=["ch_00000000000000"])
        created = load_fixture("charge.dispute.created.srm.json")
        created["data"]["object"].update(id=None, charge="ch_00000000000000", created=1381080000)
        created["created"] = 1300000000
        run(created)
        assert grant(gid).frozen == 1000
        row = run(load_fixture("charge.dispute.closed.won.legacy.srm.json"))
        assert row.status == EventStatus.PROCESSED, row.last_error
        assert (grant(gid).frozen, grant(gid).remaining) == (0, 1000)
        assert_ledger_ok()


class TestExactlyOnce:
    def test_running_a_processed_event_again_changes_nothing(self, db: Engine) -> None:
        row_id = store(load_fixture("invoice.paid.subscription_cycle.sse.json"))
        first = process_events([row_id])
        second = process_events([row_id, row_id])
        assert (first.processed, second.processed, second.skipped) == (1, 0, 1)
        assert len(grants_of("cus_JsuO3bmrj0QlAw")) == 1
        assert event_row(row_id).attempts == 1

    def test_a_stored_event_of_every_fixture_ends_in_a_final_or_waiting_status(
        self, db: Engine, fake_stripe: FakeStripe
    ) -> None:
        ids = [store(load_fixture(p.name)) for p in sorted(STRIPE_EVENTS.glob("*.json"))]
        report = process_events(ids, gateway=fake_stripe)
        assert report.retry == []
        with unit_of_work() as session:
            assert check_ledger(session) == []
        statuses = {event_row(i).status for i in ids}
        assert statuses <= {EventStatus.PROCESSED, EventStatus.IGNORED, EventStatus.WAITING, EventStatus.FAILED}
