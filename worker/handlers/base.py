"""What every event handler gets and may return.

A handler takes an :class:`EventContext` and returns an :class:`Outcome` (processed, or ignored with a reason),
or raises :class:`PrerequisiteMissing` when the event refers to something not yet applied (a refund before its
payment's grant). Anything else it raises is an error: transient ones are retried, others mark the event failed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from ledger.config import BillingConfig
from ledger.inbox import EventStatus
from reconciliation.gateway import StripeReader


@dataclass(frozen=True, slots=True)
class ClaimedEvent:
    """The stored event being processed (read once; its status is written back in bulk by the processor)."""

    id: int
    event_id: str
    type: str
    created: datetime
    customer_id: str | None
    status: EventStatus
    attempts: int
    version: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a handler did: ``processed`` with a note, or ``ignored`` with the reason."""

    ignored: bool
    note: str

    @classmethod
    def processed(cls, note: str = "") -> Outcome:
        return cls(ignored=False, note=note)

    @classmethod
    def ignore(cls, reason: str) -> Outcome:
        return cls(ignored=True, note=reason)


class PrerequisiteMissing(Exception):
    """The event needs something that has not landed yet; re-run it when one of ``awaited_ids`` gets a grant."""

    def __init__(self, reason: str, awaited_ids: list[str]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.awaited_ids = [a for a in dict.fromkeys(awaited_ids) if a]


class PermanentEventError(Exception):
    """The event cannot be applied as it is (bad shape, unconfigured plan): a person must look at it."""


class GatewayUnavailable(PermanentEventError):
    """The handler needs Stripe (line items, a fresh object) but no gateway is configured."""


@dataclass(slots=True)
class EventContext:
    """One stored event being processed, with the session of its transaction and the outside world."""

    session: Session
    row: ClaimedEvent
    event: Mapping[str, Any]
    config: BillingConfig
    gateway: StripeReader | None
    # Stripe ids that got a grant while handling this event: waiting events for them are re-run afterwards.
    linked_ids: set[str] = field(default_factory=set)

    @property
    def obj(self) -> Mapping[str, Any]:
        data = self.event.get("data")
        obj = data.get("object") if isinstance(data, Mapping) else None
        return obj if isinstance(obj, Mapping) else {}

    @property
    def previous_attributes(self) -> Mapping[str, Any]:
        data = self.event.get("data")
        prev = data.get("previous_attributes") if isinstance(data, Mapping) else None
        return prev if isinstance(prev, Mapping) else {}

    @property
    def created(self) -> datetime:
        created = self.row.created
        return created if created.tzinfo else created.replace(tzinfo=UTC)

    @property
    def event_id(self) -> str:
        return self.row.event_id

    def require_gateway(self, why: str) -> StripeReader:
        if self.gateway is None:
            raise GatewayUnavailable(f"needs Stripe to {why}, and no Stripe gateway is configured")
        return self.gateway


def stripe_id(value: object) -> str | None:
    """An id from a field that may hold the id or the expanded object."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, Mapping):
        inner = value.get("id")
        return inner if isinstance(inner, str) and inner else None
    return None


def as_int(value: object, default: int = 0) -> int:
    """An integer field (money in minor units), refusing floats and bools."""
    if isinstance(value, bool) or value is None:
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise PermanentEventError(f"expected an integer, got {value!r}")


def timestamp(value: object) -> datetime | None:
    """A Stripe unix timestamp as an aware datetime."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return datetime.fromtimestamp(value, tz=UTC)


def metadata(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """The object's metadata, or an empty mapping."""
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}
