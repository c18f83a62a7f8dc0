"""Usage limits and entitlements from the billing config, enforced atomically like a balance.

A limit (``[[limits]]``) caps what one scope value (the customer, one of its users, one of its workspaces) may
use per window (a UTC calendar hour, day or month, or the customer's billing period) of matching usage. Each
(limit, scope value, window) has a counter row; :func:`reserve_limits` adds a request to every applicable
counter with a conditional upsert (``... ON CONFLICT DO UPDATE ... WHERE used + n <= max``), so under any number
of concurrent requests at most the maximum passes, on PostgreSQL as on SQLite. It runs in the caller's
transaction (the consumption's, or the hold's): a refused or rolled-back consumption takes no room. A hold keeps
the rows it took (``holds.limit_rows``): :func:`settle_limits` moves them to what a capture used, or gives them back
on release or expiry, in the windows they were taken in. On PostgreSQL the ledger functions do all of it in their
own statement (``ledger_consume`` / ``ledger_hold`` calling ``limits_reserve``, ``ledger_capture`` /
``ledger_release`` calling ``limits_settle``).

Entitlements (``allow_operations``, ``allow_features``, ``allow_models`` on a plan) say what a plan may use at
all; a customer on several plans may use what any of them allows.

Requests without the scope's value (no ``user_id`` for a per-user limit) count under the customer, so leaving
the field out never gets around a limit.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fnmatch import fnmatchcase
from functools import cached_property, lru_cache
from typing import Any, NoReturn

from sqlalchemy import BigInteger, Table, and_, bindparam, case, select, type_coerce, update
from sqlalchemy.orm import Session

from ledger import pgfast
from ledger.config import BillingConfig, Limit, LimitMeasure, LimitScope, LimitWindow, OnSpike, get_billing_config
from ledger.errors import AccessRefused, InvalidRequest, LimitExceeded, NotEntitled
from ledger.models import Grant, GrantSource, LimitCounter, Subscription, UsageSuspension
from ledger.outbox import emit
from ledger.posting import ACCOUNTS, as_utc, for_each_backend, run
from ledger.pricing import UsageInput, provider_cost

COUNTERS: Table = LimitCounter.__table__  # type: ignore[assignment]
SUSPENSIONS: Table = UsageSuspension.__table__  # type: ignore[assignment]
GRANTS: Table = Grant.__table__  # type: ignore[assignment]
SUBSCRIPTIONS: Table = Subscription.__table__  # type: ignore[assignment]
MEASURE_COLUMNS = {
    LimitMeasure.REQUESTS: "requests",
    LimitMeasure.UNITS: "units",
    LimitMeasure.TOKENS: "tokens",
    LimitMeasure.COST_USD: "cost_usd",
}
_KEY = ["limit_name", "scope_value", "window_start"]


@dataclass(frozen=True)
class LimitRequest:
    """What a call would use, as limits and entitlements see it (the usage body's fields)."""

    operation: str | None = None
    feature: str | None = None
    provider: str | None = None
    model: str | None = None
    user_id: str | None = None
    workspace: str | None = None
    units: int = 0
    tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    requests: int = 1

    def amount(self, measure: LimitMeasure) -> int | Decimal:
        """How much of ``measure`` this request uses."""
        if measure is LimitMeasure.REQUESTS:
            return self.requests
        if measure is LimitMeasure.UNITS:
            return self.units
        if measure is LimitMeasure.TOKENS:
            return self.tokens
        return self.cost_usd


def limit_request(usage: UsageInput | None, *, units: int, config: BillingConfig | None = None) -> LimitRequest:
    """What a consumption or hold uses, as limits count it: the usage's fields, the priced units, its tokens and
    its provider cost (as reported, else estimated from the config's list prices)."""
    if usage is None:
        return LimitRequest(units=units)
    return LimitRequest(
        operation=usage.operation,
        feature=usage.feature,
        provider=usage.provider,
        model=usage.model,
        user_id=usage.user_id,
        workspace=usage.workspace,
        units=units,
        tokens=usage.input_tokens + usage.output_tokens + usage.cached_tokens,
        cost_usd=provider_cost(usage, config or get_billing_config()),
    )


@dataclass(frozen=True)
class CustomerPlans:
    """The plans (Stripe prices) a customer is on now, and the current billing period when known."""

    plans: tuple[str, ...] = ()
    period: tuple[datetime, datetime] | None = None


@dataclass(frozen=True)
class Reservation:
    """Room taken in one limit's window by one request: the counter after it, and the limit's maximum."""

    limit: str
    scope_value: str
    window_start: datetime
    reset_at: datetime
    measure: LimitMeasure
    used: int | Decimal
    maximum: int | Decimal


@dataclass(frozen=True)
class LimitStatus:
    """A limit as it stands for a scope value now: used, remaining and when the window resets."""

    limit: str
    scope: LimitScope
    scope_value: str
    window: LimitWindow
    measure: LimitMeasure
    used: int | Decimal
    maximum: int | Decimal
    remaining: int | Decimal
    window_start: datetime
    reset_at: datetime
    filters: dict[str, str]


# --- pure rules -------------------------------------------------------------------------------------------------


def matches(pattern: str | None, value: str | None) -> bool:
    """Whether ``value`` matches a limit's matcher: no matcher matches anything; exact or glob ("gpt-4*")."""
    if pattern is None:
        return True
    return value is not None and fnmatchcase(value, pattern)


def applies(limit: Limit, plans: Sequence[str], request: LimitRequest) -> bool:
    """Whether ``limit`` covers this request of a customer on ``plans``."""
    if limit.plans is not None and not set(limit.plans) & set(plans):
        return False
    return (
        matches(limit.operation, request.operation)
        and matches(limit.feature, request.feature)
        and matches(limit.provider, request.provider)
        and matches(limit.model, request.model)
    )


def applicable_limits(config: BillingConfig, plans: Sequence[str], request: LimitRequest) -> list[Limit]:
    """The limits of the config that cover this request, by name (the order counters are locked in)."""
    return [limit for limit in _facts(config).by_name if applies(limit, plans, request)]


@dataclass(frozen=True)
class _ConfigFacts:
    """What every consumption asks of the config, worked out once per config (it is read once, at start-up)."""

    config: BillingConfig
    by_name: tuple[Limit, ...]
    needs_plans: bool
    suspends: bool
    # Per limit name: its counter's column and its maximum as the counter stores it.
    stored: dict[str, tuple[str, int]]


_FACTS: dict[int, _ConfigFacts] = {}


def _facts(config: BillingConfig) -> _ConfigFacts:
    found = _FACTS.get(id(config))
    if found is None or found.config is not config:
        found = _FACTS[id(config)] = _ConfigFacts(
            config,
            tuple(sorted(config.limits, key=lambda lim: lim.name)),
            _needs_plans_of(config),
            _suspends_of(config),
            {lim.name: (MEASURE_COLUMNS[lim.measure], _stored_maximum(lim)) for lim in config.limits},
        )
    return found


def _add_month(moment: datetime) -> datetime:
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return moment.replace(year=year, month=month)


def window_bounds(
    window: LimitWindow, now: datetime, period: tuple[datetime, datetime] | None = None
) -> tuple[datetime, datetime]:
    """The window containing ``now``: [start, reset). UTC calendar hour, day, month; or the billing period
    (the customer's current subscription period when known and containing ``now``, else the calendar month)."""
    if window is LimitWindow.BILLING_PERIOD and period is not None:
        p_start, p_end = period[0].astimezone(UTC), period[1].astimezone(UTC)
        if p_start <= now < p_end:
            return p_start, p_end
    # A calendar window depends only on the UTC hour: worked out once per hour (every limited call asks, per limit).
    return _calendar_window(window, int(now.timestamp()) // 3600)


@lru_cache(maxsize=64)
def _calendar_window(window: LimitWindow, hour: int) -> tuple[datetime, datetime]:
    """The UTC calendar hour, day or month (a billing period without a known period) containing ``hour``."""
    now = datetime.fromtimestamp(hour * 3600, UTC)
    if window is LimitWindow.HOUR:
        return now, now + timedelta(hours=1)
    if window is LimitWindow.DAY:
        start = now.replace(hour=0)
        return start, start + timedelta(days=1)
    start = now.replace(day=1, hour=0)
    return start, _add_month(start)


def scope_value(limit: Limit, customer_id: str, request: LimitRequest) -> str:
    """The counter's scope value: the customer, or one of its users or workspaces (the customer when unnamed)."""
    if limit.scope is LimitScope.USER and request.user_id:
        return f"{customer_id}/user:{request.user_id}"
    if limit.scope is LimitScope.WORKSPACE and request.workspace:
        return f"{customer_id}/workspace:{request.workspace}"
    return customer_id


def entitlement_refusal(
    config: BillingConfig, customer_id: str, plans: Sequence[str], request: LimitRequest
) -> NotEntitled | None:
    """Why the customer's plans do not allow this request (the first thing not allowed), or None."""
    known = [p for p in (config.plan_for_price(price) for price in plans) if p is not None]
    if not known:
        return None
    for what, value, lists in (
        ("operation", request.operation, [p.allow_operations for p in known]),
        ("feature", request.feature, [p.allow_features for p in known]),
        ("model", request.model, [p.allow_models for p in known]),
    ):
        if value is None or any(allowed is None for allowed in lists):
            continue
        if not any(fnmatchcase(value, pattern) for allowed in lists if allowed for pattern in allowed):
            return NotEntitled(customer_id, what=what, value=value, plans=[p.price for p in known])
    return None


def entitlements(config: BillingConfig, plans: Sequence[str]) -> dict[str, list[str] | None]:
    """What the customer's plans allow, per kind (None: everything)."""
    known = [p for p in (config.plan_for_price(price) for price in plans) if p is not None]
    result: dict[str, list[str] | None] = {}
    for kind in ("operations", "features", "models"):
        lists = [getattr(p, f"allow_{kind}") for p in known]
        if not known or any(allowed is None for allowed in lists):
            result[kind] = None
        else:
            result[kind] = sorted({pattern for allowed in lists for pattern in allowed})
    return result


def enforced(config: BillingConfig) -> bool:
    """Whether consumption must take room in limits or check entitlements (anything of the kind configured)."""
    return bool(config.limits) or _needs_plans(config) or _suspends(config)


def _needs_plans(config: BillingConfig) -> bool:
    return _facts(config).needs_plans


def _suspends(config: BillingConfig) -> bool:
    return _facts(config).suspends


def _needs_plans_of(config: BillingConfig) -> bool:
    return any(lim.plans is not None or lim.window is LimitWindow.BILLING_PERIOD for lim in config.limits) or any(
        p.allow_operations is not None or p.allow_features is not None or p.allow_models is not None
        for p in config.plans
    )


def _suspends_of(config: BillingConfig) -> bool:
    return any(p.on_spike is OnSpike.SUSPEND for p in config.plans)


# --- reads ------------------------------------------------------------------------------------------------------


# Subscription statuses under which a customer is on the subscription's plan (past_due included: its access
# policy decides what it may spend, its plan still says what it may use).
LIVE_STATUSES = ("active", "trialing", "past_due")


def customer_plans(
    session: Session, customer_id: str, now: datetime, *, config: BillingConfig | None = None
) -> CustomerPlans:
    """The plans a customer is on now and the current period: from its subscriptions (those live now), else,
    for a customer with no subscription on record, from its renewal grants covering ``now``."""
    config = config or get_billing_config()
    if not config.plans:
        return CustomerPlans()
    found = _plans_from_subscriptions(session, customer_id, now, config)
    if found is not None:
        return found
    return _plans_from_renewals(session, customer_id, now, config)


def _plans_from_subscriptions(
    session: Session, customer_id: str, now: datetime, config: BillingConfig
) -> CustomerPlans | None:
    """The configured plans of the customer's live subscriptions (the period: the first one's containing ``now``);
    None when no subscription of the customer has a status on record."""
    rows = session.execute(
        select(SUBSCRIPTIONS.c.status, SUBSCRIPTIONS.c.price, SUBSCRIPTIONS.c.current_period_start,
               SUBSCRIPTIONS.c.current_period_end)
        .join(ACCOUNTS, ACCOUNTS.c.id == SUBSCRIPTIONS.c.account_id)
        .where(ACCOUNTS.c.customer_id == customer_id, SUBSCRIPTIONS.c.status.is_not(None))
        .order_by(SUBSCRIPTIONS.c.subscription_id)
    ).all()  # fmt: skip
    if not rows:
        return None
    plans: list[str] = []
    period: tuple[datetime, datetime] | None = None
    for row in rows:
        plan = config.plan_for_price(row.price)
        if row.status not in LIVE_STATUSES or plan is None or plan.price in plans:
            continue
        plans.append(plan.price)
        start, end = as_utc(row.current_period_start), as_utc(row.current_period_end)
        if period is None and start is not None and end is not None and start <= now < end:
            period = (start, end)
    return CustomerPlans(tuple(plans), period)


def _plans_from_renewals(session: Session, customer_id: str, now: datetime, config: BillingConfig) -> CustomerPlans:
    """The plans named by the customer's renewal grants covering ``now``, and their period.

    A renewal grant records its period and names its plan at the start of its reason (the invoice handler
    writes ``"<plan name or price> subscription_cycle in_..."``).
    """
    rows = session.execute(
        select(GRANTS.c.reason, GRANTS.c.period_start, GRANTS.c.period_end)
        .join(ACCOUNTS, ACCOUNTS.c.id == GRANTS.c.account_id)
        .where(
            ACCOUNTS.c.customer_id == customer_id,
            GRANTS.c.source == GrantSource.RENEWAL,
            GRANTS.c.period_start.is_not(None),
            GRANTS.c.period_start <= now,
            GRANTS.c.period_end > now,
        )
        .order_by(GRANTS.c.id.desc())
    ).all()
    plans: list[str] = []
    period: tuple[datetime, datetime] | None = None
    for row in rows:
        for plan in config.plans:
            label = plan.name or plan.price
            if (row.reason.startswith(label + " ") or row.reason.startswith(plan.price + " ")) and (
                plan.price not in plans
            ):
                plans.append(plan.price)
                if period is None:
                    start, end = as_utc(row.period_start), as_utc(row.period_end)
                    assert start is not None and end is not None
                    period = (start, end)
    return CustomerPlans(tuple(plans), period)


def active_suspension(session: Session, customer_id: str) -> Any | None:
    """The customer's usage suspension in force (a spike under review), or None."""
    return session.execute(
        select(SUSPENSIONS)
        .where(SUSPENSIONS.c.customer_id == customer_id, SUSPENSIONS.c.lifted_at.is_(None))
        .order_by(SUSPENSIONS.c.id)
        .limit(1)
    ).first()


def _used(session: Session, limit: str, value: str, start: datetime, column: str) -> int | Decimal:
    found = session.execute(
        select(COUNTERS.c[column]).where(
            COUNTERS.c.limit_name == limit, COUNTERS.c.scope_value == value, COUNTERS.c.window_start == start
        )
    ).scalar_one_or_none()
    if found is None:
        return Decimal(0) if column == "cost_usd" else 0
    return Decimal(found) if column == "cost_usd" else int(found)


def limit_usage(
    session: Session,
    customer_id: str,
    *,
    now: datetime,
    user_id: str | None = None,
    workspace: str | None = None,
    plans: CustomerPlans | None = None,
    config: BillingConfig | None = None,
) -> list[LimitStatus]:
    """Every limit that can apply to the customer: used, remaining and reset time for the customer itself, or
    for ``user_id`` / ``workspace`` where the limit is per user or per workspace."""
    config = config or get_billing_config()
    plans = plans if plans is not None else customer_plans(session, customer_id, now, config=config)
    probe = LimitRequest(user_id=user_id, workspace=workspace)
    statuses: list[LimitStatus] = []
    for limit in sorted(config.limits, key=lambda lim: lim.name):
        if limit.plans is not None and not set(limit.plans) & set(plans.plans):
            continue
        start, reset = window_bounds(limit.window, now, plans.period)
        value = scope_value(limit, customer_id, probe)
        used = _used(session, limit.name, value, start, MEASURE_COLUMNS[limit.measure])
        filters = {
            k: v
            for k, v in (
                ("operation", limit.operation),
                ("feature", limit.feature),
                ("provider", limit.provider),
                ("model", limit.model),
            )
            if v is not None
        }
        statuses.append(
            LimitStatus(
                limit.name,
                limit.scope,
                value,
                limit.window,
                limit.measure,
                used,
                limit.maximum,
                max(limit.maximum - used, 0),
                start,
                reset,
                filters,
            )
        )
    return statuses


# --- reservations -----------------------------------------------------------------------------------------------


def _reserve_statement(dialect: Any) -> Any:
    # One statement for every applicable limit (executemany with RETURNING is one multi-row INSERT): each row adds
    # the request to its counter only if the counter's own measure stays within the row's maximum; a row whose
    # check fails is not returned. Rows go in limit-name order, so concurrent reservations lock counters in one
    # order and cannot deadlock.
    ins = dialect.insert(COUNTERS)
    within = (
        case(
            (ins.excluded.measure == LimitMeasure.REQUESTS.value, COUNTERS.c.requests + ins.excluded.requests),
            (ins.excluded.measure == LimitMeasure.UNITS.value, COUNTERS.c.units + ins.excluded.units),
            (ins.excluded.measure == LimitMeasure.TOKENS.value, COUNTERS.c.tokens + ins.excluded.tokens),
            else_=type_coerce(COUNTERS.c.cost_usd, BigInteger) + type_coerce(ins.excluded.cost_usd, BigInteger),
        )
        <= ins.excluded.maximum
    )
    added = {name: COUNTERS.c[name] + ins.excluded[name] for name in MEASURE_COLUMNS.values()}
    return ins.on_conflict_do_update(
        index_elements=_KEY,
        set_={**added, "measure": ins.excluded.measure, "maximum": ins.excluded.maximum},
        where=within,
    ).returning(COUNTERS.c.limit_name, *(COUNTERS.c[name] for name in MEASURE_COLUMNS.values()))


_RESERVE = for_each_backend(_reserve_statement)
_COST_SCALE = Decimal(10) ** 10
_quote = json.encoder.encode_basestring_ascii


@lru_cache(maxsize=1024)
def _window_json(name: str, start: datetime, end: datetime, measure: str, maximum: int, scope: str) -> str:
    """A limit row's JSON up to its scope value (what every call in the limit's window has in common)."""
    return (
        f'{{"limit_name":{_quote(name)},"window_start":"{start.isoformat()}","window_end":"{end.isoformat()}",'
        f'"measure":"{measure}","maximum":{maximum},"scope":"{scope}","scope_value":'
    )


@lru_cache(maxsize=256)
def _iso(moment: datetime) -> str:
    """A window's start as the counters' key takes it (the same for every call in the window)."""
    return moment.isoformat()


def _stored_maximum(limit: Limit) -> int:
    """The maximum as the counter stores it: an integer, in 10^-10 USD for a cost limit."""
    return int(limit.maximum * _COST_SCALE) if limit.measure is LimitMeasure.COST_USD else int(limit.maximum)


def _floored(name: str) -> Any:
    col = COUNTERS.c[name]
    amount = bindparam(name + "_back", type_=col.type)
    return case((col >= amount, col - amount), else_=0)


_RELEASE = (
    update(COUNTERS)
    .where(
        and_(
            COUNTERS.c.limit_name == bindparam("l_name"),
            COUNTERS.c.scope_value == bindparam("s_value"),
            COUNTERS.c.window_start == bindparam("w_start"),
        )
    )
    .values({name: _floored(name) for name in MEASURE_COLUMNS.values()})
)


def _validate(request: LimitRequest) -> None:
    for name in ("units", "tokens", "requests"):
        value = getattr(request, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidRequest(f"{name} must be an integer >= 0")
    if not isinstance(request.cost_usd, Decimal | int) or request.cost_usd < 0:
        raise InvalidRequest("cost_usd must be a Decimal >= 0")


def check_entitled(
    session: Session,
    customer_id: str,
    request: LimitRequest,
    *,
    plans: CustomerPlans,
    config: BillingConfig,
) -> None:
    """Refuse a request the plans do not include (NotEntitled) or a customer whose usage is suspended."""
    refusal = entitlement_refusal(config, customer_id, plans.plans, request)
    if refusal is not None:
        raise refusal
    if _suspends(config) and active_suspension(session, customer_id) is not None:
        raise AccessRefused(customer_id, "suspended_usage_spike")


@dataclass(frozen=True)
class PreparedLimits:
    """A request's rows for the limits that apply to it, ready to apply (portably, or by ``limits_reserve``)."""

    customer_id: str
    request: LimitRequest
    limits: tuple[Limit, ...]
    rows: tuple[dict[str, Any], ...]

    def as_json(self) -> str:
        """The rows as ``limits_reserve(customer, rows jsonb)`` takes them: integers, cost in 10^-10 USD."""
        # Written out directly (every consumption under a limit sends it): a limit's window part cached (the same
        # for every call in the window), names JSON-quoted, amounts integers (validated; the same in every row).
        if not self.rows:
            return "[]"
        requests, units, tokens, cost = self._amounts
        amounts = f'"requests":{requests},"units":{units},"tokens":{tokens},"cost_usd":{cost}}}'
        parts = [
            _window_json(row["limit_name"], row["window_start"], row["window_end"], row["measure"],
                         int(row["maximum"]), limit.scope.value) + _quote(row["scope_value"]) + "," + amounts
            for limit, row in zip(self.limits, self.rows, strict=True)
        ]  # fmt: skip
        return "[" + ",".join(parts) + "]"

    def counter_rows(self) -> tuple[tuple[str, str, str, str, int, int, int, int, int], ...]:
        """Each counter as a batch sums them (``ledger.pgfast.CounterRow``): its key, measure and maximum, and what
        this request adds (cost in 10^-10 USD), in the limits' order."""
        if not self.rows:
            return ()
        requests, units, tokens, cost = self._amounts
        return tuple(
            (row["limit_name"], row["scope_value"], _iso(row["window_start"]), row["measure"], int(row["maximum"]),
             requests, units, tokens, cost)
            for row in self.rows
        )  # fmt: skip

    @cached_property
    def _amounts(self) -> tuple[int, int, int, int]:
        """What the request adds to each of its counters (the same in every row): requests, units, tokens, and
        cost in 10^-10 USD; worked out once for the JSON and the counter rows the consumption sends both of."""
        first = self.rows[0]
        return int(first["requests"]), int(first["units"]), int(first["tokens"]), int(first["cost_usd"] * _COST_SCALE)

    def reservations(self, used: Sequence[int | Decimal]) -> list[Reservation]:
        """The reservations, given each counter's value after (in the limits' order; cost in 10^-10 USD)."""
        taken = []
        for limit, row, value in zip(self.limits, self.rows, used, strict=True):
            amount = Decimal(value) / _COST_SCALE if limit.measure is LimitMeasure.COST_USD else int(value)
            taken.append(
                Reservation(
                    limit.name, row["scope_value"], row["window_start"], row["window_end"], limit.measure, amount,
                    limit.maximum,
                )
            )  # fmt: skip
        return taken

    def refusal(self, limit_name: str, used: int | Decimal) -> LimitExceeded:
        """The error for a refused limit, given what its counter held (cost in 10^-10 USD)."""
        limit, row = next((lim, r) for lim, r in zip(self.limits, self.rows, strict=True) if lim.name == limit_name)
        shown = Decimal(used) / _COST_SCALE if limit.measure is LimitMeasure.COST_USD else int(used)
        return LimitExceeded(
            self.customer_id,
            limit.name,
            scope_value=row["scope_value"],
            used=shown.normalize() if isinstance(shown, Decimal) else shown,
            maximum=limit.maximum,
            requested=self.request.amount(limit.measure),
            reset_at=row["window_end"],
        )


def prepare_limits(
    session: Session,
    customer_id: str,
    request: LimitRequest,
    *,
    now: datetime,
    plans: CustomerPlans | None = None,
    config: BillingConfig | None = None,
) -> PreparedLimits | None:
    """Check entitlements and suspension (raising NotEntitled / AccessRefused) and build the counter rows of the
    limits that apply to ``request``; None when no limit applies. Costs no statement unless the config has
    entitlements, suspending plans or plan-specific limits (then the customer's plans are read, unless given).

    A consumption implemented in SQL passes :meth:`PreparedLimits.as_json` to ``limits_reserve`` in its own
    statement; :func:`reserve_limits` does all of it for a Python caller.
    """
    config = config or get_billing_config()
    if not config.limits and not _suspends(config) and not _needs_plans(config):
        return None
    _validate(request)
    if plans is None:
        plans = customer_plans(session, customer_id, now, config=config) if _needs_plans(config) else CustomerPlans()
    check_entitled(session, customer_id, request, plans=plans, config=config)
    limits = applicable_limits(config, plans.plans, request)
    if not limits:
        return None
    stored = _facts(config).stored
    cost = Decimal(request.cost_usd)
    rows = []
    for limit in limits:
        start, reset = window_bounds(limit.window, now, plans.period)
        column, maximum = stored[limit.name]
        rows.append(
            {
                "limit_name": limit.name,
                "scope_value": scope_value(limit, customer_id, request),
                "window_start": start,
                "window_end": reset,
                "requests": request.requests,
                "units": request.units,
                "tokens": request.tokens,
                "cost_usd": cost,
                "measure": column,
                "maximum": maximum,
            }
        )
    return PreparedLimits(customer_id, request, tuple(limits), tuple(rows))


_RESERVE_SIGNATURE = "limits_reserve(text, jsonb)"
_RESERVE_CALL = "SELECT refused, used, counters FROM limits_reserve(%s, %s::jsonb)"


def reserve_limits(
    session: Session,
    customer_id: str,
    request: LimitRequest,
    *,
    now: datetime,
    plans: CustomerPlans | None = None,
    config: BillingConfig | None = None,
) -> list[Reservation]:
    """Check entitlements and take room for ``request`` in every applicable limit, atomically, in the caller's
    transaction; raise NotEntitled, AccessRefused (usage suspended by a spike) or LimitExceeded.

    One statement for all the limits (``limits_reserve`` on PostgreSQL, a multi-row conditional upsert
    elsewhere); none when no limit, entitlement or suspending plan is configured. ``plans`` may be passed by a
    caller that knows them. All or nothing: on a refusal the room taken in the other limits is given back before
    raising, so a caller that goes on in the same transaction (a batch with savepoints) keeps exact counters.
    """
    prepared = prepare_limits(session, customer_id, request, now=now, plans=plans, config=config)
    if prepared is None:
        return []
    return take_room(session, prepared)


def take_room(session: Session, prepared: PreparedLimits) -> list[Reservation]:
    """Take the room of prepared rows in the caller's transaction (all or nothing); raise LimitExceeded."""
    customer_id, request = prepared.customer_id, prepared.request
    for limit, row in zip(prepared.limits, prepared.rows, strict=True):
        if request.amount(limit.measure) > limit.maximum:  # more than a whole window holds: refused unwritten
            _refuse(session, customer_id, limit, request, row["scope_value"], (row["window_start"], row["window_end"]))
    if pgfast.installed(session, _RESERVE_SIGNATURE):
        refused, used, counters = pgfast.call(session, _RESERVE_CALL, (customer_id, prepared.as_json()))
        if refused is not None:
            raise prepared.refusal(refused, used)
        return prepared.reservations(counters)
    return _reserve_portably(session, prepared)


def _reserve_portably(session: Session, prepared: PreparedLimits) -> list[Reservation]:
    customer_id, request, limits = prepared.customer_id, prepared.request, prepared.limits
    rows = list(prepared.rows)
    dialect = session.get_bind().dialect.name
    result = run(session, _RESERVE[dialect], rows if len(rows) > 1 else rows[0])
    counters = {row.limit_name: row for row in result.all()}
    taken: list[Reservation] = []
    for limit, row in zip(limits, rows, strict=True):
        counter = counters.get(limit.name)
        if counter is None:
            continue
        column = MEASURE_COLUMNS[limit.measure]
        used = Decimal(getattr(counter, column)) if column == "cost_usd" else int(getattr(counter, column))
        taken.append(
            Reservation(limit.name, row["scope_value"], row["window_start"], row["window_end"], limit.measure, used,
                        limit.maximum)
        )  # fmt: skip
    if len(taken) < len(limits):
        _give_back(session, taken, request)
        refused, row = next((lim, r) for lim, r in zip(limits, rows, strict=True) if lim.name not in counters)
        _refuse(session, customer_id, refused, request, row["scope_value"], (row["window_start"], row["window_end"]))
    for reservation, limit in zip(taken, limits, strict=True):
        amount = request.amount(limit.measure)
        if reservation.used >= limit.maximum > reservation.used - amount:
            emit(
                session,
                "limit.reached",
                customer_id,
                {
                    "limit": limit.name,
                    "scope": limit.scope.value,
                    "scope_value": reservation.scope_value,
                    "measure": limit.measure.value,
                    "used": reservation.used,
                    "maximum": limit.maximum,
                    "window_start": reservation.window_start,
                    "reset_at": reservation.reset_at,
                },
            )
    return taken


def _refuse(
    session: Session,
    customer_id: str,
    limit: Limit,
    request: LimitRequest,
    value: str,
    bounds: tuple[datetime, datetime],
) -> NoReturn:
    used = _used(session, limit.name, value, bounds[0], MEASURE_COLUMNS[limit.measure])
    raise LimitExceeded(
        customer_id,
        limit.name,
        scope_value=value,
        used=used,
        maximum=limit.maximum,
        requested=request.amount(limit.measure),
        reset_at=bounds[1],
    )


def _give_back(session: Session, taken: Sequence[Reservation], request: LimitRequest) -> None:
    if not taken:
        return
    run(
        session,
        _RELEASE,
        [
            {
                "l_name": reservation.limit,
                "s_value": reservation.scope_value,
                "w_start": reservation.window_start,
                "requests_back": request.requests,
                "units_back": request.units,
                "tokens_back": request.tokens,
                "cost_usd_back": Decimal(request.cost_usd),
            }
            for reservation in taken
        ],
    )


def release_limits(
    session: Session,
    customer_id: str,
    request: LimitRequest,
    *,
    reserved_at: datetime,
    plans: CustomerPlans | None = None,
    config: BillingConfig | None = None,
) -> int:
    """Give back the room :func:`reserve_limits` took for ``request`` at ``reserved_at`` (a released hold, or
    the unused part of a capture: pass the part as ``request``, with ``requests=0`` to keep the request
    counted); counters never go below zero. Return how many counters changed."""
    config = config or get_billing_config()
    if not config.limits:
        return 0
    _validate(request)
    if plans is None:
        plans = (
            customer_plans(session, customer_id, reserved_at, config=config)
            if _needs_plans(config)
            else CustomerPlans()
        )
    taken = [
        Reservation(
            limit.name,
            scope_value(limit, customer_id, request),
            *window_bounds(limit.window, reserved_at, plans.period),
            limit.measure,
            0,
            limit.maximum,
        )
        for limit in applicable_limits(config, plans.plans, request)
    ]
    _give_back(session, taken, request)
    return len(taken)


def _settled(name: str) -> Any:
    # The cost column stores 10^-10 USD as an integer on both backends: its delta is added as that integer.
    column = type_coerce(COUNTERS.c[name], BigInteger) if name == "cost_usd" else COUNTERS.c[name]
    moved = column + bindparam(name + "_delta", type_=BigInteger)
    return case((moved >= 0, moved), else_=0)


_SETTLE = (
    update(COUNTERS)
    .where(
        and_(
            COUNTERS.c.limit_name == bindparam("l_name"),
            COUNTERS.c.scope_value == bindparam("s_value"),
            COUNTERS.c.window_start == bindparam("w_start"),
        )
    )
    .values({name: _settled(name) for name in MEASURE_COLUMNS.values()})
)


def settle_limits(
    session: Session,
    rows: Sequence[dict[str, Any]] | None,
    *,
    requests: int | None = None,
    units: int | None = None,
    tokens: int | None = None,
    cost_usd: int | None = None,
) -> int:
    """Move the counters a hold reserved (``rows`` as stored on it) from what it took to what it settled at.

    A release settles at zero (the room goes back, in the windows it was taken in); a capture keeps the request
    and settles the units at what was captured (tokens and cost at the capture's usage, when it reports one).
    None keeps what was taken; cost in 10^-10 USD. Counters never go below zero; a capture above what was held
    is counted even past a maximum (the call was served). Return how many counters were named.
    """
    if not rows:
        return 0
    settled = {"requests": requests, "units": units, "tokens": tokens, "cost_usd": cost_usd}
    params = [
        {
            "l_name": row["limit_name"],
            "s_value": row["scope_value"],
            "w_start": datetime.fromisoformat(row["window_start"]),
            **{
                f"{name}_delta": (int(row[name]) if value is None else value) - int(row[name])
                for name, value in settled.items()
            },
        }
        for row in rows
    ]
    run(session, _SETTLE, params if len(params) > 1 else params[0])
    return len(params)


def limit_usage_of_capture(usage: UsageInput | None, config: BillingConfig | None = None) -> tuple[int, int] | None:
    """The tokens and cost (10^-10 USD) a capture's usage reports, for settling a hold's limits; None without."""
    if usage is None:
        return None
    request = limit_request(usage, units=0, config=config)
    return request.tokens, int(request.cost_usd * _COST_SCALE)


@dataclass(frozen=True)
class CheckResult:
    """Whether a call would be allowed now, and why not: nothing is consumed."""

    allowed: bool
    code: str | None
    reason: str | None
    limits: list[LimitStatus]
    error: Exception | None = None


def check_request(
    session: Session,
    customer_id: str,
    request: LimitRequest,
    *,
    now: datetime,
    plans: CustomerPlans | None = None,
    config: BillingConfig | None = None,
) -> CheckResult:
    """Would ``request`` pass entitlements, suspension and every applicable limit now? Reads only."""
    config = config or get_billing_config()
    _validate(request)
    plans = plans if plans is not None else customer_plans(session, customer_id, now, config=config)
    applicable = {lim.name for lim in applicable_limits(config, plans.plans, request)}
    statuses = [
        status
        for status in limit_usage(
            session,
            customer_id,
            now=now,
            user_id=request.user_id,
            workspace=request.workspace,
            plans=plans,
            config=config,
        )
        if status.limit in applicable
    ]
    try:
        check_entitled(session, customer_id, request, plans=plans, config=config)
    except (NotEntitled, AccessRefused) as exc:
        return CheckResult(False, exc.code, str(exc), statuses, exc)
    for status in statuses:
        amount = request.amount(status.measure)
        if status.used + amount > status.maximum:
            exc2 = LimitExceeded(
                customer_id,
                status.limit,
                scope_value=status.scope_value,
                used=status.used,
                maximum=status.maximum,
                requested=amount,
                reset_at=status.reset_at,
            )
            return CheckResult(False, exc2.code, str(exc2), statuses, exc2)
    return CheckResult(True, None, None, statuses)
