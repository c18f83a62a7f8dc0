"""Each subscription's state and access, the customer's access as the best of them, and the plan grants of a period.

A customer may hold several subscriptions. Each keeps what its newest subscription event said (``object_as_of``)
and the access it gives (``access_as_of``, moved by its subscription events and by its invoices' paid/failed
events), each newer-only in Stripe time, so any delivery order ends in the same rows. The account's
``access_state`` is then the best of its subscriptions' states: canceling one leaves another's access intact.

The grants made for a subscription's period (renewal, plan change, trial) are grouped by the period's end, so a
``full`` upgrade can retire what is left of the period's earlier plan grants and a prorated downgrade can take
back unspent credits, whichever of the period's events lands first (see :func:`settle_period`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ledger.accounts import ensure_account_id, get_account
from ledger.errors import InvalidRequest
from ledger.models import (
    AccessState,
    Account,
    EntryKind,
    Grant,
    Subscription,
    SubscriptionGrant,
    SubscriptionReduction,
    SubscriptionReductionTake,
)
from ledger.posting import (
    ACCOUNTS,
    GRANTS,
    LockedAccount,
    as_utc,
    forget,
    insert_entry,
    lock_account_by_id,
    move_grant_units,
    save_account,
    upsert,
    utcnow,
)

# Best first: the customer's access is the best state any of their subscriptions gives.
ACCESS_RANK: dict[AccessState, int] = {
    AccessState.ACTIVE: 0,
    AccessState.TRIALING: 1,
    AccessState.PAST_DUE: 2,
    AccessState.SUSPENDED: 3,
    AccessState.CANCELED: 4,
}


@dataclass(frozen=True, slots=True)
class SubscriptionFacts:
    """What one subscription event says about its subscription."""

    subscription_id: str
    status: str
    price: str | None = None
    quantity: int = 1
    current_period_start: datetime | None = None
    current_period_end: datetime | None = None
    cancel_at_period_end: bool = False
    cancel_at: datetime | None = None
    pause_collection: str | None = None
    trial_end: datetime | None = None


@dataclass(frozen=True, slots=True)
class SubscriptionView:
    """A subscription as the balance API, the CLI and the review pages show it."""

    subscription_id: str
    status: str | None
    price: str | None
    plan: str | None
    quantity: int
    current_period_start: datetime | None
    current_period_end: datetime | None
    cancel_at_period_end: bool
    cancel_at: datetime | None
    pause_collection: str | None
    trial_end: datetime | None
    access_state: AccessState
    grace_until: datetime | None


def _aware(name: str, value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise InvalidRequest(f"{name} must be a timezone-aware datetime")
    return as_utc(value)


def _locked_row(session: Session, customer_id: str, subscription_id: str) -> Subscription:
    account_id = ensure_account_id(session, customer_id)
    # The account first, then the subscription: every path that moves units locks in this order.
    lock_account_by_id(session, account_id)
    session.execute(
        upsert(session, Subscription.__table__)  # type: ignore[arg-type]
        .values(subscription_id=subscription_id, account_id=account_id)
        .on_conflict_do_nothing(index_elements=["subscription_id"])
    )
    row = session.scalars(
        select(Subscription)
        .where(Subscription.subscription_id == subscription_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one()
    if row.account_id != account_id:
        raise InvalidRequest(f"subscription {subscription_id} belongs to another customer")
    return row


def _newer(as_of: datetime, applied: datetime | None) -> bool:
    return applied is None or as_utc(applied) < as_of  # type: ignore[operator]


def record_subscription(
    session: Session,
    customer_id: str,
    facts: SubscriptionFacts,
    *,
    access: AccessState,
    as_of: datetime,
    source: str,
    grace_until: datetime | None = None,
) -> tuple[bool, bool]:
    """Apply what a subscription event says, each part only when newer; return (fields applied, access applied).

    Then the customer's access is recomputed from all their subscriptions.
    """
    as_of_utc = _aware("as_of", as_of)
    assert as_of_utc is not None
    row = _locked_row(session, customer_id, facts.subscription_id)
    fields = _newer(as_of_utc, row.object_as_of)
    if fields:
        row.status = facts.status
        row.price = facts.price
        row.quantity = facts.quantity
        row.current_period_start = _aware("current_period_start", facts.current_period_start)
        row.current_period_end = _aware("current_period_end", facts.current_period_end)
        row.cancel_at_period_end = facts.cancel_at_period_end
        row.cancel_at = _aware("cancel_at", facts.cancel_at)
        row.pause_collection = facts.pause_collection
        row.trial_end = _aware("trial_end", facts.trial_end)
        row.object_as_of = as_of_utc
    applied = _apply_access(row, access, as_of_utc, source, grace_until)
    session.flush()
    if applied:
        refresh_account_access(session, row.account_id)
    return fields, applied


def set_subscription_access(
    session: Session,
    customer_id: str,
    subscription_id: str,
    state: AccessState,
    *,
    as_of: datetime,
    source: str,
    grace_until: datetime | None = None,
) -> bool:
    """Apply the access an invoice event gives one subscription unless a newer one was applied; refresh the account."""
    as_of_utc = _aware("as_of", as_of)
    assert as_of_utc is not None
    row = _locked_row(session, customer_id, subscription_id)
    applied = _apply_access(row, AccessState(state), as_of_utc, source, grace_until)
    session.flush()
    if applied:
        refresh_account_access(session, row.account_id)
    return applied


def _apply_access(
    row: Subscription, state: AccessState, as_of: datetime, source: str, grace_until: datetime | None
) -> bool:
    if not _newer(as_of, row.access_as_of):
        return False
    row.access_state = state
    row.access_as_of = as_of
    row.access_source = source[:255]
    row.grace_until = _aware("grace_until", grace_until) if state is AccessState.PAST_DUE else None
    return True


def refresh_account_access(session: Session, account_id: int) -> None:
    """Set the account's access to the best of its subscriptions' (the newest of equally good ones)."""
    subs = session.scalars(select(Subscription).where(Subscription.account_id == account_id)).all()
    if not subs:
        return
    best = min(
        subs,
        key=lambda s: (
            ACCESS_RANK[AccessState(s.access_state)],
            # Of two past_due subscriptions, the later grace deadline; else the newest state.
            -(as_utc(s.grace_until).timestamp() if s.grace_until else 0),  # type: ignore[union-attr]
            -(as_utc(s.access_as_of).timestamp() if s.access_as_of else 0),  # type: ignore[union-attr]
            s.subscription_id,
        ),
    )
    stamps = [t for t in (as_utc(s.access_as_of) for s in subs) if t is not None]
    newest = max(stamps) if stamps else None
    session.execute(
        update(ACCOUNTS)
        .where(ACCOUNTS.c.id == account_id)
        .values(
            access_state=AccessState(best.access_state),
            grace_until=best.grace_until,
            access_as_of=newest,
            access_source=f"best of {len(subs)} subscription(s): {best.subscription_id}"[:255],
            updated_at=utcnow(),
        )
    )
    forget(session, Account, [account_id])


def subscriptions_of(session: Session, customer_id: str) -> list[SubscriptionView]:
    """The customer's subscriptions, best access first."""
    from ledger.config import get_billing_config  # the config names plans; read only for display

    account = get_account(session, customer_id)
    config = get_billing_config()
    rows = session.scalars(
        select(Subscription)
        .where(Subscription.account_id == account.id)
        .order_by(Subscription.subscription_id)
        .execution_options(populate_existing=True)
    ).all()
    views = [
        SubscriptionView(
            subscription_id=s.subscription_id,
            status=s.status,
            price=s.price,
            plan=(plan.name or plan.price) if (plan := config.plan_for_price(s.price)) is not None else None,
            quantity=s.quantity,
            current_period_start=as_utc(s.current_period_start),
            current_period_end=as_utc(s.current_period_end),
            cancel_at_period_end=bool(s.cancel_at_period_end),
            cancel_at=as_utc(s.cancel_at),
            pause_collection=s.pause_collection,
            trial_end=as_utc(s.trial_end),
            access_state=AccessState(s.access_state),
            grace_until=as_utc(s.grace_until),
        )
        for s in rows
    ]
    return sorted(views, key=lambda v: (ACCESS_RANK[v.access_state], v.subscription_id))


# --- the plan grants of a period ---------------------------------------------------------------------------------


def record_plan_grant(
    session: Session,
    grant_id: int,
    *,
    subscription_id: str,
    kind: str,
    period_end: datetime | None,
    effective_at: datetime,
    supersedes: bool = False,
    invoice_id: str | None = None,
) -> None:
    """Remember that a grant was made for a subscription's period (idempotent: a grant is recorded once)."""
    session.execute(
        upsert(session, SubscriptionGrant.__table__)  # type: ignore[arg-type]
        .values(
            grant_id=grant_id,
            subscription_id=subscription_id,
            kind=kind,
            period_end=_aware("period_end", period_end),
            effective_at=_aware("effective_at", effective_at),
            supersedes=supersedes,
            invoice_id=invoice_id,
        )
        .on_conflict_do_nothing(index_elements=["grant_id"])
    )


def record_reduction(
    session: Session,
    change_key: str,
    *,
    subscription_id: str,
    period_end: datetime | None,
    effective_at: datetime,
    units: int,
) -> None:
    """Remember that a prorated downgrade takes back up to ``units`` unspent credits of its period (once per key)."""
    if units <= 0:
        return
    session.execute(
        upsert(session, SubscriptionReduction.__table__)  # type: ignore[arg-type]
        .values(
            change_key=change_key,
            subscription_id=subscription_id,
            period_end=_aware("period_end", period_end),
            effective_at=_aware("effective_at", effective_at),
            units=units,
            applied=0,
        )
        .on_conflict_do_nothing(index_elements=["change_key"])
    )


def settle_period(session: Session, customer_id: str, subscription_id: str, period_end: datetime | None) -> int:
    """Apply the period's full upgrades and prorated downgrades to its plan grants; return the units retired.

    Order-independent: a grant a ``full`` upgrade supersedes (an earlier effective time in the same period) is
    retired entirely at the upgrade's time, whether it landed before or after the upgrade, and what reductions
    had taken from it goes back to them; a downgrade's reduction then takes what is unspent of the period's
    grants in force before it (the most recent terms first), up to its units, as they land.
    """
    if period_end is None:
        return 0
    period_end = _aware("period_end", period_end)
    account_id = session.scalar(
        select(GRANTS.c.account_id)
        .join(SubscriptionGrant, SubscriptionGrant.grant_id == GRANTS.c.id)
        .where(SubscriptionGrant.subscription_id == subscription_id, SubscriptionGrant.period_end == period_end)
        .limit(1)
    )
    if account_id is None:
        return 0
    account = lock_account_by_id(session, account_id)
    # Read under the account's lock: consumption may have moved units since.
    rows = session.execute(
        select(SubscriptionGrant, GRANTS.c.remaining)
        .join(GRANTS, GRANTS.c.id == SubscriptionGrant.grant_id)
        .where(SubscriptionGrant.subscription_id == subscription_id, SubscriptionGrant.period_end == period_end)
        .execution_options(populate_existing=True)
    ).all()
    grants = sorted((r[0] for r in rows), key=lambda g: (as_utc(g.effective_at), g.kind, g.grant_id))
    remaining = {r[0].grant_id: r[1] for r in rows}
    reductions = {
        r.change_key: r
        for r in session.scalars(
            select(SubscriptionReduction)
            .where(
                SubscriptionReduction.subscription_id == subscription_id,
                SubscriptionReduction.period_end == period_end,
            )
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    }
    retired = 0
    full_times = [t for t in (as_utc(g.effective_at) for g in grants if g.supersedes) if t is not None]
    for g in grants:
        # A grant ends at the first full upgrade after its terms began (in any order of landing).
        later = [t for t in full_times if t > as_utc(g.effective_at)]  # type: ignore[operator]
        if not later:
            continue
        ended = min(later)
        session.execute(update(GRANTS).where(GRANTS.c.id == g.grant_id).values(expired_at=ended))
        if g.superseded:
            continue
        left = remaining[g.grant_id]
        if left > 0:
            _retire(session, account, g.grant_id, left, f"supersede:{g.grant_id}", "superseded by a full upgrade")
            retired += left
            remaining[g.grant_id] = 0
        g.superseded = True
        # What reductions took from it is theirs to take again from the grant in force.
        for take in session.scalars(
            select(SubscriptionReductionTake).where(SubscriptionReductionTake.grant_id == g.grant_id)
        ):
            if take.change_key in reductions:
                reductions[take.change_key].applied -= take.units
            take.units = 0
    # The reductions' shares, worked out afresh from the grants in force (newest terms first), so a grant that
    # lands late moves a share onto itself exactly as if it had landed first.
    takes = {
        (t.change_key, t.grant_id): t
        for t in session.scalars(
            select(SubscriptionReductionTake).where(SubscriptionReductionTake.change_key.in_(list(reductions)))
        )
    }
    active = [g for g in grants if not g.superseded]
    capacity = {
        g.grant_id: remaining[g.grant_id] + sum(t.units for (_, gid), t in takes.items() if gid == g.grant_id)
        for g in active
    }
    targets: dict[tuple[str, int], int] = {}
    for reduction in sorted(reductions.values(), key=lambda r: (as_utc(r.effective_at), r.change_key)):
        need = reduction.units
        for g in reversed(active):
            if need <= 0:
                break
            if not as_utc(g.effective_at) < as_utc(reduction.effective_at):  # type: ignore[operator]
                continue
            share = min(need, capacity[g.grant_id])
            if share > 0:
                targets[(reduction.change_key, g.grant_id)] = share
                capacity[g.grant_id] -= share
                need -= share
        reduction.applied = reduction.units - need
    active_ids = {g.grant_id for g in active}
    for pair in sorted(set(targets) | {p for p in takes if p[1] in active_ids}):
        change_key, grant_id = pair
        take = takes.get(pair) or SubscriptionReductionTake(change_key=change_key, grant_id=grant_id, units=0, moves=0)
        if pair not in takes:
            session.add(take)
        delta = targets.get(pair, 0) - take.units
        if delta == 0:
            continue
        take.moves += 1
        take.units += delta
        key = f"reduce:{change_key}:{grant_id}:{take.moves}"
        if delta > 0:
            _retire(session, account, grant_id, delta, key,
                    f"unspent plan credits taken back by a prorated downgrade ({change_key})")  # fmt: skip
            retired += delta
        else:
            _restore(session, account, grant_id, -delta, key,
                     f"a prorated downgrade's share moved to the period's newer grant ({change_key})")  # fmt: skip
            retired += delta
    session.flush()
    save_account(session, account)
    return retired


def _retire(
    session: Session,
    account: LockedAccount,
    grant_id: int,
    units: int,
    key: str,
    reason: str,
) -> None:
    """Take ``units`` unspent units out of a grant as an EXPIRE entry."""
    move_grant_units(session, account, [(grant_id, -units)])
    insert_entry(
        session,
        account,
        kind=EntryKind.EXPIRE,
        units=-units,
        key=key,
        grant_id=grant_id,
        reason=reason,
        allocations=[(grant_id, -units)],
    )
    forget(session, Grant, [grant_id])


def _restore(session: Session, account: LockedAccount, grant_id: int, units: int, key: str, reason: str) -> None:
    """Give ``units`` back to a grant a reduction had taken them from (an ADJUSTMENT entry)."""
    move_grant_units(session, account, [(grant_id, units)])
    insert_entry(
        session,
        account,
        kind=EntryKind.ADJUSTMENT,
        units=units,
        key=key,
        grant_id=grant_id,
        reason=reason,
        allocations=[(grant_id, units)],
    )
    forget(session, Grant, [grant_id])


def plan_grants_of_period(
    session: Session, subscription_id: str, period_end: datetime | None
) -> list[tuple[SubscriptionGrant, Grant]]:
    """The grants made for one period of a subscription, oldest terms first (for reconciliation and display)."""
    rows = session.execute(
        select(SubscriptionGrant, Grant)
        .join(Grant, Grant.id == SubscriptionGrant.grant_id)
        .where(
            SubscriptionGrant.subscription_id == subscription_id,
            SubscriptionGrant.period_end == _aware("period_end", period_end),
        )
        .order_by(SubscriptionGrant.effective_at, SubscriptionGrant.grant_id)
    ).all()
    return [(sg, g) for sg, g in rows]
