"""Per-object applied versions: a state change applies only when its event is newer than what was applied.

Stripe does not deliver in order. Each stateful Stripe object (a subscription, a dispute) has a row holding the
``created`` time of the newest event applied to it; the row is locked while an event for that object is applied,
so two workers compare against the same version.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Table, bindparam, func, select, update
from sqlalchemy.orm import Session

from ledger.posting import for_each_backend
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


def _claim_version_statement(dialect: Any) -> Any:
    # Insert the object's first version, or replace an older one; an equal or newer one stays. The conflict
    # locks the row either way, so the comparison holds until this transaction ends.
    stmt = dialect.insert(_VERSIONS).values(
        object_id=bindparam("object_id"),
        object_type=bindparam("object_type"),
        applied_created=bindparam("created"),
        event_id=bindparam("event_id"),
        state=bindparam("state"),
    )
    new = stmt.excluded
    return stmt.on_conflict_do_update(
        index_elements=["object_id"],
        set_={
            "object_type": new.object_type,
            "applied_created": new.applied_created,
            "event_id": new.event_id,
            "state": new.state,
            "updated_at": func.now(),
        },
        where=_VERSIONS.c.applied_created < new.applied_created,
    ).returning(_VERSIONS.c.object_id)


_CLAIM_VERSION = for_each_backend(_claim_version_statement)
_APPLIED = select(_VERSIONS.c.applied_created, _VERSIONS.c.event_id, _VERSIONS.c.state).where(
    _VERSIONS.c.object_id == bindparam("oid")
)
_RECORD_VERSION = (
    update(_VERSIONS)
    .where(_VERSIONS.c.object_id == bindparam("oid"))
    .values(applied_created=bindparam("created"), event_id=bindparam("eid"), state=bindparam("new_state"))
)


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def claim_version(
    session: Session, object_id: str, object_type: str, *, created: datetime, event_id: str, state: str | None
) -> tuple[Freshness, AppliedVersion | None]:
    """Record an event as its object's applied version when it is newer, in one statement; say how it compared.

    NEWER means recorded (the caller applies the change in this same transaction, so both commit or neither);
    otherwise nothing changed, and the version already applied comes back. The row stays locked either way.
    """
    conn = session.connection()
    params = {"object_id": object_id, "object_type": object_type, "created": created, "event_id": event_id}
    if conn.execute(_CLAIM_VERSION[conn.dialect.name], params | {"state": state}).first() is not None:
        return Freshness.NEWER, None
    row = conn.execute(_APPLIED, {"oid": object_id}).one()
    current = AppliedVersion(_aware(row.applied_created), row.event_id, row.state)
    return freshness(current, created=created, event_id=event_id), current


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
    """Record a version chosen after :func:`claim_version` (a timestamp tie Stripe settled; the row is locked)."""
    params = {"oid": object_id, "created": created, "eid": event_id, "new_state": state}
    updated = session.connection().execute(_RECORD_VERSION, params).rowcount
    assert updated == 1, "claim_version() first"
