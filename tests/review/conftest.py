"""Fixtures for the review pages: a configured reviewer, the sub-app mounted at /review, seeded cases."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from ledger.consume import consume
from ledger.grants import grant_credits
from ledger.inbox import EventSource, parse_envelope, store_event
from ledger.models import AccessState, GrantSource
from ledger.pricing import UsageInput
from ledger.settings import get_settings
from reconciliation.models import MismatchAction, MismatchKind, ReconciliationRun, RunStatus
from reconciliation.services import Finding, record_finding
from webhooks.review.app import create_review_app
from webhooks.review.auth import hash_password

REVIEWER = "alice"
PASSWORD = "correct horse battery staple"
SECRET_KEY = "review-test-secret-3f9a1c"
# Hashed once per test session: scrypt is slow on purpose.
_HASH = hash_password(PASSWORD)

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture(autouse=True)
def _fresh_login_throttle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Failed sign-ins in one test do not count against the next."""
    from webhooks.review import views
    from webhooks.review.sessions import LoginThrottle

    monkeypatch.setattr(views, "throttle", LoginThrottle())


@pytest.fixture
def review_settings(monkeypatch: pytest.MonkeyPatch) -> str:
    """REVIEW_USERS with one reviewer, and a known SECRET_KEY; returns the stored hash."""
    monkeypatch.setenv("REVIEW_USERS", f"{REVIEWER}:{_HASH}")
    monkeypatch.setenv("SECRET_KEY", SECRET_KEY)
    get_settings.cache_clear()
    return _HASH


def mounted_review_app() -> Starlette:
    """The review sub-app mounted at /review, as the main app mounts it."""
    return Starlette(routes=[Mount("/review", app=create_review_app())])


@pytest.fixture
def client(engine: Engine, review_settings: str) -> Iterator[TestClient]:
    """A client with no session, on either backend."""
    with TestClient(mounted_review_app(), base_url="http://testserver", follow_redirects=False) as c:
        yield c


def csrf_from(html: str) -> str:
    """The CSRF token a page's forms carry."""
    found = _CSRF.search(html)
    assert found, "page has no CSRF token"
    return found.group(1)


def log_in(client: TestClient, name: str = REVIEWER, password: str = PASSWORD) -> httpx.Response:
    """Sign in through the form, as a browser would."""
    page = client.get("/review/login")
    token = csrf_from(page.text)
    return client.post(
        "/review/login",
        data={"username": name, "password": password, "csrf_token": token, "next": "/review/mismatches"},
    )


@pytest.fixture
def signed_in(client: TestClient) -> TestClient:
    """The client, signed in as the reviewer."""
    response = log_in(client)
    assert response.status_code == 303, response.text
    return client


# --- seeded data ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seeded:
    """Ids of what :func:`seed` wrote."""

    run_id: int
    payment_case: int  # payment_without_grant for cus_alpha (Stripe pi_alpha_2, 25.00 USD)
    amount_case: int  # amount_mismatch for cus_alpha
    access_case: int  # access_state_drift for cus_beta
    provider_case: int  # provider_cost_drift, no customer
    charge_request_id: str  # the consumption that explains cus_alpha's charge
    charge_entry_id: int


def stripe_event(event_id: str, event_type: str, obj: dict[str, object], *, created: datetime) -> tuple[bytes, object]:
    """A raw Stripe event body and its parsed envelope."""
    raw = json.dumps(
        {
            "id": event_id,
            "object": "event",
            "api_version": "2024-06-20",
            "created": int(created.timestamp()),
            "livemode": False,
            "type": event_type,
            "data": {"object": obj},
        }
    ).encode()
    return raw, parse_envelope(json.loads(raw))


def add_run(session: Session, *, since: datetime, until: datetime, counts: dict[str, int]) -> ReconciliationRun:
    """A finished reconciliation run."""
    run = ReconciliationRun(
        since=since,
        until=until,
        started_at=until + timedelta(minutes=5),
        finished_at=until + timedelta(minutes=6),
        status=RunStatus.SUCCEEDED,
        actor="system",
        counts=counts,
        stats={},
        provider_reports=[],
    )
    session.add(run)
    session.flush()
    return run


def add_case(session: Session, run: ReconciliationRun, finding: Finding, *, now: datetime) -> int:
    """Record a finding as reconciliation does; return the mismatch id."""
    record_finding(session, run, finding, now=now)
    session.flush()
    mismatch_id: int = session.scalars(
        select(MismatchAction.mismatch_id).order_by(MismatchAction.id.desc()).limit(1)
    ).one()
    return mismatch_id


def seed(engine: Engine) -> Seeded:
    """Two customers with grants, usage and Stripe events; one run with four mismatches."""
    now = datetime.now(UTC).replace(microsecond=0)
    day = now - timedelta(days=1)
    with Session(engine, expire_on_commit=False) as session, session.begin():
        grant_credits(
            session,
            "cus_alpha",
            units=10_000,
            source=GrantSource.TOP_UP,
            idempotency_key="seed:pi_alpha_1",
            reason="credit pack price_credits_large",
            stripe_object_id="pi_alpha_1",
            stripe_object_type="payment_intent",
            amount_minor=10_000,
            currency="usd",
        )
        result = consume(
            session,
            "cus_alpha",
            request_id="req_explain_42",
            units=1234,
            usage=UsageInput(
                user_id="u_marta",
                feature="report-writer",
                provider="openai",
                model="gpt-4o-2024-08-06",
                input_tokens=120_000,
                output_tokens=40_000,
                provider_cost_usd=Decimal("0.7000"),
            ),
            reason="long report",
        )
        consume(
            session,
            "cus_alpha",
            request_id="req_small_1",
            units=10,
            usage=UsageInput(
                user_id="u_kim", feature="chat", provider="anthropic", model="claude-sonnet-4", input_tokens=900
            ),
        )
        grant_credits(
            session,
            "cus_beta",
            units=500,
            source=GrantSource.PROMOTION,
            idempotency_key="seed:promo_beta",
            reason="welcome credits",
        )
        raw, env = stripe_event(
            "evt_alpha_charge_2",
            "charge.succeeded",
            {
                "id": "ch_alpha_2",
                "object": "charge",
                "amount": 2500,
                "currency": "usd",
                "customer": "cus_alpha",
                "payment_intent": "pi_alpha_2",
                "paid": True,
                "status": "succeeded",
            },
            created=day,
        )
        store_event(session, raw, env, source=EventSource.WEBHOOK)  # type: ignore[arg-type]
        raw, env = stripe_event(
            "evt_alpha_pi_2",
            "payment_intent.succeeded",
            {
                "id": "pi_alpha_2",
                "object": "payment_intent",
                "amount": 2500,
                "currency": "usd",
                "customer": "cus_alpha",
            },
            created=day,
        )
        store_event(session, raw, env, source=EventSource.WEBHOOK)  # type: ignore[arg-type]

        run = add_run(
            session,
            since=day.replace(hour=0, minute=0, second=0),
            until=now.replace(hour=0, minute=0, second=0),
            counts={
                "payment_without_grant": 1,
                "amount_mismatch": 1,
                "access_state_drift": 1,
                "provider_cost_drift": 1,
            },
        )
        payment = add_case(
            session,
            run,
            Finding(
                kind=MismatchKind.PAYMENT_WITHOUT_GRANT,
                identity="pi_alpha_2",
                summary="Stripe payment pi_alpha_2 (25.00 USD) has no ledger grant",
                customer_id="cus_alpha",
                currency="usd",
                unit="minor",
                expected=2500,
                actual=None,
                evidence={
                    "stripe": {
                        "payment_intent": "pi_alpha_2",
                        "charge": "ch_alpha_2",
                        "amount": 2500,
                        "currency": "usd",
                    },
                    "ledger": {"grants": []},
                    "events": ["evt_alpha_charge_2"],
                },
                occurred_at=day,
            ),
            now=now,
        )
        amount = add_case(
            session,
            run,
            Finding(
                kind=MismatchKind.AMOUNT_MISMATCH,
                identity="pi_alpha_1",
                summary="Grant for pi_alpha_1 gave 10000 credits; the config says 12000",
                customer_id="cus_alpha",
                unit="credits",
                expected=12000,
                actual=10000,
                evidence={"stripe": {"payment_intent": "pi_alpha_1", "amount": 10_000}, "ledger": {"grant_id": 1}},
                occurred_at=day,
            ),
            now=now,
        )
        access = add_case(
            session,
            run,
            Finding(
                kind=MismatchKind.ACCESS_STATE_DRIFT,
                identity="cus_beta",
                summary="Stripe says past_due; the ledger says active",
                customer_id="cus_beta",
                unit="state",
                evidence={
                    "stripe": {"subscription": "sub_beta", "status": "past_due"},
                    "ledger": {"access_state": AccessState.ACTIVE.value},
                },
            ),
            now=now,
        )
        provider = add_case(
            session,
            run,
            Finding(
                kind=MismatchKind.PROVIDER_COST_DRIFT,
                identity="openai:gpt-4o:" + day.date().isoformat(),
                summary="OpenAI reports $12.50 for gpt-4o; the ledger recorded $0.70",
                unit="usd",
                expected=Decimal("0.70"),
                actual=Decimal("12.50"),
                evidence={
                    "provider_row": {
                        "source": "costs.json#3",
                        "provider": "openai",
                        "model": "gpt-4o",
                        "cost_usd": "12.50",
                    },
                    "ledger": {"provider_cost_usd": "0.70", "requests": 1},
                },
                occurred_at=day,
                scope_key="openai:" + day.date().isoformat(),
            ),
            now=now,
        )
        assert result.entry_id is not None
        return Seeded(
            run_id=run.id,
            payment_case=payment,
            amount_case=amount,
            access_case=access,
            provider_case=provider,
            charge_request_id="req_explain_42",
            charge_entry_id=result.entry_id,
        )


def count_actions(engine: Engine) -> int:
    """Audit rows written so far."""
    with Session(engine) as session:
        return int(session.scalar(select(func.count(MismatchAction.id))) or 0)
