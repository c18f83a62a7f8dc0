"""The revenue page: the deferred revenue roll-forward per month and currency, as a waterfall and a table.

The figures are ``ledger.revenue.revenue_report`` (see README, "Revenue, in a finance reader's words"); the chart
is inline SVG built here (no JavaScript, nothing from other hosts), one group of bars per month.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from html import escape
from typing import Any

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from ledger.db import session_factory
from ledger.money import format_money, to_major
from ledger.revenue import Line, Period, revenue_report, verify
from reconciliation.payouts import list_payouts, payout_dict
from webhooks.review.templating import render
from webhooks.review.views import bad_request

MAX_MONTHS = 36
DEFAULT_MONTHS = 12
SERIES = (
    ("sold", "#2f5bd3"),
    ("recognized", "#12b76a"),
    ("expired", "#f79009"),
    ("clawed_back", "#d92d20"),
    ("closing", "#1d2330"),
)


def _month(value: str) -> date:
    """A YYYY-MM month; ValueError outside the years a window can reach (1970 to 9998)."""
    year, month = value.split("-")
    if not (value.isascii() and len(year) == 4 and year.isdigit() and 1970 <= int(year) <= 9998 and month.isdigit()):
        raise ValueError(f"not a month: {value!r}")
    return date(int(year), int(month), 1)


def _add_months(d: date, n: int) -> date:
    total = d.year * 12 + d.month - 1 + n
    return date(total // 12, total % 12 + 1, 1)


def waterfall_svg(lines: list[Line], currency: str) -> str:
    """Grouped bars per month: sold, recognized, expired, clawed back, closing deferred."""
    width, height, left, top, bottom = 960, 220, 90, 16, 28
    values = [[float(to_major(getattr(x, name), currency)) for name, _ in SERIES] for x in lines]
    peak = max([v for group in values for v in group] + [1.0])
    slot = (width - left - 12) / max(len(lines), 1)
    bar = min(slot / (len(SERIES) + 1), 18.0)
    plot = height - top - bottom
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="Deferred revenue waterfall, {escape(currency.upper())}" font-family="system-ui, sans-serif" '
        'font-size="11">'
    ]
    for frac in (0.0, 0.5, 1.0):
        y = top + plot - frac * plot
        out.append(f'<line x1="{left}" x2="{width - 12}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e6ec"/>')
        label = escape(f"{peak * frac:,.0f}")
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#667085">{label}</text>')
    for i, (line, group) in enumerate(zip(lines, values, strict=True)):
        x0 = left + i * slot + (slot - bar * len(SERIES)) / 2
        for j, ((name, color), v) in enumerate(zip(SERIES, group, strict=True)):
            h = max(v, 0.0) / peak * plot
            title = f"{line.period_start.strftime('%Y-%m')} {name.replace('_', ' ')}: " + format_money(
                getattr(line, name), currency
            )
            out.append(
                f'<rect x="{x0 + j * bar:.1f}" y="{top + plot - h:.1f}" width="{bar - 1:.1f}" height="{h:.1f}" '
                f'fill="{color}"><title>{escape(title)}</title></rect>'
            )
        stamp = line.period_start.strftime("%Y-%m")
        out.append(
            f'<text x="{left + i * slot + slot / 2:.1f}" y="{height - 10}" text-anchor="middle" '
            f'fill="#667085">{stamp}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def _context(first: date, last: date) -> dict[str, Any]:
    since = datetime(first.year, first.month, 1, tzinfo=UTC)
    end = _add_months(last, 1)
    until = datetime(end.year, end.month, 1, tzinfo=UTC)
    with session_factory()() as session:
        report = revenue_report(session, since=since, until=until, by=Period.MONTH)
        problems = verify(session, report) if until >= datetime.now(UTC) else []
        payouts = payouts_seen(session)
    currencies = sorted({x.currency for x in report.money})
    by_currency = {c: [x for x in report.money if x.currency == c] for c in currencies}
    return {
        "first": first.strftime("%Y-%m"),
        "last": last.strftime("%Y-%m"),
        "by_currency": by_currency,
        "charts": {c: waterfall_svg(lines, c) for c, lines in by_currency.items()},
        "free": report.free_credits,
        "problems": problems,
        "series": SERIES,
        "payouts": payouts,
    }


def payouts_seen(session: Session, limit: int = 200) -> list[dict[str, Any]]:
    """The newest payouts in the payouts table, each with its tie-out as the latest run that covered it saw it."""
    return [payout_dict(p) for p in list_payouts(session, limit=limit)]


async def revenue_page(request: Request) -> Response:
    """Deferred revenue, recognized revenue, breakage and clawbacks per month and currency."""
    params = request.query_params
    today = datetime.now(UTC).date().replace(day=1)
    try:
        last = _month(params["to"]) if params.get("to") else today
        first = _month(params["from"]) if params.get("from") else _add_months(last, -(DEFAULT_MONTHS - 1))
    except ValueError:
        return bad_request(request, "from and to are months (YYYY-MM).")
    if first > last or (last.year - first.year) * 12 + last.month - first.month >= MAX_MONTHS:
        return bad_request(request, f"Give from on or before to, at most {MAX_MONTHS} months apart.")
    context = await run_in_threadpool(_context, first, last)
    context.update(section="revenue")
    return render(request, "review/revenue.html", context)
