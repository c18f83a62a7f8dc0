"""Usage spike detection: each customer's and each user's last hour against its own trailing baseline.

Every 15 minutes (beat) the last 60 minutes of production usage (credit units and provider cost) of every
customer, and of every user of a customer, is compared with the same hour of the week in each of the previous
``baseline_days`` / 7 weeks, with its neighbouring hours (so 2 weeks give 6 samples, still aligned with the weekly
and daily rhythm). The comparison is robust to outliers in the baseline (a past spike does not raise it):

    spike  <=>  current >= minimum volume
           and  current >  median + threshold_mads x max(1.4826 x MAD, mad_floor_share x median)
           and  current >= min_ratio x median

A spike becomes a review item of kind ``usage_spike`` (reconciliation's workflow) with its evidence (the hour's
usage by feature, model and user, and the baseline), which emits ``mismatch.opened`` and ``usage.spike``; on a
plan with ``on_spike = "suspend"`` the customer's usage is suspended until a reviewer resolves the item.
Idempotent: the item's identity is the subject and the hour, and a subject is quiet for ``quiet_hours`` after a
spike, so the four scans that see one burst report it once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from statistics import median
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ledger.config import BillingConfig, OnSpike, Spikes, get_billing_config
from ledger.limits import customer_plans
from ledger.models import Account, UsageEnvironment, UsageRecord
from ledger.money import format_credits, format_usd
from ledger.suspensions import suspend_usage
from reconciliation.models import Mismatch, MismatchKind
from reconciliation.services import Finding, open_review_item

MAD_TO_SIGMA = Decimal("1.4826")


@dataclass(frozen=True)
class Verdict:
    """One metric of one subject: the hour, the baseline's median and MAD, the line it had to cross."""

    current: Decimal
    median: Decimal
    mad: Decimal
    threshold: Decimal
    spike: bool


def judge(current: Decimal, baseline: Sequence[Decimal], minimum: Decimal, cfg: Spikes) -> Verdict:
    """Whether ``current`` is a spike against ``baseline`` (see the module's rule)."""
    samples = sorted(Decimal(b) for b in baseline) or [Decimal(0)]
    mid = Decimal(median(samples))
    mad = Decimal(median(sorted(abs(s - mid) for s in samples)))
    scale = max(MAD_TO_SIGMA * mad, cfg.mad_floor_share * mid)
    threshold = max(mid + cfg.threshold_mads * scale, cfg.min_ratio * mid, minimum)
    spike = current >= minimum and current > mid + cfg.threshold_mads * scale and current >= cfg.min_ratio * mid
    return Verdict(current, mid, mad, threshold, spike)


def baseline_windows(now: datetime, days: int) -> list[tuple[datetime, datetime]]:
    """The baseline's one-hour windows: the same hour of the week (and its neighbours) in each earlier week."""
    windows = []
    for week in range(1, days // 7 + 1):
        for shift in (-1, 0, 1):
            end = now - timedelta(days=7 * week) + timedelta(hours=shift)
            windows.append((end - timedelta(hours=1), end))
    return windows


Subject = tuple[str, str | None]  # (customer id, user id or None for the whole customer)


def _sums(
    session: Session, start: datetime, end: datetime, account_ids: Sequence[int] | None = None
) -> dict[Subject, tuple[Decimal, Decimal]]:
    """Units and cost per customer and per (customer, user) in [start, end), production usage only."""
    query = (
        select(
            Account.customer_id,
            UsageRecord.user_id,
            func.coalesce(func.sum(UsageRecord.units), 0),
            func.sum(UsageRecord.provider_cost_usd),
        )
        .join(Account, Account.id == UsageRecord.account_id)
        .where(
            UsageRecord.occurred_at >= start,
            UsageRecord.occurred_at < end,
            UsageRecord.environment == UsageEnvironment.PRODUCTION,
        )
        .group_by(Account.customer_id, UsageRecord.user_id)
    )
    if account_ids is not None:
        query = query.where(UsageRecord.account_id.in_(list(account_ids)))
    totals: dict[Subject, tuple[Decimal, Decimal]] = defaultdict(lambda: (Decimal(0), Decimal(0)))
    for customer_id, user_id, units, cost in session.execute(query):
        pair = (Decimal(int(units or 0)), Decimal(cost or 0))
        for subject in ((customer_id, None), (customer_id, user_id)) if user_id else ((customer_id, None),):
            old = totals[subject]
            totals[subject] = (old[0] + pair[0], old[1] + pair[1])
    return dict(totals)


def _breakdown(session: Session, customer_id: str, start: datetime, end: datetime) -> dict[str, Any]:
    """The hour's usage of a customer by feature, model and user (the spike's evidence)."""
    result: dict[str, Any] = {}
    for label, column in (("by_feature", UsageRecord.feature), ("by_model", UsageRecord.model),
                          ("by_user", UsageRecord.user_id)):  # fmt: skip
        rows = session.execute(
            select(column, func.count(), func.coalesce(func.sum(UsageRecord.units), 0))
            .join(Account, Account.id == UsageRecord.account_id)
            .where(Account.customer_id == customer_id, UsageRecord.occurred_at >= start, UsageRecord.occurred_at < end)
            .group_by(column)
            .order_by(func.sum(UsageRecord.units).desc())
            .limit(20)
        ).all()
        result[label] = [{"key": key, "requests": int(n), "units": int(units)} for key, n, units in rows]
    return result


def _subject_key(subject: Subject) -> str:
    customer_id, user_id = subject
    return f"spike:{customer_id}" if user_id is None else f"spike:{customer_id}/user:{user_id}"


def _recently_reported(session: Session, subject: Subject, now: datetime, quiet_hours: int) -> bool:
    since = now - timedelta(hours=quiet_hours + 1)
    return (
        session.scalar(
            select(func.count())
            .select_from(Mismatch)
            .where(
                Mismatch.kind == MismatchKind.USAGE_SPIKE,
                Mismatch.scope_key == _subject_key(subject),
                Mismatch.occurred_at > since,
            )
        )
        or 0
    ) > 0


@dataclass
class SpikeReport:
    subjects_checked: int = 0
    spikes: list[int] = field(default_factory=list)
    suspended: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-able data (the task's result)."""
        return {"subjects_checked": self.subjects_checked, "spikes": self.spikes, "suspended": self.suspended}


def _metric(value: Decimal, places: str) -> str:
    return format(value.quantize(Decimal(places)), "f")


def scan_spikes(session: Session, *, now: datetime, config: BillingConfig | None = None) -> SpikeReport:
    """Look for spikes in the hour before ``now``; open one review item per new spike (idempotent)."""
    config = config or get_billing_config()
    cfg = config.spikes
    now = now.astimezone(UTC)
    start = now - timedelta(hours=1)
    report = SpikeReport()
    current = _sums(session, start, now)
    candidates = {
        subject: sums for subject, sums in current.items() if sums[0] >= cfg.min_units or sums[1] >= cfg.min_cost_usd
    }
    report.subjects_checked = len(current)
    if not candidates:
        return report
    account_ids = list(session.scalars(select(Account.id).where(Account.customer_id.in_({c for c, _ in candidates}))))
    windows = baseline_windows(now, cfg.baseline_days)
    history = [_sums(session, w_start, w_end, account_ids) for w_start, w_end in windows]
    for subject, (units, cost) in sorted(candidates.items(), key=lambda item: (item[0][0], item[0][1] or "")):
        past = [h.get(subject, (Decimal(0), Decimal(0))) for h in history]
        by_units = judge(units, [p[0] for p in past], Decimal(cfg.min_units), cfg)
        by_cost = judge(cost, [p[1] for p in past], cfg.min_cost_usd, cfg)
        if not (by_units.spike or by_cost.spike) or _recently_reported(session, subject, now, cfg.quiet_hours):
            continue
        customer_id, user_id = subject
        who = customer_id if user_id is None else f"user {user_id} of {customer_id}"
        what = by_units if by_units.spike else by_cost
        ratio = "new" if what.median == 0 else f"{(what.current / what.median):.1f}x"
        evidence = {
            "customer_id": customer_id,
            "user_id": user_id,
            "window": {"start": start.isoformat(), "end": now.isoformat()},
            "units": {"current": int(units), "median": _metric(by_units.median, "0.01"),
                      "mad": _metric(by_units.mad, "0.01"), "threshold": _metric(by_units.threshold, "0.01"),
                      "spike": by_units.spike},
            "cost_usd": {"current": _metric(cost, "0.000001"), "median": _metric(by_cost.median, "0.000001"),
                         "mad": _metric(by_cost.mad, "0.000001"), "threshold": _metric(by_cost.threshold, "0.000001"),
                         "spike": by_cost.spike},
            "baseline": [
                {"start": w[0].isoformat(), "units": int(p[0]), "cost_usd": _metric(p[1], "0.000001")}
                for w, p in zip(windows, past, strict=True)
            ],
            **_breakdown(session, customer_id, start, now),
        }  # fmt: skip
        finding = Finding(
            kind=MismatchKind.USAGE_SPIKE,
            identity=f"{_subject_key(subject)}|{now.replace(minute=0, second=0, microsecond=0).isoformat()}",
            summary=f"usage spike: {who} used {format_credits(int(units))} units ({format_usd(cost)}) in the last "
            f"hour, {ratio} the usual for this hour of the week",
            customer_id=customer_id,
            unit="credits",
            expected=what.median if what is by_units else None,
            actual=units if what is by_units else None,
            evidence=evidence,
            occurred_at=start,
            scope_key=_subject_key(subject),
        )
        mismatch, outcome = open_review_item(session, finding, actor="spike-detector", now=now)
        if outcome != "new":
            continue
        report.spikes.append(mismatch.id)
        plans = customer_plans(session, customer_id, now, config=config).plans
        if any((plan := config.plan_for_price(p)) is not None and plan.on_spike is OnSpike.SUSPEND for p in plans):
            suspend_usage(
                session, customer_id, reason=f"usage spike under review (item {mismatch.id})",
                review_item_id=mismatch.id, now=now,
            )  # fmt: skip
            report.suspended.append(customer_id)
    return report
