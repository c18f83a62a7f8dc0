"""Money in every currency, free credits, whose each mismatch is, and runs that could not read everything.

Amounts are worked by hand in the comments: a credit bought at the fallback rate (one credit per minor unit) is
worth what its charge settled as in USD divided by its credits; gpt-4o input is 750 credits and $2.50 per million
tokens, Claude Sonnet output 4,500 credits and $15.00 per million.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from ledger.config import BillingConfig, get_billing_config
from ledger.db import session_factory
from ledger.grants import grant_credits
from ledger.inbox import EventStatus, parse_envelope, store_events
from ledger.models import AccessState, Grant, GrantSettlement, GrantSource
from reconciliation import services
from reconciliation.engine import RunSummary, reconcile
from reconciliation.margin import margin_rows
from reconciliation.models import Mismatch, MismatchKind, MismatchStatus, ReconciliationRun, RunStatus
from reconciliation.staging import balance_transaction_detail, balance_transaction_problem
from tests.conftest import SHARED
from tests.reconciliation import builders as b
from tests.reconciliation.conftest import Emulator

pytestmark = pytest.mark.usefixtures("test_config")


def _until() -> datetime:
    return datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(days=1)


def _run(emu: Emulator, config: BillingConfig | None = None) -> RunSummary:
    return reconcile(session_factory(), emu.gateway, since=emu.start, until=_until(), actor="test", config=config)


def _mismatches(engine: Engine) -> list[Mismatch]:
    with Session(engine) as s:
        return list(s.scalars(select(Mismatch).order_by(Mismatch.id)))


def _store_events(emu: Emulator, *, skip_types: tuple[str, ...] = ()) -> None:
    events = [e for e in emu.store.events() if e["type"] not in skip_types]
    with session_factory().begin() as s:
        b.store_all_events(s, events, status=EventStatus.PROCESSED)


def _paid_topup(emu: Emulator, customer: str, price: str, units: int, *, grant: bool = True) -> tuple[str, str]:
    """A Checkout top-up of ``price`` and (unless ``grant=False``) the worker's grant; (payment intent, charge)."""
    cs = emu.store.topup(customer, price)
    emu.store.clock.advance(minutes=5)
    if grant:
        with session_factory().begin() as s:
            b.grant_topup(s, emu.store, cs.id, units=units)
    pi = emu.store.get(cs.payment_intent)
    return pi.id, pi.latest_charge


def _use(customer: str, key: str, at: datetime, *, sonnet_output: int = 0, gpt4o_input: int = 0) -> None:
    with session_factory().begin() as s:
        if gpt4o_input:
            b.record_usage(
                s,
                customer,
                f"{key}-gpt",
                provider="openai",
                model="gpt-4o-2024-08-06",
                workspace="proj_main",
                at=at,
                input_tokens=gpt4o_input,
                output_tokens=0,
            )
        if sonnet_output:
            b.record_usage(
                s,
                customer,
                f"{key}-sonnet",
                provider="anthropic",
                model="claude-sonnet-4-20250514",
                workspace="wrkspc_main",
                at=at,
                input_tokens=0,
                output_tokens=sonnet_output,
            )


@pytest.fixture
def cli(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    """The CLI, with the gateway pointed at the emulator."""
    from ledger.settings import get_settings
    from reconciliation.gateway import get_gateway

    monkeypatch.setenv("STRIPE_API_BASE", emulator.server.url)
    monkeypatch.setenv("STRIPE_MAX_RETRIES", "0")
    get_settings.cache_clear()
    get_gateway.cache_clear()
    yield CliRunner()
    get_gateway.cache_clear()


class TestRevenueInTheSettlementCurrency:
    def test_a_eur_payer_is_counted_at_what_stripe_settled(self, engine: Engine, emulator: Emulator) -> None:
        store = emulator.store
        store.set_exchange_rate("eur", "1.10")
        store.create_price(unit_amount=1000, currency="eur", id="price_credits_eur")
        c = store.create_customer().id
        _paid_topup(emulator, c, "price_credits_eur", 1000)  # EUR 10.00 settles as $11.00; 1,000 credits
        _use(c, "eur", emulator.start + timedelta(hours=2), gpt4o_input=1_000_000)  # 750 credits, $2.50
        _store_events(emulator)

        with Session(engine) as s:
            (before,) = margin_rows(s, since=emulator.start, until=_until())
        # Before a run has seen the balance transaction, the EUR credits are unpriced, not worth zero.
        assert before.revenue == 0 and before.margin_usd is None and "EUR" in before.note

        summary = _run(emulator)

        assert summary.counts == {}  # no negative_margin: today's EUR revenue is counted
        with Session(engine) as s:
            settlement = s.scalars(select(GrantSettlement)).one()
            (row,) = margin_rows(s, since=emulator.start, until=_until())
        assert (settlement.amount_minor, settlement.currency) == (1000, "eur")
        assert (settlement.settlement_minor, settlement.settlement_currency) == (1100, "usd")
        assert settlement.exchange_rate == Decimal("1.1")
        assert settlement.fee_minor == 62 and settlement.net_minor == 1038  # 2.9% of $11.00 + 30 cents
        # 750 credits at $11.00 / 1,000 credits = $8.25; cost $2.50.
        assert (row.revenue, row.currency, row.cost_usd) == (Decimal("8.25"), "usd", Decimal("2.5"))
        assert row.margin_usd == Decimal("5.75") and row.note == ""
        # After Stripe's fee: 750 credits at a net $10.38 / 1,000 credits = $7.785.
        assert row.revenue_net == Decimal("7.785") and row.as_dict()["net_margin_usd"] == "5.2850000000"

    def test_a_jpy_payer_is_priced_by_its_zero_decimal_settlement(self, engine: Engine, emulator: Emulator) -> None:
        store = emulator.store
        store.set_exchange_rate("jpy", "0.002")
        store.create_price(unit_amount=1000, currency="jpy", id="price_credits_jpy")
        c = store.create_customer().id
        _paid_topup(emulator, c, "price_credits_jpy", 1000)  # JPY 1,000 (amount 1000) settles as $2.00
        _paid_topup(emulator, c, "price_credits_jpy", 1000, grant=False)
        _use(c, "jpy", emulator.start + timedelta(hours=2), sonnet_output=200_000)  # 900 credits, $3.00
        _store_events(emulator)

        _run(emulator)

        by_kind = {m.kind: m for m in _mismatches(engine)}
        assert set(by_kind) == {MismatchKind.NEGATIVE_MARGIN, MismatchKind.PAYMENT_WITHOUT_GRANT}
        loss = by_kind[MismatchKind.NEGATIVE_MARGIN]
        # 900 credits at $2.00 / 1,000 = $1.80 of revenue against $3.00 of cost.
        assert (loss.expected_amount, loss.actual_amount) == (Decimal("1.8"), Decimal("3"))
        assert "$3.00" in loss.summary and "$1.80" in loss.summary and loss.customer_id == c
        unpaid = by_kind[MismatchKind.PAYMENT_WITHOUT_GRANT]
        assert "(JPY 1,000)" in unpaid.summary and unpaid.customer_id == c

    def test_the_cli_tables_show_money_as_money(self, engine: Engine, emulator: Emulator, cli: CliRunner) -> None:
        from worker.cli import app

        self.test_a_jpy_payer_is_priced_by_its_zero_decimal_settlement(engine, emulator)
        listed = cli.invoke(app, ["mismatches", "list"])
        assert listed.exit_code == 0, listed.output
        # negative_margin: expected $1.80, actual $3.00; payment_without_grant: 1,000 credits expected.
        assert "$1.80" in listed.stdout and "$3.00" in listed.stdout and "1,000 credits" in listed.stdout
        window = ["--since", emulator.start.isoformat(), "--until", _until().isoformat()]
        margin = cli.invoke(app, ["margin", *window])
        assert margin.exit_code == 0, margin.output
        assert "$1.80" in margin.stdout and "$3.00" in margin.stdout and "-$1.20" in margin.stdout
        exact = json.loads(cli.invoke(app, ["margin", *window, "--json"]).stdout)["rows"]
        assert exact[0]["revenue_usd"] == "1.8000000000" and exact[0]["margin_usd"] == "-1.2000000000"


class TestFreeCredits:
    @pytest.fixture
    def tight_pro_allowance(self, billing_config_file: Any) -> BillingConfig:
        """Pro's free credits may cost $0.001 each; every other free credit the default $0.01."""
        body = b.TEST_BILLING_CONFIG.replace(
            'name = "Pro"\ncredits_per_period = 10000',
            'name = "Pro"\ncredits_per_period = 10000\nfree_credit_allowance_usd = "0.001"',
        )
        billing_config_file(body)
        return get_billing_config()

    def test_trials_and_promotions_are_no_negative_margin_and_flagged_past_their_allowance(
        self, engine: Engine, emulator: Emulator, tight_pro_allowance: BillingConfig
    ) -> None:
        store = emulator.store
        trial, promo = store.create_customer().id, store.create_customer().id
        sub = store.create_subscription(trial, "price_pro_monthly", trial_days=14)  # a $0 first invoice
        invoice = store.get(sub.id).latest_invoice
        assert store.render(invoice)["amount_paid"] == 0
        with session_factory().begin() as s:
            grant_credits(
                s,
                trial,
                units=10000,
                source=GrantSource.RENEWAL,
                idempotency_key=f"renewal:{invoice}",
                reason=f"Pro subscription_create {invoice} (subscription {sub.id})",
                stripe_object_id=invoice,
                stripe_object_type="invoice",
                amount_minor=0,
                currency="usd",
            )
            b.set_access(s, trial, AccessState.TRIALING, emulator.start, sub.id)
            grant_credits(s, promo, units=1000, source=GrantSource.PROMOTION, idempotency_key="promo")
        at = emulator.start + timedelta(hours=3)
        _use(trial, "trial", at, sonnet_output=200_000)  # 900 free Pro credits, $3.00
        _use(promo, "promo", at, sonnet_output=200_000)  # 900 promotion credits, $3.00
        _store_events(emulator)

        summary = _run(emulator, tight_pro_allowance)

        assert summary.counts == {"free_credit_cost": 1}
        (m,) = _mismatches(engine)
        # Pro: 900 credits x $0.001 = $0.90 allowed, $3.00 spent. Promotion: 900 x $0.01 = $9.00 allowed.
        assert (m.kind, m.customer_id) == (MismatchKind.FREE_CREDIT_COST, trial)
        assert (m.expected_amount, m.actual_amount) == (Decimal("0.9"), Decimal("3"))
        assert m.evidence["ledger"]["free_by_plan"][0]["plan"] == "Pro"
        assert "900 Pro" in m.summary and "$3.00" in m.summary and "$0.90" in m.summary
        with Session(engine) as s:
            rows = {r.customer_id: r for r in margin_rows(s, since=emulator.start, until=_until())}
        assert rows[promo].revenue == 0 and "900 free credits" in rows[promo].note


class TestChargesWithoutAPaymentIntent:
    def _process(self, emulator: Emulator) -> None:
        from worker.processing import process_events

        with session_factory().begin() as s:
            items = [(json.dumps(e, default=str).encode(), parse_envelope(e)) for e in emulator.store.events()]
            ids = list(store_events(s, items).values())
        process_events(sorted(ids), gateway=emulator.gateway)

    def test_the_worker_credits_it_and_reconciliation_agrees(self, engine: Engine, emulator: Emulator) -> None:
        c = emulator.store.create_customer().id
        charge = emulator.store.create_charge(c, 2500)  # the older Charges API: no payment intent
        assert emulator.store.render(charge.id)["payment_intent"] is None
        self._process(emulator)
        with Session(engine) as s:
            grant = s.scalars(select(Grant)).one()
        assert (grant.stripe_object_id, grant.units, grant.amount_minor) == (charge.id, 2500, 2500)
        assert _run(emulator).counts == {}

    def test_off_in_the_config_it_is_a_payment_without_grant(
        self, engine: Engine, emulator: Emulator, billing_config_file: Any
    ) -> None:
        billing_config_file(
            b.TEST_BILLING_CONFIG.replace(
                'fallback_credits_per_minor_unit = "1"',
                'fallback_credits_per_minor_unit = "1"\ngrant_charges_without_payment_intent = false',
            )
        )
        c = emulator.store.create_customer().id
        charge = emulator.store.create_charge(c, 2500)
        self._process(emulator)
        _run(emulator, get_billing_config())
        (m,) = _mismatches(engine)
        assert (m.kind, m.customer_id, m.expected_amount) == (MismatchKind.PAYMENT_WITHOUT_GRANT, c, Decimal(2500))
        assert f"charge {charge.id} was paid ($25.00)" in m.summary


class TestEveryMismatchNamesItsCustomer:
    def test_disputes_refunds_and_missed_events(self, engine: Engine, emulator: Emulator) -> None:
        store = emulator.store
        c = store.create_customer().id
        _, disputed = _paid_topup(emulator, c, "price_credits_small", 1000)
        _, refunded = _paid_topup(emulator, c, "price_credits_small", 1000)
        store.clock.advance(hours=1)
        store.create_dispute(disputed)  # never frozen in the ledger
        store.refund(refunded, 400)  # never clawed back
        # The dispute's events never arrived: a dispute object names no customer, its charge does.
        _store_events(emulator, skip_types=("charge.dispute.created", "charge.dispute.funds_withdrawn"))

        _run(emulator)

        found = _mismatches(engine)
        kinds = sorted(m.kind.value for m in found)
        assert kinds == ["dispute_not_applied", "missed_event", "missed_event", "refund_not_clawed_back"]
        assert {m.customer_id for m in found} == {c}
        refund = next(m for m in found if m.kind is MismatchKind.REFUND_NOT_CLAWED_BACK)
        assert f"charge {refunded} was refunded $4.00 of $10.00" in refund.summary
        with Session(engine) as s:
            assert len(services.list_mismatches(s, customer_id=c)) == 4


class TestStuckEventsNameTheirCustomer:
    def test_a_failed_dispute_event_names_the_charges_customer(self, engine: Engine, emulator: Emulator) -> None:
        from sqlalchemy import update

        from ledger.inbox import StripeEvent

        store = emulator.store
        c = store.create_customer().id
        _, charge = _paid_topup(emulator, c, "price_credits_small", 1000)
        dispute = store.create_dispute(charge)
        with session_factory().begin() as s:
            b.freeze(s, b.grant_of(s, store.get(charge).payment_intent), "dp")
        _store_events(emulator)
        with session_factory().begin() as s:
            s.execute(
                update(StripeEvent)
                .where(StripeEvent.object_id == dispute.id)
                .values(status=EventStatus.FAILED, received_at=datetime.now(UTC) - timedelta(hours=3))
            )
        _run(emulator)
        stuck = [m for m in _mismatches(engine) if m.kind is MismatchKind.UNPROCESSED_EVENT]
        assert len(stuck) == 2 and {m.customer_id for m in stuck} == {c}


class TestPartialRuns:
    def test_a_list_stripe_refuses_skips_its_checks_and_the_rest_is_compared(
        self, engine: Engine, emulator: Emulator, cli: CliRunner
    ) -> None:
        from worker.cli import app

        store = emulator.store
        c = store.create_customer().id
        _, disputed = _paid_topup(emulator, c, "price_credits_small", 1000)
        store.create_dispute(disputed)  # dispute_not_applied
        _store_events(emulator)
        window = ["--since", emulator.start.isoformat(), "--until", _until().isoformat()]
        assert cli.invoke(app, ["reconcile", *window]).exit_code == 1
        _paid_topup(emulator, c, "price_credits_small", 1000, grant=False)  # payment_without_grant
        _store_events(emulator)

        # A restricted key without the disputes permission: Stripe answers 403 to the list.
        store.faults.fail_next(1, status=403, path_prefix="/v1/disputes")
        result = cli.invoke(app, ["reconcile", *window, "--json"])

        assert result.exit_code == 8, result.output  # 6 is limit_exceeded
        body = json.loads(result.stdout)
        assert body["status"] == "partial" and set(body["missed_sources"]) == {"dispute"}
        assert body["ok"] is False and body["code"] == "partial_run"
        assert "403" in body["missed_sources"]["dispute"]
        assert set(body["skipped_checks"]) == {"disputes"}
        assert body["counts"] == {"payment_without_grant": 1}  # the payments were compared
        with Session(engine) as s:
            runs = list(s.scalars(select(ReconciliationRun).order_by(ReconciliationRun.id)))
            assert [r.status for r in runs] == [RunStatus.SUCCEEDED, RunStatus.PARTIAL]
            assert runs[1].stats["missed_sources"].keys() == {"dispute"} and "dispute" in (runs[1].error or "")
            dispute = s.scalars(select(Mismatch).where(Mismatch.kind == MismatchKind.DISPUTE_NOT_APPLIED)).one()
            assert dispute.status is MismatchStatus.OPEN  # not seen, but not closed: its check did not run

    def test_a_500_after_retries_is_partial_too(self, engine: Engine, emulator: Emulator) -> None:
        c = emulator.store.create_customer().id
        _paid_topup(emulator, c, "price_credits_small", 1000)
        _store_events(emulator)
        emulator.store.faults.fail_next(1, status=500, path_prefix="/v1/events")
        summary = _run(emulator)
        assert summary.status is RunStatus.PARTIAL and set(summary.skipped_checks) == {"missed_events"}
        assert summary.counts == {}


class TestRunsChart:
    def test_ledger_money_is_dated_by_when_stripe_was_paid(self, engine: Engine, emulator: Emulator) -> None:
        from webhooks.review.charts import daily_series

        c = emulator.store.create_customer().id
        emulator.store.topup(c, "price_credits_small")  # paid ten days ago in Stripe
        _store_events(emulator)
        with session_factory().begin() as s:  # applied today
            cs = next(iter(emulator.gateway.list_checkout_sessions()))
            b.grant_topup(s, emulator.store, cs["id"], units=1000)
        paid_day = emulator.start.date()
        with Session(engine) as s:
            series = daily_series(s, emulator.start - timedelta(days=1), _until())
        by_day = {p.day: p for p in series.days}
        assert by_day[paid_day].ledger_paid == {"usd": 1000} and by_day[paid_day].stripe_paid == {"usd": 1000}
        assert sum(p.ledger_paid.get("usd", 0) for p in series.days) == 1000


class TestFeesAndBalanceTransactions:
    def test_fee_and_net_from_stripes_own_payloads(self) -> None:
        event = json.loads((SHARED / "fixtures/stripe/events/charge.dispute.created.dahlia.zulip.json").read_text())
        (withdrawal,) = event["data"]["object"]["balance_transactions"]
        bt = balance_transaction_detail(withdrawal)
        assert bt is not None
        # A $22.00 chargeback with Stripe's $15.00 dispute fee: $37.00 leaves the balance.
        assert (bt["amount"], bt["fee"], bt["net"], bt["currency"]) == (-2200, 1500, -3700, "usd")
        assert bt["fee_details"] == [{"amount": 1500, "currency": "usd", "type": "stripe_fee"}]
        resources = json.loads((SHARED / "fixtures/stripe/openapi/fixtures3.json").read_text())["resources"]
        charge, txn = resources["charge"], resources["balance_transaction"]
        assert balance_transaction_problem(charge, balance_transaction_detail(txn)) is None
        assert "the charge for 200" in str(balance_transaction_problem({**charge, "amount": 200}, txn))
        captured = {**charge, "captured": True}  # the docs' sample is an authorization
        assert balance_transaction_problem(captured, None) == "its balance transaction could not be read"
        missing = {**captured, "balance_transaction": None}
        assert balance_transaction_problem(missing, None) == "has no balance transaction"
        assert balance_transaction_problem({**missing, "captured": False}, None) is None  # authorized only

    def test_a_balance_transaction_that_disagrees_is_a_mismatch(self, engine: Engine, emulator: Emulator) -> None:
        c = emulator.store.create_customer().id
        _, charge = _paid_topup(emulator, c, "price_credits_small", 1000)
        _paid_topup(emulator, c, "price_credits_small", 1000)
        txn = emulator.store.get(charge).balance_transaction
        emulator.store.update(txn, amount=900)  # Stripe's books say $9.00 arrived for a $10.00 charge
        _store_events(emulator)
        assert _run(emulator).counts == {"balance_transaction_mismatch": 1}
        (m,) = _mismatches(engine)
        assert (m.customer_id, m.expected_amount, m.actual_amount) == (c, Decimal(1000), Decimal(900))
        assert m.summary == f"charge {charge} ($10.00) its balance transaction is for 900 usd, the charge for 1000"


class TestPayouts:
    def test_a_payout_with_a_refund_the_ledger_never_applied_is_found_and_nothing_else(
        self, engine: Engine, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from ledger.clawback import clawback
        from reconciliation import checks

        # Two transactions a batch: the payout's six are read in three, each judged while the next is streamed.
        monkeypatch.setattr(checks, "PAYOUT_BATCH", 2)
        store = emulator.store
        c = store.create_customer().id
        _, applied = _paid_topup(emulator, c, "price_credits_small", 1000)
        _, missed = _paid_topup(emulator, c, "price_credits_small", 1000)
        _, disputed = _paid_topup(emulator, c, "price_credits_large", 12000)
        store.clock.advance(hours=1)
        refund = store.refund(applied, 300)
        store.refund(missed, 200)  # the ledger never hears of this one
        store.create_dispute(disputed)
        with session_factory().begin() as s:
            grant = b.grant_of(s, store.get(applied).payment_intent)
            clawback(s, grant.id, units=300, idempotency_key="re-1", reason="refund", stripe_object_id=refund.id)
            b.freeze(s, b.grant_of(s, store.get(disputed).payment_intent), "dp")
        store.clock.advance(hours=1)
        payout = store.create_payout()
        _store_events(emulator)

        summary = _run(emulator)

        assert summary.counts == {"refund_not_clawed_back": 1, "payout_mismatch": 1}
        (m,) = [x for x in _mismatches(engine) if x.kind is MismatchKind.PAYOUT_MISMATCH]
        assert m.customer_id == c and m.evidence["stripe"]["type"] == "refund"
        assert m.summary.startswith(f"payout {payout.id}: refund re_") and f"of charge {missed}" in m.summary
        assert m.expected_amount == Decimal(-200)
        from reconciliation.models import Payout

        with Session(engine) as s:
            (kept,) = s.scalars(select(Payout))
        assert (kept.id, kept.amount_minor, kept.differences, kept.tie_out) == (payout.id, payout.amount, 1, "differs")
        assert kept.transactions == 6  # three charges, two refunds, one dispute withdrawal
        # By hand: charges $10.00, $10.00, $100.00, fees 59 + 59 + 320 (2.9% + 30c); refunds $3.00 and $2.00, no
        # fee; the dispute takes $100.00 and Stripe's $15.00 fee. Nets: 941 + 941 + 9,680; -300, -200; -11,500.
        assert kept.by_type == {
            "adjustment": {"count": 1, "amount": -10000, "fee": 1500, "net": -11500},
            "charge": {"count": 3, "amount": 12000, "fee": 438, "net": 11562},
            "refund": {"count": 2, "amount": -500, "fee": 0, "net": -500},
        }
        assert kept.net_minor == payout.amount == 11562 - 500 - 11500

    def test_a_payout_that_does_not_add_up(self, engine: Engine, emulator: Emulator) -> None:
        c = emulator.store.create_customer().id
        _paid_topup(emulator, c, "price_credits_small", 1000)
        payout = emulator.store.create_payout()
        emulator.store.update(payout.id, amount=payout.amount + 1)
        _store_events(emulator)
        assert _run(emulator).counts == {"payout_mismatch": 1}
        (m,) = _mismatches(engine)
        # $10.00 less Stripe's $0.59 fee is $9.41 net; the payout says $9.42.
        assert m.summary == f"payout {payout.id} of $9.42: its transactions net $9.41"

    def test_each_payout_is_kept_once_and_a_later_run_updates_it(
        self, engine: Engine, emulator: Emulator, cli: CliRunner
    ) -> None:
        from reconciliation.models import Payout
        from worker.cli import app

        store = emulator.store
        c = store.create_customer().id
        _paid_topup(emulator, c, "price_credits_small", 1000)
        paid = store.create_payout()
        store.clock.advance(hours=1)
        _paid_topup(emulator, c, "price_credits_small", 1000)
        failed = store.create_payout()
        store.update(paid.id, status="in_transit")
        store.update(failed.id, status="failed")
        _store_events(emulator)
        assert _run(emulator).counts == {}
        store.update(paid.id, status="paid")
        second = _run(emulator)
        assert second.counts == {}

        with Session(engine) as s:
            kept = {p.id: p for p in s.scalars(select(Payout))}
        assert sorted(kept) == sorted([paid.id, failed.id])  # two runs, still one row each
        ok, bad = kept[paid.id], kept[failed.id]
        # $10.00 less 59 cents: $9.41; the second run saw it paid.
        assert (ok.status, ok.amount_minor, ok.net_minor, ok.tie_out, ok.run_id) == (
            "paid", 941, 941, "ties", second.run_id)  # fmt: skip
        assert ok.by_type == {"charge": {"count": 1, "amount": 1000, "fee": 59, "net": 941}}
        assert ok.first_seen_at < ok.checked_at
        assert (bad.status, bad.tie_out, bad.transactions, bad.net_minor) == ("failed", "not_checked", 0, None)

        listed = cli.invoke(app, ["payouts", "--json"])
        assert listed.exit_code == 0, listed.output
        body = json.loads(listed.stdout)
        assert body["ok"] is True and [p["payout"] for p in body["payouts"]] == [failed.id, paid.id]
        shown = body["payouts"][1]
        assert (shown["amount_minor"], shown["amount"], shown["tie_out"]) == (941, "$9.41", "ties")
        table = cli.invoke(app, ["payouts"])
        assert table.exit_code == 0 and "$9.41" in table.stdout and "charge 1: $9.41" in table.stdout
        later = cli.invoke(app, ["payouts", "--since", (emulator.start + timedelta(minutes=30)).isoformat()])
        assert failed.id in later.stdout and paid.id not in later.stdout


class TestRefundSettlements:
    def test_each_refund_is_kept_with_the_grant_it_reduced(self, engine: Engine, emulator: Emulator) -> None:
        from ledger.models import RefundSettlement

        store = emulator.store
        store.set_exchange_rate("eur", "1.10")
        store.create_price(unit_amount=1000, currency="eur", id="price_credits_eur")
        c = store.create_customer().id
        _, usd_charge = _paid_topup(emulator, c, "price_credits_small", 1000)
        _, eur_charge = _paid_topup(emulator, c, "price_credits_eur", 1000)
        store.clock.advance(hours=1)
        usd_refund, eur_refund = store.refund(usd_charge, 300), store.refund(eur_charge, 500)
        with session_factory().begin() as s:
            for charge, amount, refund in ((usd_charge, 300, usd_refund), (eur_charge, 500, eur_refund)):
                grant = b.grant_of(s, store.get(charge).payment_intent)
                from ledger.clawback import clawback

                clawback(s, grant.id, units=amount, idempotency_key=refund.id, reason="refund",
                         stripe_object_id=refund.id)  # fmt: skip
        _store_events(emulator)
        assert _run(emulator).counts == {}
        with Session(engine) as s:
            kept = {r.refund_id: r for r in s.scalars(select(RefundSettlement))}
        # $3.00 back in USD; EUR 5.00 back converted at 1.10 = $5.50; Stripe keeps its fee.
        assert (kept[usd_refund.id].settlement_minor, kept[usd_refund.id].settlement_currency) == (300, "usd")
        assert (kept[eur_refund.id].amount_minor, kept[eur_refund.id].currency) == (500, "eur")
        assert (kept[eur_refund.id].settlement_minor, kept[eur_refund.id].exchange_rate) == (550, Decimal("1.1"))

    def test_a_refund_whose_balance_transaction_disagrees(self, engine: Engine, emulator: Emulator) -> None:
        store = emulator.store
        c = store.create_customer().id
        _, charge = _paid_topup(emulator, c, "price_credits_small", 1000)
        refund = store.refund(charge, 1000)
        store.update(refund.balance_transaction, amount=-900)
        with session_factory().begin() as s:
            b.claw_refund(s, b.grant_of(s, store.get(charge).payment_intent), 1000, "r")
        _store_events(emulator)
        assert _run(emulator).counts == {"balance_transaction_mismatch": 1}
        (m,) = _mismatches(engine)
        assert m.customer_id == c and (m.expected_amount, m.actual_amount) == (Decimal(1000), Decimal(900))
        assert m.summary.startswith(f"refund {refund.id} ($10.00) its balance transaction takes 900 usd")


class TestNetRevenueAfterRefunds:
    """Net revenue is what a grant's money left in the Stripe balance after Stripe's fee and its refunds, over the
    credits the customer kept. The emulator charges fees as Stripe does (2.9% + 30 cents) and, like Stripe, keeps
    the fee when a charge is refunded (the refund's balance transaction has no fee)."""

    def _twenty_dollar_topup(self, emulator: Emulator) -> tuple[str, str]:
        emulator.store.create_price(unit_amount=2000, currency="usd", id="price_credits_twenty")
        c = emulator.store.create_customer().id
        _, charge = _paid_topup(emulator, c, "price_credits_twenty", 2000)  # fallback rate: 2,000 credits
        return c, charge

    def test_a_twenty_dollar_top_up_with_five_dollars_refunded(self, engine: Engine, emulator: Emulator) -> None:
        store = emulator.store
        c, charge = self._twenty_dollar_topup(emulator)
        _use(c, "u", emulator.start + timedelta(hours=2), gpt4o_input=1_000_000)  # 750 credits, $2.50
        store.clock.advance(hours=3)
        refund = store.refund(charge, 500)
        with session_factory().begin() as s:
            b.claw_refund(s, b.grant_of(s, store.get(charge).payment_intent), 500, refund.id)  # 500 unused credits
        _store_events(emulator)

        assert _run(emulator).counts == {}
        with Session(engine) as s:
            (row,) = margin_rows(s, since=emulator.start, until=_until())
        # By hand. Stripe's fee on $20.00: 2.9% x 2000 = 58 cents + 30 = 88 cents; net $19.12.
        # The $5.00 refund takes $5.00 from the balance and Stripe keeps the 88 cents: $19.12 - $5.00 = $14.12
        # stayed, for 2,000 - 500 = 1,500 credits kept. The 750 credits used:
        #   gross: 750 x $20.00 / 2,000 = $7.50 (margin $7.50 - $2.50 = $5.00)
        #   net:   750 x $14.12 / 1,500 = $7.06 (net margin $7.06 - $2.50 = $4.56)
        # (After the fee alone it would be 750 x $19.12 / 2,000 = $7.17.)
        assert (row.units, row.revenue, row.cost_usd) == (750, Decimal("7.5"), Decimal("2.5"))
        assert row.revenue_net == Decimal("7.06") and row.margin_usd == Decimal("5")
        assert row.as_dict()["net_margin_usd"] == "4.5600000000" and row.note == ""

    def test_a_refund_of_credits_already_spent_lowers_their_price(self, engine: Engine, emulator: Emulator) -> None:
        store = emulator.store
        c = store.create_customer().id
        _, charge = _paid_topup(emulator, c, "price_credits_small", 1000)  # $10.00, 1,000 credits
        _use(c, "u", emulator.start + timedelta(hours=2), gpt4o_input=1_000_000)  # 750 credits, $2.50
        store.clock.advance(hours=3)
        refund = store.refund(charge, 500)
        with session_factory().begin() as s:
            # 500 credits back: the 250 unused, and 250 already spent become debt.
            b.claw_refund(s, b.grant_of(s, store.get(charge).payment_intent), 500, refund.id)
        _store_events(emulator)
        summary = _run(emulator)
        assert summary.counts == {"clawback_debt": 1}
        with Session(engine) as s:
            (row,) = margin_rows(s, since=emulator.start, until=_until())
        # By hand. Fee on $10.00: 29 + 30 = 59 cents, net $9.41; the refund takes $5.00: $4.41 stayed, for
        # 1,000 - 250 (clawed back unused) = 750 credits kept, all of them used: net $4.41, gross 750 x 1c = $7.50.
        assert (row.revenue, row.revenue_net) == (Decimal("7.5"), Decimal("4.41"))
        assert row.as_dict()["net_margin_usd"] == "1.9100000000"

    def test_clawed_back_credits_without_a_refund_seen_are_named_not_guessed(
        self, engine: Engine, emulator: Emulator
    ) -> None:
        store = emulator.store
        c, charge = self._twenty_dollar_topup(emulator)
        _use(c, "u", emulator.start + timedelta(hours=2), gpt4o_input=1_000_000)
        _store_events(emulator)
        assert _run(emulator).counts == {}  # the settlement is kept; no refund yet
        with session_factory().begin() as s:
            # The ledger applied a refund that no reconciliation run has seen in Stripe yet.
            b.claw_refund(s, b.grant_of(s, store.get(charge).payment_intent), 500, "re_unseen")
        with Session(engine) as s:
            (row,) = margin_rows(s, since=emulator.start, until=_until())
        # Net of the fee only, over the credits kept, and flagged: 750 x $19.12 / 1,500 = $9.56.
        assert row.revenue_net == Decimal("9.56")
        assert "not known yet for 750 credits" in row.note


class TestNetPerCreditFromStripesPayloads:
    def test_the_docs_charge_refunded_in_full_keeps_nothing(self) -> None:
        from reconciliation.funding import net_per_credit

        resources = json.loads((SHARED / "fixtures/stripe/openapi/fixtures3.json").read_text())["resources"]
        txn, refund = resources["balance_transaction"], resources["refund"]
        assert refund["charge"] == txn["source"] and refund["amount"] == txn["amount"] == 100
        # The docs' $1.00 charge settled with no fee (net $1.00) and was refunded in full: 100 credits bought,
        # all clawed back unused, none kept: no revenue, and no division by zero.
        assert net_per_credit(txn["net"], refund["amount"], 100, 100) == 0
        # Had 40 of them been spent first (60 clawed back unused): nothing stayed, so their net is $0.00 each.
        assert net_per_credit(txn["net"], refund["amount"], 100, 60) == 0
        # Had a quarter been refunded (25 cents, 25 credits clawed back): 75 cents for 75 credits, 1 cent each.
        assert net_per_credit(txn["net"], 25, 100, 25) == Decimal(1)

    def test_a_refund_that_returned_part_of_the_fee(self) -> None:
        from reconciliation.funding import net_per_credit

        event = json.loads((SHARED / "fixtures/stripe/events/charge.succeeded.dahlia.zulip.json").read_text())
        charge = event["data"]["object"]
        assert charge["amount"] == 22200  # $222.00
        # Say its balance transaction took Stripe's 2.9% + 30c: 644 + 30 = 674 cents, net 21,526. A $22.20 refund
        # whose balance transaction returns 64 cents of the fee (amount -2220, fee -64, net -2156) takes $21.56.
        # 22,200 credits (one per cent), 2,220 clawed back unused: (21,526 - 2,156) / 19,980 = 19,370 / 19,980.
        out = 2220 + (-64)  # refund_settlements keeps settlement_minor 2220 and fee_minor -64
        assert net_per_credit(21526, out, 22200, 2220) == Decimal(19370) / Decimal(19980)


class TestMarginPerPlan:
    def test_rows_name_the_customers_plan_and_sum_per_plan(self, engine: Engine) -> None:
        from ledger.models import Account, Subscription
        from reconciliation.margin import margin_by_plan

        start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=1)
        with session_factory().begin() as s:
            for customer in ("cus_pro_a", "cus_pro_b", "cus_prepaid"):
                grant_credits(s, customer, units=1000, source=GrantSource.TOP_UP, idempotency_key=f"g-{customer}",
                              amount_minor=1000, currency="usd")  # fmt: skip
        with session_factory().begin() as s:
            ids = {c: i for c, i in s.execute(select(Account.customer_id, Account.id))}
            # cus_pro_a: a canceled Team subscription and an active Pro one (the active one counts).
            s.add_all([
                Subscription(subscription_id="sub_a1", account_id=ids["cus_pro_a"], status="canceled",
                             price="price_team_monthly"),
                Subscription(subscription_id="sub_a2", account_id=ids["cus_pro_a"], status="active",
                             price="price_pro_monthly"),
                Subscription(subscription_id="sub_b", account_id=ids["cus_pro_b"], status="past_due",
                             price="price_pro_monthly"),
            ])  # fmt: skip
        for customer in ("cus_pro_a", "cus_pro_b", "cus_prepaid"):
            _use(customer, customer, start + timedelta(hours=1), gpt4o_input=1_000_000)  # 750 credits, $2.50
        with Session(engine) as s:
            rows = list(margin_rows(s, since=start, until=_until()))
        assert {r.customer_id: r.plan for r in rows} == {"cus_pro_a": "Pro", "cus_pro_b": "Pro", "cus_prepaid": None}
        pro, prepaid = margin_by_plan(rows)
        # Each customer: 750 credits at $10.00 / 1,000 = $7.50, cost $2.50; no balance transaction seen yet, so
        # net is counted at gross. Pro: two customers, 1,500 credits, $15.00 against $5.00: $10.00 margin.
        shown = pro.as_dict()
        assert {k: shown[k] for k in ("plan", "customers", "units", "revenue_currency")} == {
            "plan": "Pro", "customers": 2, "units": 1500, "revenue_currency": "usd"}  # fmt: skip
        exact = {k: Decimal(shown[k]) for k in ("revenue", "revenue_net", "cost_usd", "margin_usd", "net_margin_usd")}
        assert exact == {"revenue": 15, "revenue_net": 15, "cost_usd": 5, "margin_usd": 10, "net_margin_usd": 10}
        assert (prepaid.plan, len(prepaid.customers), prepaid.units, prepaid.revenue) == (None, 1, 750, Decimal("7.5"))


class TestPayoutsTable:
    def test_recording_a_payout_again_updates_its_row(self, engine: Engine) -> None:
        from reconciliation.models import Payout
        from reconciliation.payouts import list_payouts, record_payouts

        first, later = datetime(2026, 12, 1, tzinfo=UTC), datetime(2026, 12, 2, tzinfo=UTC)
        tie = {"payout": "po_1", "amount": 941, "currency": "usd", "status": "in_transit",
               "created": "2026-11-30T10:00:00+00:00", "arrival_date": 1764583200, "transactions": 1, "net": 941,
               "by_type": {"charge": {"count": 1, "amount": 1000, "fee": 59, "net": 941}}, "differences": 0,
               "tie_out": "ties"}  # fmt: skip
        with session_factory().begin() as s:
            assert record_payouts(s, 1, [tie], now=first) == 1
        with session_factory().begin() as s:
            record_payouts(s, 2, [{**tie, "status": "paid", "differences": 1, "tie_out": "differs"}], now=later)
        with Session(engine) as s:
            (row,) = s.scalars(select(Payout))
            assert (row.status, row.tie_out, row.differences, row.run_id) == ("paid", "differs", 1, 2)
            assert (_aware(row.first_seen_at), _aware(row.checked_at)) == (first, later)
            assert _aware(row.arrival_date) == datetime(2025, 12, 1, 10, 0, tzinfo=UTC)  # Stripe's Unix seconds
            assert [p.id for p in list_payouts(s, since=datetime(2026, 11, 30, tzinfo=UTC))] == ["po_1"]
            assert list_payouts(s, until=datetime(2026, 11, 30, tzinfo=UTC)) == []


def _aware(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value
