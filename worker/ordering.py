"""Per-object applied versions: a state change applies only when its event is newer than what was applied.

Stripe does not deliver in order. Each stateful Stripe object (a subscription, a dispute) has a row holding the
``created`` time of the newest event applied to it; the row is locked while an event for that object is applied,
so two workers compare against the same version.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import Table, bindparam, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from worker.models import ObjectVersion


class Freshness(StrEnum):
    NEWER = "newer"  # apply it
    OLDER = "older"  # a newer state is already applied: skip
    SAME_EVENT = "same_event"  # this very event was applied before (a replay): skip
    TIE = "tie"  # same time, another event: fetch the object to decide


@dataclass(frozen=True, slots=True)
class AppliedVersion:
    """The newest event applied for a Stripe object: its Stripe time, its id and the status it carried."""

    applied_created: datetime
    event_id: str
    state: str | None


_VERSIONS: Table = ObjectVersion.__table__  # type: ignore[assignment]
_NEVER = datetime.fromtimestamp(0, tz=UTC)
# One upsert: a placeholder row is created for a new object, and the row is locked either way (an
# ``ON CONFLICT DO UPDATE`` takes the row lock), so the lock also covers the first event for an object.
_LOCK_VERSION = {
    name: dialect.insert(_VERSIONS)
    .values(object_id=bindparam("object_id"), object_type=bindparam("object_type"), applied_created=_NEVER, event_id="")
    .on_conflict_do_update(index_elements=["object_id"], set_={"object_type": bindparam("object_type")})
    .returning(_VERSIONS.c.applied_created, _VERSIONS.c.event_id, _VERSIONS.c.state)
    for name, dialect in (("postgresql", postgresql), ("sqlite", sqlite))
}
_RECORD_VERSION = (
    update(_VERSIONS)
    .where(_VERSIONS.c.object_id == bindparam("oid"))
    .values(applied_created=bindparam("created"), event_id=bindparam("eid"), state=bindparam("new_state"))
)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def lock_version(session: Session, object_id: str, object_type: str) -> AppliedVersion | None:
    """Lock (and return) the applied version of a Stripe object; None when nothing was applied yet."""
    statement = _LOCK_VERSION[session.get_bind().dialect.name]
    row = session.connection().execute(statement, {"object_id": object_id, "object_type": object_type}).one()
    return None if row.event_id == "" else AppliedVersion(_aware(row.applied_created), row.event_id, row.state)


def freshness(current: AppliedVersion | None, *, created: datetime, event_id: str) -> Freshness:
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
    params = {"oid": object_id, "created": created, "eid": event_id, "new_state": state}
    updated = session.connection().execute(_RECORD_VERSION, params).rowcount
    assert updated == 1, "lock_version() first"
