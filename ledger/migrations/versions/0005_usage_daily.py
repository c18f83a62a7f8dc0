"""usage_daily: usage summed per account, UTC day, provider, model, workspace, feature, environment and billable,
kept exact by triggers on usage_records, and backfilled from the rows already there

Revision ID: 0005
Revises: 0004

Mirrors ledger.models.UsageDaily. Triggers, not the insert paths, keep it: usage rows are written by the Python
consumption and holds (ledger/consume.py) and by the PostgreSQL function ledger_consume (migration 0001), and a
trigger covers every writer, including bulk loads, in the writer's own transaction.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_KEY = ("account_id", "day", "provider", "model", "workspace", "feature", "environment", "billable")
_SUMS = ("input_tokens", "output_tokens", "cached_tokens", "units", "provider_cost_usd")
_COLUMNS = ", ".join((*_KEY, "requests", *_SUMS))

# The roll-up's cost is an integer count of 10^-10 USD on both backends (see ledger.models.UsdAmount): usage rows
# store NUMERIC(20, 10) on PostgreSQL, scaled exactly here; SQLite's usage rows already store that integer.
# PostgreSQL: one row-level function for insert, update and delete. The account's usage is written under the
# account's row lock (every consumption and capture takes it first), so the upsert adds no new lock order.
# NULLS NOT DISTINCT on the key lets ON CONFLICT match a NULL model or workspace.
PG_FUNCTION = f"""
CREATE OR REPLACE FUNCTION usage_daily_apply() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    v_id bigint;
    v_requests bigint;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE usage_daily d
           SET requests = d.requests - 1,
               input_tokens = d.input_tokens - OLD.input_tokens,
               output_tokens = d.output_tokens - OLD.output_tokens,
               cached_tokens = d.cached_tokens - OLD.cached_tokens,
               units = d.units - OLD.units,
               provider_cost_usd = d.provider_cost_usd - (OLD.provider_cost_usd * 10000000000)::bigint
         WHERE d.account_id = OLD.account_id AND d.day = (OLD.occurred_at AT TIME ZONE 'UTC')::date
           AND d.provider IS NOT DISTINCT FROM OLD.provider AND d.model IS NOT DISTINCT FROM OLD.model
           AND d.workspace IS NOT DISTINCT FROM OLD.workspace AND d.feature IS NOT DISTINCT FROM OLD.feature
           AND d.environment = OLD.environment AND d.billable = OLD.billable
        RETURNING d.id, d.requests INTO v_id, v_requests;
        IF v_requests = 0 THEN
            DELETE FROM usage_daily WHERE id = v_id;
        END IF;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO usage_daily ({_COLUMNS})
             VALUES (NEW.account_id, (NEW.occurred_at AT TIME ZONE 'UTC')::date, NEW.provider, NEW.model,
                     NEW.workspace, NEW.feature, NEW.environment, NEW.billable, 1, NEW.input_tokens,
                     NEW.output_tokens, NEW.cached_tokens, NEW.units, (NEW.provider_cost_usd * 10000000000)::bigint)
        ON CONFLICT ({", ".join(_KEY)}) DO UPDATE
           SET requests = usage_daily.requests + 1,
               input_tokens = usage_daily.input_tokens + EXCLUDED.input_tokens,
               output_tokens = usage_daily.output_tokens + EXCLUDED.output_tokens,
               cached_tokens = usage_daily.cached_tokens + EXCLUDED.cached_tokens,
               units = usage_daily.units + EXCLUDED.units,
               provider_cost_usd = usage_daily.provider_cost_usd + EXCLUDED.provider_cost_usd;
    END IF;
    RETURN NULL;
END
$fn$
"""
PG_TRIGGER = """
CREATE TRIGGER usage_daily_apply AFTER INSERT OR UPDATE OR DELETE ON usage_records
FOR EACH ROW EXECUTE FUNCTION usage_daily_apply()
"""


def _sqlite_match(row: str) -> str:
    """The usage_daily row of usage row ``row`` (NEW or OLD): ``IS`` so that NULL matches NULL."""
    return (
        f"account_id = {row}.account_id AND day = date({row}.occurred_at) AND provider IS {row}.provider "
        f"AND model IS {row}.model AND workspace IS {row}.workspace AND feature IS {row}.feature "
        f"AND environment = {row}.environment AND billable = {row}.billable"
    )


def _sqlite_add(row: str, sign: str) -> str:
    sums = ", ".join(f"{c} = {c} {sign} {row}.{c}" for c in _SUMS)
    return f"UPDATE usage_daily SET requests = requests {sign} 1, {sums} WHERE {_sqlite_match(row)};"


# SQLite: a unique index treats NULLs as distinct, so an upsert on the key would not match a NULL model; the
# triggers create the row when missing, then add to it (SQLite has one writer at a time, so this cannot race).
_SQLITE_ENSURE = (
    f"INSERT INTO usage_daily ({_COLUMNS}) "
    "SELECT NEW.account_id, date(NEW.occurred_at), NEW.provider, NEW.model, NEW.workspace, NEW.feature, "
    "NEW.environment, NEW.billable, 0, 0, 0, 0, 0, 0 "
    f"WHERE NOT EXISTS (SELECT 1 FROM usage_daily WHERE {_sqlite_match('NEW')});"
)
_SQLITE_REMOVE = f"{_sqlite_add('OLD', '-')} DELETE FROM usage_daily WHERE {_sqlite_match('OLD')} AND requests = 0;"
SQLITE_TRIGGERS = (
    f"CREATE TRIGGER usage_daily_insert AFTER INSERT ON usage_records BEGIN {_SQLITE_ENSURE} "
    f"{_sqlite_add('NEW', '+')} END",
    f"CREATE TRIGGER usage_daily_delete AFTER DELETE ON usage_records BEGIN {_SQLITE_REMOVE} END",
    f"CREATE TRIGGER usage_daily_update AFTER UPDATE ON usage_records BEGIN {_SQLITE_REMOVE} {_SQLITE_ENSURE} "
    f"{_sqlite_add('NEW', '+')} END",
)


def _backfill(day: str, cost: str) -> str:
    return (
        f"INSERT INTO usage_daily ({_COLUMNS}) "
        f"SELECT account_id, {day}, provider, model, workspace, feature, environment, billable, count(*), "
        f"sum(input_tokens), sum(output_tokens), sum(cached_tokens), sum(units), {cost} "
        "FROM usage_records "
        f"GROUP BY account_id, {day}, provider, model, workspace, feature, environment, billable"
    )


def upgrade() -> None:
    op.create_table(
        "usage_daily",
        sa.Column("id", _ID, nullable=False),
        sa.Column("account_id", _ID, nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        # Fixed-width columns first (found at fixed offsets when the checks read every row of a window).
        sa.Column("billable", sa.Boolean(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cached_tokens", sa.BigInteger(), nullable=False),
        sa.Column("units", sa.BigInteger(), nullable=False),
        # Integer 10^-10 USD on both backends (ledger.models.UsdAmount(integer=True)).
        sa.Column("provider_cost_usd", sa.BigInteger(), nullable=False),
        sa.Column(
            "environment",
            sa.Enum("production", "test", "internal", name="usage_environment", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column("provider", sa.String(length=64), nullable=True),
        sa.Column("model", sa.String(length=255), nullable=True),
        sa.Column("workspace", sa.String(length=255), nullable=True),
        sa.Column("feature", sa.String(length=255), nullable=True),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name=op.f("fk_usage_daily_account_id_accounts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_daily")),
        postgresql_with={"fillfactor": 70},
    )
    op.create_index("uq_usage_daily_key", "usage_daily", list(_KEY), unique=True, postgresql_nulls_not_distinct=True)
    op.create_index("ix_usage_daily_day", "usage_daily", ["day"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FUNCTION)
        # CREATE TRIGGER locks usage_records against writes until this migration commits, so the backfill below
        # sees every row written before the trigger, and the trigger every row written after.
        op.execute(PG_TRIGGER)
        op.execute(
            _backfill("(occurred_at AT TIME ZONE 'UTC')::date", "(sum(provider_cost_usd) * 10000000000)::bigint")
        )
    else:
        for trigger in SQLITE_TRIGGERS:
            op.execute(trigger)
        op.execute(_backfill("date(occurred_at)", "sum(provider_cost_usd)"))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS usage_daily_apply ON usage_records")
        op.execute("DROP FUNCTION IF EXISTS usage_daily_apply()")
    else:
        for name in ("usage_daily_insert", "usage_daily_delete", "usage_daily_update"):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_index("ix_usage_daily_day", table_name="usage_daily")
    op.drop_index("uq_usage_daily_key", table_name="usage_daily")
    op.drop_table("usage_daily")
