"""The mismatch review workflow: record what a run found, close what disappeared, and let people resolve,
ignore or reopen a mismatch with a note. Every status change writes a :class:`MismatchAction` audit row.

All functions take a session and never commit: the caller (CLI command, HTTP handler, engine) owns the
transaction.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Select, and_, or_, select
from sqlalchemy.orm import Session

from ledger.errors import InvalidRequest
from ledger.outbox import emit
from ledger.suspensions import lift_suspensions
from reconciliation.models import (
    ActionKind,
    Mismatch,
    MismatchAction,
    MismatchKind,
    MismatchStatus,
    ReconciliationRun,
    RunStatus,
)


class UnknownMismatch(InvalidRequest):
    """No mismatch has this id."""

    code = "unknown_mismatch"

    def __init__(self, mismatch_id: int) -> None:
        super().__init__(f"unknown mismatch {mismatch_id}")
        self.mismatch_id = mismatch_id


class InvalidTransition(InvalidRequest):
    """The mismatch cannot take this action from its current status."""

    code = "invalid_transition"


@dataclass(frozen=True)
class Finding:
    """One disagreement as a check reports it, before it is matched to a stored mismatch."""

    kind: MismatchKind
    identity: str  # what disagrees, never the amounts: the fingerprint is derived from kind + identity
    summary: str
    customer_id: str | None = None
    currency: str | None = None
    unit: str = "minor"
    expected: Decimal | int | None = None
    actual: Decimal | int | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    occurred_at: datetime | None = None
    scope_key: str | None = None

    @property
    def fingerprint(self) -> str:
        """Stable across runs: the same disagreement always has the same fingerprint."""
        return hashlib.sha256(f"{self.kind.value}|{self.identity}".encode()).hexdigest()

    @property
    def amounts_digest(self) -> str:
        """Changes when the amounts change, which reopens a resolved mismatch."""
        parts = [_canonical(self.expected), _canonical(self.actual), self.currency or "", self.unit]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _canonical(value: Decimal | int | None) -> str:
    if value is None:
        return "-"
    d = Decimal(value)
    return format(d.normalize(), "f") if d else "0"


def _amount(value: Decimal | int | None) -> Decimal | None:
    return None if value is None else Decimal(value)


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(value: datetime | None) -> str | None:
    # SQLite hands back naive datetimes; everything stored is UTC.
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def _audit(
    session: Session,
    mismatch: Mismatch,
    *,
    action: ActionKind,
    actor: str,
    note: str,
    from_status: MismatchStatus | None,
    run_id: int | None = None,
    at: datetime | None = None,
) -> MismatchAction:
    row = MismatchAction(
        mismatch_id=mismatch.id,
        run_id=run_id,
        actor=actor,
        action=action,
        note=note,
        from_status=from_status,
        to_status=mismatch.status,
        at=at or _now(),
    )
    session.add(row)
    return row


# --- what runs do ----------------------------------------------------------------------------------------------


def record_finding(session: Session, run: ReconciliationRun, finding: Finding, *, now: datetime) -> str:
    """Insert or update the mismatch for a finding; return what happened (new, updated, unchanged, reopened,
    reappeared)."""
    existing = session.scalars(select(Mismatch).where(Mismatch.fingerprint == finding.fingerprint)).one_or_none()
    if existing is None:
        mismatch = Mismatch(
            fingerprint=finding.fingerprint,
            kind=finding.kind,
            status=MismatchStatus.OPEN,
            customer_id=finding.customer_id,
            currency=finding.currency,
            unit=finding.unit,
            expected_amount=_amount(finding.expected),
            actual_amount=_amount(finding.actual),
            amounts_digest=finding.amounts_digest,
            summary=finding.summary,
            evidence=finding.evidence,
            occurred_at=finding.occurred_at,
            scope_key=finding.scope_key,
            first_seen_run_id=run.id,
            last_seen_run_id=run.id,
            first_seen_at=now,
            last_seen_at=now,
            status_changed_at=now,
        )
        session.add(mismatch)
        session.flush()
        _audit(
            session,
            mismatch,
            action=ActionKind.DETECTED,
            actor=run.actor,
            note=finding.summary,
            from_status=None,
            run_id=run.id,
            at=now,
        )
        _announce(session, mismatch)
        return "new"

    outcome = "unchanged"
    before = existing.status
    changed_amounts = existing.amounts_digest != finding.amounts_digest
    if before is MismatchStatus.CLOSED:
        existing.status = MismatchStatus.OPEN
        existing.status_changed_at = now
        _audit(
            session,
            existing,
            action=ActionKind.REAPPEARED,
            actor=run.actor,
            note=f"observed again by run {run.id}: {finding.summary}",
            from_status=before,
            run_id=run.id,
            at=now,
        )
        outcome = "reappeared"
    elif changed_amounts and before in (MismatchStatus.RESOLVED, MismatchStatus.IGNORED):
        existing.status = MismatchStatus.OPEN
        existing.status_changed_at = now
        _audit(
            session,
            existing,
            action=ActionKind.AMOUNTS_CHANGED,
            actor=run.actor,
            note=(
                f"reopened by run {run.id}: amounts changed from expected {_canonical(existing.expected_amount)} / "
                f"actual {_canonical(existing.actual_amount)} to expected {_canonical(_amount(finding.expected))} / "
                f"actual {_canonical(_amount(finding.actual))}"
            ),
            from_status=before,
            run_id=run.id,
            at=now,
        )
        outcome = "reopened"
    elif changed_amounts:
        outcome = "updated"
    if changed_amounts or existing.summary != finding.summary or existing.evidence != finding.evidence:
        outcome = "updated" if outcome == "unchanged" else outcome
    existing.expected_amount = _amount(finding.expected)
    existing.actual_amount = _amount(finding.actual)
    existing.amounts_digest = finding.amounts_digest
    existing.currency = finding.currency
    existing.customer_id = finding.customer_id
    existing.unit = finding.unit
    existing.summary = finding.summary
    existing.evidence = finding.evidence
    existing.occurred_at = finding.occurred_at
    existing.scope_key = finding.scope_key
    existing.last_seen_run_id = run.id
    existing.last_seen_at = now
    if outcome in ("reappeared", "reopened"):
        _announce(session, existing)
    return outcome


def _announce(session: Session, mismatch: Mismatch) -> None:
    """``mismatch.opened`` (and ``usage.spike`` for a spike), in the transaction that opens the review item."""
    data = {
        "mismatch_id": mismatch.id,
        "kind": mismatch.kind.value,
        "summary": mismatch.summary,
        "unit": mismatch.unit,
        "currency": mismatch.currency,
        "expected": mismatch.expected_amount,
        "actual": mismatch.actual_amount,
        "occurred_at": mismatch.occurred_at,
    }
    emit(session, "mismatch.opened", mismatch.customer_id, data)
    if mismatch.kind is MismatchKind.USAGE_SPIKE:
        emit(session, "usage.spike", mismatch.customer_id, {**data, "evidence": mismatch.evidence})


def close_unseen(
    session: Session,
    run: ReconciliationRun,
    *,
    windowed_kinds: Sequence[MismatchKind],
    global_kinds: Sequence[MismatchKind],
    scope_keys: Sequence[str],
    now: datetime,
) -> int:
    """Close mismatches this run covered but no longer observed; return how many closed.

    Covered means: a windowed kind that occurred inside the run's window, a state kind (every run sees the
    whole state), or a provider day the run had a report for. Ignored mismatches stay ignored: a person chose
    to stop looking at them.
    """
    covered = [
        and_(
            Mismatch.kind.in_(list(windowed_kinds)),
            Mismatch.occurred_at >= run.since,
            Mismatch.occurred_at < run.until,
            Mismatch.scope_key.is_(None),
        ),
        and_(Mismatch.kind.in_(list(global_kinds)), Mismatch.occurred_at.is_(None)),
    ]
    if scope_keys:
        covered.append(Mismatch.scope_key.in_(list(scope_keys)))
    stmt = (
        select(Mismatch)
        .where(
            Mismatch.status.in_([MismatchStatus.OPEN, MismatchStatus.RESOLVED]),
            Mismatch.last_seen_run_id != run.id,
            or_(*covered),
        )
        .order_by(Mismatch.id)
    )
    closed = 0
    for mismatch in list(session.scalars(stmt)):
        before = mismatch.status
        mismatch.status = MismatchStatus.CLOSED
        mismatch.status_changed_at = now
        _audit(
            session,
            mismatch,
            action=ActionKind.AUTO_CLOSE,
            actor=run.actor,
            note=f"no longer observed by run {run.id} over [{run.since.isoformat()}, {run.until.isoformat()})",
            from_status=before,
            run_id=run.id,
            at=now,
        )
        closed += 1
    return closed


# --- what people do --------------------------------------------------------------------------------------------


def get_mismatch(session: Session, mismatch_id: int) -> Mismatch:
    """The mismatch with this id; raise UnknownMismatch."""
    mismatch = session.get(Mismatch, mismatch_id)
    if mismatch is None:
        raise UnknownMismatch(mismatch_id)
    return mismatch


def _transition(
    session: Session,
    mismatch_id: int,
    *,
    to: MismatchStatus,
    action: ActionKind,
    allowed_from: tuple[MismatchStatus, ...],
    actor: str,
    note: str,
) -> Mismatch:
    if not note or not note.strip():
        raise InvalidRequest("a note is required: say why")
    if not actor or not actor.strip():
        raise InvalidRequest("an actor is required")
    mismatch = session.scalars(select(Mismatch).where(Mismatch.id == mismatch_id).with_for_update()).one_or_none()
    if mismatch is None:
        raise UnknownMismatch(mismatch_id)
    before = mismatch.status
    if before not in allowed_from:
        raise InvalidTransition(f"mismatch {mismatch_id} is {before.value}: cannot {action.value} it")
    now = _now()
    mismatch.status = to
    mismatch.status_changed_at = now
    _audit(session, mismatch, action=action, actor=actor.strip(), note=note.strip(), from_status=before, at=now)
    if mismatch.kind is MismatchKind.USAGE_SPIKE and to in (MismatchStatus.RESOLVED, MismatchStatus.IGNORED):
        # The reviewer's decision lifts a suspension the spike caused; the audit row above says who and why.
        lift_suspensions(session, review_item_id=mismatch.id, actor=actor.strip(), note=note.strip(), now=now)
    session.flush()
    return mismatch


def resolve(session: Session, mismatch_id: int, *, actor: str, note: str) -> Mismatch:
    """Mark a mismatch resolved (someone fixed it or explained it), with a note."""
    return _transition(
        session,
        mismatch_id,
        to=MismatchStatus.RESOLVED,
        action=ActionKind.RESOLVE,
        allowed_from=(MismatchStatus.OPEN, MismatchStatus.IGNORED),
        actor=actor,
        note=note,
    )


def ignore(session: Session, mismatch_id: int, *, actor: str, note: str) -> Mismatch:
    """Mark a mismatch ignored (expected, not worth fixing), with a note."""
    return _transition(
        session,
        mismatch_id,
        to=MismatchStatus.IGNORED,
        action=ActionKind.IGNORE,
        allowed_from=(MismatchStatus.OPEN, MismatchStatus.RESOLVED),
        actor=actor,
        note=note,
    )


def reopen(session: Session, mismatch_id: int, *, actor: str, note: str) -> Mismatch:
    """Reopen a resolved, ignored or closed mismatch, with a note."""
    return _transition(
        session,
        mismatch_id,
        to=MismatchStatus.OPEN,
        action=ActionKind.REOPEN,
        allowed_from=(MismatchStatus.RESOLVED, MismatchStatus.IGNORED, MismatchStatus.CLOSED),
        actor=actor,
        note=note,
    )


def list_actions(session: Session, mismatch_id: int) -> list[MismatchAction]:
    """A mismatch's audit trail, oldest first."""
    return list(
        session.scalars(
            select(MismatchAction).where(MismatchAction.mismatch_id == mismatch_id).order_by(MismatchAction.id)
        )
    )


def mismatch_query(
    *,
    status: MismatchStatus | str | None = None,
    kind: MismatchKind | str | None = None,
    customer_id: str | None = None,
    run_id: int | None = None,
) -> Select[Mismatch]:
    """A SELECT of mismatches matching the filters, oldest first (run: last seen by that run)."""
    stmt = select(Mismatch).order_by(Mismatch.id)
    if status is not None:
        stmt = stmt.where(Mismatch.status == MismatchStatus(status))
    if kind is not None:
        stmt = stmt.where(Mismatch.kind == MismatchKind(kind))
    if customer_id is not None:
        stmt = stmt.where(Mismatch.customer_id == customer_id)
    if run_id is not None:
        stmt = stmt.where(Mismatch.last_seen_run_id == run_id)
    return stmt


def list_mismatches(
    session: Session,
    *,
    status: MismatchStatus | str | None = None,
    kind: MismatchKind | str | None = None,
    customer_id: str | None = None,
    run_id: int | None = None,
    limit: int | None = None,
) -> list[Mismatch]:
    """Mismatches matching the filters, oldest first."""
    stmt = mismatch_query(status=status, kind=kind, customer_id=customer_id, run_id=run_id)
    if limit is not None:
        stmt = stmt.limit(limit)
    return list(session.scalars(stmt))


def iter_mismatches(session: Session, **filters: Any) -> Iterator[Mismatch]:
    """Mismatches matching the filters, streamed in batches (for exports)."""
    stmt = mismatch_query(**filters).execution_options(yield_per=500)
    yield from session.scalars(stmt)


def mismatch_dict(mismatch: Mismatch) -> dict[str, Any]:
    """A JSON-ready view of a mismatch (Decimals as strings, times as ISO 8601)."""
    return {
        "id": mismatch.id,
        "fingerprint": mismatch.fingerprint,
        "kind": mismatch.kind.value,
        "status": mismatch.status.value,
        "customer_id": mismatch.customer_id,
        "currency": mismatch.currency,
        "unit": mismatch.unit,
        "expected": _canonical(mismatch.expected_amount) if mismatch.expected_amount is not None else None,
        "actual": _canonical(mismatch.actual_amount) if mismatch.actual_amount is not None else None,
        "summary": mismatch.summary,
        "evidence": mismatch.evidence,
        "occurred_at": _iso(mismatch.occurred_at),
        "first_seen_run_id": mismatch.first_seen_run_id,
        "last_seen_run_id": mismatch.last_seen_run_id,
        "first_seen_at": _iso(mismatch.first_seen_at),
        "last_seen_at": _iso(mismatch.last_seen_at),
        "status_changed_at": _iso(mismatch.status_changed_at),
    }


def action_dict(action: MismatchAction) -> dict[str, Any]:
    """A JSON-ready view of an audit row."""
    return {
        "id": action.id,
        "mismatch_id": action.mismatch_id,
        "run_id": action.run_id,
        "actor": action.actor,
        "action": action.action.value,
        "note": action.note,
        "from_status": action.from_status.value if action.from_status else None,
        "to_status": action.to_status.value,
        "at": _iso(action.at),
    }


EXPORT_COLUMNS = (
    "id",
    "kind",
    "status",
    "customer_id",
    "currency",
    "unit",
    "expected",
    "actual",
    "summary",
    "occurred_at",
    "first_seen_run_id",
    "last_seen_run_id",
    "first_seen_at",
    "last_seen_at",
    "fingerprint",
    "evidence",
)


def export_csv(session: Session, out: IO[str] | Path, **filters: Any) -> int:
    """Write matching mismatches as CSV (evidence as a JSON column); return how many rows were written."""
    if isinstance(out, Path):
        with out.open("w", newline="", encoding="utf-8") as fh:
            return export_csv(session, fh, **filters)
    writer = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS)
    writer.writeheader()
    n = 0
    for mismatch in iter_mismatches(session, **filters):
        row = mismatch_dict(mismatch)
        row["evidence"] = json.dumps(row["evidence"], sort_keys=True, default=str)
        writer.writerow({k: row[k] for k in EXPORT_COLUMNS})
        n += 1
    return n


def open_review_item(session: Session, finding: Finding, *, actor: str, now: datetime) -> tuple[Mismatch, str]:
    """Record a finding that a job other than the nightly run made (a usage spike, a disabled notification
    endpoint) as a review item, through a run row of its own so the audit trail has the same shape; return the
    mismatch and what happened (new, unchanged, updated, reopened, reappeared)."""
    run = ReconciliationRun(
        since=finding.occurred_at or now,
        until=now,
        started_at=now,
        finished_at=now,
        status=RunStatus.SUCCEEDED,
        actor=actor,
        counts={finding.kind.value: 1},
        stats={"source": actor},
    )
    session.add(run)
    session.flush()
    outcome = record_finding(session, run, finding, now=now)
    session.flush()
    mismatch = session.scalars(select(Mismatch).where(Mismatch.fingerprint == finding.fingerprint)).one()
    return mismatch, outcome


def find_review_item(session: Session, finding: Finding) -> Mismatch | None:
    """The stored review item of a finding (by fingerprint), if any."""
    return session.scalars(select(Mismatch).where(Mismatch.fingerprint == finding.fingerprint)).one_or_none()
