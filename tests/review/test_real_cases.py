"""The pages on what reconciliation really records: the seeded month of the reconciliation tests, run for real
against the Stripe emulator, then every mismatch, list, customer and the CSV rendered and checked."""

from __future__ import annotations

import csv
import io
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from starlette.testclient import TestClient
from stripe_emulator import Clock, EmulatorServer, Store

from ledger.db import session_factory
from reconciliation.engine import reconcile
from reconciliation.gateway import StripeGateway
from reconciliation.models import Mismatch
from tests.reconciliation import seeded
from tests.review.conftest import log_in, mounted_review_app
from webhooks.review.cases import find_refs

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.usefixtures("test_config")]


@pytest.fixture
def test_config(billing_config_file: object) -> Path:
    """The reconciliation tests' billing config."""
    from tests.reconciliation.builders import TEST_BILLING_CONFIG

    return billing_config_file(TEST_BILLING_CONFIG)  # type: ignore[operator, no-any-return]


def _reconciled_month(tmp_path: Path) -> None:
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=28)
    store = Store(clock=Clock(start))
    server = EmulatorServer(store).start()
    try:
        gateway = StripeGateway(api_key="sk_test_review", api_base=server.url, max_attempts=1)
        world = seeded.build(store, tmp_path, customers=200, faults=2)
        reconcile(
            session_factory(),
            gateway,
            since=world.since,
            until=world.until,
            provider_reports=world.reports,
            actor="review-test",
        )
    finally:
        server.stop()


def test_every_recorded_mismatch_renders_with_its_evidence(
    pg_engine: Engine, review_settings: str, tmp_path: Path
) -> None:
    _reconciled_month(tmp_path)
    signed_in = TestClient(mounted_review_app(), follow_redirects=False)
    assert log_in(signed_in).status_code == 303
    with Session(pg_engine) as session:
        mismatches = list(session.scalars(select(Mismatch).order_by(Mismatch.id)))
    kinds = Counter(m.kind.value for m in mismatches)
    assert len(kinds) >= 10, kinds  # the seeded faults cover (nearly) every kind

    for m in mismatches:
        html = signed_in.get(f"/review/mismatches/{m.id}").text
        assert f"Mismatch #{m.id}" in html
        refs = find_refs(m.evidence)
        if refs.stripe_ids or refs.event_ids:
            stripe_side = html.split('class="side stripe"')[1].split('class="side ledger"')[0]
        else:  # provider drift: the provider report stands where Stripe would
            assert 'class="side provider"' in html, m.kind
            stripe_side = ""
        for object_id in refs.stripe_ids[:5]:
            assert object_id in html, (m.kind, object_id)
        for event_id in refs.event_ids[:5]:
            assert event_id in stripe_side, (m.kind, event_id)
        for grant_id in refs.grant_ids[:5]:
            assert f"#{grant_id}" in html, (m.kind, grant_id)
        if m.customer_id:
            assert signed_in.get(f"/review/customers/{m.customer_id}").status_code == 200, m.customer_id

    for kind, n in kinds.items():
        listed = signed_in.get(f"/review/mismatches?kind={kind}").text
        assert f"{n} match" in listed, kind

    rows = list(csv.DictReader(io.StringIO(signed_in.get("/review/mismatches.csv?sort=oldest").text)))
    assert [int(r["id"]) for r in rows] == [m.id for m in mismatches]
    assert Counter(r["kind"] for r in rows) == kinds

    runs = signed_in.get("/review/runs").text
    assert "<svg" in runs and "review-test" in runs
