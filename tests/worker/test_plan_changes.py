"""Plan changes by policy, with credits worked out by hand from Stripe's proration arithmetic; several
subscriptions per customer; cancel at period end; trials; top-ups whose events agree in any order.

The proration fixture is Stripe's documented example (docs.stripe.com/billing/subscriptions/prorations): a change
from Silver ($10/month) to Gold on 2020-09-01 17:42:28 UTC (1598982148) in the period ending 2020-09-06 21:28:08
(1599427688), which began a calendar month earlier, 2020-08-06 21:28:08 (1596749288): 2678400 s, 445540 s left.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from typer.testing import CliRunner

from ledger.check import check_ledger
from ledger.db import unit_of_work
from ledger.inbox import EventStatus
from ledger.models import AccessState, Account, Grant, GrantSource
from ledger.queries import balance_summary
from ledger.subscriptions import subscriptions_of
from tests.worker.conftest import event_row, load_fixture, store
from webhooks.api import SubscriptionOut
from worker.cli import app as cli_app
from worker.processing import process_events

DOCS_PERIOD_START, DOCS_CHANGE, DOCS_PERIOD_END = 1596749288, 1598982148, 1599427688
DOCS_SUB, DOCS_CUSTOMER, DOCS_INVOICE = "sub_H38lqYjDO0DSzl", "cus_DGEhAXrZWrzdYs", "in_fxProrationDocs0001"
SILVER, GOLD = "price_c8v1liEvrf", "price_KV3bAJVYItwOKq16frkr"
ZULIP_OLD, ZULIP_NEW = "price_1TZtAjJEe0yY0QKr27Tj0mDA", "price_fxUpgrade000000000000"

CONFIG = """
[[packs]]
price = "price_credits_large"
credits = 12000
expires_after_days = 365

[[plans]]
price = "price_c8v1liEvrf"
name = "Silver"
credits_per_period = 1000

[[plans]]
price = "price_KV3bAJVYItwOKq16frkr"
name = "Gold"
credits_per_period = 4000
period_end = "{gold_period_end}"

[[plans]]
price = "price_1TZtAjJEe0yY0QKr27Tj0mDA"
name = "Zulip Standard"
credits_per_period = 2000
trial_credits = 300

[[plans]]
price = "price_fxUpgrade000000000000"
name = "Zulip Plus"
credits_per_period = 4000

[plan_changes]
on_upgrade = "{on_upgrade}"
on_downgrade = "{on_downgrade}"
"""


@pytest.fixture
def policy(engine: Engine, billing_config_file: Callable[[str], Path]) -> Callable[..., None]:
    """Set the [plan_changes] policy of the billing config."""

    def set_policy(on_upgrade: str = "prorate", on_downgrade: str = "next_period", gold: str = "expire") -> None:
        billing_config_file(CONFIG.format(on_upgrade=on_upgrade, on_downgrade=on_downgrade, gold_period_end=gold))

    set_policy()
    return set_policy


def run(event: dict[str, Any]) -> Any:
    row_id = store(event)
    process_events([row_id])
    row = event_row(row_id)
    assert row.status in (EventStatus.PROCESSED, EventStatus.IGNORED), row.last_error
    return row


def grants(customer_id: str) -> list[Grant]:
    with unit_of_work() as session:
        rows = list(
            session.scalars(
                select(Grant)
                .join(Account, Account.id == Grant.account_id)
                .where(Account.customer_id == customer_id)
                .order_by(Grant.id)
            )
        )
        assert check_ledger(session) == []
        session.expunge_all()
        return rows


def by_source(customer_id: str, source: GrantSource) -> list[Grant]:
    return [g for g in grants(customer_id) if g.source == source]


def balance(customer_id: str) -> int:
    with unit_of_work() as session:
        return session.scalars(select(Account.balance).where(Account.customer_id == customer_id)).one()


def aware(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def at(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def proration_invoice(
    *,
    old: tuple[str, int, int],
    new: tuple[str, int, int],
    invoice_id: str = DOCS_INVOICE,
    amount_paid: int | None = None,
) -> dict[str, Any]:
    """The docs proration invoice.paid with its two lines set to (price, quantity, amount)."""
    event = load_fixture("invoice.paid.subscription_update_proration.derived.json")
    event["id"] = f"evt_{invoice_id}"
    invoice = event["data"]["object"]
    invoice["id"] = invoice_id
    unused, remaining = invoice["lines"]["data"]
    for line, (price, quantity, amount) in ((unused, old), (remaining, new)):
        line["price"]["id"], line["plan"]["id"], line["quantity"], line["amount"] = price, price, quantity, amount
    invoice["amount_paid"] = max(0, old[2] + new[2]) if amount_paid is None else amount_paid
    return event


def basil(event: dict[str, Any]) -> dict[str, Any]:
    """The same invoice event in the 2025-03-31.basil shape: subscription under ``parent``, prices under
    ``pricing.price_details``, the proration flag under ``parent.subscription_item_details``."""
    event = copy.deepcopy(event)
    event["id"] += "_basil"
    event["api_version"] = "2025-03-31.basil"
    invoice = event["data"]["object"]
    subscription = invoice.pop("subscription")
    invoice["parent"] = {"type": "subscription_details", "subscription_details": {"subscription": subscription}}
    for key in ("charge", "payment_intent"):
        invoice.pop(key)
    invoice["payments"] = {
        "data": [{"payment": {"type": "payment_intent", "payment_intent": "pi_fxProrationDocs0001"}}]
    }
    for line in invoice["lines"]["data"]:
        price = line.pop("price")["id"]
        line.pop("plan")
        line["pricing"] = {"type": "price_details", "price_details": {"price": price, "product": "prod_x"}}
        line["parent"] = {
            "type": "subscription_item_details",
            "subscription_item_details": {
                "proration": line.pop("proration"),
                "subscription": line.pop("subscription"),
                "subscription_item": line.pop("subscription_item"),
            },
        }
        line.pop("type")
    return event


def renewal(
    price: str, credits_amount: int, *, invoice_id: str = "in_docsRenewal", quantity: int = 1
) -> dict[str, Any]:
    """The docs subscription's period invoice (2020-08-06 .. 2020-09-06), paid at the period's start."""
    event = load_fixture("invoice.paid.subscription_update_proration.derived.json")
    event["id"] = f"evt_{invoice_id}"
    event["created"] = DOCS_PERIOD_START + 60
    invoice = event["data"]["object"]
    invoice.update(
        id=invoice_id,
        billing_reason="subscription_cycle",
        amount_paid=credits_amount,
        charge=f"ch_{invoice_id}",
        payment_intent=f"pi_{invoice_id}",
    )
    line = invoice["lines"]["data"][0]
    line.update(
        amount=credits_amount,
        proration=False,
        type="subscription",
        quantity=quantity,
        period={"start": DOCS_PERIOD_START, "end": DOCS_PERIOD_END},
    )
    line["price"]["id"] = line["plan"]["id"] = price
    invoice["lines"]["data"] = [line]
    return event


class TestStripesArithmetic:
    def test_the_derived_period_reproduces_stripes_own_proration_amounts(self) -> None:
        # The period start (one calendar month before its end) gives back the documented line amounts.
        total, left = DOCS_PERIOD_END - DOCS_PERIOD_START, DOCS_PERIOD_END - DOCS_CHANGE
        assert (total, left) == (31 * 86400, 445540)
        assert round(1000 * left / total) == 166  # "Unused time on Silver plan": -166
        assert round(3252 * left / total) == 541  # "Remaining time on Gold plan": +541


class TestUpgrade:
    def test_prorate_grants_the_unused_share_of_the_difference_expiring_with_the_period(self, policy: Any) -> None:
        run(proration_invoice(old=(SILVER, 1, -166), new=(GOLD, 1, 541)))
        [g] = by_source(DOCS_CUSTOMER, GrantSource.PLAN_CHANGE)
        # (4000 - 1000) x 445540 // 2678400 = 1336620000 // 2678400 = 499 (remainder 98400)
        assert (g.units, g.remaining) == (499, 499)
        assert aware(g.expires_at) == at(DOCS_PERIOD_END)
        assert (g.stripe_object_id, g.stripe_object_type, g.amount_minor, g.currency) == (
            DOCS_INVOICE,
            "invoice",
            375,
            "usd",
        )

    def test_both_invoice_shapes_and_redelivery_grant_once_with_the_same_fields(self, policy: Any) -> None:
        legacy = proration_invoice(old=(SILVER, 1, -166), new=(GOLD, 1, 541))
        run(basil(legacy))
        run(legacy)
        run(basil(legacy))
        [g] = by_source(DOCS_CUSTOMER, GrantSource.PLAN_CHANGE)
        assert (g.units, g.idempotency_key) == (499, f"plan_change:{DOCS_INVOICE}")

    def test_a_refund_of_the_proration_charge_finds_the_plan_change_grant(self, policy: Any) -> None:
        run(proration_invoice(old=(SILVER, 1, -166), new=(GOLD, 1, 541)))
        from worker.payments import find_funded_grant

        with unit_of_work() as session:
            funded = find_funded_grant(session, ["ch_fxProrationDocs0001"], unlinked=False)
        assert funded is not None and funded.units == 499

    @pytest.mark.parametrize("upgrade_first", [False, True])
    def test_full_retires_the_period_grant_and_grants_the_whole_new_plan(
        self, policy: Any, upgrade_first: bool
    ) -> None:
        policy(on_upgrade="full")
        events = [renewal(SILVER, 1000), proration_invoice(old=(SILVER, 1, -166), new=(GOLD, 1, 541))]
        for event in reversed(events) if upgrade_first else events:
            run(event)
        [period] = by_source(DOCS_CUSTOMER, GrantSource.RENEWAL)
        [change] = by_source(DOCS_CUSTOMER, GrantSource.PLAN_CHANGE)
        assert (period.units, period.remaining, aware(period.expired_at)) == (1000, 0, at(DOCS_CHANGE))
        assert (change.units, change.remaining, aware(change.expires_at)) == (4000, 4000, at(DOCS_PERIOD_END))
        assert balance(DOCS_CUSTOMER) == 4000

    def test_next_period_grants_nothing_now(self, policy: Any) -> None:
        policy(on_upgrade="next_period")
        run(renewal(SILVER, 1000))
        row = run(proration_invoice(old=(SILVER, 1, -166), new=(GOLD, 1, 541)))
        assert row.status == EventStatus.PROCESSED
        assert by_source(DOCS_CUSTOMER, GrantSource.PLAN_CHANGE) == []
        assert balance(DOCS_CUSTOMER) == 1000

    def test_more_seats_prorate_credits_times_quantity(self, policy: Any) -> None:
        run(proration_invoice(old=(SILVER, 1, -166), new=(SILVER, 3, 499)))
        [g] = by_source(DOCS_CUSTOMER, GrantSource.PLAN_CHANGE)
        # (3 x 1000 - 1 x 1000) x 445540 // 2678400 = 891080000 // 2678400 = 332 (remainder 1851200)
        assert g.units == 332

    def test_a_change_stripe_does_not_invoice_is_granted_from_the_update_at_once(self, policy: Any) -> None:
        event = load_fixture("customer.subscription.updated.upgrade_price.dahlia.derived.json")
        del event["data"]["previous_attributes"]["latest_invoice"]
        run(event)
        [g] = by_source("cus_UZ11RVzkmLf6Cf", GrantSource.PLAN_CHANGE)
        # Period 1779785433 .. 1782463833 (2678400 s); changed at the event's time 1780649439: 1814394 s left.
        # (4000 - 2000) x 1814394 // 2678400 = 3628788000 // 2678400 = 1354 (remainder 2234400)
        assert (g.units, g.idempotency_key, g.stripe_object_id) == (1354, f"plan_change:{event['id']}", None)
        assert aware(g.expires_at) == at(1782463833)


class TestDowngrade:
    @pytest.mark.parametrize("downgrade_first", [False, True])
    def test_prorate_takes_back_the_unspent_share_in_either_order(self, policy: Any, downgrade_first: bool) -> None:
        policy(on_downgrade="prorate")
        events = [renewal(GOLD, 4000), proration_invoice(old=(GOLD, 1, -541), new=(SILVER, 1, 166), amount_paid=0)]
        for event in reversed(events) if downgrade_first else events:
            run(event)
        [period] = by_source(DOCS_CUSTOMER, GrantSource.RENEWAL)
        # (4000 - 1000) x 445540 // 2678400 = 499 taken back: 3501 left.
        assert (period.units, period.remaining) == (4000, 3501)
        assert by_source(DOCS_CUSTOMER, GrantSource.PLAN_CHANGE) == []

    def test_prorate_takes_only_what_is_unspent(self, policy: Any) -> None:
        from ledger.consume import consume

        # Gold rolls over here, so its 2020 period's credits are still spendable today.
        policy(on_downgrade="prorate", gold="rollover")
        run(renewal(GOLD, 4000))
        with unit_of_work() as session:
            consume(session, DOCS_CUSTOMER, units=3800, request_id="spent")
        run(proration_invoice(old=(GOLD, 1, -541), new=(SILVER, 1, 166), amount_paid=0))
        [period] = by_source(DOCS_CUSTOMER, GrantSource.RENEWAL)
        # 499 to take back, 200 unspent: 200 taken, nothing owed.
        assert (period.remaining, balance(DOCS_CUSTOMER)) == (0, 0)
        with unit_of_work() as session:
            debt = session.scalars(select(Account.debt).where(Account.customer_id == DOCS_CUSTOMER)).one()
        assert debt == 0

    def test_next_period_keeps_the_credits_granted(self, policy: Any) -> None:
        run(renewal(GOLD, 4000))
        run(proration_invoice(old=(GOLD, 1, -541), new=(SILVER, 1, 166), amount_paid=0))
        assert balance(DOCS_CUSTOMER) == 4000


class TestSharedPlanChangeFixtures:
    def test_apply_without_a_failed_event(self, policy: Any) -> None:
        names = [
            "customer.subscription.created.active.dahlia.zulip.json",
            "customer.subscription.updated.upgrade_price.dahlia.derived.json",
            "customer.subscription.updated.cancel_at_period_end.dahlia.derived.json",
            "invoice.created.subscription_update_proration.derived.json",
            "invoice.paid.subscription_update_proration.derived.json",
        ]
        rows = [run(load_fixture(n)) for n in names]
        assert [r.status for r in rows] == [
            EventStatus.PROCESSED,
            EventStatus.PROCESSED,
            EventStatus.PROCESSED,
            EventStatus.IGNORED,
            EventStatus.PROCESSED,
        ]
        # The upgrade was invoiced (a new latest_invoice): its credits wait for that invoice, not granted twice.
        assert by_source("cus_UZ11RVzkmLf6Cf", GrantSource.PLAN_CHANGE) == []
        [docs] = by_source(DOCS_CUSTOMER, GrantSource.PLAN_CHANGE)
        assert docs.units == 499
        with unit_of_work() as session:
            [sub] = subscriptions_of(session, "cus_UZ11RVzkmLf6Cf")
        assert (sub.status, sub.cancel_at_period_end, sub.access_state) == ("active", True, AccessState.ACTIVE)
        assert (sub.price, sub.plan, sub.cancel_at) == (ZULIP_OLD, "Zulip Standard", at(1782463833))


def subscription_event(event_type: str, sub_id: str, status: str, created: int, **fields: Any) -> dict[str, Any]:
    event = load_fixture("customer.subscription.created.active.dahlia.zulip.json")
    event.update(id=f"evt_{sub_id}_{created}", type=event_type, created=created)
    sub = event["data"]["object"]
    sub.update(id=sub_id, status=status, **fields)
    return event


class TestSeveralSubscriptions:
    def test_access_is_the_best_of_the_customers_subscriptions(self, policy: Any) -> None:
        customer = "cus_UZ11RVzkmLf6Cf"
        run(subscription_event("customer.subscription.created", "sub_A", "active", 1779785439))
        run(subscription_event("customer.subscription.created", "sub_B", "active", 1779785500))
        run(subscription_event("customer.subscription.deleted", "sub_A", "canceled", 1779790000))
        with unit_of_work() as session:
            account = session.scalars(select(Account).where(Account.customer_id == customer)).one()
            subs = {s.subscription_id: s.access_state for s in subscriptions_of(session, customer)}
        assert account.access_state == AccessState.ACTIVE
        assert subs == {"sub_A": AccessState.CANCELED, "sub_B": AccessState.ACTIVE}
        run(subscription_event("customer.subscription.updated", "sub_B", "past_due", 1779800000))
        with unit_of_work() as session:
            account = session.scalars(select(Account).where(Account.customer_id == customer)).one()
        assert account.access_state == AccessState.PAST_DUE
        assert aware(account.grace_until) == at(1779800000) + timedelta(days=7)

    def test_cancel_at_period_end_keeps_access_until_deleted(self, policy: Any) -> None:
        customer = "cus_UZ11RVzkmLf6Cf"
        run(load_fixture("customer.subscription.updated.cancel_at_period_end.dahlia.derived.json"))
        with unit_of_work() as session:
            [sub] = subscriptions_of(session, customer)
            state = session.scalars(select(Account.access_state).where(Account.customer_id == customer)).one()
        assert (sub.cancel_at_period_end, sub.access_state, state) == (True, AccessState.ACTIVE, AccessState.ACTIVE)
        run(subscription_event("customer.subscription.deleted", sub.subscription_id, "canceled", 1782463833))
        with unit_of_work() as session:
            state = session.scalars(select(Account.access_state).where(Account.customer_id == customer)).one()
        assert state == AccessState.CANCELED

    def test_pause_suspends_and_resume_restores(self, policy: Any) -> None:
        customer = "cus_UZ11RVzkmLf6Cf"
        run(subscription_event("customer.subscription.paused", "sub_P", "paused", 1779790000))
        with unit_of_work() as session:
            assert subscriptions_of(session, customer)[0].access_state == AccessState.SUSPENDED
        run(subscription_event("customer.subscription.resumed", "sub_P", "active", 1779800000))
        with unit_of_work() as session:
            assert subscriptions_of(session, customer)[0].access_state == AccessState.ACTIVE


class TestTrialCredits:
    def test_a_trial_grants_its_credits_once_until_the_trial_ends(self, policy: Any) -> None:
        trial_end = 1779785433 + 14 * 86400
        for created in (1779785439, 1779785500):
            run(
                subscription_event(
                    "customer.subscription.updated",
                    "sub_T",
                    "trialing",
                    created,
                    trial_start=1779785433,
                    trial_end=trial_end,
                )
            )
        [g] = by_source("cus_UZ11RVzkmLf6Cf", GrantSource.TRIAL)
        assert (g.units, aware(g.expires_at), g.idempotency_key) == (300, at(trial_end), "trial:sub_T")


class TestTopUpInAnyOrder:
    @pytest.mark.parametrize("session_first", [True, False])
    def test_the_grant_is_the_same_whichever_event_comes_first(self, policy: Any, session_first: bool) -> None:
        customer, pi = "cus_TopUpOrder", "pi_TopUpOrder"
        meta = {"price_id": "price_credits_large"}
        checkout = {
            "id": "evt_cs_order",
            "object": "event",
            "type": "checkout.session.completed",
            "created": 1780000100,
            "data": {
                "object": {
                    "id": "cs_order",
                    "object": "checkout.session",
                    "mode": "payment",
                    "payment_status": "paid",
                    "payment_intent": pi,
                    "customer": customer,
                    "amount_total": 10000,
                    "currency": "usd",
                    "created": 1780000000,
                    "metadata": meta,
                }
            },
        }
        intent = {
            "id": "evt_pi_order",
            "object": "event",
            "type": "payment_intent.succeeded",
            "created": 1780000090,
            "data": {
                "object": {
                    "id": pi,
                    "object": "payment_intent",
                    "customer": customer,
                    "amount": 10000,
                    "amount_received": 10000,
                    "currency": "usd",
                    "created": 1780000060,
                    "metadata": meta,
                }
            },
        }
        for event in (checkout, intent) if session_first else (intent, checkout):
            run(event)
        [g] = grants(customer)
        # 365 days from the payment's earliest moment, the session's creation (1780000000).
        assert aware(g.expires_at) == at(1780000000) + timedelta(days=365)
        assert (g.units, g.reason, g.stripe_object_id, g.priority) == (12000, f"top-up {pi}", pi, 0)


class TestSubscriptionsAreShown:
    def test_balance_cli_and_api_model_show_each_subscription(self, policy: Any) -> None:
        customer = "cus_UZ11RVzkmLf6Cf"
        run(subscription_event("customer.subscription.created", "sub_A", "active", 1779785439))
        run(load_fixture("customer.subscription.updated.cancel_at_period_end.dahlia.derived.json"))
        result = CliRunner().invoke(cli_app, ["balance", customer])
        assert result.exit_code == 0, result.output
        assert "subscription sub_1TbGh3JEe0yY0QKrmHd5I4l8: Zulip Standard x1, active" in result.stdout
        assert "cancels at period end" in result.stdout and "subscription sub_A" in result.stdout
        shown = CliRunner().invoke(cli_app, ["balance", customer, "--json"])
        subs = {s["subscription_id"]: s for s in json.loads(shown.stdout)["subscriptions"]}
        assert subs["sub_1TbGh3JEe0yY0QKrmHd5I4l8"]["cancel_at_period_end"] is True
        assert subs["sub_A"]["current_period_end"] is not None
        with unit_of_work() as session:
            summary = balance_summary(session, customer)
        out = [SubscriptionOut(**dataclasses.asdict(v)) for v in summary.subscriptions]
        assert {(o.subscription_id, o.plan, o.cancel_at_period_end) for o in out} == {
            ("sub_A", "Zulip Standard", False),
            ("sub_1TbGh3JEe0yY0QKrmHd5I4l8", "Zulip Standard", True),
        }
