"""PostgreSQL's one-round-trip consumption (a plpgsql function created by migration 0001)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from ledger.consume import ConsumeResult
    from ledger.pricing import UsageInput


def enabled(session: Session) -> bool:
    """Whether consumption goes through the PostgreSQL function."""
    return False


def consume(
    session: Session,
    customer_id: str,
    *,
    request_id: str,
    charge: int,
    digest: str,
    usage: UsageInput | None,
    actor: str,
    reason: str,
    now: datetime,
) -> ConsumeResult:
    """Consume in one round trip."""
    raise NotImplementedError
