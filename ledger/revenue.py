"""Deferred revenue, recognized revenue and breakage: the roll-forward of money paid for credits.

Money paid for credits is a liability (deferred revenue) until the credits are spent or expire. For each period
(UTC day or month) and currency:

- **sold**: money of paid grants made in the period (what customers paid for credits);
- **recognized**: the value of credits spent in the period (consumption, captured holds, debt a grant settled),
  each credit at its own grant's price;
- **expired** (breakage): the value of credits that lapsed unused;
- **clawed back**: the value of credits taken back for refunds and lost disputes;
- **adjusted**: any other movement of a paid grant's credits (manual adjustments);
- **closing deferred** = opening + sold - recognized - expired - clawed back - adjusted, exactly, in minor units.

Each grant's money leaves deferred revenue as ``floor(credits out so far x amount / credits)``: every movement is
the difference of two such floors, so a grant's pieces always sum to what was paid (rounding is carried, never
lost) and the report ties to the cent. Free credits (promotions, trials, $0 invoices) carry no money and are
reported apart, in credits.

:func:`verify` recomputes the closing balance from the grants' current state (credits, remaining, frozen),
independently of the entries the roll-forward walks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from itertools import pairwise
from typing import Any

from sqlalchemy import select, union_all
from sqlalchemy.orm import Session

from ledger.models import Allocation, Entry, EntryKind, Grant, GrantSource

# Grants bought with money: top-ups, renewals and paid changes of plan (a $0 one counts as free).
PAID_SOURCES = (GrantSource.TOP_UP, GrantSource.RENEWAL, GrantSource.PLAN_CHANGE)
RECOGNIZING = frozenset(
    {EntryKind.CONSUME, EntryKind.HOLD, EntryKind.CAPTURE, EntryKind.RELEASE, EntryKind.DEBT_SETTLEMENT}
)
BUCKETS = ("recognized", "expired", "clawed_back", "adjusted")


class Period(StrEnum):
    DAY = "day"
    MONTH = "month"


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def period_starts(since: datetime, until: datetime, by: Period) -> list[datetime]:
    """The starts of the periods covering [since, until): since itself, then each UTC day or month boundary."""
    since, until = _utc(since), _utc(until)
    starts = [since]
    day = since.date()
    while True:
        next_month = date(day.year + (day.month == 12), day.month % 12 + 1, 1)
        day = day + timedelta(days=1) if by is Period.DAY else next_month
        boundary = datetime(day.year, day.month, day.day, tzinfo=UTC)
        if boundary >= until:
            return starts
        starts.append(boundary)


@dataclass
class Line:
    """One period and currency of the roll-forward, in minor units (credits for the free line)."""

    period_start: datetime
    period_end: datetime
    currency: str
    opening: int = 0
    sold: int = 0
    recognized: int = 0
    expired: int = 0
    clawed_back: int = 0
    adjusted: int = 0

    @property
    def closing(self) -> int:
        """Opening plus sold minus everything that left deferred revenue."""
        return self.opening + self.sold - self.recognized - self.expired - self.clawed_back - self.adjusted

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view (minor units, with the currency)."""
        return {
            "period_start": self.period_start.isoformat(),
            "period_end": self.period_end.isoformat(),
            "currency": self.currency,
            "opening_deferred": self.opening,
            "sold": self.sold,
            "recognized": self.recognized,
            "expired": self.expired,
            "clawed_back": self.clawed_back,
            "adjusted": self.adjusted,
            "closing_deferred": self.closing,
        }


@dataclass
class RevenueReport:
    """The roll-forward over [since, until): paid money per currency, free credits apart."""

    since: datetime
    until: datetime
    by: Period
    money: list[Line] = field(default_factory=list)
    free_credits: list[Line] = field(default_factory=list)  # currency "credits": units, not money

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "by": self.by.value,
            "money": [x.as_dict() for x in self.money],
            "free_credits": [x.as_dict() for x in self.free_credits],
        }


def _movements(until: datetime) -> Any:
    """Every credit movement out of a grant before ``until``: (grant, entry id, kind, time, credits out).

    An entry with a grant moved units + debt_delta in that grant's remaining credits and frozen_delta in its
    frozen ones; one without has an allocation row per grant. Grants' own GRANT entries are what was sold."""
    E, A = Entry, Allocation
    single = select(
        E.grant_id.label("grant_id"),
        E.id.label("entry_id"),
        E.kind.label("kind"),
        E.created_at.label("at"),
        (-(E.units + E.debt_delta) - E.frozen_delta).label("out"),
    ).where(E.grant_id.is_not(None), E.kind != EntryKind.GRANT, E.created_at < until)
    spread = (
        select(
            A.grant_id.label("grant_id"),
            E.id.label("entry_id"),
            E.kind.label("kind"),
            E.created_at.label("at"),
            (-A.units).label("out"),
        )
        .join(A, A.entry_id == E.id)
        .where(E.grant_id.is_(None), E.kind != EntryKind.GRANT, E.created_at < until)
    )
    return union_all(single, spread).subquery("movements")


def _bucket(kind: EntryKind) -> str:
    if kind in RECOGNIZING:
        return "recognized"
    if kind is EntryKind.EXPIRE:
        return "expired"
    if kind is EntryKind.CLAWBACK:
        return "clawed_back"
    return "adjusted"


def _grant_rows(session: Session, until: datetime) -> Iterator[tuple[Any, ...]]:
    """Grants made before ``until`` with their movements, in grant then entry order (streamed)."""
    M = _movements(until)
    stmt = (
        select(
            Grant.id,
            Grant.source,
            Grant.units,
            Grant.amount_minor,
            Grant.currency,
            Grant.created_at,
            M.c.kind,
            M.c.at,
            M.c.out,
        )
        .outerjoin(M, M.c.grant_id == Grant.id)
        .where(Grant.created_at < until)
        .order_by(Grant.id, M.c.entry_id)
        .execution_options(yield_per=2000)
    )
    yield from session.execute(stmt)


def revenue_report(session: Session, *, since: datetime, until: datetime, by: Period = Period.MONTH) -> RevenueReport:
    """The deferred revenue roll-forward for [since, until) by UTC day or month (see the module doc)."""
    since, until = _utc(since), _utc(until)
    if until <= since:
        raise ValueError("until must be after since")
    starts = period_starts(since, until, by)
    ends = [*starts[1:], until]
    lines: dict[tuple[int, str], Line] = {}
    free_lines: dict[int, Line] = {}

    def index(at: datetime) -> int:
        """The period of a time: -1 before the window."""
        at = _utc(at)
        if at < since:
            return -1
        lo, hi = 0, len(starts) - 1
        while lo < hi:  # the last start <= at
            mid = (lo + hi + 1) // 2
            if starts[mid] <= at:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def line(i: int, currency: str) -> Line:
        key = (i, currency)
        if key not in lines:
            lines[key] = Line(starts[i], ends[i], currency)
        return lines[key]

    def free_line(i: int) -> Line:
        if i not in free_lines:
            free_lines[i] = Line(starts[i], ends[i], "credits")
        return free_lines[i]

    opening: dict[str, int] = {}
    free_opening = 0
    current: int | None = None
    cum = 0
    paid = False
    amount = units = 0
    currency = ""

    for grant_id, source, g_units, g_amount, g_currency, created, kind, at, out in _grant_rows(session, until):
        if grant_id != current:
            current, cum = grant_id, 0
            units, amount = int(g_units), int(g_amount or 0)
            paid = source in PAID_SOURCES and amount > 0
            currency = (g_currency or "").lower() or "unknown"
            i = index(created)
            if paid:
                if i < 0:
                    opening[currency] = opening.get(currency, 0) + amount
                else:
                    line(i, currency).sold += amount
            elif i < 0:
                free_opening += units
            else:
                free_line(i).sold += units
        if kind is None or not out:
            continue
        before = cum * amount // units if paid else cum
        cum += int(out)
        moved = (cum * amount // units if paid else cum) - before
        i = index(at)
        target = opening if paid else None
        if i < 0:
            if target is not None:
                target[currency] = target.get(currency, 0) - moved
            else:
                free_opening -= moved
            continue
        bucket = _bucket(kind)
        row = line(i, currency) if paid else free_line(i)
        setattr(row, bucket, getattr(row, bucket) + moved)

    report = RevenueReport(since=since, until=until, by=by)
    currencies = sorted(set(opening) | {c for _, c in lines})
    for currency in currencies:
        carried = opening.get(currency, 0)
        for i in range(len(starts)):
            row = lines.get((i, currency)) or Line(starts[i], ends[i], currency)
            row.opening = carried
            carried = row.closing
            report.money.append(row)
    carried = free_opening
    for i in range(len(starts)):
        row = free_lines.get(i) or Line(starts[i], ends[i], "credits")
        row.opening = carried
        carried = row.closing
        report.free_credits.append(row)
    return report


def deferred_now(session: Session) -> tuple[dict[str, int], int]:
    """Deferred revenue per currency and free credits outstanding, from the grants' current state alone
    (credits not yet out = remaining + frozen), without reading a single entry."""
    money: dict[str, int] = {}
    free = 0
    stmt = select(Grant.source, Grant.units, Grant.remaining, Grant.frozen, Grant.amount_minor, Grant.currency)
    for source, units, remaining, frozen, amount, currency in session.execute(stmt.execution_options(yield_per=2000)):
        outstanding = int(remaining) + int(frozen)
        if source in PAID_SOURCES and amount:
            out = int(units) - outstanding
            key = (currency or "").lower() or "unknown"
            money[key] = money.get(key, 0) + int(amount) - out * int(amount) // int(units)
        else:
            free += outstanding
    return money, free


def verify(session: Session, report: RevenueReport) -> list[str]:
    """Problems with a report that reaches the present: each line must roll forward (it does by construction),
    and the last closing balances must equal what the grants hold now (an independent computation)."""
    problems = []
    for lines in (report.money, report.free_credits):
        for a, b in pairwise(lines):
            if a.currency == b.currency and b.period_start == a.period_end and b.opening != a.closing:
                problems.append(f"{b.currency} {b.period_start.date()}: opening {b.opening} != closing {a.closing}")
    money, free = deferred_now(session)
    closing = {x.currency: x.closing for x in report.money if x.period_end == report.until}
    for currency in sorted(set(money) | set(closing)):
        if money.get(currency, 0) != closing.get(currency, 0):
            problems.append(
                f"{currency}: closing deferred {closing.get(currency, 0)} != grants now {money.get(currency, 0)}"
            )
    free_closing = report.free_credits[-1].closing if report.free_credits else 0
    if free != free_closing:
        problems.append(f"free credits: closing {free_closing} != grants now {free}")
    return problems
