"""Per-object applied versions: a state change applies only when its event is newer than what was applied.

Stripe does not deliver in order. Each stateful Stripe object (a subscription, a dispute) has a row holding the
``created`` time of the newest event applied to it; the row is locked while an event for that object is applied,
so two workers compare against the same version.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from worker.models import ObjectVersion


class Freshness(StrEnum):
    NEWER = "newer"  # apply it
    OLDER = "older"  # a newer state is already applied: skip
    SAME_EVENT = "same_event"  # this very event was applied before (a replay): skip
    TIE = "tie"  # same time, another event: fetch the object to decide


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _insert(session: Session) -> Any:
    return (postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert)(ObjectVersion)


def lock_version(session: Session, object_id: str, object_type: str) -> ObjectVersion | None:
    """Lock (and return) the applied version of a Stripe object; None when nothing was applied yet.

    One upsert: a placeholder row is created for a new object, and the row is locked either way (an
    ``ON CONFLICT DO UPDATE`` takes the row lock), so the lock also covers the first event for an object.
    """
    stmt = (
        _insert(session)
        .values(
            object_id=object_id,
            object_type=object_type,
            applied_created=datetime.fromtimestamp(0, tz=UTC),
            event_id="",
        )
        .on_conflict_do_update(index_elements=["object_id"], set_={"object_type": object_type})
        .returning(ObjectVersion)
    )
    row = session.scalars(stmt, execution_options={"populate_existing": True}).one()
    return None if row.event_id == "" else row


def freshness(current: ObjectVersion | None, *, created: datetime, event_id: str) -> Freshness:
    """How an event compares with the version already applied for its object."""
    if current is None:
        return Freshness.NEWER
    if current.event_id == event_id:
        return Freshness.SAME_EVENT
    applied = _aware(current.applied_created)
    created = _aware(created)
    if created > applied:
        return Freshness.NEWER
    if created < applied:
        return Freshness.OLDER
    return Freshness.TIE


def record_version(session: Session, object_id: str, *, created: datetime, event_id: str, state: str | None) -> None:
    """Remember the event just applied as the object's newest version (the row is already locked)."""
    row = session.get(ObjectVersion, object_id)
    assert row is not None, "lock_version() first"
    row.applied_created = created
    row.event_id = event_id
    row.state = state
