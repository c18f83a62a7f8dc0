"""The credit ledger's tables.

Invariants, kept in the same transaction as every movement and proved by :mod:`ledger.check`:

* ``account.balance == sum(entry.units)`` over the account's entries (entries are append-only);
* ``account.balance == sum(grant.remaining) - account.debt`` over the account's grants, where units on hold are
  already drawn from their grants (a hold is a movement, a release gives them back);
* ``grant.remaining >= 0`` and ``grant.frozen >= 0`` and ``account.debt >= 0``;
* ``account.held == sum(hold.units - hold.captured_units)`` over the account's open holds;
* ``account.debt == sum(entry.debt_delta)``; ``grant.frozen == sum(entry.frozen_delta)`` over the grant's entries;
* ``grant.remaining`` equals the grant's movements (allocation rows, or whole entries naming it: see Allocation);
* every entry's ``balance_after`` is the running sum of its account's entries, in id order;
* each ``usage_daily`` row holds the count and sums of its key's usage records (kept by triggers).

``balance`` is the spendable balance: what consumption may take, plus ``overdraft_limit``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    cast,
    false,
    func,
    type_coerce,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.types import TypeDecorator, TypeEngine

from ledger.db import Base, BigId


class UsdAmount(TypeDecorator[Decimal]):
    """USD with sub-cent precision (per-token prices), exact on every backend: never a float.

    PostgreSQL stores NUMERIC(20, 10). SQLite has no decimal type (NUMERIC there means REAL, and SUM() adds
    floats), so there the value is stored as an integer count of 10^-10 USD: sums stay integer sums, and come
    back as exact Decimals. ``integer=True`` stores that integer on PostgreSQL too (for sums over many rows:
    PostgreSQL adds BIGINTs in 128-bit accumulators, several times cheaper than NUMERIC).
    """

    impl = Numeric(20, 10)
    cache_ok = True
    _SCALE = 10

    def __init__(self, integer: bool = False) -> None:
        super().__init__()
        self.integer = integer

    def _stored_as_integer(self, dialect: Dialect) -> bool:
        return self.integer or dialect.name == "sqlite"

    def process_bind_param(self, value: Decimal | int | None, dialect: Dialect) -> Any:
        if value is None or not self._stored_as_integer(dialect):
            return value
        if isinstance(value, float):
            raise TypeError("USD amounts must be Decimal, not float")
        return int(Decimal(value).scaleb(self._SCALE).to_integral_value())

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None or not self._stored_as_integer(dialect):
            return value
        return Decimal(int(value)).scaleb(-self._SCALE).quantize(Decimal(1).scaleb(-self._SCALE))

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        # Stored as an integer, the value must not pass through Numeric's float conversion.
        return dialect.type_descriptor(BigInteger() if self._stored_as_integer(dialect) else Numeric(20, 10))


def usd_as_integer(column: Any, dialect_name: str) -> Any:
    """A UsdAmount column's value as the integer 10^-10 USD that ``UsdAmount(integer=True)`` stores, typed so."""
    value = column if dialect_name == "sqlite" else cast(column * 10**UsdAmount._SCALE, BigInteger)
    return type_coerce(value, UsdAmount(integer=True))


def _enum(cls: type[StrEnum], name: str) -> Enum:
    # Stored by value, as a plain string column with a CHECK, so SQLite and PostgreSQL agree.
    return Enum(cls, name=name, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e])


class AccessState(StrEnum):
    ACTIVE = "active"
    TRIALING = "trialing"
    PAST_DUE = "past_due"
    SUSPENDED = "suspended"
    CANCELED = "canceled"


class GrantSource(StrEnum):
    TOP_UP = "top_up"
    RENEWAL = "renewal"
    PROMOTION = "promotion"
    ADJUSTMENT = "adjustment"
    # A paid (or free) change of plan or quantity in the middle of a period.
    PLAN_CHANGE = "plan_change"
    # A subscription's trial credits (once per subscription).
    TRIAL = "trial"


# Grant sources that come with a subscription plan (what a canceled customer stops spending).
PLAN_SOURCES = (GrantSource.RENEWAL, GrantSource.PLAN_CHANGE, GrantSource.TRIAL)


class EntryKind(StrEnum):
    GRANT = "grant"
    CONSUME = "consume"
    HOLD = "hold"
    CAPTURE = "capture"
    RELEASE = "release"
    EXPIRE = "expire"
    CLAWBACK = "clawback"
    ADJUSTMENT = "adjustment"
    FREEZE = "freeze"
    UNFREEZE = "unfreeze"
    DEBT_SETTLEMENT = "debt_settlement"


class HoldStatus(StrEnum):
    OPEN = "open"
    CAPTURED = "captured"
    RELEASED = "released"
    EXPIRED = "expired"


class UsageEnvironment(StrEnum):
    PRODUCTION = "production"
    TEST = "test"
    INTERNAL = "internal"


class Account(Base):
    """A customer's credit account, keyed by Stripe customer id."""

    __tablename__ = "accounts"
    __table_args__ = (
        CheckConstraint("debt >= 0", name="debt_not_negative"),
        CheckConstraint("held >= 0", name="held_not_negative"),
        CheckConstraint("overdraft_limit >= 0", name="overdraft_not_negative"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(255), unique=True)
    external_id: Mapped[str | None] = mapped_column(String(255), index=True)
    balance: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    held: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    debt: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    overdraft_limit: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    access_state: Mapped[AccessState] = mapped_column(
        _enum(AccessState, "access_state"), default=AccessState.ACTIVE, server_default=AccessState.ACTIVE.value
    )
    grace_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The Stripe time of the newest state change applied, so older events never overwrite newer state.
    access_as_of: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    access_source: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class Grant(Base):
    """Credits added to an account, drawn down by consumption in priority, expiry, age order."""

    __tablename__ = "grants"
    __table_args__ = (
        CheckConstraint("units > 0", name="units_positive"),
        CheckConstraint("remaining >= 0", name="remaining_not_negative"),
        CheckConstraint("frozen >= 0", name="frozen_not_negative"),
        # The consumption order: priority, then earliest expiry (NULL last), then oldest.
        Index("ix_grants_drawdown", "account_id", "priority", "expires_at", "id"),
        Index("ix_grants_stripe_object", "stripe_object_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    source: Mapped[GrantSource] = mapped_column(_enum(GrantSource, "grant_source"))
    units: Mapped[int] = mapped_column(BigInteger)
    remaining: Mapped[int] = mapped_column(BigInteger)
    # Units set aside while a dispute is open: neither spendable nor yet clawed back.
    frozen: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # What paid for it: a payment intent, charge, invoice or checkout session id, and the money.
    stripe_object_id: Mapped[str | None] = mapped_column(String(255))
    stripe_object_type: Mapped[str | None] = mapped_column(String(64))
    amount_minor: Mapped[int | None] = mapped_column(BigInteger)
    currency: Mapped[str | None] = mapped_column(String(3))
    # Units refunded or lost to disputes so far, so repeated refund events claw back only what is new.
    clawed_back: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    refunded_minor: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    idempotency_key: Mapped[str] = mapped_column(String(255), unique=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    actor: Mapped[str] = mapped_column(String(255), default="system")
    period_start: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    period_end: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Entry(Base):
    """One movement of credits: append-only, never updated, never deleted."""

    __tablename__ = "entries"
    __table_args__ = (Index("ix_entries_account_id_id", "account_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # On PostgreSQL this key and grant_id's are checked once per INSERT by a trigger (STATEMENT_CHECKED_KEYS).
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    kind: Mapped[EntryKind] = mapped_column(_enum(EntryKind, "entry_kind"))
    units: Mapped[int] = mapped_column(BigInteger)
    balance_after: Mapped[int] = mapped_column(BigInteger)
    # Change to the account's recorded debt (positive: debt recorded; negative: settled).
    debt_delta: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Change to the grant's frozen units (positive: set aside for a dispute; negative: given back or clawed).
    frozen_delta: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    idempotency_key: Mapped[str] = mapped_column(String(255), unique=True)
    # A digest of the request's parameters: the same key with other parameters is refused.
    request_hash: Mapped[str | None] = mapped_column(String(64))
    grant_id: Mapped[int | None] = mapped_column(ForeignKey("grants.id"))
    hold_id: Mapped[int | None] = mapped_column(ForeignKey("holds.id"))
    usage_id: Mapped[int | None] = mapped_column(ForeignKey("usage_records.id"))
    stripe_object_id: Mapped[str | None] = mapped_column(String(255))
    actor: Mapped[str] = mapped_column(String(255), default="system")
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


# Foreign keys that PostgreSQL checks once per INSERT statement, set-wise, instead of by a trigger per row
# (migration hot_2: the entries' account and grant); SQLite enforces them as declared. Schema comparison
# (the migrations' test, autogenerate) leaves them out on PostgreSQL.
STATEMENT_CHECKED_KEYS = frozenset({"fk_entries_account_id_accounts", "fk_entries_grant_id_grants"})


def compared_with_models(dialect: str) -> Callable[[object, str | None, str, bool, object], bool] | None:
    """Alembic's ``include_object`` for a database of ``dialect``: on PostgreSQL every schema object but the keys it
    checks per statement; elsewhere None (everything compared)."""
    if dialect != "postgresql":
        return None

    def include(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
        return not (type_ == "foreign_key_constraint" and name in STATEMENT_CHECKED_KEYS)

    return include


class Allocation(Base):
    """Which grant funded (or received back) how many units of an entry.

    Every entry moves ``units + debt_delta`` units in grants. When a single grant takes the whole movement (the
    common case), the entry's ``grant_id`` names it and no allocation row is written; an entry spread over several
    grants has one row per grant and no ``grant_id``. ``ledger.posting.entry_movements`` reads either form.
    """

    __tablename__ = "allocations"
    __table_args__ = (Index("ix_allocations_grant_id", "grant_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    entry_id: Mapped[int] = mapped_column(ForeignKey("entries.id"), index=True)
    grant_id: Mapped[int] = mapped_column(ForeignKey("grants.id"))
    # Signed like the entry: negative when drawn from the grant, positive when returned to it.
    units: Mapped[int] = mapped_column(BigInteger)


class Hold(Base):
    """Units reserved for an AI call that may time out, captured or released later."""

    __tablename__ = "holds"
    __table_args__ = (
        CheckConstraint("units >= 0", name="units_not_negative"),
        Index("ix_holds_status_expires_at", "status", "expires_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    request_id: Mapped[str] = mapped_column(String(255), unique=True)
    units: Mapped[int] = mapped_column(BigInteger)
    captured_units: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Units a capture asked for beyond what the balance allowed (reported, never charged).
    shortfall: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    status: Mapped[HoldStatus] = mapped_column(_enum(HoldStatus, "hold_status"), default=HoldStatus.OPEN)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    usage_id: Mapped[int | None] = mapped_column(ForeignKey("usage_records.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    settled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Why it was released (``provider_timeout``: the call may still have been served) and the provider call it
    # stood for, so a provider report that shows the call served can be matched in reconciliation.
    release_reason: Mapped[str | None] = mapped_column(String(64))
    provider: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(255))
    provider_request_id: Mapped[str | None] = mapped_column(String(255))
    # The limit room the hold took (ledger.limits.PreparedLimits.as_json's rows, None when no limit applied):
    # capture settles it, release and expiry give it back, in the windows it was taken in.
    limit_rows: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON().with_variant(JSONB(), "postgresql"))


class UsageRecord(Base):
    """What an AI call did and cost, attributed for reporting, margin and provider reconciliation."""

    __tablename__ = "usage_records"
    __table_args__ = (
        Index("ix_usage_account_occurred", "account_id", "occurred_at"),
        Index("ix_usage_provider_model_occurred", "provider", "model", "occurred_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    request_id: Mapped[str] = mapped_column(String(255), unique=True)
    user_id: Mapped[str | None] = mapped_column(String(255))
    workspace: Mapped[str | None] = mapped_column(String(255))
    feature: Mapped[str | None] = mapped_column(String(255))
    provider: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(255))
    operation: Mapped[str | None] = mapped_column(String(64))
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    provider_cost_usd: Mapped[Decimal] = mapped_column(UsdAmount(), default=Decimal(0))
    units: Mapped[int] = mapped_column(BigInteger, default=0)
    billable: Mapped[bool] = mapped_column(Boolean, default=True)
    environment: Mapped[UsageEnvironment] = mapped_column(
        _enum(UsageEnvironment, "usage_environment"), default=UsageEnvironment.PRODUCTION
    )
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class UsageDaily(Base):
    """Usage summed per account, UTC day and what the reconciliation checks group by: a roll-up of
    ``usage_records`` that triggers keep exact in the transaction of every insert, update or delete of a usage
    row (on both backends; migration 0005), so the nightly checks read a row per account and day instead of
    every call. ``ledger.check`` proves it equals the sums of the usage rows.
    """

    __tablename__ = "usage_daily"
    __table_args__ = (
        # One row per key; a NULL (no model, no workspace) is a value of the key like any other.
        Index(
            "uq_usage_daily_key",
            "account_id",
            "day",
            "provider",
            "model",
            "workspace",
            "feature",
            "environment",
            "billable",
            unique=True,
            postgresql_nulls_not_distinct=True,
        ),
        Index("ix_usage_daily_day", "day"),
        # Every usage row updates its roll-up row: room on each page keeps the new versions there (HOT updates,
        # no index writes) and the table near its live size.
        {"postgresql_with": {"fillfactor": 70}},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    day: Mapped[date] = mapped_column(Date)
    # Fixed-width columns first: the checks read every row of a window, and PostgreSQL finds these at fixed
    # offsets instead of walking the text columns before them.
    billable: Mapped[bool] = mapped_column(Boolean)
    requests: Mapped[int] = mapped_column(BigInteger)
    input_tokens: Mapped[int] = mapped_column(BigInteger)
    output_tokens: Mapped[int] = mapped_column(BigInteger)
    cached_tokens: Mapped[int] = mapped_column(BigInteger)
    units: Mapped[int] = mapped_column(BigInteger)
    # Integer 10^-10 USD on both backends: the checks sum it over every row of a window.
    provider_cost_usd: Mapped[Decimal] = mapped_column(UsdAmount(integer=True))
    environment: Mapped[UsageEnvironment] = mapped_column(_enum(UsageEnvironment, "usage_environment"))
    provider: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(255))
    workspace: Mapped[str | None] = mapped_column(String(255))
    feature: Mapped[str | None] = mapped_column(String(255))


class Subscription(Base):
    """One Stripe subscription of a customer: its own status and access state, each newer-only in Stripe time.

    The account's ``access_state`` is the best of its subscriptions' (see ``ledger.subscriptions``).
    """

    __tablename__ = "subscriptions"
    __table_args__ = (Index("ix_subscriptions_account_id", "account_id"),)

    subscription_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    # What the newest subscription event said (fields below), and its Stripe time.
    status: Mapped[str | None] = mapped_column(String(32))
    price: Mapped[str | None] = mapped_column(String(255))
    quantity: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    current_period_start: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    current_period_end: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_at_period_end: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    cancel_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    pause_collection: Mapped[str | None] = mapped_column(String(32))
    trial_end: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    object_as_of: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The access this subscription gives, from its events and its invoices' (newest Stripe time wins).
    access_state: Mapped[AccessState] = mapped_column(
        _enum(AccessState, "access_state"), default=AccessState.ACTIVE, server_default=AccessState.ACTIVE.value
    )
    grace_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    access_as_of: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    access_source: Mapped[str | None] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class SubscriptionGrant(Base):
    """A grant made for a subscription's period (renewal, plan change, trial), grouped by the period's end.

    ``effective_at`` is when the grant's terms began in Stripe time (the period start, or the change's time);
    a grant of a ``full`` upgrade (``supersedes``) retires what is left of the period's earlier plan grants,
    whichever of them lands first.
    """

    __tablename__ = "subscription_grants"
    __table_args__ = (Index("ix_subscription_grants_period", "subscription_id", "period_end"),)

    grant_id: Mapped[int] = mapped_column(ForeignKey("grants.id"), primary_key=True)
    subscription_id: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16))
    period_end: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    effective_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    supersedes: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Retired by a later full upgrade of its period (what was left of it expired).
    superseded: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    invoice_id: Mapped[str | None] = mapped_column(String(255))


class SubscriptionReduction(Base):
    """Unspent plan credits a prorated downgrade takes back from its period's grants (once per change)."""

    __tablename__ = "subscription_reductions"

    change_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    subscription_id: Mapped[str] = mapped_column(String(255))
    period_end: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    effective_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    units: Mapped[int] = mapped_column(BigInteger)
    # Units taken so far (a reduction that lands before its period's grant is applied when the grant lands).
    applied: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class SubscriptionReductionTake(Base):
    """How many units a reduction took from one grant; given back to the reduction if a full upgrade later
    supersedes that grant (the reduction then applies to the grant in force), so any order ends the same."""

    __tablename__ = "subscription_reduction_takes"

    change_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    grant_id: Mapped[int] = mapped_column(ForeignKey("grants.id"), primary_key=True)
    units: Mapped[int] = mapped_column(BigInteger)
    # How many times the share moved (each move is one entry, keyed by this count).
    moves: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class AccessPolicy(Base):
    """[access.spend] as PostgreSQL's ledger functions read it: per policy key (an access state, or
    ``past_due_after_grace``), the grant sources it may spend (NULL: all; empty: none; else a comma list)."""

    __tablename__ = "ledger_access_policy"

    policy_key: Mapped[str] = mapped_column(String(32), primary_key=True)
    sources: Mapped[str | None] = mapped_column(Text)


class LimitCounter(Base):
    """What one scope value (a customer, a user or a workspace of a customer) used of a limit in one window.

    Reservations add to it with a conditional upsert (``... WHERE used + n <= max``), so a limit holds under
    concurrent requests the way a balance does; a released hold gives its room back.
    """

    __tablename__ = "limit_counters"
    __table_args__ = (
        UniqueConstraint("limit_name", "scope_value", "window_start", name="uq_limit_counters_key"),
        Index("ix_limit_counters_window_end", "window_end"),
        # Every reservation updates its counters: 20% fill keeps their new versions on their page (HOT updates).
        {"postgresql_with": {"fillfactor": 20}},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    limit_name: Mapped[str] = mapped_column(String(100))
    # "<customer>" or "<customer>/user:<id>" or "<customer>/workspace:<id>": a user id is unique per customer only.
    scope_value: Mapped[str] = mapped_column(String(600))
    window_start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    window_end: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    requests: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    units: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # Integer 10^-10 USD on both backends, so the conditional add is an exact integer comparison.
    cost_usd: Mapped[Decimal] = mapped_column(UsdAmount(integer=True), default=Decimal(0), server_default="0")
    # What the limit counts (requests, units, tokens, cost_usd) and its maximum as of the last reservation (for a
    # cost limit in 10^-10 USD): the reservation's condition reads them from the row it writes.
    measure: Mapped[str] = mapped_column(String(16))
    maximum: Mapped[int] = mapped_column(BigInteger)


class OutboxEvent(Base):
    """A notification to the product, written in the same transaction as the change that caused it."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_customer_id_id", "customer_id", "id"),
        Index("ix_outbox_dispatched_at", "dispatched_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # The public id ("evt_..."): receivers deduplicate on it, since delivery is at least once.
    event_id: Mapped[str] = mapped_column(String(40), unique=True)
    type: Mapped[str] = mapped_column(String(64))
    customer_id: Mapped[str | None] = mapped_column(String(255))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Set when the worker has created this event's deliveries (one per subscribed endpoint).
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    # Gave up: failing for longer than the retry horizon (3 days), or the endpoint was disabled.
    FAILED = "failed"


class NotificationDelivery(Base):
    """One outbox event to one endpoint: the delivery log (attempts, last status, latency, last error)."""

    __tablename__ = "notification_deliveries"
    __table_args__ = (
        UniqueConstraint("outbox_id", "endpoint_url", name="uq_notification_deliveries_outbox_endpoint"),
        Index("ix_notification_deliveries_due", "status", "next_attempt_at"),
        Index("ix_notification_deliveries_order", "endpoint_url", "customer_id", "outbox_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    outbox_id: Mapped[int] = mapped_column(ForeignKey("outbox.id"))
    endpoint_url: Mapped[str] = mapped_column(String(2048))
    customer_id: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[DeliveryStatus] = mapped_column(
        _enum(DeliveryStatus, "delivery_status"), default=DeliveryStatus.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_latency_ms: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class NotificationEndpointState(Base):
    """An endpoint's health: failing since when, disabled when (after failing for the whole retry horizon)."""

    __tablename__ = "notification_endpoints"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    url: Mapped[str] = mapped_column(String(2048), unique=True)
    failing_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_success_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    disabled_reason: Mapped[str | None] = mapped_column(Text)


class BalanceThreshold(Base):
    """A customer's low-balance threshold: an override set through the API or CLI, else the plan's."""

    __tablename__ = "balance_thresholds"

    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    # Set by a person (API or CLI); None means the plan's threshold applies.
    override_units: Mapped[int | None] = mapped_column(BigInteger)
    # The threshold in force (the override, or the plan's, a share resolved against the last grant), kept at
    # grants and overrides so the crossing check after a consumption is one primary-key read.
    effective_units: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class UsageSuspension(Base):
    """Usage stopped for a customer (a usage spike on a plan with ``on_spike = "suspend"``) until lifted."""

    __tablename__ = "usage_suspensions"
    __table_args__ = (Index("ix_usage_suspensions_customer_id", "customer_id", "lifted_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(Text)
    # The review item (reconciliation's mismatch) whose resolution lifts it.
    review_item_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    lifted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lifted_by: Mapped[str | None] = mapped_column(String(255))
    lift_note: Mapped[str | None] = mapped_column(Text)


class GrantSettlement(Base):
    """What Stripe's balance transaction says a paid grant's charge settled as: the money in the account's
    settlement currency, the exchange rate, Stripe's fee and the net. Written by reconciliation from the charge it
    paged (https://docs.stripe.com/api/balance_transactions/object), so margin can count revenue in any currency.
    """

    __tablename__ = "grant_settlements"
    __table_args__ = (Index("ix_grant_settlements_charge", "charge_id"),)

    grant_id: Mapped[int] = mapped_column(ForeignKey("grants.id"), primary_key=True)
    charge_id: Mapped[str] = mapped_column(String(255))
    balance_transaction_id: Mapped[str | None] = mapped_column(String(255))
    # When Stripe says the charge was made (not when the ledger applied it).
    paid_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The charge in the currency the customer paid (presentment).
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    # The balance transaction: in the currency Stripe settled it in.
    settlement_minor: Mapped[int] = mapped_column(BigInteger)
    settlement_currency: Mapped[str] = mapped_column(String(3))
    exchange_rate: Mapped[Decimal | None] = mapped_column(Numeric(24, 12))
    fee_minor: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    net_minor: Mapped[int] = mapped_column(BigInteger)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class RefundSettlement(Base):
    """What Stripe's balance transaction says a refund of a paid grant's charge took back from the balance, in
    the settlement currency: kept by reconciliation beside the grant's own settlement."""

    __tablename__ = "refund_settlements"
    __table_args__ = (Index("ix_refund_settlements_grant", "grant_id"),)

    refund_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    grant_id: Mapped[int] = mapped_column(ForeignKey("grants.id"))
    charge_id: Mapped[str] = mapped_column(String(255))
    balance_transaction_id: Mapped[str | None] = mapped_column(String(255))
    refunded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The refund in the currency the customer paid, and what left the balance for it (positive amounts).
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    settlement_minor: Mapped[int] = mapped_column(BigInteger)
    settlement_currency: Mapped[str] = mapped_column(String(3))
    exchange_rate: Mapped[Decimal | None] = mapped_column(Numeric(24, 12))
    fee_minor: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
