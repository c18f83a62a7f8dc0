"""Read-only queries over reconciliation's mismatches, runs and audit rows, for the review pages.

Lists page by keyset ``(sort key, id)`` with row-value comparisons, so page N costs what page 1 does and each
sort has an index to walk (see :mod:`webhooks.review.models`). Writes go through reconciliation's services.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Literal, TypeVar

from sqlalchemy import BigInteger, ColumnElement, Select, Text, bindparam, cast, func, or_, select, tuple_
from sqlalchemy.orm import Session, aliased

from ledger.inbox import StripeEvent
from ledger.models import Account, Entry, Grant
from reconciliation.models import (
    Mismatch,
    MismatchAction,
    MismatchKind,
    MismatchStatus,
    ReconciliationRun,
)
from webhooks.review import params as params_
from webhooks.review.customers import GRANT_ENTRY_KINDS
from webhooks.review.models import amount_gap, gap_expr

PAGE_SIZE = 50
_S = TypeVar("_S", bound=Select)
Sort = Literal["newest", "oldest", "amount", "amount_asc"]
SORTS: tuple[Sort, ...] = ("newest", "oldest", "amount", "amount_asc")
SORT_LABELS = {
    "newest": "Newest first",
    "oldest": "Oldest first (age)",
    "amount": "Largest difference",
    "amount_asc": "Smallest difference",
}
Seen = Literal["last", "first"]


@dataclass(frozen=True, slots=True)
class MismatchFilter:
    """What the mismatch list shows: every field is optional; the sort decides the keyset."""

    status: MismatchStatus | None = None
    kind: MismatchKind | None = None
    customer: str | None = None
    run_id: int | None = None
    seen: Seen = "last"
    occurred_from: date | None = None
    occurred_to: date | None = None  # inclusive day
    sort: Sort = "newest"

    def params(self) -> dict[str, str]:
        """The filter as query parameters (for links, the CSV export and forms)."""
        out = {
            "status": self.status.value if self.status else "",
            "kind": self.kind.value if self.kind else "",
            "customer": self.customer or "",
            "run": str(self.run_id) if self.run_id is not None else "",
            "seen": self.seen if self.run_id is not None and self.seen != "last" else "",
            "from": self.occurred_from.isoformat() if self.occurred_from else "",
            "to": self.occurred_to.isoformat() if self.occurred_to else "",
            "sort": self.sort if self.sort != "newest" else "",
        }
        return {k: v for k, v in out.items() if v}


def parse_filter(params: Mapping[str, str]) -> MismatchFilter:
    """Read a filter from query parameters; raise ValueError naming the bad one."""

    def get(name: str) -> str:
        return (params.get(name) or "").strip()

    def enum_value(name: str, cls: Any) -> Any:
        raw = get(name)
        if not raw:
            return None
        try:
            return cls(raw)
        except ValueError:
            raise ValueError(f"{name}: unknown value {raw!r}") from None

    def day(name: str) -> date | None:
        raw = get(name)
        return params_.parse_day(raw, name) if raw else None

    run = get("run")
    run_id = params_.parse_id(run, "run") if run else None
    sort = get("sort") or "newest"
    if sort not in SORTS:
        raise ValueError(f"sort: one of {', '.join(SORTS)}")
    seen = get("seen") or "last"
    if seen not in ("last", "first"):
        raise ValueError("seen: last or first")
    return MismatchFilter(
        status=enum_value("status", MismatchStatus),
        kind=enum_value("kind", MismatchKind),
        customer=get("customer") or None,
        run_id=run_id,
        seen=seen,  # type: ignore[arg-type]  # checked just above
        occurred_from=day("from"),
        occurred_to=day("to"),
        sort=sort,
    )


def _where(stmt: _S, f: MismatchFilter, *, with_status: bool = True) -> _S:
    if with_status and f.status is not None:
        stmt = stmt.where(Mismatch.status == f.status)
    if f.kind is not None:
        stmt = stmt.where(Mismatch.kind == f.kind)
    if f.customer:
        stmt = stmt.where(Mismatch.customer_id == f.customer)
    if f.run_id is not None:
        column = Mismatch.first_seen_run_id if f.seen == "first" else Mismatch.last_seen_run_id
        stmt = stmt.where(column == f.run_id)
    if f.occurred_from is not None:
        stmt = stmt.where(Mismatch.occurred_at >= datetime.combine(f.occurred_from, time(0), tzinfo=UTC))
    if f.occurred_to is not None:
        end = datetime.combine(f.occurred_to + timedelta(days=1), time(0), tzinfo=UTC)
        stmt = stmt.where(Mismatch.occurred_at < end)
    return stmt


def _sort_key(sort: Sort) -> ColumnElement[Any]:
    if sort in ("amount", "amount_asc"):
        return gap_expr
    return Mismatch.first_seen_at.expression


def _descending(sort: Sort) -> bool:
    return sort in ("newest", "amount")


def encode_cursor(sort: Sort, row: Mismatch, gap: Decimal | None) -> str:
    """An opaque-enough cursor: the row's sort value and id."""
    if sort in ("amount", "amount_asc"):
        value = format(gap if gap is not None else Decimal(0), "f")
    else:
        seen = row.first_seen_at if row.first_seen_at.tzinfo else row.first_seen_at.replace(tzinfo=UTC)
        value = seen.isoformat()
    return f"{value}~{row.id}"


def decode_cursor(sort: Sort, cursor: str) -> tuple[Any, int]:
    """The (sort value, id) a cursor names; ValueError if it is not one."""
    value, sep, row_id = cursor.rpartition("~")
    if not sep:
        raise ValueError("cursor: not a page cursor")
    position = params_.parse_id(row_id, "cursor")
    if sort in ("amount", "amount_asc"):
        return params_.parse_amount(value, "cursor"), position
    return params_.parse_time(value, "cursor"), position


@dataclass(frozen=True, slots=True)
class MismatchRow:
    """A mismatch as listed, with its amount difference."""

    mismatch: Mismatch
    gap: Decimal | None


@dataclass(frozen=True, slots=True)
class MismatchPage:
    """One page of the list, the cursors around it, and the counts per status for the same filter."""

    rows: list[MismatchRow]
    next_cursor: str | None
    prev_cursor: str | None
    total: int
    by_status: dict[str, int] = field(default_factory=dict)


def _page_select(f: MismatchFilter, *, after: tuple[Any, int] | None, backwards: bool) -> Select[Mismatch, Decimal]:
    key = _sort_key(f.sort)
    descending = _descending(f.sort) != backwards
    stmt = _where(select(Mismatch, amount_gap), f)
    if after is not None:
        value, row_id = after
        bound = tuple_(bindparam(None, value, type_=key.type), bindparam(None, row_id, type_=BigInteger()))
        stmt = stmt.where(tuple_(key, Mismatch.id) < bound if descending else tuple_(key, Mismatch.id) > bound)
    order = (key.desc(), Mismatch.id.desc()) if descending else (key.asc(), Mismatch.id.asc())
    return stmt.order_by(*order)


def list_mismatches(
    session: Session,
    f: MismatchFilter,
    *,
    after: str | None = None,
    before: str | None = None,
    limit: int = PAGE_SIZE,
) -> MismatchPage:
    """A page of mismatches matching ``f``: after a cursor (next page), before one (previous), or the first."""
    backwards = before is not None
    cursor = decode_cursor(f.sort, before) if before else decode_cursor(f.sort, after) if after else None
    rows = session.execute(_page_select(f, after=cursor, backwards=backwards).limit(limit + 1)).all()
    more = len(rows) > limit
    found = [MismatchRow(m, Decimal(g) if g is not None else None) for m, g in rows[:limit]]
    if backwards:
        found.reverse()
    next_cursor = prev_cursor = None
    if found:
        first, last = found[0], found[-1]
        if more or backwards:
            next_cursor = encode_cursor(f.sort, last.mismatch, last.gap)
        if (more and backwards) or (after is not None and not backwards):
            prev_cursor = encode_cursor(f.sort, first.mismatch, first.gap)
    by_status = {
        (status.value if isinstance(status, MismatchStatus) else str(status)): int(n)
        for status, n in session.execute(
            _where(select(Mismatch.status, func.count()), f, with_status=False).group_by(Mismatch.status)
        )
    }
    total = by_status.get(f.status.value, 0) if f.status else sum(by_status.values())
    return MismatchPage(rows=found, next_cursor=next_cursor, prev_cursor=prev_cursor, total=total, by_status=by_status)


# The CSV export's columns, read as plain rows (no ORM objects): the mismatch, its gap, its latest audit row.
EXPORT_COLUMNS = (
    "id",
    "kind",
    "status",
    "customer_id",
    "currency",
    "unit",
    "expected",
    "actual",
    "difference",
    "summary",
    "occurred_at",
    "first_seen_at",
    "last_seen_at",
    "first_seen_run_id",
    "last_seen_run_id",
    "last_action",
    "last_actor",
    "last_note",
    "fingerprint",
    "evidence",
)


EXPORT_BATCH = 2000


def iter_export_rows(session: Session, f: MismatchFilter, *, batch: int | None = None) -> Iterator[Sequence[Any]]:
    """Every mismatch matching ``f`` in list order, as EXPORT_COLUMNS tuples, read in keyset batches.

    Plain rows, no ORM objects; each batch is one keyset query on mismatches and one indexed lookup of the
    batch's latest audit rows.
    """
    batch = batch or EXPORT_BATCH
    key = _sort_key(f.sort)
    columns = (
        Mismatch.id,
        Mismatch.kind,
        Mismatch.status,
        Mismatch.customer_id,
        Mismatch.currency,
        Mismatch.unit,
        Mismatch.expected_amount,
        Mismatch.actual_amount,
        gap_expr,
        Mismatch.summary,
        Mismatch.occurred_at,
        Mismatch.first_seen_at,
        Mismatch.last_seen_at,
        Mismatch.first_seen_run_id,
        Mismatch.last_seen_run_id,
        Mismatch.fingerprint,
        cast(Mismatch.evidence, Text),  # the stored JSON text, not decoded and encoded again
        key,
    )
    later = aliased(MismatchAction)
    newest = select(func.max(later.id)).where(later.mismatch_id == MismatchAction.mismatch_id).scalar_subquery()
    descending = _descending(f.sort)
    cursor: tuple[Any, int] | None = None
    while True:
        stmt = _where(select(*columns), f)
        if cursor is not None:
            bound = tuple_(bindparam(None, cursor[0], type_=key.type), bindparam(None, cursor[1], type_=BigInteger()))
            stmt = stmt.where(tuple_(key, Mismatch.id) < bound if descending else tuple_(key, Mismatch.id) > bound)
        order = (key.desc(), Mismatch.id.desc()) if descending else (key.asc(), Mismatch.id.asc())
        rows = session.execute(stmt.order_by(*order).limit(batch)).all()
        last_actions = (
            {
                mismatch_id: (action, actor, note)
                for mismatch_id, action, actor, note in session.execute(
                    select(
                        MismatchAction.mismatch_id, MismatchAction.action, MismatchAction.actor, MismatchAction.note
                    ).where(MismatchAction.mismatch_id.in_([r[0] for r in rows]), MismatchAction.id == newest)
                )
            }
            if rows
            else {}
        )
        for row in rows:
            action, actor, note = last_actions.get(row[0], (None, None, None))
            yield (*row[:15], action, actor, note, row[15], row[16])
        if len(rows) < batch:
            return
        cursor = (rows[-1][-1], rows[-1][0])


def latest_notes(session: Session, mismatch_ids: list[int]) -> dict[int, MismatchAction]:
    """The newest audit row per mismatch, for a page or a batch of the export."""
    if not mismatch_ids:
        return {}
    # A correlated max(id) per mismatch walks (mismatch_id, id) once per row on both backends.
    later = aliased(MismatchAction)
    newest = select(func.max(later.id)).where(later.mismatch_id == MismatchAction.mismatch_id).scalar_subquery()
    actions = session.scalars(
        select(MismatchAction).where(MismatchAction.mismatch_id.in_(mismatch_ids), MismatchAction.id == newest)
    )
    return {a.mismatch_id: a for a in actions}


def for_customer(
    session: Session, customer_id: str, limit: int = 50
) -> tuple[list[MismatchRow], bool, dict[int, MismatchAction]]:
    """Mismatches naming a customer, newest first: (rows, more exist, the latest audit row of each)."""
    page = list_mismatches(session, MismatchFilter(customer=customer_id), limit=limit)
    return page.rows, page.next_cursor is not None, latest_notes(session, [r.mismatch.id for r in page.rows])


# --- one mismatch --------------------------------------------------------------------------------------------

_STRIPE_ID = re.compile(r"^(ch|py|pi|cs|in|il|re|pyr|dp|du|sub|si|cus|cn|txn|po|evt|ii|prod|price)_[A-Za-z0-9_]+$")
_STRIPE_PREFIX_TYPES = {
    "ch": "charge",
    "py": "charge",
    "pi": "payment_intent",
    "cs": "checkout.session",
    "in": "invoice",
    "re": "refund",
    "pyr": "refund",
    "dp": "dispute",
    "du": "dispute",
    "sub": "subscription",
    "cus": "customer",
    "cn": "credit_note",
}
_GRANT_KEYS = re.compile(r"(^|_)grants?(_ids?)?$")
_ENTRY_KEYS = re.compile(r"(^|_)entr(y|ies)(_ids?)?$")
_EVENT_ROW_KEYS = re.compile(r"^(stored_)?event_row_ids?$|^stripe_events?_ids?$|^stored_event_ids?$")
_SKIP_LOOKUP = {"cus", "evt", "prod", "price", "txn", "si", "ii", "il"}
MAX_RELATED = 50


@dataclass
class EvidenceRefs:
    """Ids found anywhere in a mismatch's evidence, by what they point to."""

    stripe_ids: list[str] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)
    event_row_ids: list[int] = field(default_factory=list)
    grant_ids: list[int] = field(default_factory=list)
    entry_ids: list[int] = field(default_factory=list)


def _ints(value: Any) -> list[int]:
    values = value if isinstance(value, list | tuple) else [value]
    out: list[int] = []
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool):
            out.append(v)
        elif isinstance(v, str) and v.isdigit():
            out.append(int(v))
        elif isinstance(v, Mapping) and isinstance(v.get("id"), int):
            out.append(int(v["id"]))
    return out


def find_refs(evidence: Any) -> EvidenceRefs:
    """Walk the evidence JSON and collect the Stripe ids, stored events, grants and entries it names."""
    refs = EvidenceRefs()

    def add(bucket: list[Any], value: Any) -> None:
        if value not in bucket and len(bucket) < MAX_RELATED:
            bucket.append(value)

    def walk(node: Any, key: str = "") -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                k = str(k)
                if _GRANT_KEYS.search(k):
                    for i in _ints(v):
                        add(refs.grant_ids, i)
                elif _ENTRY_KEYS.search(k):
                    for i in _ints(v):
                        add(refs.entry_ids, i)
                elif _EVENT_ROW_KEYS.search(k):
                    for i in _ints(v):
                        add(refs.event_row_ids, i)
                walk(v, k)
        elif isinstance(node, list | tuple):
            for item in node:
                walk(item, key)
        elif isinstance(node, str) and _STRIPE_ID.match(node):
            if node.startswith("evt_"):
                add(refs.event_ids, node)
            elif node.split("_", 1)[0] not in _SKIP_LOOKUP:
                add(refs.stripe_ids, node)

    walk(evidence)
    return refs


def stripe_type(object_id: str) -> str:
    """The Stripe object type an id's prefix names."""
    return _STRIPE_PREFIX_TYPES.get(object_id.split("_", 1)[0], "object")


@dataclass(frozen=True, slots=True)
class StripeSide:
    """What we hold about one Stripe object: the stored events that carried it (newest first)."""

    object_id: str
    object_type: str
    events: list[StripeEvent]

    @property
    def latest_payload(self) -> bytes | None:
        """The object as Stripe last sent it to us (the newest stored event's raw JSON)."""
        return self.events[0].payload if self.events else None


@dataclass(frozen=True, slots=True)
class MismatchDetail:
    """A mismatch with its history, runs, and both sides' evidence loaded from the database."""

    mismatch: Mismatch
    gap: Decimal | None
    actions: list[MismatchAction]
    first_run: ReconciliationRun | None
    last_run: ReconciliationRun | None
    account: Account | None
    stripe: list[StripeSide]
    events: list[StripeEvent]
    grants: list[Grant]
    entries: list[Entry]
    evidence_stripe: dict[str, Any]
    evidence_ledger: dict[str, Any]
    evidence_provider: dict[str, Any]
    evidence_other: dict[str, Any]
    recent_grants: list[Grant] = field(default_factory=list)  # the customer's, when the evidence names none
    provider_columns: list[str] = field(default_factory=list)
    provider_rows: list[dict[str, Any]] = field(default_factory=list)


def _split_evidence(evidence: Mapping[str, Any]) -> tuple[dict[str, Any], ...]:
    stripe: dict[str, Any] = {}
    ledger: dict[str, Any] = {}
    provider: dict[str, Any] = {}
    other: dict[str, Any] = {}
    for key, value in evidence.items():
        k = key.lower()
        if "provider" in k or "report" in k:
            provider[key] = value
        elif "stripe" in k or k in {"payment", "charge", "invoice", "refund", "dispute", "subscription", "events"}:
            stripe[key] = value
        elif any(w in k for w in ("ledger", "grant", "entr", "account", "usage", "access", "credits")):
            ledger[key] = value
        else:
            other[key] = value
    return stripe, ledger, provider, other


_REPORT_COLUMNS = (
    "source",
    "day",
    "line_item",
    "model",
    "scope",
    "kind",
    "requests",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "cost_usd",
)


def provider_report_rows(evidence: Mapping[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """The provider report rows in the evidence (lists of row dicts anywhere in it), and the columns they use."""
    rows: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            if {"source", "provider"} <= set(node) and ("cost_usd" in node or "input_tokens" in node):
                rows.append(dict(node))
                return
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(evidence)
    used = [c for c in _REPORT_COLUMNS if any(r.get(c) not in (None, "", 0, "0") for r in rows)]
    return used, rows[:MAX_RELATED]


def mismatch_detail(session: Session, mismatch_id: int) -> MismatchDetail | None:
    """Everything the detail page shows about one mismatch."""
    row = session.execute(select(Mismatch, amount_gap).where(Mismatch.id == mismatch_id)).one_or_none()
    if row is None:
        return None
    mismatch, gap = row
    actions = list(
        session.scalars(
            select(MismatchAction).where(MismatchAction.mismatch_id == mismatch.id).order_by(MismatchAction.id)
        )
    )
    runs = {
        r.id: r
        for r in session.scalars(
            select(ReconciliationRun).where(
                ReconciliationRun.id.in_({mismatch.first_seen_run_id, mismatch.last_seen_run_id})
            )
        )
    }
    evidence = mismatch.evidence if isinstance(mismatch.evidence, Mapping) else {"evidence": mismatch.evidence}
    refs = find_refs(evidence)
    account = None
    if mismatch.customer_id:
        account = session.scalars(select(Account).where(Account.customer_id == mismatch.customer_id)).one_or_none()

    stripe_sides: list[StripeSide] = []
    for object_id in refs.stripe_ids:
        carried = list(
            session.scalars(
                select(StripeEvent)
                .where(StripeEvent.object_id == object_id)
                .order_by(StripeEvent.created.desc(), StripeEvent.id.desc())
                .limit(10)
            )
        )
        stripe_sides.append(StripeSide(object_id=object_id, object_type=stripe_type(object_id), events=carried))

    events: list[StripeEvent] = []
    if refs.event_ids:
        events += session.scalars(select(StripeEvent).where(StripeEvent.event_id.in_(refs.event_ids)))
    if refs.event_row_ids:
        events += session.scalars(select(StripeEvent).where(StripeEvent.id.in_(refs.event_row_ids)))
    seen_events: set[int] = set()
    events = [e for e in events if not (e.id in seen_events or seen_events.add(e.id))]  # type: ignore[func-returns-value]

    grant_ids = set(refs.grant_ids)
    if refs.stripe_ids:
        grant_ids |= set(
            session.scalars(select(Grant.id).where(Grant.stripe_object_id.in_(refs.stripe_ids)).limit(MAX_RELATED))
        )
    grants = list(session.scalars(select(Grant).where(Grant.id.in_(grant_ids)).order_by(Grant.id))) if grant_ids else []
    entry_filter: list[ColumnElement[bool]] = []
    if refs.entry_ids:
        entry_filter.append(Entry.id.in_(refs.entry_ids))
    if grants:
        # entries.grant_id has no index: reach a grant's own entries through (account_id, kind).
        entry_filter.append(
            Entry.account_id.in_({g.account_id for g in grants})
            & Entry.kind.in_(GRANT_ENTRY_KINDS)
            & Entry.grant_id.in_(grant_ids)
        )
    if refs.stripe_ids:
        entry_filter.append(Entry.stripe_object_id.in_(refs.stripe_ids))
    entries: list[Entry] = []
    if entry_filter:
        entries = list(session.scalars(select(Entry).where(or_(*entry_filter)).order_by(Entry.id).limit(MAX_RELATED)))
    recent_grants: list[Grant] = []
    if account is not None and not grants:
        recent_grants = list(
            session.scalars(select(Grant).where(Grant.account_id == account.id).order_by(Grant.id.desc()).limit(5))
        )
    stripe_ev, ledger_ev, provider_ev, other_ev = _split_evidence(evidence)
    columns, report_rows = provider_report_rows(provider_ev)
    return MismatchDetail(
        mismatch=mismatch,
        gap=Decimal(gap) if gap is not None else None,
        actions=actions,
        first_run=runs.get(mismatch.first_seen_run_id),
        last_run=runs.get(mismatch.last_seen_run_id),
        account=account,
        stripe=stripe_sides,
        events=events,
        grants=grants,
        entries=entries,
        evidence_stripe=stripe_ev,
        evidence_ledger=ledger_ev,
        evidence_provider=provider_ev,
        evidence_other=other_ev,
        recent_grants=recent_grants,
        provider_columns=columns,
        provider_rows=report_rows,
    )


# --- runs ----------------------------------------------------------------------------------------------------

RUNS_PAGE_SIZE = 50


def list_runs(
    session: Session, *, before_id: int | None = None, limit: int = RUNS_PAGE_SIZE
) -> tuple[list[ReconciliationRun], int | None]:
    """Runs newest first, keyset by id: (runs, the cursor for older ones)."""
    stmt = select(ReconciliationRun).order_by(ReconciliationRun.id.desc()).limit(limit + 1)
    if before_id is not None:
        stmt = stmt.where(ReconciliationRun.id < before_id)
    runs = list(session.scalars(stmt))
    return runs[:limit], (runs[limit - 1].id if len(runs) > limit else None)


def get_run(session: Session, run_id: int) -> ReconciliationRun | None:
    """One run by id."""
    return session.get(ReconciliationRun, run_id)


def kinds() -> list[str]:
    """Every mismatch kind, for filters and the runs table's columns."""
    return [k.value for k in MismatchKind]


def statuses() -> list[str]:
    """Every mismatch status."""
    return [s.value for s in MismatchStatus]
