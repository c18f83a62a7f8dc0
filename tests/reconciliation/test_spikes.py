"""Usage spike detection on generated hourly histories, the spike review item, suspension and its lifting; and the
``mismatch.opened`` notification of the review workflow."""

from __future__ import annotations

import itertools
import math
import random
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import Engine, insert, select

from ledger.accounts import open_account
from ledger.config import BillingConfig, Spikes
from ledger.db import unit_of_work
from ledger.errors import AccessRefused
from ledger.grants import grant_credits
from ledger.limits import LimitRequest, reserve_limits
from ledger.models import GrantSource, OutboxEvent, UsageEnvironment, UsageRecord, UsageSuspension
from reconciliation import services
from reconciliation.models import Mismatch, MismatchKind, MismatchStatus, ReconciliationRun
from reconciliation.spikes import baseline_windows, judge, scan_spikes

END = datetime(2026, 11, 30, tzinfo=UTC)  # a Monday, 00:00 UTC
HISTORY_DAYS = 17  # 14 days of baseline before the 2 days scanned, and a margin
_ids = itertools.count(1)


def flat(hour: datetime) -> float:
    return 1000.0


def weekly_seasonal(hour: datetime) -> float:
    daily = 0.25 + 1.5 * max(0.0, math.sin(math.pi * (hour.hour - 6) / 14)) if 6 <= hour.hour <= 20 else 0.25
    weekend = 0.4 if hour.weekday() >= 5 else 1.0
    return 1600.0 * daily * weekend


def growing(hour: datetime) -> float:
    days = (hour - (END - timedelta(days=HISTORY_DAYS))).total_seconds() / 86400
    return 700.0 * 1.04**days  # +4% a day: x1.73 over the two baseline weeks


def seed_history(
    customer_id: str,
    shape: Callable[[datetime], float],
    *,
    spikes: dict[datetime, float],
    rng: random.Random,
    users: int = 0,
) -> None:
    """One usage row per hour (or per user and hour) at :20, with +-15% noise; ``spikes`` multiply an hour."""
    rows = []
    with unit_of_work() as session:
        account_id = open_account(session, customer_id).id
        hour = END - timedelta(days=HISTORY_DAYS)
        while hour < END:
            for user in range(max(users, 1)):
                user_id = f"u{user}" if users else None
                value = shape(hour) / max(users, 1) * rng.uniform(0.85, 1.15)
                if (hour, user_id) in spikes or (hour in spikes and not users):
                    value *= spikes.get((hour, user_id), spikes.get(hour, 1))  # type: ignore[call-overload]
                units = int(value)
                rows.append(
                    {
                        "account_id": account_id,
                        "request_id": f"req_{next(_ids)}",
                        "user_id": user_id,
                        "feature": "chat",
                        "model": "gpt-4o-mini-2024-07-18",
                        "units": units,
                        "provider_cost_usd": Decimal(units) / 1000,
                        "environment": UsageEnvironment.PRODUCTION,
                        "billable": True,
                        "occurred_at": hour + timedelta(minutes=20),
                    }
                )
            hour += timedelta(hours=1)
        session.execute(insert(UsageRecord), rows)


def spike_items() -> list[Mismatch]:
    with unit_of_work() as session:
        return list(
            session.scalars(select(Mismatch).where(Mismatch.kind == MismatchKind.USAGE_SPIKE).order_by(Mismatch.id))
        )


class TestJudge:
    def test_robust_to_an_outlier_in_the_baseline(self) -> None:
        cfg = Spikes()
        baseline = [Decimal(v) for v in (1000, 1100, 950, 1050, 9000, 1000)]  # a past spike among them
        assert not judge(Decimal(1500), baseline, Decimal(500), cfg).spike
        verdict = judge(Decimal(8000), baseline, Decimal(500), cfg)
        assert verdict.spike and verdict.median == Decimal(1025)
        # Below the minimum volume nothing is a spike, however new.
        assert not judge(Decimal(400), [Decimal(0)] * 6, Decimal(500), cfg).spike
        assert judge(Decimal(600), [Decimal(0)] * 6, Decimal(500), cfg).spike

    def test_baseline_windows_are_the_same_hour_of_the_week(self) -> None:
        now = datetime(2026, 11, 27, 14, 15, tzinfo=UTC)
        windows = baseline_windows(now, 14)
        assert len(windows) == 6
        assert (now - timedelta(days=7) - timedelta(hours=1), now - timedelta(days=7)) in windows
        assert all(end - start == timedelta(hours=1) for start, end in windows)
        assert {(end.weekday(), end.hour) for _, end in windows} == {(4, 13), (4, 14), (4, 15)}


class TestScanOnHistories:
    def test_every_injected_spike_found_once_and_none_on_clean_histories(self, sqlite_engine: Engine) -> None:
        rng = random.Random(20261206)
        hour = lambda days, h: (END - timedelta(days=days)).replace(hour=h)  # noqa: E731
        injected = {
            "cus_flat": [hour(2, 5), hour(1, 15)],
            "cus_seasonal": [hour(2, 11), hour(1, 3)],  # a weekend day's busy hour, and a quiet night hour
            "cus_growing": [hour(2, 9), hour(1, 19)],
        }
        seed_history("cus_flat", flat, spikes=dict.fromkeys(injected["cus_flat"], 8.0), rng=rng)
        seed_history("cus_seasonal", weekly_seasonal, spikes={injected["cus_seasonal"][0]: 6.0,
                                                              injected["cus_seasonal"][1]: 20.0}, rng=rng)  # fmt: skip
        seed_history("cus_growing", growing, spikes=dict.fromkeys(injected["cus_growing"], 8.0), rng=rng)
        for clean in ("cus_clean_flat", "cus_clean_seasonal", "cus_clean_growing"):
            shape = {"flat": flat, "seasonal": weekly_seasonal, "growing": growing}[clean.rsplit("_", 1)[1]]
            seed_history(clean, shape, spikes={}, rng=rng)
        # A team: ten users; one user's hour jumps 9x while the team's total stays within its usual range.
        team_spike = (hour(1, 10), "u3")
        seed_history("cus_team", flat, spikes={team_spike: 9.0}, rng=rng, users=10)

        tick = END - timedelta(days=2, hours=-1)
        cfg = BillingConfig()
        while tick <= END:
            with unit_of_work() as session:
                scan_spikes(session, now=tick, config=cfg)
            tick += timedelta(minutes=15)

        found: dict[tuple[str, str | None], list[datetime]] = {}
        for item in spike_items():
            window_start = datetime.fromisoformat(item.evidence["window"]["start"])
            found.setdefault((item.evidence["customer_id"], item.evidence["user_id"]), []).append(window_start)
        # Each injected hour (its row at :20) lies in the one window that reported it.
        for customer, hours in injected.items():
            windows = found.pop((customer, None))
            assert len(windows) == len(hours), (customer, windows)
            for injected_hour, start in zip(sorted(hours), sorted(windows), strict=True):
                assert start <= injected_hour + timedelta(minutes=20) < start + timedelta(hours=1)
        (team_window,) = found.pop(("cus_team", "u3"))
        assert team_window <= team_spike[0] + timedelta(minutes=20) < team_window + timedelta(hours=1)
        assert found == {}  # nothing on the clean histories, nothing for the team as a whole

    def test_evidence_names_the_hour_by_feature_model_and_user(self, sqlite_engine: Engine) -> None:
        rng = random.Random(7)
        spike_hour = (END - timedelta(days=1)).replace(hour=12)
        seed_history("cus_e", flat, spikes={spike_hour: 10.0}, rng=rng)
        with unit_of_work() as session:
            report = scan_spikes(session, now=spike_hour + timedelta(minutes=30), config=BillingConfig())
        assert len(report.spikes) == 1
        (item,) = spike_items()
        evidence = item.evidence
        assert evidence["units"]["spike"] and evidence["by_feature"][0]["key"] == "chat"
        assert evidence["by_model"][0]["key"] == "gpt-4o-mini-2024-07-18" and len(evidence["baseline"]) == 6
        assert int(evidence["units"]["current"]) >= 8500 and Decimal(evidence["units"]["median"]) < 1200


SUSPEND = """
[[plans]]
price = "price_pro"
name = "Pro"
credits_per_period = 2000
on_spike = "suspend"
"""


class TestSpikeItem:
    def test_suspends_once_until_a_reviewer_resolves_it(self, engine: Engine, billing_config_file: Callable) -> None:
        billing_config_file(SUSPEND)
        cfg = BillingConfig.model_validate(tomllib.loads(SUSPEND))
        rng = random.Random(3)
        spike_hour = (END - timedelta(days=1)).replace(hour=9)
        seed_history("cus_s", flat, spikes={spike_hour: 8.0}, rng=rng)
        with unit_of_work() as session:
            grant_credits(
                session, "cus_s", units=2000, source=GrantSource.RENEWAL, idempotency_key="renew-1",
                reason="Pro subscription_cycle in_1", period_start=END - timedelta(days=20),
                period_end=END + timedelta(days=10),
            )  # fmt: skip
        now = spike_hour + timedelta(minutes=45)
        for _ in range(2):  # idempotent: the second scan of the same moment reports nothing new
            with unit_of_work() as session:
                report = scan_spikes(session, now=now, config=cfg)
        assert report.spikes == []
        (item,) = spike_items()
        with unit_of_work() as session:
            with pytest.raises(AccessRefused) as info:
                reserve_limits(session, "cus_s", LimitRequest(units=1), now=now, config=cfg)
            assert info.value.state == "suspended_usage_spike"
        with unit_of_work() as session:
            services.resolve(session, item.id, actor="alice", note="a launch, expected")
        with unit_of_work() as session:
            reserve_limits(session, "cus_s", LimitRequest(units=1), now=now, config=cfg)
            (suspension,) = session.scalars(select(UsageSuspension)).all()
            assert (suspension.lifted_by, suspension.lift_note) == ("alice", "a launch, expected")
            types = list(session.scalars(select(OutboxEvent.type).where(OutboxEvent.customer_id == "cus_s")))
        assert types.count("usage.spike") == 1 and types.count("mismatch.opened") == 1
        assert item.status is MismatchStatus.OPEN


class TestMismatchOpened:
    def test_once_per_opening(self, engine: Engine) -> None:
        now = datetime.now(UTC)
        finding = services.Finding(
            kind=MismatchKind.CLAWBACK_DEBT, identity="x-1", summary="debt", customer_id="cus_m", unit="credits"
        )
        with unit_of_work() as session:
            run = ReconciliationRun(since=now, until=now, started_at=now)
            session.add(run)
            session.flush()
            assert services.record_finding(session, run, finding, now=now) == "new"
            assert services.record_finding(session, run, finding, now=now) == "unchanged"
        with unit_of_work() as session:
            rows = session.execute(select(OutboxEvent.type, OutboxEvent.data)).all()
        assert [(t, d["kind"]) for t, d in rows] == [("mismatch.opened", "clawback_debt")]
