"""The checks: each a small function that compares one thing and yields :class:`Finding` s of a named kind.

They read the staged Stripe rows of the run and the ledger with streamed SELECTs (server-side cursors on
PostgreSQL), so memory does not grow with the window.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, TypeVar

from sqlalchemy import Numeric, and_, case, func, or_, select, type_coerce
from sqlalchemy.orm import Session, aliased

from ledger.config import BillingConfig, Tolerance
from ledger.inbox import EventStatus, StripeEvent
from ledger.models import (
    AccessState,
    Account,
    Entry,
    EntryKind,
    Grant,
    GrantSettlement,
    GrantSource,
    Hold,
    Subscription,
    SubscriptionReduction,
    UsageDaily,
    UsageEnvironment,
)
from ledger.money import format_credits, format_money, format_usd
from reconciliation.funding import Funding, MarginSplit, consumption_funding, paid_grants, split_margin
from reconciliation.models import MismatchKind, StagedStripeAlias, StagedStripeObject
from reconciliation.providers import ProviderReport, ReportKind
from reconciliation.services import Finding
from reconciliation.staging import SUBSCRIPTION_RANK
from reconciliation.stripe_source import StripeSource, is_not_found, object_type_of, stripe_id
from reconciliation.usage import usage_in_window

STREAM = {"yield_per": 1000}
PAID_SOURCES = (GrantSource.TOP_UP, GrantSource.RENEWAL)
# Grants a charge may fund (a paid-out charge of a plan change funds its plan_change grant).
CHARGE_FUNDED_SOURCES = (*PAID_SOURCES, GrantSource.PLAN_CHANGE)
T = TypeVar("T")


@dataclass
class CheckContext:
    """What every check may read: the run, its window, the config, Stripe, and the provider reports."""

    session: Session
    run_id: int
    since: datetime
    until: datetime
    now: datetime
    config: BillingConfig
    stripe: StripeSource
    reports: Sequence[ProviderReport] = ()
    # Filled by the provider checks: "provider:day" keys this run had a report for.
    provider_scope_keys: set[str] = field(default_factory=set)
    # Results a check needs that the engine started on another connection (see reconciliation.engine).
    prefetched: dict[str, Future[Any]] = field(default_factory=dict)
    # Filled by the payouts check: each payout of the window and whether it tied out (kept in the run's stats).
    payouts: list[dict[str, Any]] = field(default_factory=list)

    def fetched(self, name: str, compute: Callable[[Session], T]) -> T:
        """The result the engine prefetched under ``name``, else ``compute`` on this check's session."""
        future = self.prefetched.pop(name, None)
        return future.result() if future is not None else compute(self.session)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat()


def _utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _grant_evidence(g: Any) -> dict[str, Any]:
    return {
        "grant_id": g.id,
        "units": g.units,
        "remaining": g.remaining,
        "frozen": g.frozen,
        "clawed_back": g.clawed_back,
        "amount_minor": g.amount_minor,
        "currency": g.currency,
        "stripe_object_id": g.stripe_object_id,
        "idempotency_key": g.idempotency_key,
        "created_at": _iso(g.created_at),
    }


def _grant_entry_ids(session: Session, grant_ids: Sequence[int]) -> list[int]:
    return list(session.scalars(select(Entry.id).where(Entry.grant_id.in_(list(grant_ids))).order_by(Entry.id)))


def _stored_events(session: Session, object_ids: Sequence[str | None]) -> list[dict[str, Any]]:
    """The inbox's events about these Stripe objects: did we receive them, and what became of them?"""
    wanted = [o for o in object_ids if o]
    if not wanted:
        return []
    rows = session.execute(
        select(StripeEvent.id, StripeEvent.event_id, StripeEvent.type, StripeEvent.status, StripeEvent.last_error)
        .where(StripeEvent.object_id.in_(wanted))
        .order_by(StripeEvent.id)
        .limit(50)
    )
    return [
        {
            "stored_event_id": r.id,
            "event_id": r.event_id,
            "type": r.type,
            "status": r.status.value,
            "last_error": r.last_error,
        }
        for r in rows
    ]


# --- whose is it -----------------------------------------------------------------------------------------------


def customer_of(
    ctx: CheckContext, object_ids: Sequence[str | None], grant: Grant | None, *, follow: bool = True
) -> str | None:
    """The Stripe customer behind objects that name none themselves (disputes, refunds, events about them):
    a staged object of this run with a customer, the account of a grant they funded, a stored event about
    them."""
    ids = [o for o in object_ids if o]
    if grant is not None:
        found = ctx.session.scalar(select(Account.customer_id).where(Account.id == grant.account_id))
        if found:
            return found
    if not ids:
        return None
    S = StagedStripeObject
    found = ctx.session.scalar(
        select(S.customer_id).where(S.run_id == ctx.run_id, S.object_id.in_(ids), S.customer_id.is_not(None)).limit(1)
    )
    if found:
        return found
    A = StagedStripeAlias
    keys = select(A.key).where(
        A.run_id == ctx.run_id, A.payment_id.in_(select(A.payment_id).where(A.run_id == ctx.run_id, A.key.in_(ids)))
    )
    found = ctx.session.scalar(
        select(Account.customer_id)
        .join(Grant, Grant.account_id == Account.id)
        .where(or_(Grant.stripe_object_id.in_(ids), Grant.stripe_object_id.in_(keys)))
        .limit(1)
    )
    if found:
        return found
    found = ctx.session.scalar(
        select(StripeEvent.customer_id)
        .where(StripeEvent.object_id.in_(ids), StripeEvent.customer_id.is_not(None))
        .limit(1)
    )
    if found or not follow:
        return found
    # A dispute or refund staged by this run points to its charge: whose the charge is, so is it.
    parents = list(
        ctx.session.scalars(
            select(S.ref).where(S.run_id == ctx.run_id, S.object_id.in_(ids), S.ref.is_not(None)).limit(10)
        )
    )
    return customer_of(ctx, [p for p in parents if p not in ids], None, follow=False) if parents else None


# --- payments against grants ----------------------------------------------------------------------------------


def _payment_grants(run_id: int) -> Any:
    """Per staged payment: how many grants name any of its ids, and the first of them."""
    A = StagedStripeAlias
    return (
        select(
            A.payment_id.label("payment_id"),
            func.count(Grant.id).label("n"),
            func.min(Grant.id).label("first_id"),
        )
        .join(Grant, Grant.stripe_object_id == A.key)
        .where(A.run_id == run_id)
        .group_by(A.payment_id)
        .subquery()
    )


def check_payments(ctx: CheckContext) -> Iterator[Finding]:
    """payment_without_grant, duplicate_grant and amount_mismatch, from one pass over the staged payments."""
    P = StagedStripeObject
    agg = _payment_grants(ctx.run_id)
    G = aliased(Grant)
    stmt = (
        select(P, agg.c.n, G)
        .outerjoin(agg, agg.c.payment_id == P.object_id)
        .outerjoin(G, G.id == agg.c.first_id)
        .where(
            P.run_id == ctx.run_id,
            P.object_type == "payment",
            # Only what disagrees leaves the database: most payments have exactly one grant of the right size.
            or_(agg.c.n.is_(None), agg.c.n != 1, G.units != P.expected_credits),
        )
        .order_by(P.id)
        .execution_options(**STREAM)
    )
    for p, n, g in ctx.session.execute(stmt):
        stripe_side = {
            "object": p.detail.get("source"),
            "id": p.object_id,
            "payment_intent": p.detail.get("payment_intent"),
            "charge": p.detail.get("charge"),
            "amount": p.amount,
            "currency": p.currency,
            "created": _iso(p.created),
            "prices": p.detail.get("prices"),
            "expected_credits": p.expected_credits,
        }
        events = _stored_events(ctx.session, [p.object_id, p.detail.get("payment_intent"), p.detail.get("charge")])
        if not n:
            yield Finding(
                kind=MismatchKind.PAYMENT_WITHOUT_GRANT,
                identity=p.object_id,
                summary=f"{p.detail.get('source')} {p.object_id} was paid ({format_money(p.amount, p.currency)}) "
                "but the ledger has no grant for it",
                customer_id=p.customer_id
                or customer_of(ctx, [p.object_id, p.detail.get("payment_intent"), p.detail.get("charge")], None),
                currency=p.currency,
                unit="credits",
                expected=p.expected_credits,
                actual=0,
                evidence={"stripe": stripe_side, "ledger": {"grants": [], "stored_events": events}},
                occurred_at=_utc(p.created),
            )
            continue
        if n > 1:
            grants = list(
                ctx.session.scalars(
                    select(Grant)
                    .join(StagedStripeAlias, StagedStripeAlias.key == Grant.stripe_object_id)
                    .where(StagedStripeAlias.run_id == ctx.run_id, StagedStripeAlias.payment_id == p.object_id)
                    .order_by(Grant.id)
                )
            )
            yield Finding(
                kind=MismatchKind.DUPLICATE_GRANT,
                identity=p.object_id,
                summary=f"{p.detail.get('source')} {p.object_id} was granted {n} times",
                customer_id=p.customer_id,
                currency=p.currency,
                unit="count",
                expected=1,
                actual=n,
                evidence={
                    "stripe": stripe_side,
                    "ledger": {
                        "grants": [_grant_evidence(x) for x in grants],
                        "entry_ids": _grant_entry_ids(ctx.session, [x.id for x in grants]),
                        "stored_events": events,
                    },
                },
                occurred_at=_utc(p.created),
            )
        if p.expected_credits is not None and g.units != p.expected_credits:
            yield Finding(
                kind=MismatchKind.AMOUNT_MISMATCH,
                identity=p.object_id,
                summary=f"{p.detail.get('source')} {p.object_id} should grant "
                f"{format_credits(p.expected_credits)} credits by the billing config; "
                f"grant {g.id} gave {format_credits(g.units)}",
                customer_id=p.customer_id,
                currency=p.currency,
                unit="credits",
                expected=p.expected_credits,
                actual=g.units,
                evidence={
                    "stripe": stripe_side,
                    "ledger": {
                        "grants": [_grant_evidence(g)],
                        "entry_ids": _grant_entry_ids(ctx.session, [g.id]),
                        "stored_events": events,
                    },
                },
                occurred_at=_utc(p.created),
            )


def check_balance_transactions(ctx: CheckContext) -> Iterator[Finding]:
    """balance_transaction_mismatch: a succeeded charge whose balance transaction is missing or disagrees with
    it (staging judged each charge; see reconciliation.staging.balance_transaction_problem)."""
    P = StagedStripeObject
    stmt = (
        select(P)
        .where(P.run_id == ctx.run_id, P.object_type == "balance_transaction_problem")
        .order_by(P.id)
        .execution_options(**STREAM)
    )
    for p in ctx.session.scalars(stmt):
        bt = p.detail.get("balance_transaction")
        yield Finding(
            kind=MismatchKind.BALANCE_TRANSACTION_MISMATCH,
            identity=p.object_id,
            summary=f"{p.detail.get('object') or 'charge'} {p.object_id} ({format_money(p.amount, p.currency)}) "
            f"{p.detail.get('problem')}",
            customer_id=p.customer_id
            or customer_of(ctx, [p.object_id, p.detail.get("payment_intent"), p.detail.get("charge")], None),
            currency=p.currency,
            unit="minor",
            expected=p.amount,
            actual=(-int(bt["amount"]) if p.detail.get("object") == "refund" else int(bt["amount"])) if bt else None,
            evidence={
                "stripe": {
                    "charge": p.object_id,
                    "amount": p.amount,
                    "currency": p.currency,
                    "balance_transaction": bt,
                },
                "ledger": {"stored_events": _stored_events(ctx.session, [p.object_id])},
            },
            occurred_at=_utc(p.created),
        )


def _is_paid(object_type: str, obj: Mapping[str, Any]) -> bool:
    if object_type == "checkout_session":
        return obj.get("payment_status") in ("paid", "no_payment_required")
    if object_type == "invoice":
        return obj.get("status") == "paid"
    if object_type == "payment_intent":
        return obj.get("status") == "succeeded"
    if object_type == "charge":
        return bool(obj.get("paid")) and obj.get("status") == "succeeded"
    return False


def check_grants(ctx: CheckContext) -> Iterator[Finding]:
    """grant_without_payment: paid-for grants of the window whose Stripe payment is missing or unpaid."""
    A = StagedStripeAlias
    stmt = (
        select(Grant, Account.customer_id)
        .join(Account, Account.id == Grant.account_id)
        .outerjoin(A, and_(A.run_id == ctx.run_id, A.key == Grant.stripe_object_id))
        .where(
            Grant.source.in_(PAID_SOURCES),
            Grant.created_at >= ctx.since,
            Grant.created_at < ctx.until,
            A.key.is_(None),
        )
        .order_by(Grant.id)
        .execution_options(**STREAM)
    )
    for g, customer_id in ctx.session.execute(stmt):
        # Not among this window's payments: it may have been paid before the window. Ask Stripe.
        problem: str | None = None
        stripe_side: dict[str, Any] = {"id": g.stripe_object_id}
        if not g.stripe_object_id:
            problem = "names no Stripe payment"
        else:
            object_type = g.stripe_object_type or object_type_of(g.stripe_object_id)
            if object_type not in ("checkout_session", "invoice", "payment_intent", "charge"):
                problem = f"names {g.stripe_object_id}, which is not a payment"
            else:
                try:
                    obj = ctx.stripe.retrieve(object_type, g.stripe_object_id)
                except Exception as exc:
                    if not is_not_found(exc):
                        raise
                    problem = f"names {object_type} {g.stripe_object_id}, which does not exist in Stripe"
                else:
                    stripe_side.update(
                        {
                            "object": object_type,
                            "status": obj.get("status"),
                            "payment_status": obj.get("payment_status"),
                            "amount": obj.get("amount_total") or obj.get("amount_paid") or obj.get("amount"),
                            "currency": obj.get("currency"),
                        }
                    )
                    if not _is_paid(object_type, obj):
                        problem = f"names {object_type} {g.stripe_object_id}, which is not paid"
        if problem is None:
            continue
        yield Finding(
            kind=MismatchKind.GRANT_WITHOUT_PAYMENT,
            identity=str(g.id),
            summary=f"grant {g.id} ({format_credits(g.units)} credits, {g.source.value}) {problem}",
            customer_id=customer_id,
            currency=g.currency,
            unit="credits",
            expected=0,
            actual=g.units,
            evidence={
                "stripe": stripe_side,
                "ledger": {
                    "grants": [_grant_evidence(g)],
                    "entry_ids": _grant_entry_ids(ctx.session, [g.id]),
                    "stored_events": _stored_events(ctx.session, [g.stripe_object_id]),
                },
            },
            occurred_at=_utc(g.created_at),
        )


def _grants_for_charge(ctx: CheckContext, charge_id: str, payment_intent: str | None) -> tuple[list[Grant], dict]:
    """The grants funded by a charge: through this run's aliases, or (for an older payment) by asking Stripe."""
    A = StagedStripeAlias
    payment_id = ctx.session.scalar(select(A.payment_id).where(A.run_id == ctx.run_id, A.key == charge_id))
    if payment_id is None and payment_intent:
        payment_id = ctx.session.scalar(select(A.payment_id).where(A.run_id == ctx.run_id, A.key == payment_intent))
    charge: dict[str, Any] = {}
    if payment_id is not None:
        keys = list(ctx.session.scalars(select(A.key).where(A.run_id == ctx.run_id, A.payment_id == payment_id)))
    else:
        charge = ctx.stripe.retrieve("charge", charge_id)
        pi = stripe_id(charge.get("payment_intent")) or payment_intent
        keys = [k for k in (charge_id, pi, stripe_id(charge.get("invoice"))) if k]
        if pi:
            keys += [cs["id"] for cs in ctx.stripe.list_checkout_sessions(payment_intent=pi)]
    grants = list(
        ctx.session.scalars(
            select(Grant).where(Grant.stripe_object_id.in_(keys), Grant.source.in_(PAID_SOURCES)).order_by(Grant.id)
        )
    )
    return grants, charge


def _units_for(grant: Grant, amount_minor: int, paid_minor: int | None) -> int:
    paid = grant.amount_minor or paid_minor or 0
    if paid <= 0:
        return 0
    return min(grant.units, grant.units * min(amount_minor, paid) // paid)


def _clawed_enough(ctx: CheckContext) -> dict[str, tuple[int, int | None, int]]:
    """For each charge refunded in the run's window whose payment was staged: (units, amount, clawed back) of the
    first paid grant it funded, in one query (what :func:`_grants_for_charge` finds one charge at a time)."""
    R = StagedStripeObject
    by_charge, by_payment = aliased(StagedStripeAlias), aliased(StagedStripeAlias)
    refunded = select(R.ref).where(R.run_id == ctx.run_id, R.object_type == "refund", R.ref.is_not(None)).distinct()
    stmt = (
        select(by_charge.key, Grant.id, Grant.units, Grant.amount_minor, Grant.clawed_back)
        .join(by_payment, (by_payment.run_id == by_charge.run_id) & (by_payment.payment_id == by_charge.payment_id))
        .join(Grant, Grant.stripe_object_id == by_payment.key)
        .where(
            by_charge.run_id == ctx.run_id,
            by_charge.key.in_(refunded),
            Grant.source.in_(PAID_SOURCES),
        )
        .order_by(by_charge.key, Grant.id)
    )
    found: dict[str, tuple[int, int | None, int]] = {}
    for charge_id, _, units, amount, clawed in ctx.session.execute(stmt):
        found.setdefault(charge_id, (int(units), amount, int(clawed)))
    return found


def check_refunds(ctx: CheckContext) -> Iterator[Finding]:
    """refund_not_clawed_back: a charge refunded in the window whose grant was not clawed back to match."""
    R = StagedStripeObject
    C = aliased(StagedStripeObject)
    # The charges whose grant is plainly clawed back enough are told apart in one query; only the rest (a few, or
    # a charge outside the window) take the per-charge look, which may ask Stripe.
    first_grants = _clawed_enough(ctx)
    stmt = (
        select(
            R.ref,
            func.count(R.id),
            func.sum(R.amount),
            func.max(R.created),
            func.min(R.object_id),
            func.max(R.object_id),
            func.max(R.customer_id),
            func.max(R.currency),
            func.max(C.amount),
            func.max(C.amount_refunded),
            func.max(C.customer_id),
        )
        .outerjoin(C, and_(C.run_id == R.run_id, C.object_type == "charge", C.object_id == R.ref))
        .where(R.run_id == ctx.run_id, R.object_type == "refund", R.ref.is_not(None))
        .group_by(R.ref)
        .order_by(R.ref)
        .execution_options(**STREAM)
    )
    for (
        charge_id,
        n,
        window_refunded,
        last_at,
        first_re,
        last_re,
        cust,
        currency,
        paid,
        refunded,
        ch_cust,
    ) in ctx.session.execute(stmt):
        charge_id = str(charge_id)
        known = first_grants.get(charge_id)
        if known is not None and refunded is not None:
            units, amount, clawed = known
            paid_minor = amount or paid or 0
            if paid_minor <= 0 or clawed >= min(units, units * min(int(refunded), paid_minor) // paid_minor):
                continue  # the same rule as _units_for, on the same grant
        grants, charge = _grants_for_charge(ctx, charge_id, None)
        if not grants:
            continue  # no grant at all: payment_without_grant reports the payment itself
        if refunded is None:
            charge = charge or ctx.stripe.retrieve("charge", charge_id)
            paid = int(charge.get("amount_captured") or charge.get("amount") or 0)
            refunded = int(charge.get("amount_refunded") or 0)
        g = grants[0]
        expected = _units_for(g, int(refunded), paid)
        if g.clawed_back >= expected:
            continue
        customer_id = ch_cust or cust or stripe_id(charge.get("customer")) or customer_of(ctx, [charge_id], g)
        yield Finding(
            kind=MismatchKind.REFUND_NOT_CLAWED_BACK,
            identity=charge_id,
            summary=f"charge {charge_id} was refunded {format_money(refunded, currency)} of "
            f"{format_money(paid, currency)}: grant {g.id} should have {format_credits(expected)} credits "
            f"clawed back, has {format_credits(g.clawed_back)}",
            customer_id=customer_id,
            currency=currency,
            unit="credits",
            expected=expected,
            actual=g.clawed_back,
            evidence={
                "stripe": {
                    "charge": charge_id,
                    "amount": paid,
                    "amount_refunded": refunded,
                    "refunds_in_window": n,
                    "refunded_in_window": int(window_refunded or 0),
                    "refund_ids": sorted({first_re, last_re}),
                },
                "ledger": {
                    "grants": [_grant_evidence(x) for x in grants],
                    "entry_ids": _grant_entry_ids(ctx.session, [x.id for x in grants]),
                    "stored_events": _stored_events(ctx.session, [charge_id, first_re, last_re]),
                },
            },
            occurred_at=_utc(last_at),
        )


OPEN_DISPUTE = ("needs_response", "under_review")
WON_DISPUTE = ("won", "warning_closed")


def check_disputes(ctx: CheckContext) -> Iterator[Finding]:
    """dispute_not_applied: an open dispute with nothing frozen, a lost one not clawed back, a won one still
    frozen."""
    D = StagedStripeObject
    stmt = (
        select(D)
        .where(D.run_id == ctx.run_id, D.object_type == "dispute", D.ref.is_not(None))
        .order_by(D.id)
        .execution_options(**STREAM)
    )
    for d in ctx.session.scalars(stmt):
        assert d.ref is not None
        grants, charge = _grants_for_charge(ctx, d.ref, d.detail.get("payment_intent"))
        if not grants:
            continue
        g = grants[0]
        status = d.status or ""
        problem: str | None = None
        expected: int = 0
        actual: int = 0
        if status in OPEN_DISPUTE:
            froze = ctx.session.scalar(
                select(func.count(Entry.id)).where(Entry.grant_id == g.id, Entry.kind == EntryKind.FREEZE)
            )
            if not froze and g.frozen == 0 and g.clawed_back == 0:
                problem = "is open but the grant was never frozen"
                expected, actual = 1, 0
        elif status == "lost":
            expected = _units_for(g, int(d.amount or 0), None)
            actual = g.clawed_back
            if actual < expected:
                problem = (
                    f"was lost but only {format_credits(actual)} of {format_credits(expected)} credits were clawed back"
                )
        elif status in WON_DISPUTE and g.frozen > 0:
            problem = f"was won but {format_credits(g.frozen)} credits are still frozen"
            expected, actual = 0, g.frozen
        if problem is None:
            continue
        yield Finding(
            kind=MismatchKind.DISPUTE_NOT_APPLIED,
            identity=d.object_id,
            summary=f"dispute {d.object_id} ({status}) on charge {d.ref} {problem} (grant {g.id})",
            # A dispute names no customer: its charge does, and so does the grant it funded.
            customer_id=d.customer_id or stripe_id(charge.get("customer")) or customer_of(ctx, [d.ref], g),
            currency=d.currency,
            unit="credits",
            expected=expected,
            actual=actual,
            evidence={
                "stripe": {"dispute": d.object_id, "charge": d.ref, "status": status, "amount": d.amount},
                "ledger": {
                    "grants": [_grant_evidence(g)],
                    "entry_ids": _grant_entry_ids(ctx.session, [g.id]),
                    "stored_events": _stored_events(ctx.session, [d.object_id]),
                },
            },
            occurred_at=_utc(d.created),
        )


# --- plan changes ------------------------------------------------------------------------------------------------


def check_plan_changes(ctx: CheckContext) -> Iterator[Finding]:
    """plan_change_not_applied: a paid subscription_update invoice whose credits are missing or differ from what
    the [plan_changes] policy gives (a grant for an upgrade, a reduction for a prorated downgrade)."""
    P = StagedStripeObject
    stmt = (
        select(P)
        .where(P.run_id == ctx.run_id, P.object_type == "plan_change")
        .order_by(P.id)
        .execution_options(**STREAM)
    )
    for p in ctx.session.scalars(stmt):
        action = p.detail.get("action")
        key = f"plan_change:{p.object_id}"
        grant = ctx.session.scalars(select(Grant).where(Grant.idempotency_key == key)).one_or_none()
        reduction = ctx.session.get(SubscriptionReduction, key)
        if action in ("grant", "full"):
            actual = grant.units if grant is not None else 0
        elif action == "reduce":
            actual = reduction.units if reduction is not None else 0
        elif action == "none":
            actual = grant.units if grant is not None else 0
        else:
            actual = None  # a price the billing config does not know: the worker refused it too
        expected = p.expected_credits if action != "none" else 0
        if actual is not None and expected is not None and actual == expected:
            continue
        what = "taken back" if action == "reduce" else "granted"
        yield Finding(
            kind=MismatchKind.PLAN_CHANGE_NOT_APPLIED,
            identity=p.object_id,
            summary=f"plan change {p.object_id} of {p.detail.get('subscription')} was paid "
            f"({format_money(p.amount, p.currency)}): "
            f"{format_credits(expected) if expected is not None else 'unknown'} credits should be {what} by the "
            f"policy ({p.detail.get('explanation')}), the ledger has "
            f"{format_credits(actual) if actual is not None else 'none'}",
            customer_id=p.customer_id,
            currency=p.currency,
            unit="credits",
            expected=expected,
            actual=actual,
            evidence={
                "stripe": {
                    "invoice": p.object_id,
                    "amount_paid": p.amount,
                    "currency": p.currency,
                    "created": _iso(p.created),
                    **{
                        k: p.detail.get(k)
                        for k in (
                            "subscription",
                            "action",
                            "explanation",
                            "changed_at",
                            "period_end",
                            "old_items",
                            "new_items",
                            "payment_intent",
                        )
                    },
                },
                "ledger": {
                    "grants": [_grant_evidence(grant)] if grant is not None else [],
                    "reduction": {"units": reduction.units, "applied": reduction.applied}
                    if reduction is not None
                    else None,
                    "entry_ids": _grant_entry_ids(ctx.session, [grant.id]) if grant is not None else [],
                    "stored_events": _stored_events(ctx.session, [p.object_id, p.detail.get("subscription")]),
                },
            },
            occurred_at=_utc(p.created),
        )


# --- state -----------------------------------------------------------------------------------------------------

_RANK_NAME = {rank: name for name, rank in SUBSCRIPTION_RANK.items()}
# Which access states are consistent with a customer's best subscription status.
ALLOWED_ACCESS: dict[str, tuple[AccessState, ...]] = {
    "active": (AccessState.ACTIVE,),
    "trialing": (AccessState.TRIALING, AccessState.ACTIVE),
    "past_due": (AccessState.PAST_DUE, AccessState.SUSPENDED),
    "unpaid": (AccessState.SUSPENDED, AccessState.PAST_DUE),
    "paused": (AccessState.SUSPENDED,),
    "canceled": (AccessState.CANCELED, AccessState.SUSPENDED),
    "incomplete_expired": (AccessState.CANCELED, AccessState.SUSPENDED),
}


def check_access_state(ctx: CheckContext) -> Iterator[Finding]:
    """access_state_drift: each subscription's access in the ledger against its Stripe status; for customers whose
    subscriptions the ledger does not track one by one, the account's access against their best subscription."""
    tracked = yield from _subscription_access_drift(ctx)
    yield from _account_access_drift(ctx, tracked)


def _subscription_access_drift(ctx: CheckContext) -> Generator[Finding, None, set[str]]:
    S = StagedStripeObject
    tracked_customers = set(
        ctx.session.scalars(
            select(Account.customer_id).where(Account.id.in_(select(Subscription.account_id).distinct()))
        )
    )
    stmt = (
        select(S.object_id, S.customer_id, S.status, S.created, Subscription)
        .outerjoin(Subscription, Subscription.subscription_id == S.object_id)
        .where(S.run_id == ctx.run_id, S.object_type == "subscription", S.customer_id.is_not(None))
        .order_by(S.object_id)
        .execution_options(**STREAM)
    )
    for sub_id, customer_id, status, created, row in ctx.session.execute(stmt):
        if customer_id not in tracked_customers:
            continue
        allowed = ALLOWED_ACCESS.get(str(status))
        if allowed is None:
            continue  # incomplete: no paid state yet, nothing to compare
        state = AccessState(row.access_state) if row is not None else None
        if state in allowed or (state is None and status not in ("active", "trialing", "past_due")):
            continue
        yield Finding(
            kind=MismatchKind.ACCESS_STATE_DRIFT,
            identity=sub_id,
            summary=f"subscription {sub_id} of {customer_id}: Stripe status is {status}, "
            f"ledger access is {state.value if state else 'missing (subscription not in the ledger)'}",
            customer_id=customer_id,
            unit="state",
            evidence={
                "stripe": {"subscription": sub_id, "status": status, "created": _iso(created)},
                "ledger": {
                    "subscription": sub_id,
                    "status": row.status if row is not None else None,
                    "access_state": state.value if state else None,
                    "access_as_of": _iso(row.access_as_of) if row is not None else None,
                    "access_source": row.access_source if row is not None else None,
                    "allowed": [a.value for a in allowed],
                    "stored_events": _stored_events(ctx.session, [sub_id]),
                },
            },
        )
    return tracked_customers


def _account_access_drift(ctx: CheckContext, tracked_customers: set[str]) -> Iterator[Finding]:
    S = StagedStripeObject
    best = (
        select(S.customer_id.label("customer_id"), func.min(S.amount).label("rank"))
        .where(S.run_id == ctx.run_id, S.object_type == "subscription", S.customer_id.is_not(None))
        .group_by(S.customer_id)
        .subquery()
    )
    stmt = (
        select(best.c.customer_id, best.c.rank, Account.access_state, Account.access_as_of, Account.id)
        .outerjoin(Account, Account.customer_id == best.c.customer_id)
        .order_by(best.c.customer_id)
        .execution_options(**STREAM)
    )
    for customer_id, rank, state, as_of, account_id in ctx.session.execute(stmt):
        if customer_id in tracked_customers:
            continue  # compared subscription by subscription above
        status = _RANK_NAME.get(int(rank), "unknown")
        allowed = ALLOWED_ACCESS.get(status)
        if allowed is None:
            continue  # incomplete: no paid state yet, nothing to compare
        if state is None and status not in ("active", "trialing", "past_due"):
            continue  # never had an account and Stripe says they should not have access: consistent
        if state in allowed:
            continue
        subs = [
            {"id": s.object_id, "status": s.status, "created": _iso(s.created)}
            for s in ctx.session.scalars(
                select(S).where(S.run_id == ctx.run_id, S.object_type == "subscription", S.customer_id == customer_id)
            )
        ]
        yield Finding(
            kind=MismatchKind.ACCESS_STATE_DRIFT,
            identity=customer_id,
            summary=f"customer {customer_id}: Stripe subscription is {status}, "
            f"ledger access state is {state.value if state else 'missing (no account)'}",
            customer_id=customer_id,
            unit="state",
            evidence={
                "stripe": {"subscriptions": subs, "best_status": status},
                "ledger": {
                    "account_id": account_id,
                    "access_state": state.value if state else None,
                    "access_as_of": _iso(as_of),
                    "allowed": [a.value for a in allowed],
                    "stored_events": _stored_events(ctx.session, [x["id"] for x in subs]),
                },
            },
        )


def check_unprocessed_events(ctx: CheckContext) -> Iterator[Finding]:
    """unprocessed_event: stored events failed, waiting or pending for longer than the configured hours."""
    cutoff = ctx.now - timedelta(hours=ctx.config.reconciliation.unprocessed_event_hours)
    stmt = (
        select(
            StripeEvent.id,
            StripeEvent.event_id,
            StripeEvent.type,
            StripeEvent.status,
            StripeEvent.customer_id,
            StripeEvent.object_id,
            StripeEvent.attempts,
            StripeEvent.last_error,
            StripeEvent.status_reason,
            StripeEvent.received_at,
            StripeEvent.created,
        )
        .where(
            StripeEvent.status.in_([EventStatus.FAILED, EventStatus.WAITING, EventStatus.PENDING]),
            StripeEvent.received_at < cutoff,
        )
        .order_by(StripeEvent.id)
        .execution_options(**STREAM)
    )
    for row in ctx.session.execute(stmt):
        yield Finding(
            kind=MismatchKind.UNPROCESSED_EVENT,
            identity=row.event_id,
            summary=f"stored event {row.event_id} ({row.type}) is {row.status.value} since {_iso(row.received_at)}",
            customer_id=row.customer_id or customer_of(ctx, [row.object_id], None),
            unit="state",
            evidence={
                "stripe": {"event_id": row.event_id, "type": row.type, "object_id": row.object_id},
                "ledger": {
                    "stored_event_id": row.id,
                    "status": row.status.value,
                    "attempts": row.attempts,
                    "last_error": row.last_error,
                    "status_reason": row.status_reason,
                    "received_at": _iso(row.received_at),
                },
            },
        )


def check_missed_events(ctx: CheckContext) -> Iterator[Finding]:
    """missed_event: an event in Stripe's Events API for the window that was never stored."""
    E = StagedStripeObject
    # NOT EXISTS on the event id alone: an anti join that reads the unique index, not the stored payloads.
    stored = select(StripeEvent.event_id).where(StripeEvent.event_id == E.object_id).exists()
    stmt = (
        select(E.object_id, E.status, E.created, E.customer_id, E.ref, E.detail)
        .where(E.run_id == ctx.run_id, E.object_type == "event", ~stored)
        .order_by(E.id)
        .execution_options(**STREAM)
    )
    for event_id, event_type, created, customer_id, object_id, detail in ctx.session.execute(stmt):
        related = [object_id, *((detail or {}).get("related") or [])]
        yield Finding(
            kind=MismatchKind.MISSED_EVENT,
            identity=event_id,
            summary=f"Stripe event {event_id} ({event_type}) was never stored",
            customer_id=customer_id or customer_of(ctx, related, None),
            unit="state",
            evidence={
                "stripe": {"event_id": event_id, "type": event_type, "object_id": object_id, "created": _iso(created)},
                "ledger": {"stored_event_id": None},
            },
            occurred_at=_utc(created),
        )


def check_customer_totals(ctx: CheckContext) -> Iterator[Finding]:
    """customer_total_mismatch: per customer and currency, what Stripe was paid against what the grants record.

    Compares the window's payments that have a grant (a payment with none is a payment_without_grant), by the
    money each grant records; refunds are compared per charge by refund_not_clawed_back.
    """
    P = StagedStripeObject
    agg = _payment_grants(ctx.run_id)
    G = aliased(Grant)
    stmt = (
        select(
            P.customer_id,
            P.currency,
            func.count(P.id),
            func.sum(P.amount),
            func.sum(func.coalesce(G.amount_minor, 0)),
            func.min(P.created),
        )
        .join(agg, agg.c.payment_id == P.object_id)
        .join(G, G.id == agg.c.first_id)
        .where(P.run_id == ctx.run_id, P.object_type == "payment")
        .group_by(P.customer_id, P.currency)
        .having(func.sum(P.amount) != func.sum(func.coalesce(G.amount_minor, 0)))
        .order_by(P.customer_id, P.currency)
        .execution_options(**STREAM)
    )
    for customer_id, currency, n, stripe_total, ledger_total, _first in ctx.session.execute(stmt):
        if int(stripe_total or 0) == int(ledger_total or 0):
            continue
        payments = [
            {"id": pid, "amount": amt, "grant_id": gid, "grant_amount_minor": gam}
            for pid, amt, gid, gam in ctx.session.execute(
                select(P.object_id, P.amount, G.id, G.amount_minor)
                .join(agg, agg.c.payment_id == P.object_id)
                .join(G, G.id == agg.c.first_id)
                .where(
                    P.run_id == ctx.run_id,
                    P.object_type == "payment",
                    P.customer_id == customer_id,
                    P.currency == currency,
                )
                .order_by(P.id)
            )
            if amt != gam
        ]
        yield Finding(
            kind=MismatchKind.CUSTOMER_TOTAL_MISMATCH,
            identity=f"{customer_id}|{currency}|{ctx.since.isoformat()}|{ctx.until.isoformat()}",
            summary=f"customer {customer_id}: Stripe was paid {format_money(stripe_total, currency)} over "
            f"{n} payments, the ledger's grants record {format_money(ledger_total, currency)}",
            customer_id=customer_id,
            currency=currency,
            unit="minor",
            expected=int(stripe_total or 0),
            actual=int(ledger_total or 0),
            evidence={
                "stripe": {"payments": n, "total": int(stripe_total or 0)},
                "ledger": {"total": int(ledger_total or 0), "differing_payments": payments},
            },
            occurred_at=ctx.since,
        )


# --- providers -------------------------------------------------------------------------------------------------


def _as_date(value: Any) -> date:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC).date()
    return value if isinstance(value, date) else date.fromisoformat(str(value)[:10])


def _beyond(diff: Decimal, reference: Decimal, absolute: Decimal, relative: Decimal) -> bool:
    diff = abs(diff)
    return diff > absolute and diff > relative * abs(reference)


@dataclass
class _Side:
    cost: Decimal = Decimal(0)
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)


Groups = dict[tuple[str, ReportKind, bool], dict[tuple[date, str | None, str | None], _Side]]
LedgerUsage = dict[str, dict[tuple[date, str | None, str | None], tuple[Decimal, int, int, int, int]]]


def _reported(reports: Sequence[ProviderReport]) -> Groups:
    """The reports' sums per (provider, kind, scoped) and (day, model, scope); each covered day has a key."""
    # One report per (provider, kind, day): a second report for the same day would double-count.
    covered: dict[tuple[str, ReportKind, date], str] = {}
    groups: Groups = {}
    for report in reports:
        by_key = groups.setdefault((report.provider, report.kind, report.has_scope), {})
        fresh = {d for d in report.days if (report.provider, report.kind, d) not in covered}
        for d in fresh:
            covered[(report.provider, report.kind, d)] = str(report.path)
            by_key.setdefault((d, None, None), _Side())  # a covered day with no rows still counts as covered
        for row in report.rows:
            if row.day not in fresh:
                continue
            side = by_key.setdefault((row.day, row.model, row.scope if report.has_scope else None), _Side())
            side.cost += row.cost_usd
            side.input_tokens += row.input_tokens
            side.output_tokens += row.output_tokens
            side.cached_tokens += row.cached_tokens
            side.rows.append(row.evidence())
    return groups


def provider_ledger_usage(session: Session, reports: Sequence[ProviderReport]) -> LedgerUsage:
    """The ledger's side of the provider checks for these reports (what the engine may prefetch)."""
    return _ledger_usage(session, _reported(reports))


def _ledger_usage(session: Session, groups: Groups) -> LedgerUsage:
    """The ledger's usage per provider, day, model and workspace over every reported day: one scan for all."""
    days = sorted({k[0] for reported in groups.values() for k in reported})
    providers = sorted({provider for provider, _kind, _scope in groups})
    if not days:
        return {}
    covered = {(provider, d) for (provider, _k, _s), reported in groups.items() for d, _m, _sc in reported}
    # Reported days are whole UTC days: the daily roll-up has their sums, a row per account and key.
    D = UsageDaily
    stmt = (
        select(
            D.provider,
            D.day,
            D.model,
            D.workspace,
            func.sum(D.provider_cost_usd),
            func.sum(D.input_tokens),
            func.sum(D.output_tokens),
            func.sum(D.cached_tokens),
            func.sum(D.requests),
        )
        .where(D.provider.in_(providers), D.day.in_(days))
        .group_by(D.provider, D.day, D.model, D.workspace)
        # Bounded by providers x days x models x workspaces: no server-side cursor, so it may run in parallel.
    )
    out: LedgerUsage = {}
    for provider, d, model, scope, cost, inp, output, cached, n in session.execute(stmt):
        dd = _as_date(d)
        if provider is None or (provider, dd) not in covered:
            continue
        out.setdefault(provider, {})[(dd, model, scope)] = (
            Decimal(cost or 0),
            int(inp or 0),
            int(output or 0),
            int(cached or 0),
            int(n),
        )
    return out


# A day's calls that timed out unanswered, listed in a provider mismatch's evidence (at most this many).
TIMED_OUT_EVIDENCE = 50


def _timed_out_calls(session: Session, groups: Groups) -> dict[tuple[str, date, str | None], list[dict[str, Any]]]:
    """Holds released because the provider call timed out with no answer (``provider_timeout``): the provider may
    have served and billed them anyway, so they are the first suspects of a provider report above the ledger."""
    days = sorted({k[0] for reported in groups.values() for k in reported})
    if not days:
        return {}
    start = datetime.combine(days[0], time(), tzinfo=UTC)
    end = datetime.combine(days[-1] + timedelta(days=1), time(), tzinfo=UTC)
    stmt = (
        select(
            Hold.request_id, Hold.provider, Hold.model, Hold.provider_request_id, Hold.created_at, Account.customer_id
        )
        .join(Account, Account.id == Hold.account_id)
        .where(Hold.release_reason == "provider_timeout", Hold.created_at >= start, Hold.created_at < end)
        .order_by(Hold.id)
    )
    out: dict[tuple[str, date, str | None], list[dict[str, Any]]] = {}
    for request_id, provider, model, provider_request_id, created_at, customer_id in session.execute(stmt):
        at = _utc(created_at)
        if provider is None or at is None:
            continue
        calls = out.setdefault((provider, at.date(), model), [])
        if len(calls) < TIMED_OUT_EVIDENCE:
            calls.append(
                {
                    "hold": request_id,
                    "customer_id": customer_id,
                    "provider_request_id": provider_request_id,
                    "at": at.isoformat(),
                }
            )
    return out


def check_providers(ctx: CheckContext) -> Iterator[Finding]:
    """provider_cost_drift and provider_usage_drift, per provider, day, model (and project/workspace)."""
    tol: Tolerance = ctx.config.reconciliation.provider_tolerance
    groups = _reported(ctx.reports)
    timed_out = _timed_out_calls(ctx.session, groups)
    for (provider, _kind, _scope), by_key in groups.items():
        for d, _m, _s in by_key:
            ctx.provider_scope_keys.add(f"{provider}:{d.isoformat()}")
    ledger_by_provider = ctx.fetched("providers", lambda session: _ledger_usage(session, groups))
    for (provider, kind, has_scope), reported in groups.items():
        days = {k[0] for k in reported}
        ledger: dict[tuple[date, str | None, str | None], tuple[Decimal, int, int, int, int]] = {}
        for (d, model, scope), sums in ledger_by_provider.get(provider, {}).items():
            if d not in days:
                continue
            key = (d, model, scope if has_scope else None)
            prev = ledger.get(key, (Decimal(0), 0, 0, 0, 0))
            ledger[key] = (
                prev[0] + sums[0],
                prev[1] + sums[1],
                prev[2] + sums[2],
                prev[3] + sums[3],
                prev[4] + sums[4],
            )
        keys = sorted(set(reported) | set(ledger), key=lambda k: (k[0], k[1] or "", k[2] or ""))
        for key in keys:
            d, model, scope = key
            rep = reported.get(key, _Side())
            led = ledger.get(key, (Decimal(0), 0, 0, 0, 0))
            if model is None and scope is None and not rep.rows and led[4] == 0:
                continue  # the placeholder for a covered day
            ident = f"{provider}|{d.isoformat()}|{model}|{scope}"
            occurred_at = datetime.combine(d, time(), tzinfo=UTC)
            scope_key = f"{provider}:{d.isoformat()}"
            ledger_side: dict[str, Any] = {
                "usage_records": led[4],
                "provider_cost_usd": str(led[0]),
                "input_tokens": led[1],
                "output_tokens": led[2],
                "cached_tokens": led[3],
            }
            if (provider, d, model) in timed_out:
                # Released unanswered, not charged: if the provider served them, they explain a report above us.
                ledger_side["provider_timeouts"] = timed_out[(provider, d, model)]
            evidence = {
                "provider": {
                    "provider": provider,
                    "day": d.isoformat(),
                    "model": model,
                    "scope": scope,
                    "rows": rep.rows,
                },
                "ledger": ledger_side,
            }
            if kind is ReportKind.COST:
                if _beyond(led[0] - rep.cost, rep.cost, tol.absolute_usd, tol.relative):
                    yield Finding(
                        kind=MismatchKind.PROVIDER_COST_DRIFT,
                        identity=ident,
                        summary=f"{provider} {d} {model or '(no model)'}{' ' + scope if scope else ''}: "
                        f"provider billed {format_usd(rep.cost)}, the ledger recorded {format_usd(led[0])}",
                        currency="usd",
                        unit="usd",
                        expected=rep.cost,
                        actual=led[0],
                        evidence=evidence,
                        occurred_at=occurred_at,
                        scope_key=scope_key,
                    )
            else:
                pairs = {
                    "input_tokens": (rep.input_tokens, led[1]),
                    "output_tokens": (rep.output_tokens, led[2]),
                    "cached_tokens": (rep.cached_tokens, led[3]),
                }
                drifted = {
                    name: {"provider": r, "ledger": lg}
                    for name, (r, lg) in pairs.items()
                    if _beyond(Decimal(lg - r), Decimal(r), Decimal(tol.absolute_tokens), tol.relative)
                }
                if drifted:
                    evidence["drifted"] = drifted
                    yield Finding(
                        kind=MismatchKind.PROVIDER_USAGE_DRIFT,
                        identity=ident,
                        summary=f"{provider} {d} {model or '(no model)'}{' ' + scope if scope else ''}: "
                        + ", ".join(
                            f"{k} provider {format_credits(v['provider'])} vs ledger {format_credits(v['ledger'])}"
                            for k, v in drifted.items()
                        ),
                        unit="tokens",
                        expected=sum(r for r, _ in pairs.values()),
                        actual=sum(lg for _, lg in pairs.values()),
                        evidence=evidence,
                        occurred_at=occurred_at,
                        scope_key=scope_key,
                    )


# --- margin ----------------------------------------------------------------------------------------------------


def margin_candidates(
    session: Session, since: datetime, until: datetime, settlement_currency: str = "usd"
) -> list[Any]:
    """Accounts of the window that may have a negative margin or free production usage, with their sums and
    what they paid (what the engine may prefetch). Generous: check_margin decides exactly, in Decimal."""
    W = usage_in_window(session, since, until)
    # Plain sums per account, environment and billable first, then the few rows per account sorted into billed
    # and free: a third cheaper than the conditional sums over every roll-up row.
    by_kind = (
        select(
            W.c.account_id,
            W.c.environment,
            W.c.billable,
            func.sum(W.c.units).label("units"),
            func.sum(W.c.provider_cost_usd).label("cost"),
            func.sum(W.c.requests).label("n"),
        )
        .group_by(W.c.account_id, W.c.environment, W.c.billable)
        .subquery()
    )
    K = by_kind.c
    prod_free = and_(K.billable.is_(False), K.environment == UsageEnvironment.PRODUCTION)
    # Margin is over billed production usage; free production usage is its own review item.
    billed = and_(K.billable.is_(True), K.environment == UsageEnvironment.PRODUCTION)
    usage = (
        select(
            K.account_id.label("account_id"),
            func.sum(case((billed, K.units), else_=0)).label("units"),
            func.sum(case((billed, K.cost), else_=0)).label("cost"),
            func.sum(case((prod_free, K.n), else_=0)).label("free_n"),
            func.sum(case((prod_free, K.cost), else_=0)).label("free_cost"),
            func.sum(K.n).label("n"),
        )
        .group_by(K.account_id)
        .subquery()
    )
    paid = paid_grants(settlement_currency)
    stmt = (
        select(
            Account.customer_id,
            usage.c.account_id,
            usage.c.units,
            usage.c.cost,
            usage.c.free_n,
            usage.c.free_cost,
            usage.c.n,
            paid.c.minor,
            paid.c.units.label("paid_units"),
            paid.c.free_grants,
            paid.c.unknown_grants,
        )
        .join(usage, usage.c.account_id == Account.id)
        .outerjoin(paid, paid.c.account_id == Account.id)
        .where(
            # Only candidates leave the database (generously: Python decides exactly, in Decimal). A small
            # result needs no server-side cursor, so PostgreSQL may run the aggregate in parallel.
            or_(
                usage.c.free_n > 0,
                and_(
                    usage.c.cost > 0,
                    or_(
                        paid.c.units.is_(None),
                        paid.c.units == 0,
                        # Free credits or credits priced in another currency: check_margin splits them exactly.
                        paid.c.free_grants > 0,
                        paid.c.unknown_grants > 0,
                        # revenue <= 1.01 x cost, where revenue = units x minor / paid units / 100 and the cost
                        # is in integer 10^-10 USD here (as a plain number, so 101 binds as 101).
                        usage.c.units * paid.c.minor * 10**10
                        <= type_coerce(usage.c.cost, Numeric()) * paid.c.units * 101,
                    ),
                ),
            )
        )
        .order_by(Account.id)
    )
    return list(session.execute(stmt))


def check_margin(ctx: CheckContext) -> Iterator[Finding]:
    """Review items for the window: customers whose paid credits were worth less than the provider cost of what
    they funded (negative_margin), free credits that cost more than their allowance (free_credit_cost), and
    production usage marked non-billable.

    Revenue is in the settlement currency (see reconciliation.funding); it is compared with USD costs only when
    that currency is USD. Credits paid in another currency without a known settlement are left out of both
    sides and named in the evidence, never counted as worth nothing.
    """
    currency = ctx.config.reconciliation.settlement_currency
    rows = ctx.fetched("margin", lambda session: margin_candidates(session, ctx.since, ctx.until, currency))
    window = f"{ctx.since.isoformat()}|{ctx.until.isoformat()}"
    costly = [row.account_id for row in rows if Decimal(row.cost or 0) > 0]
    funding = consumption_funding(ctx.session, since=ctx.since, until=ctx.until, account_ids=costly, config=ctx.config)
    for row in rows:
        cost = Decimal(row.cost or 0)
        units = int(row.units or 0)
        split = split_margin(funding.get(row.account_id, Funding()), cost, ctx.config) if cost > 0 else None
        if split is not None and split.comparable and split.paid_cost_usd > 0 and split.revenue < split.paid_cost_usd:
            yield Finding(
                kind=MismatchKind.NEGATIVE_MARGIN,
                identity=f"{row.customer_id}|{window}",
                summary=f"customer {row.customer_id}: usage funded by paid credits cost "
                f"{format_usd(split.paid_cost_usd)} but those credits were worth {format_usd(split.revenue)}"
                + _unpriced_note(split),
                customer_id=row.customer_id,
                currency="usd",
                unit="usd",
                expected=split.revenue,
                actual=split.paid_cost_usd,
                evidence={
                    "ledger": {
                        "usage_records": int(row.n),
                        "units": units,
                        "provider_cost_usd": str(cost),
                        "paid_minor": int(row.minor or 0),
                        "paid_units": int(row.paid_units or 0),
                        "margin": split.as_dict(),
                        "by_feature_model": _margin_breakdown(ctx, row.account_id),
                    },
                },
                occurred_at=ctx.since,
            )
        if split is not None and split.free_cost_usd > split.free_allowance_usd:
            buckets = split.funding.free.values()
            yield Finding(
                kind=MismatchKind.FREE_CREDIT_COST,
                identity=f"{row.customer_id}|{window}",
                summary=f"customer {row.customer_id}: free credits ("
                + ", ".join(f"{format_credits(b.units)} {b.label}" for b in buckets)
                + f") cost {format_usd(split.free_cost_usd)}, over their allowance of "
                f"{format_usd(split.free_allowance_usd)}",
                customer_id=row.customer_id,
                currency="usd",
                unit="usd",
                expected=split.free_allowance_usd,
                actual=split.free_cost_usd,
                evidence={
                    "ledger": {
                        "provider_cost_usd": str(cost),
                        "margin": split.as_dict(),
                        "free_by_plan": [
                            {
                                "plan": b.label,
                                "credits": b.units,
                                "allowance_per_credit_usd": str(b.allowance_per_credit_usd),
                                "allowance_usd": str(b.allowance_usd),
                            }
                            for b in buckets
                        ],
                    },
                },
                occurred_at=ctx.since,
            )
        if row.free_n:
            yield Finding(
                kind=MismatchKind.NON_BILLABLE_PRODUCTION_USAGE,
                identity=f"{row.customer_id}|{window}",
                summary=f"customer {row.customer_id}: {row.free_n} production usage records marked non-billable "
                f"(provider cost {format_usd(Decimal(row.free_cost or 0))})",
                customer_id=row.customer_id,
                currency="usd",
                unit="usd",
                expected=Decimal(0),
                actual=Decimal(row.free_cost or 0),
                evidence={
                    "ledger": {"records": int(row.free_n), "provider_cost_usd": str(Decimal(row.free_cost or 0))}
                },
                occurred_at=ctx.since,
            )


def _unpriced_note(split: MarginSplit) -> str:
    f = split.funding
    if not f.unknown_units:
        return ""
    return (
        f" ({format_credits(f.unknown_units)} credits paid in {', '.join(sorted(f.unknown_currencies)).upper()} "
        f"have no known {split.currency.upper()} settlement and are left out)"
    )


def _margin_breakdown(ctx: CheckContext, account_id: int) -> list[dict[str, Any]]:
    A = usage_in_window(ctx.session, ctx.since, ctx.until, account_id=account_id)
    return [
        {"feature": f, "model": m, "units": int(u or 0), "cost_usd": str(Decimal(c or 0))}
        for f, m, u, c in ctx.session.execute(
            select(A.c.feature, A.c.model, func.sum(A.c.units), func.sum(A.c.provider_cost_usd))
            .where(A.c.billable.is_(True), A.c.environment == UsageEnvironment.PRODUCTION)
            .group_by(A.c.feature, A.c.model)
            .order_by(A.c.feature, A.c.model)
        )
    ]


# --- payouts ---------------------------------------------------------------------------------------------------


def _parent_charge(ctx: CheckContext, object_type: str, object_id: str) -> str | None:
    """The charge a refund or dispute belongs to: from this run's staged rows, else from Stripe."""
    S = StagedStripeObject
    found = ctx.session.scalar(
        select(S.ref).where(S.run_id == ctx.run_id, S.object_type == object_type, S.object_id == object_id).limit(1)
    )
    if found:
        return found
    try:
        return stripe_id(ctx.stripe.retrieve(object_type, object_id).get("charge"))
    except Exception as exc:
        if not is_not_found(exc):
            raise
        return None


def _charge_grant(ctx: CheckContext, charge_id: str) -> tuple[Grant | None, GrantSettlement | None]:
    """The paid grant a charge funded (by its kept settlement, this run's aliases, or its own id)."""
    settlement = ctx.session.scalars(
        select(GrantSettlement).where(GrantSettlement.charge_id == charge_id).limit(1)
    ).first()
    if settlement is not None:
        return ctx.session.get(Grant, settlement.grant_id), settlement
    A = StagedStripeAlias
    keys = select(A.key).where(
        A.run_id == ctx.run_id,
        A.payment_id.in_(select(A.payment_id).where(A.run_id == ctx.run_id, A.key == charge_id)),
    )
    grant = ctx.session.scalars(
        select(Grant)
        .where(
            Grant.source.in_(CHARGE_FUNDED_SOURCES),
            or_(Grant.stripe_object_id == charge_id, Grant.stripe_object_id.in_(keys)),
        )
        .order_by(Grant.id)
        .limit(1)
    ).first()
    return grant, None


def _ledger_side_of(ctx: CheckContext, txn: StagedStripeObject) -> tuple[str | None, dict[str, Any], Grant | None]:
    """(problem or None, the ledger's evidence, the grant involved) for one paid-out balance transaction."""
    source = txn.detail.get("source") or ""
    kind = object_type_of(source)
    if kind == "charge":
        grant, settlement = _charge_grant(ctx, source)
        if grant is None:
            return f"charge {source} ({txn.amount}) funds no grant in the ledger", {"grants": []}, None
        side: dict[str, Any] = {"grants": [_grant_evidence(grant)]}
        if settlement is not None:
            side["settlement"] = {"amount": settlement.settlement_minor, "fee": settlement.fee_minor}
            if settlement.settlement_minor != txn.amount or settlement.fee_minor != txn.detail.get("fee"):
                return (
                    f"charge {source}: paid out {txn.amount} (fee {txn.detail.get('fee')}), the ledger kept "
                    f"{settlement.settlement_minor} (fee {settlement.fee_minor})",
                    side,
                    grant,
                )
        return None, side, grant
    if kind in ("refund", "dispute"):
        charge = _parent_charge(ctx, kind, source)
        grant = _charge_grant(ctx, charge)[0] if charge else None
        named = [source, *([charge] if charge and kind == "refund" else [])]
        entries = list(
            ctx.session.execute(
                select(Entry.id, Entry.kind).where(
                    Entry.stripe_object_id.in_(named), Entry.kind.in_((EntryKind.CLAWBACK, EntryKind.FREEZE))
                )
            )
        )
        if not entries and grant is not None and kind == "dispute":
            # A dispute's freeze names no Stripe object: the funded grant's freeze or clawback is the ledger's side.
            entries = list(
                ctx.session.execute(
                    select(Entry.id, Entry.kind).where(
                        Entry.grant_id == grant.id, Entry.kind.in_((EntryKind.CLAWBACK, EntryKind.FREEZE))
                    )
                )
            )
        side = {
            "charge": charge,
            "grants": [_grant_evidence(grant)] if grant is not None else [],
            "entries": [{"id": e.id, "kind": e.kind.value} for e in entries],
        }
        if grant is None:
            return None, side, None  # the charge funds no grant: payment_without_grant reports it, if any
        if not entries:
            return f"{kind} {source} of charge {charge} ({txn.amount}) was paid out but never applied", side, grant
        return None, side, grant
    return None, {}, None  # fees, adjustments, the payout itself: only the total


# Paid-out balance transactions read per batch: the ones the ledger plainly agrees with are told apart in two
# queries per batch, so only the few that do not take the per-transaction look (and memory stays one batch).
PAYOUT_BATCH = 1000
NOT_TIED_STATUSES = ("failed", "canceled")


def _agreeing(ctx: CheckContext, batch: list[tuple[int, str, int, dict[str, Any]]]) -> set[int]:
    """Ids of staged transactions the ledger plainly agrees with: a charge whose kept settlement has the same
    amount and fee, a refund the ledger clawed back naming it. The rest take :func:`_ledger_side_of`."""
    # By the source's own kind: a dispute's withdrawal is an "adjustment" transaction whose source is the dispute.
    kinds = {row_id: object_type_of(str(d.get("source") or "")) for row_id, _, _, d in batch}
    charges = {str(d.get("source")) for row_id, _, _, d in batch if kinds[row_id] == "charge"}
    refunds = {str(d.get("source")) for row_id, _, _, d in batch if kinds[row_id] == "refund"}
    settled: dict[str, tuple[int, int]] = {}
    if charges:
        G = GrantSettlement
        for charge_id, amount, fee in ctx.session.execute(
            select(G.charge_id, G.settlement_minor, G.fee_minor).where(G.charge_id.in_(charges))
        ):
            settled.setdefault(charge_id, (int(amount), int(fee)))
    applied: set[str] = set()
    if refunds:
        applied = set(
            ctx.session.scalars(
                select(Entry.stripe_object_id).where(
                    Entry.stripe_object_id.in_(refunds), Entry.kind == EntryKind.CLAWBACK
                )
            )
        )
    fine = set()
    for row_id, _, amount, detail in batch:
        source, kind = str(detail.get("source") or ""), kinds[row_id]
        if kind == "charge":
            agrees = settled.get(source) == (amount, int(detail.get("fee") or 0))
        elif kind == "refund":
            agrees = source in applied
        else:
            agrees = kind != "dispute"  # fees, other adjustments, the payout itself: only the total
        if agrees:
            fine.add(row_id)
    return fine


def _doubtful(ctx: CheckContext, batch: list[tuple[int, str, int, dict[str, Any]]]) -> list[int]:
    """Ids in ``batch`` the ledger does not plainly agree with."""
    fine = _agreeing(ctx, batch) if batch else set()
    return [row_id for row_id, *_ in batch if row_id not in fine]


def check_payouts(ctx: CheckContext) -> Iterator[Finding]:
    """payout_mismatch: a payout whose balance transactions do not add up to it, and each paid-out charge,
    refund or dispute the ledger has no side for (or a different amount). Each payout's tie-out (its sums by
    transaction type) goes to ``ctx.payouts``, which the engine keeps in the ``payouts`` table."""
    S = StagedStripeObject
    payouts = list(
        ctx.session.scalars(select(S).where(S.run_id == ctx.run_id, S.object_type == "payout").order_by(S.id))
    )
    for po in payouts:
        tie: dict[str, Any] = {
            "payout": po.object_id,
            "amount": po.amount,
            "currency": po.currency,
            "status": po.status,
            "created": _iso(po.created),
            "arrival_date": po.detail.get("arrival_date"),
            "transactions": 0,
            "net": None,
            "by_type": {},
            "differences": 0,
            # Set when the payout is done with: a check stopped half-way leaves it None, and it is not kept.
            "tie_out": None,
        }
        ctx.payouts.append(tie)
        if po.status in NOT_TIED_STATUSES:
            tie["tie_out"] = "not_checked"  # its transactions went back to the balance, to be paid out again
            continue
        by_type: dict[str, dict[str, int]] = {}
        doubtful: list[int] = []
        batch: list[tuple[int, str, int, dict[str, Any]]] = []
        txns = (
            select(S.id, S.status, S.amount, S.detail)
            .where(S.run_id == ctx.run_id, S.object_type == "payout_txn", S.ref == po.object_id)
            .order_by(S.id)
            .execution_options(yield_per=PAYOUT_BATCH)
        )
        for row_id, kind, amount, detail in ctx.session.execute(txns):
            if kind == "payout":
                continue  # the payout's own transaction: it is what the others must add up to
            detail = detail or {}
            sums = by_type.setdefault(str(kind), {"count": 0, "amount": 0, "fee": 0, "net": 0})
            sums["count"] += 1
            sums["amount"] += int(amount or 0)
            sums["fee"] += int(detail.get("fee") or 0)
            sums["net"] += int(detail.get("net") or 0)
            batch.append((row_id, str(kind), int(amount or 0), detail))
            if len(batch) >= PAYOUT_BATCH:
                doubtful += _doubtful(ctx, batch)
                batch = []
        doubtful += _doubtful(ctx, batch)
        net = sum(x["net"] for x in by_type.values())
        count = sum(x["count"] for x in by_type.values())
        tie.update(net=net, transactions=count, by_type=dict(sorted(by_type.items())))
        if net != po.amount:
            tie["differences"] += 1
            yield Finding(
                kind=MismatchKind.PAYOUT_MISMATCH,
                identity=f"{po.object_id}|total",
                summary=f"payout {po.object_id} of {format_money(po.amount, po.currency)}: its transactions net "
                f"{format_money(net, po.currency)}",
                currency=po.currency,
                unit="minor",
                expected=net,
                actual=po.amount,
                evidence={"stripe": {"payout": po.object_id, "amount": po.amount, "transactions": count}},
                occurred_at=_utc(po.created),
            )
        for start in range(0, len(doubtful), PAYOUT_BATCH):
            ids = doubtful[start : start + PAYOUT_BATCH]
            for t in list(ctx.session.scalars(select(S).where(S.id.in_(ids)).order_by(S.id))):
                problem, ledger_side, grant = _ledger_side_of(ctx, t)
                if problem is None:
                    continue
                tie["differences"] += 1
                source = t.detail.get("source")
                yield Finding(
                    kind=MismatchKind.PAYOUT_MISMATCH,
                    identity=f"{po.object_id}|{t.object_id}",
                    summary=f"payout {po.object_id}: {problem}",
                    customer_id=customer_of(ctx, [source], grant),
                    currency=t.currency,
                    unit="minor",
                    expected=t.amount,
                    actual=None,
                    evidence={
                        "stripe": {
                            "payout": po.object_id,
                            "balance_transaction": t.object_id,
                            "type": t.status,
                            "source": source,
                            "amount": t.amount,
                            "fee": t.detail.get("fee"),
                            "net": t.detail.get("net"),
                        },
                        "ledger": ledger_side,
                    },
                    occurred_at=_utc(po.created),
                )
        tie["tie_out"] = "differs" if tie["differences"] else "ties"


# --- clawbacks that found the credits already spent ------------------------------------------------------------


def check_clawback_debt(ctx: CheckContext) -> Iterator[Finding]:
    """clawback_debt: a refund or lost dispute clawed back credits already spent; the ledger booked them as debt.

    Nothing disagrees here: the ledger did what it should. It is a review item, because someone must decide
    whether to recover the money, write the debt off, or suspend the customer.
    """
    stmt = (
        select(
            Entry.id,
            Entry.units,
            Entry.debt_delta,
            Entry.frozen_delta,
            Entry.reason,
            Entry.stripe_object_id,
            Entry.idempotency_key,
            Entry.created_at,
            Account.customer_id,
            Account.debt.label("account_debt"),
            Grant,
        )
        .join(Account, Account.id == Entry.account_id)
        .join(Grant, Grant.id == Entry.grant_id)
        .where(
            Entry.kind == EntryKind.CLAWBACK,
            Entry.debt_delta > 0,
            Entry.created_at >= ctx.since,
            Entry.created_at < ctx.until,
        )
        .order_by(Entry.id)
        .execution_options(**STREAM)
    )
    for row in ctx.session.execute(stmt):
        grant: Grant = row.Grant
        # The entry moves -(taken from remaining + debt) units; frozen units it took are in frozen_delta.
        wanted = -row.units - row.frozen_delta
        yield Finding(
            kind=MismatchKind.CLAWBACK_DEBT,
            identity=f"entry:{row.id}",
            summary=(
                f"{row.customer_id} had already spent {format_credits(row.debt_delta)} of the credits clawed back "
                f"from grant {grant.id} ({row.reason or 'clawback'}); recorded as debt"
            ),
            customer_id=row.customer_id,
            currency=grant.currency,
            unit="credits",
            expected=wanted,
            actual=wanted - row.debt_delta,
            occurred_at=_utc(row.created_at),
            evidence={
                "stripe": {
                    "object_id": row.stripe_object_id,
                    "payment": grant.stripe_object_id,
                    "events": _stored_events(ctx.session, [row.stripe_object_id, grant.stripe_object_id]),
                },
                "ledger": {
                    "entry_id": row.id,
                    "idempotency_key": row.idempotency_key,
                    "clawback_units": wanted,
                    "recovered_from_grant": wanted - row.debt_delta,
                    "debt_recorded": row.debt_delta,
                    "account_debt_now": row.account_debt,
                    "grant": _grant_evidence(grant),
                },
            },
        )
