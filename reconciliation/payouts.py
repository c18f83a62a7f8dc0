"""The payouts table: each Stripe payout a reconciliation run saw, with its tie-out, kept for people to read.

The payouts check (``reconciliation.checks.check_payouts``) works out each payout of the run's window: the sum of
its balance transactions by type and whether they, and the ledger's side of each, agree with it. The engine keeps
that here in the run's own transaction, one row per payout: a later run covering the same payout updates the row
(its status may have gone from in_transit to paid, a mismatch may have been fixed), never adds a second one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ledger.money import format_money
from reconciliation.models import Payout

PAGE_ROWS = 500


def _when(value: Any) -> datetime | None:
    """A time from a tie-out dict: ISO text, or Stripe's Unix seconds (a payout's arrival_date)."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, tz=UTC)
    if isinstance(value, str) and value:
        parsed = datetime.fromisoformat(value)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def record_payouts(session: Session, run_id: int, ties: Iterable[Mapping[str, Any]], *, now: datetime) -> int:
    """Upsert one row per payout tied out by run ``run_id``; returns how many were written."""
    values = [
        {
            "id": t["payout"],
            "amount_minor": int(t.get("amount") or 0),
            "currency": str(t.get("currency") or "").lower()[:3],
            "status": str(t.get("status") or "")[:32],
            "created": _when(t.get("created")) or now,
            "arrival_date": _when(t.get("arrival_date")),
            "transactions": int(t.get("transactions") or 0),
            "net_minor": None if t.get("net") is None else int(t["net"]),
            "by_type": dict(t.get("by_type") or {}),
            "tie_out": str(t.get("tie_out") or "not_checked"),
            "differences": int(t.get("differences") or 0),
            "run_id": run_id,
            "first_seen_at": now,
            "checked_at": now,
        }
        for t in ties
    ]
    if not values:
        return 0
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    for start in range(0, len(values), PAGE_ROWS):
        stmt = insert(Payout)
        keep = ("id", "first_seen_at")
        stmt = stmt.on_conflict_do_update(
            index_elements=["id"], set_={c: stmt.excluded[c] for c in values[0] if c not in keep}
        )
        session.execute(stmt, values[start : start + PAGE_ROWS])
    return len(values)


def list_payouts(
    session: Session, *, since: datetime | None = None, until: datetime | None = None, limit: int | None = None
) -> list[Payout]:
    """Payouts created in [since, until) (either end open), newest first."""
    stmt = select(Payout).order_by(Payout.created.desc(), Payout.id.desc())
    if since is not None:
        stmt = stmt.where(Payout.created >= since)
    if until is not None:
        stmt = stmt.where(Payout.created < until)
    if limit is not None:
        stmt = stmt.limit(limit)
    return list(session.scalars(stmt))


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def payout_dict(p: Payout) -> dict[str, Any]:
    """A JSON-ready view: money in exact minor units of ``currency``, with its formatted form beside it."""
    return {
        "payout": p.id,
        "status": p.status,
        "created": _iso(p.created),
        "arrival_date": _iso(p.arrival_date),
        "currency": p.currency,
        "amount_minor": p.amount_minor,
        "amount": format_money(p.amount_minor, p.currency),
        "transactions": p.transactions,
        "net_minor": p.net_minor,
        "net": None if p.net_minor is None else format_money(p.net_minor, p.currency),
        "by_type": p.by_type,
        "tie_out": p.tie_out,
        "differences": p.differences,
        "run_id": p.run_id,
        "checked_at": _iso(p.checked_at),
    }
