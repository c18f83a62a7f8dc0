"""Each check kind, one small world at a time: a clean world finds nothing, each fault exactly its kind."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from ledger.db import session_factory
from ledger.grants import grant_credits
from ledger.inbox import EventStatus, StripeEvent
from ledger.models import AccessState, GrantSource
from reconciliation.engine import RunSummary, reconcile
from reconciliation.models import Mismatch, MismatchKind
from reconciliation.providers import ReportError
from tests.reconciliation import builders as b
from tests.reconciliation.conftest import Emulator

pytestmark = pytest.mark.usefixtures("test_config")


def _until() -> datetime:
    return datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(days=1)


def _run(emu: Emulator, reports: list[Path] | None = None, **kwargs: object) -> RunSummary:
    return reconcile(
        session_factory(),
        emu.gateway,
        since=emu.start,
        until=_until(),
        provider_reports=reports or [],
        actor="test",
        **kwargs,  # type: ignore[arg-type]
    )


def _found(engine: Engine) -> set[tuple[MismatchKind, str]]:
    with Session(engine) as s:
        return {(m.kind, m.fingerprint) for m in s.scalars(select(Mismatch))}


def _expect(*pairs: tuple[MismatchKind, str]) -> set[tuple[MismatchKind, str]]:
    return {(kind, b.fingerprint(kind, identity)) for kind, identity in pairs}


def _store_events(emu: Emulator) -> None:
    with session_factory().begin() as s:
        b.store_all_events(s, emu.store.events(), status=EventStatus.PROCESSED)


def _topup(emu: Emulator, customer: str, price: str = "price_credits_small", **grant: object) -> tuple[str, str, str]:
    """A paid top-up in Stripe and its grant in the ledger; returns (session id, payment intent, charge)."""
    cs = emu.store.topup(customer, price)
    emu.store.clock.advance(minutes=5)
    if grant.pop("skip", False) is not True:
        with session_factory().begin() as s:
            b.grant_topup(s, emu.store, cs.id, **grant)  # type: ignore[arg-type]
    pi = emu.store.get(cs.payment_intent)
    return cs.id, pi.id, pi.latest_charge


class TestCleanWorld:
    def test_a_consistent_world_has_no_mismatches(self, engine: Engine, emulator: Emulator, tmp_path: Path) -> None:
        store = emulator.store
        alice = store.create_customer(email="alice@example.com").id
        bob = store.create_customer(email="bob@example.com").id
        _topup(emulator, alice, "price_credits_large")
        _, _, refunded_charge = _topup(emulator, bob)
        _, _, open_dispute_charge = _topup(emulator, bob)
        _, _, lost_charge = _topup(emulator, bob)
        _, _, won_charge = _topup(emulator, bob)
        sub = store.create_subscription(alice, "price_pro_monthly")
        store.clock.advance(hours=1)
        store.refund(refunded_charge, 400)
        store.create_dispute(open_dispute_charge)
        d_lost = store.create_dispute(lost_charge)
        d_won = store.create_dispute(won_charge)
        store.clock.advance(hours=1)
        store.close_dispute(d_lost, won=False)
        store.close_dispute(d_won, won=True)
        with session_factory().begin() as s:
            b.grant_renewal(s, store, store.get(sub.id).latest_invoice)
            b.set_access(s, alice, AccessState.ACTIVE, emulator.start + timedelta(hours=1), sub.id)
            refunded = b.grant_of(s, store.get(refunded_charge).payment_intent)
            b.claw_refund(s, refunded, 400, "refund-1")
            for charge, key in ((open_dispute_charge, "o"), (lost_charge, "l"), (won_charge, "w")):
                b.freeze(s, b.grant_of(s, store.get(charge).payment_intent), key)
            lost = b.grant_of(s, store.get(lost_charge).payment_intent)
            from ledger.clawback import clawback

            clawback(s, lost.id, units=lost.units, idempotency_key="lost", reason="dispute lost")
            b.unfreeze(s, b.grant_of(s, store.get(won_charge).payment_intent), "w")
            for i, (provider, model, scope) in enumerate(b.MODELS):
                b.record_usage(
                    s,
                    alice,
                    f"req-{i}",
                    provider=provider,
                    model=model,
                    workspace=scope,
                    at=emulator.start + timedelta(days=1, hours=i),
                    input_tokens=10_000 * (i + 1),
                    output_tokens=2_000,
                    cached_tokens=500,
                )
            reports = b.write_reports(tmp_path, b.usage_groups(s))
        _store_events(emulator)

        summary = _run(emulator, reports)

        assert summary.counts == {}
        assert _found(engine) == set()
        assert summary.stripe_objects["checkout_session"] == 5
        assert summary.stripe_objects["refund"] == 1 and summary.stripe_objects["dispute"] == 3


class TestPaymentChecks:
    def test_payment_without_grant(self, engine: Engine, emulator: Emulator) -> None:
        c = emulator.store.create_customer().id
        cs, _, _ = _topup(emulator, c, skip=True)
        _topup(emulator, c)
        _store_events(emulator)
        summary = _run(emulator)
        assert summary.counts == {"payment_without_grant": 1}
        assert _found(engine) == _expect((MismatchKind.PAYMENT_WITHOUT_GRANT, cs))
        with Session(engine) as s:
            m = s.scalars(select(Mismatch)).one()
        stored = {e["type"]: e["status"] for e in m.evidence["ledger"]["stored_events"]}
        assert stored["checkout.session.completed"] == "processed"
        assert stored["payment_intent.succeeded"] == "processed"
        assert m.evidence["stripe"]["id"] == cs and m.evidence["stripe"]["amount"] == 1000

    def test_direct_payment_intent_without_grant(self, engine: Engine, emulator: Emulator) -> None:
        c = emulator.store.create_customer().id
        charge = emulator.store.create_payment(c, 2500)
        _store_events(emulator)
        _run(emulator)
        assert _found(engine) == _expect((MismatchKind.PAYMENT_WITHOUT_GRANT, charge.payment_intent))

    def test_amount_mismatch(self, engine: Engine, emulator: Emulator) -> None:
        c = emulator.store.create_customer().id
        cs, _, _ = _topup(emulator, c, "price_credits_large", units=1200)
        _store_events(emulator)
        summary = _run(emulator)
        assert _found(engine) == _expect((MismatchKind.AMOUNT_MISMATCH, cs))
        with Session(engine) as s:
            m = s.scalars(select(Mismatch)).one()
            assert (m.expected_amount, m.actual_amount, m.unit) == (12000, 1200, "credits")
            assert m.evidence["stripe"]["prices"] == ["price_credits_large"]
            assert m.evidence["ledger"]["grants"][0]["units"] == 1200
            assert m.evidence["ledger"]["entry_ids"]
        assert summary.run_id == m.first_seen_run_id

    def test_duplicate_grant(self, engine: Engine, emulator: Emulator) -> None:
        c = emulator.store.create_customer().id
        cs, pi, _ = _topup(emulator, c)
        with session_factory().begin() as s:
            b.grant_topup(s, emulator.store, cs, key=f"other:{pi}")
        _store_events(emulator)
        _run(emulator)
        assert _found(engine) == _expect((MismatchKind.DUPLICATE_GRANT, cs))
        with Session(engine) as s:
            m = s.scalars(select(Mismatch)).one()
            assert len(m.evidence["ledger"]["grants"]) == 2 and m.actual_amount == 2

    def test_grant_without_payment(self, engine: Engine, emulator: Emulator) -> None:
        c = emulator.store.create_customer().id
        unpaid = emulator.store.create_checkout_session(c, "price_credits_small")
        with session_factory().begin() as s:
            ghost = grant_credits(
                s,
                c,
                units=500,
                source=GrantSource.TOP_UP,
                idempotency_key="ghost",
                stripe_object_id="pi_doesnotexist000000000000",
                amount_minor=500,
                currency="usd",
            ).grant_id
            unpaid_grant = grant_credits(
                s,
                c,
                units=1000,
                source=GrantSource.TOP_UP,
                idempotency_key="unpaid",
                stripe_object_id=unpaid.id,
                stripe_object_type="checkout_session",
            ).grant_id
            nothing = grant_credits(s, c, units=10, source=GrantSource.TOP_UP, idempotency_key="none").grant_id
            grant_credits(s, c, units=99, source=GrantSource.PROMOTION, idempotency_key="promo")
        _store_events(emulator)
        _run(emulator)
        assert _found(engine) == _expect(
            (MismatchKind.GRANT_WITHOUT_PAYMENT, str(ghost)),
            (MismatchKind.GRANT_WITHOUT_PAYMENT, str(unpaid_grant)),
            (MismatchKind.GRANT_WITHOUT_PAYMENT, str(nothing)),
        )
        with Session(engine) as s:
            summaries = sorted(m.summary for m in s.scalars(select(Mismatch)))
        assert any("does not exist in Stripe" in x for x in summaries)
        assert any("which is not paid" in x for x in summaries)
        assert any("names no Stripe payment" in x for x in summaries)

    def test_grant_for_a_payment_before_the_window_is_not_a_mismatch(self, engine: Engine, emulator: Emulator) -> None:
        c = emulator.store.create_customer().id
        _topup(emulator, c)
        emulator.store.clock.advance(days=2)
        _store_events(emulator)
        summary = reconcile(
            session_factory(), emulator.gateway, since=emulator.start + timedelta(days=1), until=_until(), actor="t"
        )
        assert summary.counts == {}

    def test_customer_total_mismatch(self, engine: Engine, emulator: Emulator) -> None:
        c = emulator.store.create_customer().id
        _topup(emulator, c)
        _topup(emulator, c, amount_minor=900)
        _store_events(emulator)
        summary = _run(emulator)
        identity = f"{c}|usd|{summary.since.isoformat()}|{summary.until.isoformat()}"
        assert _found(engine) == _expect((MismatchKind.CUSTOMER_TOTAL_MISMATCH, identity))
        with Session(engine) as s:
            m = s.scalars(select(Mismatch)).one()
            assert (m.expected_amount, m.actual_amount, m.currency) == (2000, 1900, "usd")


class TestRefundsAndDisputes:
    def test_refund_not_clawed_back(self, engine: Engine, emulator: Emulator) -> None:
        store = emulator.store
        c = store.create_customer().id
        _, _, partly = _topup(emulator, c)
        _, pi_ok, clawed = _topup(emulator, c)
        store.refund(partly, 250)
        store.refund(clawed)
        with session_factory().begin() as s:
            b.claw_refund(s, b.grant_of(s, pi_ok), 1000, "ok")
        _store_events(emulator)
        _run(emulator)
        assert _found(engine) == _expect((MismatchKind.REFUND_NOT_CLAWED_BACK, partly))
        with Session(engine) as s:
            m = s.scalars(select(Mismatch)).one()
            assert (m.expected_amount, m.actual_amount) == (250, 0)
            assert m.evidence["stripe"]["amount_refunded"] == 250

    def test_refund_of_a_payment_made_before_the_window(self, engine: Engine, emulator: Emulator) -> None:
        store = emulator.store
        c = store.create_customer().id
        _, _, charge = _topup(emulator, c)
        store.clock.advance(days=2)
        store.refund(charge)
        _store_events(emulator)
        reconcile(
            session_factory(), emulator.gateway, since=emulator.start + timedelta(days=1), until=_until(), actor="t"
        )
        assert _found(engine) == _expect((MismatchKind.REFUND_NOT_CLAWED_BACK, charge))

    def test_dispute_not_applied(self, engine: Engine, emulator: Emulator) -> None:
        store = emulator.store
        c = store.create_customer().id
        charges = [_topup(emulator, c)[2] for _ in range(4)]
        open_d = store.create_dispute(charges[0])
        lost_d = store.create_dispute(charges[1])
        won_d = store.create_dispute(charges[2])
        fine_d = store.create_dispute(charges[3])  # open and frozen: consistent
        store.clock.advance(hours=2)
        store.close_dispute(lost_d, won=False)
        store.close_dispute(won_d, won=True)
        with session_factory().begin() as s:
            for charge, key in ((charges[1], "l"), (charges[2], "w"), (charges[3], "f")):
                b.freeze(s, b.grant_of(s, store.get(charge).payment_intent), key)
        _store_events(emulator)
        _run(emulator)
        assert _found(engine) == _expect(
            (MismatchKind.DISPUTE_NOT_APPLIED, open_d.id),
            (MismatchKind.DISPUTE_NOT_APPLIED, lost_d.id),
            (MismatchKind.DISPUTE_NOT_APPLIED, won_d.id),
        )
        assert fine_d.id


class TestClawbackDebt:
    def test_a_refund_of_spent_credits_is_a_review_item_with_the_debt(self, engine: Engine, emulator: Emulator) -> None:
        from ledger.consume import consume

        store = emulator.store
        spender, saver = store.create_customer().id, store.create_customer().id
        _, pi_spent, spent_charge = _topup(emulator, spender)  # 1,000 credits for $10
        _, pi_kept, kept_charge = _topup(emulator, saver)
        with session_factory().begin() as s:
            consume(s, spender, request_id="spend-700", units=700)
        store.refund(spent_charge)
        store.refund(kept_charge)
        with session_factory().begin() as s:
            b.claw_refund(s, b.grant_of(s, pi_spent), 1000, "refund-spent")
            b.claw_refund(s, b.grant_of(s, pi_kept), 1000, "refund-kept")
        _store_events(emulator)
        _run(emulator)
        with Session(engine) as s:
            found = s.scalars(select(Mismatch)).all()
        assert [(m.kind, m.customer_id) for m in found] == [(MismatchKind.CLAWBACK_DEBT, spender)]
        item = found[0]
        # 1,000 credits clawed back, 300 recovered from the grant, 700 already spent: debt.
        assert (item.expected_amount, item.actual_amount) == (1000, 300)
        assert item.evidence["ledger"]["debt_recorded"] == 700
        assert item.evidence["ledger"]["grant"]["stripe_object_id"] == pi_spent
        _run(emulator)
        with Session(engine) as s:
            assert s.scalar(select(func.count()).select_from(Mismatch)) == 1


class TestStateChecks:
    def test_access_state_drift(self, engine: Engine, emulator: Emulator) -> None:
        store = emulator.store
        a, b_, c = (store.create_customer().id for _ in range(3))
        subs = [store.create_subscription(x) for x in (a, b_, c)]
        store.clock.advance(hours=1)
        store.cancel_subscription(subs[2])
        with session_factory().begin() as s:
            for sub in subs:
                b.grant_renewal(s, store, store.get(sub.id).latest_invoice)
            b.set_access(s, a, AccessState.ACTIVE, emulator.start, "sub")
            b.set_access(s, b_, AccessState.SUSPENDED, emulator.start, "sub")  # Stripe says active
            b.set_access(s, c, AccessState.ACTIVE, emulator.start, "sub")  # Stripe says canceled
        _store_events(emulator)
        _run(emulator)
        assert _found(engine) == _expect((MismatchKind.ACCESS_STATE_DRIFT, b_), (MismatchKind.ACCESS_STATE_DRIFT, c))

    def test_unprocessed_and_missed_events(self, engine: Engine, emulator: Emulator) -> None:
        c = emulator.store.create_customer().id
        _topup(emulator, c)
        events = emulator.store.events()
        missed, stuck, waiting, fresh = events[0], events[1], events[2], events[3]
        with session_factory().begin() as s:
            b.store_all_events(s, events[1:], status=EventStatus.PROCESSED)
            old = datetime.now(UTC) - timedelta(hours=3)
            s.execute(
                update(StripeEvent)
                .where(StripeEvent.event_id == stuck["id"])
                .values(status=EventStatus.FAILED, received_at=old, last_error="boom")
            )
            s.execute(
                update(StripeEvent)
                .where(StripeEvent.event_id == waiting["id"])
                .values(status=EventStatus.WAITING, received_at=old)
            )
            s.execute(update(StripeEvent).where(StripeEvent.event_id == fresh["id"]).values(status=EventStatus.PENDING))
        _run(emulator)
        assert _found(engine) == _expect(
            (MismatchKind.MISSED_EVENT, missed["id"]),
            (MismatchKind.UNPROCESSED_EVENT, stuck["id"]),
            (MismatchKind.UNPROCESSED_EVENT, waiting["id"]),
        )


class TestProviderAndMargin:
    def _usage(self, emu: Emulator, customer: str) -> None:
        _topup(emu, customer, "price_credits_large")
        with session_factory().begin() as s:
            for day in range(2):
                for i, (provider, model, scope) in enumerate(b.MODELS):
                    b.record_usage(
                        s,
                        customer,
                        f"r{day}-{i}",
                        provider=provider,
                        model=model,
                        workspace=scope,
                        at=emu.start + timedelta(days=day, hours=3),
                        input_tokens=100_000,
                        output_tokens=20_000,
                        cached_tokens=1_000,
                    )

    def test_provider_cost_and_usage_drift(self, engine: Engine, emulator: Emulator, tmp_path: Path) -> None:
        c = emulator.store.create_customer().id
        self._usage(emulator, c)
        day0 = emulator.start.date()
        day1 = day0 + timedelta(days=1)
        with Session(engine) as s:
            groups = b.usage_groups(s)
        openai = ("openai", day0, "gpt-4o-2024-08-06", "proj_main")
        sonnet = ("anthropic", day1, "claude-sonnet-4-20250514", "wrkspc_main")
        tiny = ("openai", day1, "gpt-4o-2024-08-06", "proj_main")
        haiku = ("anthropic", day0, "claude-3-5-haiku-20241022", "wrkspc_main")
        reports = b.write_reports(
            tmp_path,
            groups,
            # Within tolerance (a tenth of a cent) is noise, not drift.
            cost_drift={openai: Decimal("1.00"), sonnet: Decimal("-0.50"), tiny: Decimal("0.001")},
            usage_drift={haiku: 5_000},
        )
        _store_events(emulator)
        _run(emulator, reports)
        assert _found(engine) == _expect(
            (MismatchKind.PROVIDER_COST_DRIFT, f"openai|{day0}|gpt-4o-2024-08-06|proj_main"),
            (MismatchKind.PROVIDER_COST_DRIFT, f"anthropic|{day1}|claude-sonnet-4-20250514|wrkspc_main"),
            (MismatchKind.PROVIDER_USAGE_DRIFT, f"anthropic|{day0}|claude-3-5-haiku-20241022|wrkspc_main"),
        )
        with Session(engine) as s:
            m = s.scalars(select(Mismatch).where(Mismatch.kind == MismatchKind.PROVIDER_USAGE_DRIFT)).one()
            assert m.evidence["drifted"] == {"output_tokens": {"provider": 25_000, "ledger": 20_000}}
            cost = s.scalars(select(Mismatch).where(Mismatch.summary.contains("gpt-4o-2024-08-06"))).one()
            assert cost.expected_amount - cost.actual_amount == Decimal("1.00")

    def test_a_call_released_on_a_provider_timeout_is_evidence_of_the_drift(
        self, engine: Engine, emulator: Emulator, tmp_path: Path
    ) -> None:
        from ledger.holds import ReleaseNote, place_hold, release_hold
        from ledger.models import Hold

        c = emulator.store.create_customer().id
        self._usage(emulator, c)
        at = emulator.start + timedelta(hours=3)
        haiku_model = "claude-3-5-haiku-20241022"
        with session_factory().begin() as s:
            place_hold(s, c, request_id="call_timed_out", units=10)
        with session_factory().begin() as s:
            note = ReleaseNote("provider_timeout", "anthropic", haiku_model, "req_unanswered")
            release_hold(s, "call_timed_out", note=note)
            s.execute(update(Hold).where(Hold.request_id == "call_timed_out").values(created_at=at))
        with Session(engine) as s:
            groups = b.usage_groups(s)
        day0 = emulator.start.date()
        # The provider served and billed the call the client gave up on: its report is above the ledger.
        reports = b.write_reports(
            tmp_path, groups, usage_drift={("anthropic", day0, haiku_model, "wrkspc_main"): 5_000}
        )
        _store_events(emulator)
        _run(emulator, reports)
        with Session(engine) as s:
            m = s.scalars(select(Mismatch).where(Mismatch.kind == MismatchKind.PROVIDER_USAGE_DRIFT)).one()
        assert m.evidence["ledger"]["provider_timeouts"] == [
            {"hold": "call_timed_out", "customer_id": c, "provider_request_id": "req_unanswered", "at": at.isoformat()}
        ]

    def test_usage_the_provider_never_reported_is_drift(
        self, engine: Engine, emulator: Emulator, tmp_path: Path
    ) -> None:
        c = emulator.store.create_customer().id
        self._usage(emulator, c)
        with Session(engine) as s:
            groups = b.usage_groups(s)
        day0 = emulator.start.date()
        missing = ("openai", day0, "gpt-4o-mini-2024-07-18", "proj_main")
        del groups[missing]
        reports = b.write_reports(tmp_path, groups)
        _store_events(emulator)
        _run(emulator, reports[:1])  # the OpenAI costs report only
        assert _found(engine) == _expect(
            (MismatchKind.PROVIDER_COST_DRIFT, f"openai|{day0}|gpt-4o-mini-2024-07-18|proj_main")
        )

    def test_negative_margin_and_non_billable_production_usage(self, engine: Engine, emulator: Emulator) -> None:
        store = emulator.store
        cheap, free = store.create_customer().id, store.create_customer().id
        _topup(emulator, cheap, "price_credits_large")
        _topup(emulator, free, "price_credits_large")
        at = emulator.start + timedelta(hours=2)
        with session_factory().begin() as s:
            b.record_usage(
                s,
                cheap,
                "r1",
                provider="openai",
                model="gpt-4o-2024-08-06",
                workspace=None,
                at=at,
                input_tokens=1_000,
                output_tokens=1_000,
            )
            # Priced in credits like the rest, but 2M output tokens at a pack price far below cost.
            s.flush()
            from ledger.consume import consume
            from ledger.pricing import UsageInput

            consume(
                s,
                cheap,
                request_id="r2",
                units=1,
                usage=UsageInput(
                    provider="openai",
                    model="gpt-4o-2024-08-06",
                    output_tokens=2_000_000,
                    provider_cost_usd=Decimal("20"),
                    occurred_at=at,
                ),
            )
            b.record_usage(
                s,
                free,
                "r3",
                provider="openai",
                model="gpt-4o-2024-08-06",
                workspace=None,
                at=at,
                input_tokens=1_000,
                output_tokens=1_000,
                billable=False,
            )
        _store_events(emulator)
        summary = _run(emulator)
        window = f"{summary.since.isoformat()}|{summary.until.isoformat()}"
        assert _found(engine) == _expect(
            (MismatchKind.NEGATIVE_MARGIN, f"{cheap}|{window}"),
            (MismatchKind.NON_BILLABLE_PRODUCTION_USAGE, f"{free}|{window}"),
        )

    def test_a_bad_report_writes_nothing(self, engine: Engine, emulator: Emulator, tmp_path: Path) -> None:
        bad = tmp_path / "bad.json"
        bad.write_text('{"data": [}')
        with pytest.raises(ReportError, match=r"bad\.json"):
            _run(emulator, [bad])
        with Session(engine) as s:
            from reconciliation.models import ReconciliationRun

            assert s.scalars(select(ReconciliationRun)).all() == []
            assert s.scalars(select(Mismatch)).all() == []


class TestAgainstTheWorker:
    def test_what_the_worker_makes_of_stripe_reconciles_clean(self, engine: Engine, emulator: Emulator) -> None:
        """The ledger side built by the real worker from the stored events: reconciliation agrees with it."""
        from ledger.inbox import parse_envelope, store_events
        from worker.processing import process_events

        store = emulator.store
        a, c = store.create_customer().id, store.create_customer().id
        _topup(emulator, a, "price_credits_large", skip=True)
        _, _, refunded = _topup(emulator, a, skip=True)
        _, _, lost = _topup(emulator, c, skip=True)
        _, _, won = _topup(emulator, c, skip=True)
        _, _, still_open = _topup(emulator, c, skip=True)
        subs = [store.create_subscription(x) for x in (a, c)]
        store.clock.advance(hours=1)
        store.refund(refunded, 300)
        d_lost, d_won = store.create_dispute(lost), store.create_dispute(won)
        store.create_dispute(still_open)
        store.clock.advance(hours=1)
        store.close_dispute(d_lost, won=False)
        store.close_dispute(d_won, won=True)
        store.cancel_subscription(subs[1])
        store.create_payment(c, 2500)
        events = store.events()
        with session_factory().begin() as s:
            items = [(json.dumps(e, default=str).encode(), parse_envelope(e)) for e in events]
            ids = list(store_events(s, items).values())
        report = process_events(sorted(ids), gateway=emulator.gateway)
        with Session(engine) as s:
            stuck = s.scalars(
                select(StripeEvent).where(StripeEvent.status.not_in([EventStatus.PROCESSED, EventStatus.IGNORED]))
            ).all()
        assert not stuck, [(e.type, e.status, e.last_error) for e in stuck]
        summary = _run(emulator)
        assert summary.counts == {}, (summary.counts, report)


class TestMarginReport:
    def test_margin_per_customer_feature_and_model(self, engine: Engine, emulator: Emulator) -> None:
        from reconciliation.margin import margin_rows

        c = emulator.store.create_customer().id
        _topup(emulator, c, "price_credits_large")  # $100 for 12,000 credits
        at = emulator.start + timedelta(hours=3)
        with session_factory().begin() as s:
            for i, feature in enumerate(("chat", "chat", "search")):
                b.record_usage(
                    s,
                    c,
                    f"m{i}",
                    provider="openai",
                    model="gpt-4o-2024-08-06",
                    workspace=None,
                    at=at,
                    input_tokens=1_000_000,
                    output_tokens=0,
                    feature=feature,
                )
            b.record_usage(
                s,
                c,
                "m-free",
                provider="openai",
                model="gpt-4o-2024-08-06",
                workspace=None,
                at=at,
                input_tokens=1_000_000,
                output_tokens=0,
                feature="search",
                billable=False,
            )
        with Session(engine) as s:
            rows = list(margin_rows(s, since=emulator.start, until=_until()))
        assert [(r.feature, r.requests, r.units) for r in rows] == [("chat", 2, 1500), ("search", 2, 750)]
        chat, search = rows
        # 750 credits per million input tokens at $100/12,000 a credit; the provider charges $2.50 a million.
        assert chat.revenue_usd == Decimal(1500) * 100 / 12000 == Decimal("12.5")
        assert chat.cost_usd == Decimal("5.00") and chat.margin_usd == Decimal("7.5")
        assert search.cost_usd == Decimal("5.00") and search.revenue_usd == Decimal("6.25")
