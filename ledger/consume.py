"""Consumption: atomic, idempotent spending of credits, with the usage that caused it.

The consume path reads top-down: an edge (the usage API, the CLI, a caller's unit of work) calls one function
here; this module validates and prices the request into a :class:`~ledger.consumption.Consumption`; one backend
applies it and returns the result: PostgreSQL's ledger functions (:mod:`ledger.pgfast`, one round trip) or the
portable path (:mod:`ledger.portable`, SQLite and PostgreSQL with the functions switched off).

Replaying a request id with the same parameters returns the original result (``replayed=True``) and charges
nothing; with other parameters (any field that the record keeps, ``reason`` included), or from another customer,
it is an IdempotencyConflict.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ledger import limits, pgfast, portable
from ledger.config import BillingConfig, get_billing_config
from ledger.consumption import ConsumeOutcome, ConsumeResult, Consumption, key_taken
from ledger.db import get_engine, unit_of_work
from ledger.errors import InvalidRequest, LedgerError
from ledger.models import Entry
from ledger.posting import charge_hash, request_hash, require_key, require_positive, utcnow
from ledger.pricing import UsageInput, price_usage

__all__ = [
    "ConsumeInput",
    "ConsumeOutcome",
    "ConsumeResult",
    "UsageInput",
    "consume",
    "consume_batch",
    "consume_standalone",
    "price_usage",
]


@dataclass(frozen=True, slots=True)
class ConsumeInput:
    """One consumption as an edge received it, before it is checked and priced (an item of a batch)."""

    customer_id: str
    request_id: str
    units: int | None = None
    usage: UsageInput | None = None
    actor: str = "api"
    reason: str = ""


def price_consumption(item: ConsumeInput) -> Consumption:
    """Check a consumption request and price it (units given, else the usage's price), at the current time."""
    require_key("request_id", item.request_id)
    return Consumption(
        customer_id=item.customer_id,
        request_id=item.request_id,
        charge=charge_for(item.units, item.usage),
        digest=consume_digest(item),
        usage=item.usage,
        actor=item.actor,
        reason=item.reason,
        now=utcnow(),
    )


def charge_for(units: int | None, usage: UsageInput | None) -> int:
    """The units a request charges: given units, else the usage's price; test/internal usage charges 0."""
    if usage is not None:
        usage.validate()
    if units is not None:
        require_positive("units", units, allow_zero=True)
        return units if usage is None or usage.charges else 0
    if usage is None:
        raise InvalidRequest("give units or a usage to price")
    return price_usage(usage, get_billing_config())


def consume_digest(item: ConsumeInput) -> str:
    """The digest that tells a retry of this consumption from a reuse of its request id.

    It covers every field the ledger keeps of the request (customer, units, usage, reason), so a replay that
    would record something else is a conflict, not a silent 200.
    """
    if item.usage is None and (item.units is None or type(item.units) is int):  # a bool would dump as true
        return charge_hash(item.customer_id, item.units, item.reason)
    usage = item.usage.as_dict() if item.usage is not None else None
    return request_hash(customer_id=item.customer_id, units=item.units, usage=usage, reason=item.reason)


def consume(
    session: Session,
    customer_id: str,
    *,
    request_id: str,
    units: int | None = None,
    usage: UsageInput | None = None,
    actor: str = "api",
    reason: str = "",
) -> ConsumeResult:
    """Spend credits once per request id, drawing grants in order; refuse what the balance cannot cover.

    In the caller's unit of work (the caller commits). Raises the ledger's errors with nothing written.
    """
    request = price_consumption(ConsumeInput(customer_id, request_id, units, usage, actor, reason))
    config = get_billing_config()
    if not limits.enforced(config):
        return _apply(session, request)
    if pgfast.installed(session, pgfast.LIMITED_SIGNATURE):
        # One statement consumes and takes the limits' room (atomic: a refusal writes nothing).
        try:
            prepared = _prepare(session, request, config)
        except LedgerError:
            if portable.find_original(session, request.key) is None:
                raise
            return _apply(session, request)  # a replay: its first answer, whatever the plan says now
        try:
            limit_rows, refusal, _ = _limit_args(prepared)
            return pgfast.consume_limited(session, request, limit_rows, refusal)
        except IntegrityError as exc:
            raise key_taken(exc, request.request_id) or exc from exc
    outcome = _apply_alone(session, request, limited=True)
    if isinstance(outcome, LedgerError):
        raise outcome
    return outcome


def _apply(session: Session, request: Consumption) -> ConsumeResult:
    """The backend's consumption in the session's transaction."""
    try:
        if pgfast.enabled(session):
            return pgfast.consume(session, request)
        return portable.consume(session, request)
    except IntegrityError as exc:
        raise key_taken(exc, request.request_id) or exc from exc


def consume_standalone(
    customer_id: str,
    *,
    request_id: str,
    units: int | None = None,
    usage: UsageInput | None = None,
    actor: str = "api",
    reason: str = "",
) -> ConsumeResult:
    """:func:`consume` as a whole unit of work of its own, committed when it returns.

    For an edge whose unit of work is this one consumption (the CLI); same results and errors. On PostgreSQL it
    is one statement in autocommit on a pooled connection: one round trip where a unit of work takes three.
    Never call it inside another unit of work: it commits on a connection of its own (and would wait forever for
    an account lock that unit holds); there, call ``consume(session, ...)``.
    """
    (outcome,) = consume_batch([ConsumeInput(customer_id, request_id, units, usage, actor, reason)])
    if isinstance(outcome, LedgerError):
        raise outcome
    return outcome


def consume_batch(items: Sequence[ConsumeInput]) -> list[ConsumeOutcome]:
    """Apply many consumptions, each its own idempotent unit; one outcome per item, in order, all committed.

    One item's refusal (insufficient credits, unknown customer, a conflict, an invalid body) is that item's
    outcome and does not affect the others. The result equals applying the items one by one in order: a request
    id used twice in the batch replays (or conflicts with) its first use. Committed when it returns: on
    PostgreSQL in one statement (the batch's accounts locked in one order, so batches cannot deadlock), else in
    one transaction with a savepoint per item.
    """
    outcomes: list[ConsumeOutcome | None] = [None] * len(items)
    priced: list[tuple[int, Consumption]] = []
    for index, item in enumerate(items):
        try:
            priced.append((index, price_consumption(item)))
        except LedgerError as exc:
            outcomes[index] = exc
    if priced:
        requests = [request for _, request in priced]
        engine = get_engine()
        config = get_billing_config()
        limited = limits.enforced(config)
        if pgfast.enabled_for(engine) and not limited:
            applied = pgfast.consume_many_autocommit(engine, requests)
        elif limited and pgfast.installed_for(engine, pgfast.LIMITED_SIGNATURE):
            applied = _apply_limited_autocommit(engine, requests, config)
        else:
            # Limits are counted in the consumption's own transaction: one unit of work, a savepoint per item.
            with unit_of_work() as session:
                applied = [_apply_alone(session, request, limited=limited) for request in requests]
        for (index, _), outcome in zip(priced, applied, strict=True):
            outcomes[index] = outcome
    return [outcome for outcome in outcomes if outcome is not None]


def _prepare(session: Session, request: Consumption, config: BillingConfig) -> limits.PreparedLimits | None:
    """Check entitlements and suspension and build the request's limit rows (reads only if the config needs)."""
    counted = limits.limit_request(request.usage, units=request.charge, config=config)
    return limits.prepare_limits(session, request.customer_id, counted, now=request.now, config=config)


def _limit_args(prepared: limits.PreparedLimits | None) -> pgfast.Limited:
    if prepared is None:
        return None, None, ()
    return prepared.as_json(), prepared.refusal, prepared.counter_rows()


def _apply_limited_autocommit(
    engine: Engine, requests: Sequence[Consumption], config: BillingConfig
) -> list[ConsumeOutcome]:
    """The consumptions in one statement that also takes each one's limit room (PostgreSQL), as without limits."""
    prepared: list[limits.PreparedLimits | LedgerError | None] = []
    # The plans and suspension are read here when the config has entitlements, plan limits or suspending plans;
    # otherwise the session never touches the database.
    with unit_of_work() as session:
        for request in requests:
            try:
                prepared.append(_prepare(session, request, config))
            except LedgerError as exc:
                prepared.append(exc)
        refused = [i for i, rows in enumerate(prepared) if isinstance(rows, LedgerError)]
        if refused:
            # A replay is recognized before the entitlements and suspension that refused it (as the portable path
            # does): a retry after the customer's plan changed gets its first answer. Its key is taken, so the
            # consumption without limits replays it (or answers a conflict), and takes no room.
            taken = _taken_keys(session, [requests[i].key for i in refused])
            for i in refused:
                if requests[i].key in taken:
                    prepared[i] = None
    chosen = [(i, rows) for i, rows in enumerate(prepared) if not isinstance(rows, LedgerError)]
    applied = pgfast.consume_many_autocommit(
        engine, [requests[i] for i, _ in chosen], [_limit_args(rows) for _, rows in chosen]
    )
    by_position = {i: outcome for (i, _), outcome in zip(chosen, applied, strict=True)}
    outcomes: list[ConsumeOutcome] = []
    for i, rows in enumerate(prepared):
        outcomes.append(rows if isinstance(rows, LedgerError) else by_position[i])
    return outcomes


def _taken_keys(session: Session, keys: Sequence[str]) -> set[str]:
    """Which of these consumption keys an entry already has (a replay, or another customer's conflict)."""
    return set(session.scalars(select(Entry.idempotency_key).where(Entry.idempotency_key.in_(keys))))


def _apply_alone(session: Session, request: Consumption, *, limited: bool) -> ConsumeOutcome:
    """One item in a savepoint: its refusal (a limit's included) undoes only what it wrote."""
    savepoint = session.begin_nested()
    try:
        result = _apply(session, request)
        if limited and not result.replayed:
            # A replay took its room when it was first applied; a limit refused undoes the consumption too.
            usage = limits.limit_request(request.usage, units=request.charge)
            limits.reserve_limits(session, request.customer_id, usage, now=request.now)
    except LedgerError as exc:
        savepoint.rollback()
        return exc
    except BaseException:
        savepoint.rollback()
        raise
    savepoint.commit()
    return result
