"""The ledger's usage over a window, for the checks that sum it: whole UTC days from the ``usage_daily``
roll-up (a row per account, day and key instead of a row per call), the partial days at either end from the
usage rows themselves. Both give the same sums; ``ledger.check`` proves the roll-up equals the rows.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import and_, literal, or_, select, union_all
from sqlalchemy.orm import Session

from ledger.models import UsageDaily, UsageRecord, usd_as_integer

# The key and sums every window query may group or add (names shared by the roll-up and the usage rows).
KEY = ("account_id", "provider", "model", "workspace", "feature", "environment", "billable")
SUMS = ("input_tokens", "output_tokens", "cached_tokens", "units", "provider_cost_usd")


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


def whole_days(since: datetime, until: datetime) -> tuple[date, date]:
    """The UTC days wholly inside [since, until), as [first, end); empty when first >= end."""
    since, until = since.astimezone(UTC), until.astimezone(UTC)
    first = since.date() if since == _midnight(since.date()) else since.date() + timedelta(days=1)
    return first, until.date()


def usage_in_window(session: Session, since: datetime, until: datetime, *, account_id: int | None = None) -> Any:
    """A subquery of the usage in [since, until): the KEY columns, ``requests`` and the SUMS, one row per
    roll-up row of a whole day and per usage row of a partial day. Callers aggregate it.

    Its ``provider_cost_usd`` is the roll-up's integer 10^-10 USD (``UsdAmount(integer=True)``): in SQL, compare
    it with that scale; its sums come back as Decimal USD."""
    D, U = UsageDaily, UsageRecord
    first, end = whole_days(since, until)
    cost = usd_as_integer(U.provider_cost_usd, session.get_bind().dialect.name).label("provider_cost_usd")
    rolled = select(*(getattr(D, c) for c in KEY), D.requests, *(getattr(D, c) for c in SUMS))
    rows = select(
        *(getattr(U, c) for c in KEY),
        literal(1).label("requests"),
        *(cost if c == "provider_cost_usd" else getattr(U, c) for c in SUMS),
    )
    if account_id is not None:
        rolled, rows = rolled.where(D.account_id == account_id), rows.where(U.account_id == account_id)
    if first >= end:  # no whole day: every row from the usage records
        return rows.where(U.occurred_at >= since, U.occurred_at < until).subquery("usage")
    rolled = rolled.where(D.day >= first, D.day < end)
    rows = rows.where(
        or_(
            and_(U.occurred_at >= since, U.occurred_at < _midnight(first)),
            and_(U.occurred_at >= _midnight(end), U.occurred_at < until),
        )
    )
    return union_all(rolled, rows).subquery("usage")
