"""The seeded-fault test: a month for 200 customers in the emulator and the ledger, 30 faults of every kind,
each reported exactly once with the right kind and nothing else; re-running changes nothing."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from stripe_emulator import Clock, EmulatorServer, Store

from ledger.db import session_factory
from reconciliation.engine import reconcile
from reconciliation.gateway import StripeGateway
from reconciliation.models import Mismatch, MismatchAction, MismatchKind, MismatchStatus
from tests.reconciliation import seeded

FAULTS = 30
# The kinds the issue asks to seed; margin review items are tested on their own (test_checks).
SEEDED_KINDS = {
    MismatchKind.PAYMENT_WITHOUT_GRANT,
    MismatchKind.GRANT_WITHOUT_PAYMENT,
    MismatchKind.AMOUNT_MISMATCH,
    MismatchKind.DUPLICATE_GRANT,
    MismatchKind.REFUND_NOT_CLAWED_BACK,
    MismatchKind.DISPUTE_NOT_APPLIED,
    MismatchKind.ACCESS_STATE_DRIFT,
    MismatchKind.UNPROCESSED_EVENT,
    MismatchKind.MISSED_EVENT,
    MismatchKind.CUSTOMER_TOTAL_MISMATCH,
    MismatchKind.PROVIDER_COST_DRIFT,
    MismatchKind.PROVIDER_USAGE_DRIFT,
}


def _snapshot(engine: Engine) -> list[tuple[object, ...]]:
    with Session(engine) as s:
        return [
            (m.id, m.fingerprint, m.kind, m.status, m.amounts_digest, m.first_seen_run_id)
            for m in s.scalars(select(Mismatch).order_by(Mismatch.id))
        ]


@pytest.mark.slow
@pytest.mark.usefixtures("test_config")
def test_every_seeded_fault_is_reported_once_and_nothing_else(engine: Engine, tmp_path: Path) -> None:
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=28)
    store = Store(clock=Clock(start))
    server = EmulatorServer(store).start()
    try:
        gateway = StripeGateway(api_key="sk_test_seeded", api_base=server.url, max_attempts=1)
        world = seeded.build(store, tmp_path, customers=200, faults=FAULTS)
        assert set(world.expected) == SEEDED_KINDS
        assert all(len(ids) == FAULTS for ids in world.expected.values()), {
            k.value: len(v) for k, v in world.expected.items()
        }
        assert store.count("customer") == 200 and store.count("event") > 2000

        first = reconcile(
            session_factory(),
            gateway,
            since=world.since,
            until=world.until,
            provider_reports=world.reports,
            actor="seeded-test",
        )

        with Session(engine) as s:
            found = {(m.kind, m.fingerprint) for m in s.scalars(select(Mismatch))}
            per_kind = Counter(m.kind for m in s.scalars(select(Mismatch)))
        expected = world.fingerprints()
        missing = expected - found
        extra = found - expected
        assert not missing, f"{len(missing)} injected faults not reported: {Counter(k for k, _ in missing)}"
        assert not extra, f"{len(extra)} unexpected mismatches: {Counter(k for k, _ in extra)}"
        assert per_kind == {k: FAULTS for k in SEEDED_KINDS}
        assert first.counts == {k.value: FAULTS for k in SEEDED_KINDS}
        assert first.outcomes == {"new": FAULTS * len(SEEDED_KINDS)}

        before = _snapshot(engine)
        with Session(engine) as s:
            actions = s.scalar(select(func.count(MismatchAction.id)))
        second = reconcile(
            session_factory(),
            gateway,
            since=world.since,
            until=world.until,
            provider_reports=world.reports,
            actor="seeded-test",
        )
        assert second.counts == first.counts
        assert second.outcomes == {"unchanged": FAULTS * len(SEEDED_KINDS)} and second.closed == 0
        assert _snapshot(engine) == before
        with Session(engine) as s:
            assert s.scalar(select(func.count(MismatchAction.id))) == actions
            assert {m.status for m in s.scalars(select(Mismatch))} == {MismatchStatus.OPEN}
    finally:
        server.stop()
