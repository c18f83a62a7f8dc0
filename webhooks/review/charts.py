"""The runs page's daily chart: credits granted, money paid (Stripe against the ledger), provider cost.

Sums are per UTC day over a window, each a GROUP BY on an indexed time column. The chart is inline SVG built
here on the server (no JavaScript, nothing from other hosts); every bar has a <title> tooltip, and the page
also prints the numbers in a table.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from html import escape
from typing import Any

from sqlalchemy import BigInteger, Date, Text, cast, func, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from ledger.db import is_sqlite
from ledger.inbox import StripeEvent
from ledger.models import Grant, GrantSettlement, UsageRecord
from ledger.money import exponent, to_major

# Stripe's paid amounts: one charge.succeeded per successful payment, top-ups and invoices alike.
# https://docs.stripe.com/api/events/types#event_types-charge.succeeded
PAID_EVENT_TYPE = "charge.succeeded"
# Events saying a grant's payment (payment intent, invoice, checkout session or charge) was paid.
PAID_TYPES = (
    "payment_intent.succeeded",
    "invoice.paid",
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "charge.succeeded",
)


@dataclass
class DayPoint:
    """One UTC day of the window."""

    day: date
    credits_granted: int = 0
    stripe_paid: dict[str, int] = field(default_factory=dict)  # currency -> minor units
    ledger_paid: dict[str, int] = field(default_factory=dict)  # currency -> minor units the grants record
    provider_cost_usd: Decimal = Decimal(0)


@dataclass
class DailySeries:
    """The window's days and the currency the money panel shows."""

    days: list[DayPoint]
    currency: str
    currencies: list[str]

    @property
    def totals(self) -> dict[str, object]:
        """Sums over the window, for the table's footer."""
        return {
            "credits_granted": sum(d.credits_granted for d in self.days),
            "stripe_paid": sum(d.stripe_paid.get(self.currency, 0) for d in self.days),
            "ledger_paid": sum(d.ledger_paid.get(self.currency, 0) for d in self.days),
            "provider_cost_usd": sum((d.provider_cost_usd for d in self.days), Decimal(0)),
        }


def _day(value: object) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value)[:10])


def _day_of(session: Session, column: Any) -> Any:
    if is_sqlite(session):
        return func.date(column)
    return cast(func.timezone("UTC", column), Date)


def _payload_field(session: Session, name: str) -> Any:
    if is_sqlite(session):
        return func.json_extract(cast(StripeEvent.payload, Text), f"$.data.object.{name}")
    return cast(func.convert_from(StripeEvent.payload, "UTF8"), JSONB)[("data", "object", name)].astext


def daily_series(session: Session, start: datetime, end: datetime) -> DailySeries:
    """Per-day sums over [start, end): grants' credits and payments, Stripe's charges, provider cost."""
    points: dict[date, DayPoint] = {}
    d = start.date()
    while d < end.date() or (d == end.date() and end.time() != datetime.min.time()):  # end is exclusive
        points[d] = DayPoint(day=d)
        d += timedelta(days=1)

    def point(value: object) -> DayPoint | None:
        return points.get(_day(value))

    # Ledger money is dated by when Stripe says it was paid (the first paid event about the grant's payment, else
    # its charge's time), not when the worker applied it, so it lines up with Stripe's series; a grant without
    # a payment (a promotion) by when it was made. A grant is applied after it is paid: created_at >= start.
    paid_event = (
        select(func.min(StripeEvent.created))
        .where(StripeEvent.object_id == Grant.stripe_object_id, StripeEvent.type.in_(PAID_TYPES))
        .correlate(Grant)
        .scalar_subquery()
    )
    paid_at = func.coalesce(paid_event, GrantSettlement.paid_at, Grant.created_at)
    dated = (
        select(
            paid_at.label("paid_at"),
            func.coalesce(func.lower(Grant.currency), "").label("currency"),
            Grant.units,
            func.coalesce(Grant.amount_minor, 0).label("minor"),
        )
        .outerjoin(GrantSettlement, GrantSettlement.grant_id == Grant.id)
        .where(Grant.created_at >= start)
        .subquery("dated")
    )
    grant_day = _day_of(session, dated.c.paid_at)
    grants = (
        select(grant_day, dated.c.currency, func.sum(dated.c.units), func.sum(dated.c.minor))
        .where(dated.c.paid_at >= start, dated.c.paid_at < end)
        .group_by(grant_day, dated.c.currency)
    )
    for day, cur, units, paid in session.execute(grants):
        p = point(day)
        if p is not None:
            p.credits_granted += int(units or 0)
            if cur:
                p.ledger_paid[cur] = p.ledger_paid.get(cur, 0) + int(paid or 0)

    event_day = _day_of(session, StripeEvent.created)
    event_currency = func.lower(_payload_field(session, "currency"))
    stripe = (
        select(event_day, event_currency, func.sum(cast(_payload_field(session, "amount"), BigInteger)))
        .where(StripeEvent.type == PAID_EVENT_TYPE, StripeEvent.created >= start, StripeEvent.created < end)
        .group_by(event_day, event_currency)
    )
    for day, cur, paid in session.execute(stripe):
        p = point(day)
        if p is not None and cur:
            p.stripe_paid[cur] = p.stripe_paid.get(cur, 0) + int(paid or 0)

    usage_day = _day_of(session, UsageRecord.occurred_at)
    cost = (
        select(usage_day, func.sum(UsageRecord.provider_cost_usd))
        .where(UsageRecord.occurred_at >= start, UsageRecord.occurred_at < end)
        .group_by(usage_day)
    )
    for day, total in session.execute(cost):
        p = point(day)
        if p is not None:
            p.provider_cost_usd += Decimal(str(total or 0))

    money: dict[str, int] = defaultdict(int)
    for p in points.values():
        for cur, v in (*p.stripe_paid.items(), *p.ledger_paid.items()):
            money[cur] += v
    currencies = sorted(money, key=lambda c: -money[c])
    return DailySeries(
        days=list(points.values()), currency=currencies[0] if currencies else "usd", currencies=currencies
    )


# --- SVG -----------------------------------------------------------------------------------------------------

WIDTH = 960
PANEL_HEIGHT = 120
LEFT = 90
RIGHT = 12
TOP_PAD = 26
GAP = 58
COLORS = {"credits": "#2f5bd3", "stripe": "#12b76a", "ledger": "#1d2330", "cost": "#f79009"}


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    exp = 10 ** (len(str(int(value))) - 1) if value >= 1 else 1
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exp:
            return float(step * exp)
    return float(value)


def render_svg(series: DailySeries) -> str:
    """Three stacked panels sharing the day axis: credits granted; Stripe paid vs ledger paid; provider cost."""
    days = series.days
    n = max(len(days), 1)
    plot_w = WIDTH - LEFT - RIGHT
    slot = plot_w / n
    cur = series.currency
    panels: list[tuple[str, str, list[float], list[float] | None, str]] = [
        ("Credits granted", "credits", [float(d.credits_granted) for d in days], None, "{:,.0f}"),
        (
            f"Paid ({cur.upper()}): Stripe charges, ledger grants as line",
            "stripe",
            [float(to_major(d.stripe_paid.get(cur, 0), cur)) for d in days],
            [float(to_major(d.ledger_paid.get(cur, 0), cur)) for d in days],
            f"{{:,.{exponent(cur)}f}}",
        ),
        ("Provider cost (USD, recorded usage)", "cost", [float(d.provider_cost_usd) for d in days], None, "{:,.2f}"),
    ]
    height = TOP_PAD + len(panels) * (PANEL_HEIGHT + GAP) + 10
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" role="img" '
        'aria-label="Daily credits granted, paid amounts and provider cost" '
        'font-family="system-ui, sans-serif" font-size="11">'
    ]
    for index, (title, color_key, values, line, fmt) in enumerate(panels):
        top = TOP_PAD + index * (PANEL_HEIGHT + GAP)
        bottom = top + PANEL_HEIGHT
        peak = _nice_max(max([*values, *(line or []), 0.0]))
        if fmt == "{:,.0f}":
            peak = max(peak, 10.0)  # whole numbers: keep the mid tick a whole number too
        out.append(f'<text x="{LEFT}" y="{top - 10}" font-weight="600" fill="#1d2330">{escape(title)}</text>')
        for frac in (0.0, 0.5, 1.0):
            y = bottom - frac * PANEL_HEIGHT
            out.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e6ec"/>')
            tick = escape(fmt.format(peak * frac))
            out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#667085">{tick}</text>')
        for i, (d, v) in enumerate(zip(days, values, strict=True)):
            h = (v / peak) * PANEL_HEIGHT if peak else 0
            bar = min(slot * 0.7, 48.0)
            x = LEFT + i * slot + (slot - bar) / 2
            label = f"{d.day.isoformat()}: {fmt.format(v)}"
            if line is not None:
                label += f" (ledger {fmt.format(line[i])})"
            out.append(
                f'<rect x="{x:.1f}" y="{bottom - h:.1f}" width="{max(bar, 1):.1f}" height="{h:.1f}" '
                f'fill="{COLORS[color_key]}"><title>{escape(label)}</title></rect>'
            )
        if line is not None:
            pts = " ".join(
                f"{LEFT + i * slot + slot / 2:.1f},{bottom - (v / peak) * PANEL_HEIGHT:.1f}" for i, v in enumerate(line)
            )
            out.append(f'<polyline points="{pts}" fill="none" stroke="{COLORS["ledger"]}" stroke-width="2"/>')
            for i, v in enumerate(line):
                cx = LEFT + i * slot + slot / 2
                cy = bottom - (v / peak) * PANEL_HEIGHT
                out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="2.5" fill="{COLORS["ledger"]}"/>')
        every = max(1, n // 10)
        for i, d in enumerate(days):
            if i % every == 0 or i == n - 1:
                x = LEFT + i * slot + slot / 2
                stamp = d.day.strftime("%m-%d")
                out.append(f'<text x="{x:.1f}" y="{bottom + 13}" text-anchor="middle" fill="#667085">{stamp}</text>')
    out.append("</svg>")
    return "".join(out)
