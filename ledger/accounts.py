"""Customer accounts and their access state."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.orm import Session

from ledger.errors import InvalidRequest, UnknownCustomer
from ledger.models import AccessState, Account
from ledger.posting import ACCOUNTS, LockedAccount, as_utc, forget, lock_account, run, upsert, utcnow

_ACCOUNT_ID = select(ACCOUNTS.c.id).where(ACCOUNTS.c.customer_id == bindparam("customer_id"))
# Applied only when newer than the state already applied (Stripe time), in the same statement.
_SET_ACCESS_STATE = (
    update(ACCOUNTS)
    .where(
        ACCOUNTS.c.customer_id == bindparam("customer"),
        or_(ACCOUNTS.c.access_as_of.is_(None), ACCOUNTS.c.access_as_of < bindparam("as_of")),
    )
    .values(
        access_state=bindparam("state"),
        access_as_of=bindparam("as_of"),
        access_source=bindparam("source"),
        grace_until=bindparam("grace"),
        updated_at=bindparam("now"),
    )
    .returning(ACCOUNTS.c.id)
)


def open_account(session: Session, customer_id: str, *, external_id: str | None = None) -> Account:
    """Get or create the account of a Stripe customer (idempotent, safe under concurrency)."""
    if not isinstance(customer_id, str) or not customer_id or len(customer_id) > 255:
        raise InvalidRequest("customer_id must be a non-empty string of at most 255 characters")
    session.execute(
        upsert(session, ACCOUNTS)
        .values(customer_id=customer_id, external_id=external_id)
        .on_conflict_do_nothing(index_elements=["customer_id"])
    )
    account = get_account(session, customer_id)
    if external_id is not None and account.external_id is None:
        account.external_id = external_id
        session.flush()
    return account


def open_accounts(session: Session, customer_ids: Sequence[str]) -> None:
    """Open the accounts of these customers that have none, in one statement (idempotent, customer id order)."""
    ids = sorted(set(customer_ids))
    for customer_id in ids:
        if not isinstance(customer_id, str) or not customer_id or len(customer_id) > 255:
            raise InvalidRequest("customer_id must be a non-empty string of at most 255 characters")
    if ids:
        run(
            session,
            upsert(session, ACCOUNTS).on_conflict_do_nothing(index_elements=["customer_id"]),
            [{"customer_id": customer_id} for customer_id in ids],
        )


def get_account(session: Session, customer_id: str) -> Account:
    """The account of ``customer_id``; raise UnknownCustomer when there is none."""
    account = session.scalars(
        select(Account).where(Account.customer_id == customer_id).execution_options(populate_existing=True)
    ).one_or_none()
    if account is None:
        raise UnknownCustomer(customer_id)
    return account


def ensure_account_id(session: Session, customer_id: str) -> int:
    """The row id of the customer's account, opening it if needed (one statement when it exists)."""
    account_id = run(session, _ACCOUNT_ID, {"customer_id": customer_id}).scalar_one_or_none()
    return account_id if account_id is not None else open_account(session, customer_id).id


def lock_or_open_account(session: Session, customer_id: str) -> LockedAccount:
    """Lock and read the customer's account, opening it first if there is none (one statement when it exists)."""
    try:
        return lock_account(session, customer_id)
    except UnknownCustomer:
        open_account(session, customer_id)
        return lock_account(session, customer_id)


def set_access_state(
    session: Session,
    customer_id: str,
    state: AccessState,
    *,
    as_of: datetime,
    source: str,
    grace_until: datetime | None = None,
) -> bool:
    """Apply an access state seen at Stripe time ``as_of`` unless a newer (or equal) one was applied already."""
    state = AccessState(state)
    as_of_utc = as_utc(as_of)
    if as_of_utc is None or as_of.tzinfo is None:
        raise InvalidRequest("as_of must be a timezone-aware datetime")
    if grace_until is not None and grace_until.tzinfo is None:
        raise InvalidRequest("grace_until must be a timezone-aware datetime")
    params = {
        "customer": customer_id,
        "state": state,
        "as_of": as_of_utc,
        "source": source[:255],
        "grace": as_utc(grace_until) if state is AccessState.PAST_DUE else None,
        "now": utcnow(),
    }
    applied = run(session, _SET_ACCESS_STATE, params).scalar_one_or_none()
    if applied is None:
        # Not applied: a state as new was applied already, or the customer has no account yet (open it, retry).
        if run(session, _ACCOUNT_ID, {"customer_id": customer_id}).scalar_one_or_none() is not None:
            return False
        open_account(session, customer_id)
        applied = run(session, _SET_ACCESS_STATE, params).scalar_one_or_none()
    if applied is not None and session.identity_map:
        forget(session, Account, [applied])
    return applied is not None


def set_overdraft_limit(session: Session, customer_id: str, units: int) -> None:
    """Let the account consume up to ``units`` beyond its grants (recorded as debt); 0 turns overdraft off."""
    if not isinstance(units, int) or units < 0:
        raise InvalidRequest("overdraft limit must be an integer >= 0")
    account_id = ensure_account_id(session, customer_id)
    session.execute(update(ACCOUNTS).where(ACCOUNTS.c.id == account_id).values(overdraft_limit=units))
    forget(session, Account, [account_id])
