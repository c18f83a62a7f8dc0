"""limits, outbox and notifications: limit counters, the transactional outbox, its delivery log and endpoint
health, low-balance thresholds and usage suspensions (usage spikes)

Revision ID: notify_1
Revises: subs_2

Mirrors ledger.models (LimitCounter, OutboxEvent, NotificationDelivery, NotificationEndpointState,
BalanceThreshold, UsageSuspension), and the triggers that write the outbox rows of changes every writer makes:
``credits.granted`` / ``credits.clawed_back`` / ``credits.expired`` from the entries a grant, clawback or expiry
appends, and ``access.changed`` from an account whose access state changed. Triggers, not the Python paths, so
the PostgreSQL functions (ledger_consume expiring lapsed grants, ledger_grant, ledger_grant_movement) and any
future writer emit them too, in the writer's own transaction. Their conditions are checked before the trigger
runs, so the hot path's other entries (consume, hold, capture, release) and balance updates pay nothing.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "notify_1"
down_revision = "subs_2"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_TS = sa.DateTime(timezone=True)


# The notification's data, the same on both backends: amounts as positive units, times as ISO 8601 UTC.
_ENTRY_KINDS = "('grant', 'clawback', 'expire')"
_ENTRY_WHEN = f"NEW.kind IN {_ENTRY_KINDS} AND (NEW.units <> 0 OR NEW.frozen_delta <> 0)"

PG_ENTRY_FUNCTION = r"""
CREATE OR REPLACE FUNCTION outbox_iso(t timestamptz) RETURNS text LANGUAGE sql IMMUTABLE AS $fn$
    -- As Python's datetime.isoformat() in UTC: microseconds only when there are some.
    SELECT to_char(t AT TIME ZONE 'UTC',
                   CASE WHEN extract(microseconds FROM t)::bigint % 1000000 = 0 THEN 'YYYY-MM-DD"T"HH24:MI:SS'
                        ELSE 'YYYY-MM-DD"T"HH24:MI:SS.US' END) || '+00:00'
$fn$;

CREATE OR REPLACE FUNCTION outbox_entry_event() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO outbox (event_id, type, customer_id, data, created_at)
    SELECT 'evt_' || replace(gen_random_uuid()::text, '-', ''),
           CASE NEW.kind WHEN 'grant' THEN 'credits.granted' WHEN 'clawback' THEN 'credits.clawed_back'
                ELSE 'credits.expired' END,
           a.customer_id,
           json_build_object(
               'entry_id', NEW.id, 'grant_id', NEW.grant_id,
               'units', CASE NEW.kind WHEN 'grant' THEN NEW.units WHEN 'clawback' THEN -NEW.units - NEW.frozen_delta
                        ELSE -NEW.units END,
               'debt', NEW.debt_delta, 'balance_after', NEW.balance_after, 'reason', NEW.reason,
               'stripe_object_id', NEW.stripe_object_id, 'source', g.source, 'priority', g.priority,
               'expires_at', outbox_iso(g.expires_at)),
           clock_timestamp()
      FROM accounts a LEFT JOIN grants g ON g.id = NEW.grant_id
     WHERE a.id = NEW.account_id;
    RETURN NULL;
END
$fn$;

CREATE OR REPLACE FUNCTION outbox_access_event() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    INSERT INTO outbox (event_id, type, customer_id, data, created_at)
    VALUES ('evt_' || replace(gen_random_uuid()::text, '-', ''), 'access.changed', NEW.customer_id,
            json_build_object('previous', OLD.access_state, 'access_state', NEW.access_state,
                              'source', NEW.access_source, 'as_of', outbox_iso(NEW.access_as_of),
                              'grace_until', outbox_iso(NEW.grace_until)),
            clock_timestamp());
    RETURN NULL;
END
$fn$;
"""
# The same rules as ledger.limits.reserve_limits and ledger.outbox.note_balance, server-side, for PostgreSQL's
# consumption functions to call in their own statement (one round trip for the consumption and its limits):
# limits_reserve takes the rows ledger.limits.limit_rows builds (in limit-name order, the lock order) and either
# adds the request to every counter or to none, answering the first limit refused and what it had used.
PG_LIMIT_FUNCTIONS = r"""
CREATE OR REPLACE FUNCTION outbox_amount(p_measure text, p_value bigint) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $fn$
    -- A counter's value as notifications show it: an integer, or USD as a decimal string (stored in 10^-10 USD).
    SELECT CASE WHEN p_measure = 'cost_usd' THEN to_jsonb(trim_scale(p_value::numeric / 10000000000)::text)
                ELSE to_jsonb(p_value) END
$fn$;

CREATE OR REPLACE FUNCTION limits_reserve(
    p_customer text, p_rows jsonb, OUT refused text, OUT used bigint, OUT counters bigint[]
) LANGUAGE plpgsql AS $fn$
DECLARE
    v_names text[];
BEGIN
    -- One statement for every row: a row is added only where its counter's measure stays within its maximum
    -- (and a new window only when the amount alone fits); rows come in limit-name order (the lock order).
    WITH req AS (
        SELECT r.*, e.pos,
               CASE r.measure WHEN 'requests' THEN r.requests WHEN 'units' THEN r.units WHEN 'tokens' THEN r.tokens
                    ELSE r.cost_usd END AS amount
          FROM jsonb_array_elements(p_rows) WITH ORDINALITY AS e(doc, pos),
               LATERAL jsonb_to_record(e.doc) AS r(
                   limit_name text, scope_value text, window_start timestamptz, window_end timestamptz,
                   requests bigint, units bigint, tokens bigint, cost_usd bigint, measure text, maximum bigint,
                   scope text)
    ), added AS (
        INSERT INTO limit_counters AS c (limit_name, scope_value, window_start, window_end, requests, units, tokens,
                                         cost_usd, measure, maximum)
        SELECT limit_name, scope_value, window_start, window_end, requests, units, tokens, cost_usd, measure, maximum
          FROM req WHERE amount <= maximum ORDER BY pos
        ON CONFLICT (limit_name, scope_value, window_start) DO UPDATE
           SET requests = c.requests + excluded.requests, units = c.units + excluded.units,
               tokens = c.tokens + excluded.tokens, cost_usd = c.cost_usd + excluded.cost_usd,
               measure = excluded.measure, maximum = excluded.maximum
         WHERE CASE excluded.measure WHEN 'requests' THEN c.requests + excluded.requests
                                     WHEN 'units' THEN c.units + excluded.units
                                     WHEN 'tokens' THEN c.tokens + excluded.tokens
                                     ELSE c.cost_usd + excluded.cost_usd END <= excluded.maximum
        RETURNING c.limit_name,
                  CASE c.measure WHEN 'requests' THEN c.requests WHEN 'units' THEN c.units WHEN 'tokens' THEN c.tokens
                       ELSE c.cost_usd END AS now_used
    ), reached AS (
        -- limit.reached when this request took a counter to its maximum (only if every limit took it).
        INSERT INTO outbox (event_id, type, customer_id, data, created_at)
        SELECT 'evt_' || replace(gen_random_uuid()::text, '-', ''), 'limit.reached', p_customer,
               json_build_object('limit', q.limit_name, 'scope', q.scope, 'scope_value', q.scope_value,
                                 'measure', q.measure, 'used', outbox_amount(q.measure, a.now_used),
                                 'maximum', outbox_amount(q.measure, q.maximum),
                                 'window_start', outbox_iso(q.window_start), 'reset_at', outbox_iso(q.window_end)),
               clock_timestamp()
          FROM added a JOIN req q USING (limit_name)
         WHERE a.now_used >= q.maximum AND a.now_used - q.amount < q.maximum
           AND (SELECT count(*) FROM added) = (SELECT count(*) FROM req)
    )
    SELECT array_agg(a.limit_name ORDER BY q.pos), array_agg(a.now_used ORDER BY q.pos) INTO v_names, counters
      FROM added a JOIN req q USING (limit_name);
    IF coalesce(array_length(v_names, 1), 0) = jsonb_array_length(p_rows) THEN
        RETURN;
    END IF;
    -- Refused somewhere: give back what the others took (all or none); answer the first refused and its use.
    counters := NULL;
    UPDATE limit_counters c
       SET requests = greatest(c.requests - r.requests, 0), units = greatest(c.units - r.units, 0),
           tokens = greatest(c.tokens - r.tokens, 0), cost_usd = greatest(c.cost_usd - r.cost_usd, 0)
      FROM jsonb_to_recordset(p_rows) AS r(limit_name text, scope_value text, window_start timestamptz,
                                          requests bigint, units bigint, tokens bigint, cost_usd bigint)
     WHERE c.limit_name = r.limit_name AND c.scope_value = r.scope_value AND c.window_start = r.window_start
       AND r.limit_name = ANY (coalesce(v_names, '{}'));
    SELECT r.limit_name,
           coalesce((SELECT CASE r.measure WHEN 'requests' THEN c.requests WHEN 'units' THEN c.units
                                           WHEN 'tokens' THEN c.tokens ELSE c.cost_usd END
                       FROM limit_counters c
                      WHERE c.limit_name = r.limit_name AND c.scope_value = r.scope_value
                        AND c.window_start = r.window_start), 0)
      INTO refused, used
      FROM jsonb_array_elements(p_rows) WITH ORDINALITY AS e(doc, pos),
           LATERAL jsonb_to_record(e.doc) AS r(limit_name text, scope_value text, window_start timestamptz,
                                               measure text)
     WHERE NOT (r.limit_name = ANY (coalesce(v_names, '{}')))
     ORDER BY e.pos
     LIMIT 1;
END
$fn$;

CREATE OR REPLACE FUNCTION balance_notice(
    p_account bigint, p_customer text, p_before bigint, p_after bigint, p_cause text
) RETURNS integer LANGUAGE plpgsql AS $fn$
DECLARE
    v_threshold bigint;
    v_emitted integer := 0;
BEGIN
    IF p_after >= p_before THEN
        RETURN 0;
    END IF;
    SELECT effective_units INTO v_threshold FROM balance_thresholds WHERE account_id = p_account;
    IF v_threshold IS NOT NULL AND p_after < v_threshold AND v_threshold <= p_before THEN
        INSERT INTO outbox (event_id, type, customer_id, data, created_at)
        VALUES ('evt_' || replace(gen_random_uuid()::text, '-', ''), 'balance.low', p_customer,
                json_build_object('balance_before', p_before, 'balance', p_after, 'cause', p_cause,
                                  'threshold', v_threshold), clock_timestamp());
        v_emitted := v_emitted + 1;
    END IF;
    IF p_after <= 0 AND p_before > 0 THEN
        INSERT INTO outbox (event_id, type, customer_id, data, created_at)
        VALUES ('evt_' || replace(gen_random_uuid()::text, '-', ''), 'balance.depleted', p_customer,
                json_build_object('balance_before', p_before, 'balance', p_after, 'cause', p_cause),
                clock_timestamp());
        v_emitted := v_emitted + 1;
    END IF;
    RETURN v_emitted;
END
$fn$;
"""

PG_TRIGGERS = (
    f"CREATE TRIGGER entries_outbox AFTER INSERT ON entries FOR EACH ROW WHEN ({_ENTRY_WHEN}) "
    "EXECUTE FUNCTION outbox_entry_event()",
    "CREATE TRIGGER accounts_access_outbox AFTER UPDATE OF access_state ON accounts FOR EACH ROW "
    "WHEN (OLD.access_state IS DISTINCT FROM NEW.access_state) EXECUTE FUNCTION outbox_access_event()",
)


def _sqlite_iso(column: str) -> str:
    # SQLite keeps naive UTC text ("2026-03-05 08:00:00.000000"): render it as Python's isoformat() in UTC does.
    return (
        f"CASE WHEN {column} IS NULL THEN NULL "
        f"WHEN substr({column}, -7) = '.000000' THEN replace(substr({column}, 1, length({column}) - 7), ' ', 'T') "
        f"|| '+00:00' ELSE replace({column}, ' ', 'T') || '+00:00' END"
    )


_SQLITE_EVENT_ID = "'evt_' || lower(hex(randomblob(16)))"
_SQLITE_NOW = "strftime('%Y-%m-%d %H:%M:%f', 'now')"
SQLITE_TRIGGERS = (
    f"""CREATE TRIGGER entries_outbox AFTER INSERT ON entries WHEN {_ENTRY_WHEN} BEGIN
    INSERT INTO outbox (event_id, type, customer_id, data, created_at)
    SELECT {_SQLITE_EVENT_ID},
           CASE NEW.kind WHEN 'grant' THEN 'credits.granted' WHEN 'clawback' THEN 'credits.clawed_back'
                ELSE 'credits.expired' END,
           a.customer_id,
           json_object(
               'entry_id', NEW.id, 'grant_id', NEW.grant_id,
               'units', CASE NEW.kind WHEN 'grant' THEN NEW.units WHEN 'clawback' THEN -NEW.units - NEW.frozen_delta
                        ELSE -NEW.units END,
               'debt', NEW.debt_delta, 'balance_after', NEW.balance_after, 'reason', NEW.reason,
               'stripe_object_id', NEW.stripe_object_id, 'source', g.source, 'priority', g.priority,
               'expires_at', {_sqlite_iso("g.expires_at")}),
           {_SQLITE_NOW}
      FROM accounts a LEFT JOIN grants g ON g.id = NEW.grant_id
     WHERE a.id = NEW.account_id;
END""",
    f"""CREATE TRIGGER accounts_access_outbox AFTER UPDATE OF access_state ON accounts
WHEN OLD.access_state IS NOT NEW.access_state BEGIN
    INSERT INTO outbox (event_id, type, customer_id, data, created_at)
    VALUES ({_SQLITE_EVENT_ID}, 'access.changed', NEW.customer_id,
            json_object('previous', OLD.access_state, 'access_state', NEW.access_state,
                        'source', NEW.access_source, 'as_of', {_sqlite_iso("NEW.access_as_of")},
                        'grace_until', {_sqlite_iso("NEW.grace_until")}),
            {_SQLITE_NOW});
END""",
)


def upgrade() -> None:
    op.create_table(
        "limit_counters",
        sa.Column("id", _ID, primary_key=True),
        sa.Column("limit_name", sa.String(100), nullable=False),
        sa.Column("scope_value", sa.String(600), nullable=False),
        sa.Column("window_start", _TS, nullable=False),
        sa.Column("window_end", _TS, nullable=False),
        sa.Column("requests", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("units", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("cost_usd", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("measure", sa.String(16), nullable=False),
        sa.Column("maximum", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_limit_counters"),
        sa.UniqueConstraint("limit_name", "scope_value", "window_start", name="uq_limit_counters_key"),
        # Every reservation updates its counters: room on each page keeps the new versions there (HOT updates).
        postgresql_with={"fillfactor": 70},
    )
    op.create_index("ix_limit_counters_window_end", "limit_counters", ["window_end"])

    op.create_table(
        "outbox",
        sa.Column("id", _ID, primary_key=True),
        sa.Column("event_id", sa.String(40), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("customer_id", sa.String(255)),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("dispatched_at", _TS),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        sa.UniqueConstraint("event_id", name="uq_outbox_event_id"),
    )
    op.create_index("ix_outbox_customer_id_id", "outbox", ["customer_id", "id"])
    op.create_index("ix_outbox_dispatched_at", "outbox", ["dispatched_at"])

    op.create_table(
        "notification_deliveries",
        sa.Column("id", _ID, primary_key=True),
        sa.Column("outbox_id", _ID, nullable=False),
        sa.Column("endpoint_url", sa.String(2048), nullable=False),
        sa.Column("customer_id", sa.String(255)),
        sa.Column(
            "status",
            sa.Enum("pending", "succeeded", "failed", name="delivery_status", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", _TS, nullable=False),
        sa.Column("last_attempt_at", _TS),
        sa.Column("last_status_code", sa.Integer()),
        sa.Column("last_latency_ms", sa.Integer()),
        sa.Column("last_error", sa.Text()),
        sa.Column("delivered_at", _TS),
        sa.Column("created_at", _TS, nullable=False),
        sa.ForeignKeyConstraint(["outbox_id"], ["outbox.id"], name="fk_notification_deliveries_outbox_id_outbox"),
        sa.PrimaryKeyConstraint("id", name="pk_notification_deliveries"),
        sa.UniqueConstraint("outbox_id", "endpoint_url", name="uq_notification_deliveries_outbox_endpoint"),
    )
    op.create_index("ix_notification_deliveries_due", "notification_deliveries", ["status", "next_attempt_at"])
    op.create_index(
        "ix_notification_deliveries_order", "notification_deliveries", ["endpoint_url", "customer_id", "outbox_id"]
    )

    op.create_table(
        "notification_endpoints",
        sa.Column("id", _ID, primary_key=True),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("failing_since", _TS),
        sa.Column("last_success_at", _TS),
        sa.Column("disabled_at", _TS),
        sa.Column("disabled_reason", sa.Text()),
        sa.PrimaryKeyConstraint("id", name="pk_notification_endpoints"),
        sa.UniqueConstraint("url", name="uq_notification_endpoints_url"),
    )

    op.create_table(
        "balance_thresholds",
        sa.Column("account_id", _ID, nullable=False),
        sa.Column("override_units", sa.BigInteger()),
        sa.Column("effective_units", sa.BigInteger()),
        sa.Column("updated_at", _TS, nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_balance_thresholds_account_id_accounts"),
        sa.PrimaryKeyConstraint("account_id", name="pk_balance_thresholds"),
    )

    op.create_table(
        "usage_suspensions",
        sa.Column("id", _ID, primary_key=True),
        sa.Column("customer_id", sa.String(255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("review_item_id", sa.BigInteger()),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("lifted_at", _TS),
        sa.Column("lifted_by", sa.String(255)),
        sa.Column("lift_note", sa.Text()),
        sa.PrimaryKeyConstraint("id", name="pk_usage_suspensions"),
    )
    op.create_index("ix_usage_suspensions_customer_id", "usage_suspensions", ["customer_id", "lifted_at"])

    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_ENTRY_FUNCTION)
        op.execute(PG_LIMIT_FUNCTIONS)
        for statement in PG_TRIGGERS:
            op.execute(statement)
    else:
        for statement in SQLITE_TRIGGERS:
            op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS accounts_access_outbox" + (" ON accounts" if _pg() else ""))
    op.execute("DROP TRIGGER IF EXISTS entries_outbox" + (" ON entries" if _pg() else ""))
    if _pg():
        op.execute("DROP FUNCTION IF EXISTS outbox_access_event()")
        op.execute("DROP FUNCTION IF EXISTS outbox_entry_event()")
        op.execute("DROP FUNCTION IF EXISTS outbox_iso(timestamptz)")
        op.execute("DROP FUNCTION IF EXISTS limits_reserve(text, jsonb)")
        op.execute("DROP FUNCTION IF EXISTS outbox_amount(text, bigint)")
        op.execute("DROP FUNCTION IF EXISTS balance_notice(bigint, text, bigint, bigint, text)")
    op.drop_index("ix_usage_suspensions_customer_id", table_name="usage_suspensions")
    op.drop_table("usage_suspensions")
    op.drop_table("balance_thresholds")
    op.drop_table("notification_endpoints")
    op.drop_index("ix_notification_deliveries_order", table_name="notification_deliveries")
    op.drop_index("ix_notification_deliveries_due", table_name="notification_deliveries")
    op.drop_table("notification_deliveries")
    op.drop_index("ix_outbox_dispatched_at", table_name="outbox")
    op.drop_index("ix_outbox_customer_id_id", table_name="outbox")
    op.drop_table("outbox")
    op.drop_index("ix_limit_counters_window_end", table_name="limit_counters")
    op.drop_table("limit_counters")


def _pg() -> bool:
    return bool(op.get_bind().dialect.name == "postgresql")
