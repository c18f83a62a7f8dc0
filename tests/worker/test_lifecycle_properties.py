"""Property: random subscription lifecycles (plan changes, seats, renewals, failures, pauses, cancel at period end,
deletes, two subscriptions, top-ups and refunds on the side), in both invoice shapes, delivered 1-3 times each in
any order, leave the same ledger as in-order single delivery: every grant field, every subscription's state,
access and balances. On SQLite and PostgreSQL, through the worker's event processing (process_events, what the
Celery task runs).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, select

from ledger.check import check_ledger
from ledger.db import Base, unit_of_work
from ledger.inbox import EventStatus, StripeEvent
from ledger.models import Account, Grant, Subscription, SubscriptionGrant, SubscriptionReduction
from tests.worker.conftest import store
from tests.worker.lifecycles import LIFECYCLE_CONFIG, generate_lifecycles
from worker.processing import process_events

GRANT_FIELDS = (
    "source",
    "units",
    "remaining",
    "frozen",
    "priority",
    "expires_at",
    "expired_at",
    "stripe_object_id",
    "stripe_object_type",
    "amount_minor",
    "currency",
    "clawed_back",
    "refunded_minor",
    "idempotency_key",
    "reason",
    "actor",
    "period_start",
    "period_end",
)
SUBSCRIPTION_FIELDS = tuple(c.name for c in Subscription.__table__.columns if c.name != "updated_at")


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value.value if hasattr(value, "value") else value


def snapshot() -> dict[str, Any]:
    """The whole ledger as values that do not depend on row ids or processing times."""
    with unit_of_work() as session:
        assert check_ledger(session) == []
        keys = dict(session.execute(select(Grant.id, Grant.idempotency_key)).all())
        customers = dict(session.execute(select(Account.id, Account.customer_id)).all())
        return {
            "statuses": set(session.scalars(select(StripeEvent.status))),
            "accounts": {
                a.customer_id: (
                    a.balance,
                    a.held,
                    a.debt,
                    _plain(a.access_state),
                    _plain(a.grace_until),
                    _plain(a.access_as_of),
                )
                for a in session.scalars(select(Account))
            },
            "grants": sorted(
                [
                    (customers[g.account_id], *(_plain(getattr(g, f)) for f in GRANT_FIELDS))
                    for g in session.scalars(select(Grant))
                ],
                key=repr,
            ),
            "subscriptions": sorted(
                [
                    tuple(
                        _plain(getattr(s, f)) if f != "account_id" else customers[s.account_id]
                        for f in SUBSCRIPTION_FIELDS
                    )
                    for s in session.scalars(select(Subscription))
                ],
                key=repr,
            ),
            "subscription_grants": sorted(
                [
                    (
                        keys[sg.grant_id],
                        sg.subscription_id,
                        sg.kind,
                        _plain(sg.period_end),
                        _plain(sg.effective_at),
                        sg.supersedes,
                        sg.superseded,
                        sg.invoice_id,
                    )
                    for sg in session.scalars(select(SubscriptionGrant))
                ],
                key=repr,
            ),
            "reductions": sorted(
                (r.change_key, r.units, r.applied) for r in session.scalars(select(SubscriptionReduction))
            ),
        }


def wipe(engine: Engine) -> None:
    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            if engine.dialect.has_table(conn, table.name):
                conn.execute(delete(table))


def deliver(events: list[dict[str, Any]], rng: random.Random | None) -> None:
    """Store and process events in chunks: in order once, or (with ``rng``) each 1-3 times, shuffled."""
    deliveries = list(events)
    if rng is not None:
        deliveries = [e for e in events for _ in range(rng.randint(1, 3))]
        rng.shuffle(deliveries)
    position = 0
    while position < len(deliveries):
        size = rng.randint(1, 12) if rng is not None else 10
        process_events([store(e) for e in deliveries[position : position + size]])
        position += size


class TestLifecyclesInAnyOrder:
    def test_shuffled_repeated_delivery_equals_in_order_delivery(
        self, engine: Engine, billing_config_file: Callable[[str], Path]
    ) -> None:
        seen: set[str] = set()

        @settings(
            max_examples=4,
            deadline=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(
            seed=st.integers(0, 10**6),
            order_seed=st.integers(0, 10**6),
            on_upgrade=st.sampled_from(["prorate", "full", "next_period"]),
            on_downgrade=st.sampled_from(["next_period", "prorate"]),
        )
        def check(seed: int, order_seed: int, on_upgrade: str, on_downgrade: str) -> None:
            billing_config_file(LIFECYCLE_CONFIG.format(on_upgrade=on_upgrade, on_downgrade=on_downgrade))
            events = generate_lifecycles(seed)
            wipe(engine)
            deliver(events, None)
            in_order = snapshot()
            assert in_order["statuses"] <= {EventStatus.PROCESSED, EventStatus.IGNORED}
            wipe(engine)
            deliver(events, random.Random(order_seed))
            shuffled = snapshot()
            for part in ("statuses", "accounts", "grants", "subscriptions", "subscription_grants", "reductions"):
                assert shuffled[part] == in_order[part], part
            seen.update(g[1] for g in in_order["grants"])
            seen.update(f"sub:{s[SUBSCRIPTION_FIELDS.index('status')]}" for s in in_order["subscriptions"])

        check()
        # The lifecycles really exercised the paths: plan-change grants, renewals, top-ups, several states.
        assert {"renewal", "plan_change", "top_up"} <= seen
        assert {"sub:active", "sub:canceled"} <= seen
