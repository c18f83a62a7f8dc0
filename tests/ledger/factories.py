"""Small factories for ledger tests: keyword arguments, sensible defaults, unique ids."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from ledger.accounts import open_account, set_overdraft_limit
from ledger.consume import ConsumeResult, UsageInput, consume
from ledger.db import unit_of_work
from ledger.errors import LimitExceeded
from ledger.grants import GrantResult, grant_credits
from ledger.holds import HoldResult, place_hold
from ledger.models import Account, Entry, Grant, GrantSource, UsageEnvironment

_ids = itertools.count(1)


def unique(prefix: str) -> str:
    """A fresh id like ``cus_7``."""
    return f"{prefix}_{next(_ids)}"


def make_account(*, customer_id: str | None = None, external_id: str | None = None, overdraft_limit: int = 0) -> str:
    """Open an account (committed); return its customer id."""
    customer_id = customer_id or unique("cus")
    with unit_of_work() as session:
        open_account(session, customer_id, external_id=external_id)
        if overdraft_limit:
            set_overdraft_limit(session, customer_id, overdraft_limit)
    return customer_id


def make_grant(
    *,
    customer_id: str | None = None,
    units: int = 100,
    source: GrantSource = GrantSource.TOP_UP,
    key: str | None = None,
    priority: int = 0,
    expires_at: datetime | None = None,
    stripe_object_id: str | None = None,
) -> GrantResult:
    """Grant credits (committed), opening the account if needed."""
    with unit_of_work() as session:
        return grant_credits(
            session,
            customer_id or unique("cus"),
            units=units,
            source=source,
            idempotency_key=key or unique("grant"),
            priority=priority,
            expires_at=expires_at,
            stripe_object_id=stripe_object_id,
        )


def make_consume(
    *, customer_id: str, units: int | None = 1, request_id: str | None = None, usage: UsageInput | None = None
) -> ConsumeResult:
    """Consume (committed)."""
    with unit_of_work() as session:
        return consume(session, customer_id, request_id=request_id or unique("req"), units=units, usage=usage)


def make_hold(
    *, customer_id: str, units: int = 10, request_id: str | None = None, ttl_seconds: int = 600
) -> HoldResult:
    """Place a hold (committed)."""
    with unit_of_work() as session:
        return place_hold(
            session, customer_id, request_id=request_id or unique("hold"), units=units, ttl_seconds=ttl_seconds
        )


def make_usage(
    *,
    model: str | None = "gpt-4o-2024-08-06",
    provider: str | None = "openai",
    operation: str | None = None,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cached_tokens: int = 0,
    feature: str | None = "chat",
    user_id: str | None = "user_1",
    provider_cost_usd: Decimal | None = None,
    billable: bool = True,
    environment: UsageEnvironment = UsageEnvironment.PRODUCTION,
) -> UsageInput:
    """A usage record input."""
    return UsageInput(
        user_id=user_id,
        feature=feature,
        provider=provider,
        model=model,
        operation=operation,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_tokens=cached_tokens,
        provider_cost_usd=provider_cost_usd,
        billable=billable,
        environment=environment,
    )


def account_state(customer_id: str) -> tuple[int, int, int, int]:
    """(balance, held, debt, number of entries) of an account, read fresh."""
    with unit_of_work() as session:
        account = session.execute(select(Account).where(Account.customer_id == customer_id)).scalar_one()
        entries = len(session.execute(select(Entry.id).where(Entry.account_id == account.id)).all())
        return account.balance, account.held, account.debt, entries


def grant_remaining(grant_id: int) -> tuple[int, int]:
    """(remaining, frozen) of a grant, read fresh."""
    with unit_of_work() as session:
        grant = session.get_one(Grant, grant_id)
        return grant.remaining, grant.frozen


def race_at_limit(
    clients: int, attempt: Callable[[int], object], on_thread: Callable[[], None] = lambda: None
) -> tuple[list[object], list[LimitExceeded], list[BaseException]]:
    """``clients`` threads released at once, each calling ``attempt(i)`` once; what passed, what a limit refused,
    and any other error. A thread whose database connection slot was not free (a shared server) retries."""
    barrier = threading.Barrier(clients)
    passed: list[object] = []
    refused: list[LimitExceeded] = []
    errors: list[BaseException] = []

    def client(i: int) -> None:
        on_thread()
        barrier.wait()
        for _ in range(200):
            try:
                passed.append(attempt(i))
            except LimitExceeded as exc:
                refused.append(exc)
            except OperationalError as exc:
                if "too many clients" in str(exc):
                    time.sleep(0.05)
                    continue
                errors.append(exc)
            except BaseException as exc:  # reported to the caller
                errors.append(exc)
            return

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return passed, refused, errors

