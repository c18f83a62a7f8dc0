"""What a change of plan or quantity in the middle of a period does to the period's credits, by policy.

Stripe prorates a change by the unused share of the period, to the second: the old items' unused time is
credited and the new items' remaining time charged, each ``price x quantity x seconds left / period seconds``
(https://docs.stripe.com/billing/subscriptions/prorations). Credits follow the same arithmetic:

* upgrade (more ``credits_per_period x quantity`` than before), ``on_upgrade``:
  ``prorate`` grants ``(new - old) x seconds left // period seconds``, expiring with the period;
  ``full`` retires what is left of the period's plan grants and grants the new plan's whole credits;
  ``next_period`` grants nothing (the next renewal grants the new plan).
* downgrade, ``on_downgrade``: ``next_period`` takes nothing back; ``prorate`` takes back up to
  ``(old - new) x seconds left // period seconds`` of what is unspent.

The change's time and the period's end come from the proration lines (their ``period``), and the period's
start from the plan's billing interval, so both invoice shapes (which differ in what they carry about the
price) give the same answer.
"""

from __future__ import annotations

import calendar
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from ledger.config import BillingConfig, Interval, OnDowngrade, OnUpgrade, Plan


class PlanNotConfigured(ValueError):
    """A price of the change is not a plan in the billing config."""


class ChangeAction(StrEnum):
    NONE = "none"  # nothing changes now (policy next_period, or the same credits)
    GRANT = "grant"  # grant ``units`` for the rest of the period
    FULL = "full"  # retire the period's earlier plan grants and grant ``units``
    REDUCE = "reduce"  # take back up to ``units`` unspent plan credits of the period


@dataclass(frozen=True, slots=True)
class Item:
    """A subscription item as a plan change sees it: its price and quantity."""

    price: str | None
    quantity: int


@dataclass(frozen=True, slots=True)
class ChangeEffect:
    """What one plan change does to the period's credits, and why (said to a person)."""

    action: ChangeAction
    units: int
    old_credits: int
    new_credits: int
    plan: Plan | None  # the new items' first plan: the grant's priority and expiry follow it
    period_start: datetime
    period_end: datetime
    explanation: str

    @property
    def is_upgrade(self) -> bool:
        return self.new_credits > self.old_credits


def _months_back(moment: datetime, months: int) -> datetime:
    year, month = divmod(moment.year * 12 + moment.month - 1 - months, 12)
    day = min(moment.day, calendar.monthrange(year, month + 1)[1])
    return moment.replace(year=year, month=month + 1, day=day)


def period_start_for(plan: Plan, period_end: datetime) -> datetime:
    """The start of the billing period that ends at ``period_end``, by the plan's interval (calendar months)."""
    count = plan.interval_count
    if plan.interval is Interval.DAY:
        return period_end - timedelta(days=count)
    if plan.interval is Interval.WEEK:
        return period_end - timedelta(weeks=count)
    if plan.interval is Interval.MONTH:
        return _months_back(period_end, count)
    return _months_back(period_end, 12 * count)


def prorated(units: int, *, changed_at: datetime, period_start: datetime, period_end: datetime) -> int:
    """``units x seconds left / period seconds``, rounded down (whole seconds, as Stripe counts them)."""
    total = int((period_end - period_start).total_seconds())
    left = min(total, max(0, int((period_end - changed_at).total_seconds())))
    return units * left // total if total > 0 else 0


def credits_of(config: BillingConfig, items: Sequence[Item]) -> tuple[int, Plan | None]:
    """The credits per period of these items (credits x quantity) and the first item's plan."""
    unknown = sorted({str(i.price) for i in items if config.plan_for_price(i.price) is None})
    if unknown:
        raise PlanNotConfigured(f"no plan in the billing config for prices {unknown}")
    plans = [(config.plan_for_price(i.price), i.quantity) for i in items]
    total = sum(p.credits_per_period * q for p, q in plans if p is not None)
    return total, next((p for p, _ in plans if p is not None), None)


def change_effect(
    config: BillingConfig,
    *,
    old: Sequence[Item],
    new: Sequence[Item],
    changed_at: datetime,
    period_end: datetime,
    period_start: datetime | None = None,
) -> ChangeEffect:
    """What the billing config's ``[plan_changes]`` policy does for a change from ``old`` to ``new`` items."""
    old_credits, old_plan = credits_of(config, old)
    new_credits, new_plan = credits_of(config, new)
    interval_plan = new_plan or old_plan
    if interval_plan is None:
        raise PlanNotConfigured("the change names no subscription item")
    start = period_start or period_start_for(interval_plan, period_end)
    policy = config.plan_changes

    def effect(action: ChangeAction, units: int, why: str) -> ChangeEffect:
        return ChangeEffect(action, units, old_credits, new_credits, new_plan, start, period_end, why)

    delta = new_credits - old_credits
    share = f"{int((period_end - changed_at).total_seconds())}s of {int((period_end - start).total_seconds())}s left"
    if delta > 0:
        if policy.on_upgrade is OnUpgrade.NEXT_PERIOD:
            return effect(ChangeAction.NONE, 0, f"upgrade {old_credits}->{new_credits}: on_upgrade=next_period")
        if policy.on_upgrade is OnUpgrade.FULL:
            return effect(ChangeAction.FULL, new_credits, f"upgrade {old_credits}->{new_credits}: on_upgrade=full")
        units = prorated(delta, changed_at=changed_at, period_start=start, period_end=period_end)
        return effect(ChangeAction.GRANT, units, f"upgrade {old_credits}->{new_credits} prorated ({share})")
    if delta < 0:
        if policy.on_downgrade is OnDowngrade.NEXT_PERIOD:
            return effect(ChangeAction.NONE, 0, f"downgrade {old_credits}->{new_credits}: on_downgrade=next_period")
        units = prorated(-delta, changed_at=changed_at, period_start=start, period_end=period_end)
        return effect(ChangeAction.REDUCE, units, f"downgrade {old_credits}->{new_credits} prorated ({share})")
    return effect(ChangeAction.NONE, 0, f"same credits per period ({new_credits})")


# --- reading a proration invoice (both shapes) ---------------------------------------------------------------


def _id(value: object) -> str | None:
    if isinstance(value, str):
        return value or None
    if isinstance(value, Mapping):
        inner = value.get("id")
        return inner if isinstance(inner, str) and inner else None
    return None


def _int(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def line_price(line: Mapping[str, Any]) -> str | None:
    """A line's price id: ``price``/``plan`` (before 2025) or ``pricing.price_details.price`` (basil on)."""
    for key in ("price", "plan"):
        if line.get(key):
            return _id(line.get(key))
    pricing = line.get("pricing")
    details = pricing.get("price_details") if isinstance(pricing, Mapping) else None
    return _id(details.get("price")) if isinstance(details, Mapping) else None


def is_proration_line(line: Mapping[str, Any]) -> bool:
    """Whether a line is a proration (top-level ``proration``, or basil's ``parent.*_details.proration``)."""
    if line.get("proration") is True:
        return True
    parent = line.get("parent")
    if isinstance(parent, Mapping):
        for key in ("subscription_item_details", "invoice_item_details"):
            details = parent.get(key)
            if isinstance(details, Mapping) and details.get("proration") is True:
                return True
    return False


@dataclass(frozen=True, slots=True)
class ProrationLines:
    """What a proration invoice says about its change: the items before and after, when, until when."""

    old: list[Item]
    new: list[Item]
    changed_at: datetime
    period_end: datetime


def proration_lines(invoice: Mapping[str, Any]) -> ProrationLines | None:
    """The change a ``subscription_update`` invoice charged for, from its proration lines; None without any."""
    raw = invoice.get("lines")
    data = raw.get("data") if isinstance(raw, Mapping) else None
    lines = [x for x in data if isinstance(x, Mapping) and is_proration_line(x)] if isinstance(data, list) else []
    old: list[Item] = []
    new: list[Item] = []
    starts: list[int] = []
    ends: list[int] = []
    for line in lines:
        item = Item(line_price(line), max(0, _int(line.get("quantity"), 1)))
        amount = _int(line.get("amount"), 0)
        description = line.get("description")
        unused = amount < 0 or (amount == 0 and isinstance(description, str) and description.startswith("Unused"))
        (old if unused else new).append(item)
        period = line.get("period")
        if isinstance(period, Mapping):
            if isinstance(period.get("start"), int):
                starts.append(period["start"])
            if isinstance(period.get("end"), int):
                ends.append(period["end"])
    if not lines or not starts or not ends:
        return None
    return ProrationLines(
        old=old,
        new=new,
        changed_at=datetime.fromtimestamp(min(starts), tz=UTC),
        period_end=datetime.fromtimestamp(max(ends), tz=UTC),
    )
