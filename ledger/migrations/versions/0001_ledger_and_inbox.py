"""ledger and inbox

Revision ID: 0001
Revises: 
Create Date: 2026-11-23 04:00:48.147468
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


# PostgreSQL's consumption in one round trip. It follows the same rules as ledger.portable.consume (the
# portable path); the property tests run both against the same scenarios, so they cannot drift apart.
CONSUME_FUNCTION = r"""
CREATE OR REPLACE FUNCTION ledger_consume(
    p_customer text, p_request_id text, p_key text, p_units bigint, p_hash text,
    p_actor text, p_reason text, p_now timestamptz, p_usage jsonb
,
    OUT status text, OUT entry_id bigint, OUT balance_after bigint, OUT usage_id bigint, OUT units bigint,
    OUT available bigint, OUT access_state text, OUT request_hash text, OUT grant_ids bigint[],
    OUT grant_units bigint[]
) LANGUAGE plpgsql AS $fn$
DECLARE
    v_account bigint;
    v_balance bigint;
    v_debt bigint;
    v_overdraft bigint;
    v_state text;
    v_grace timestamptz;
    v_orig bigint;
    v_gids bigint[];
    v_grem bigint[];
    v_gexp timestamptz[];
    o record;
    v_lapsed bigint := 0;
    v_need bigint := 0;
    v_take bigint;
    v_ids bigint[] := '{}';
    v_takes bigint[] := '{}';
    v_lapsed_ids bigint[] := '{}';
    v_lapsed_units bigint[] := '{}';
    v_entry bigint;
    v_usage bigint;
    v_grant bigint;
    i int;
BEGIN
    -- Fast path, the common case: no debt, no lapsed grant, access allowed, and the first grant in draw order
    -- covers it all. Its outcome is what the general path would give; it only takes fewer statements.
    -- The conditional UPDATE takes the account's row lock and applies the guard in one statement (a concurrent
    -- consumer waits, then the guard is re-checked against the row it committed), so nothing can overdraw.
    IF p_units > 0 THEN
        UPDATE accounts a SET balance = a.balance - p_units, updated_at = p_now
         WHERE a.customer_id = p_customer AND a.debt = 0 AND a.balance + a.overdraft_limit >= p_units
           AND (a.access_state IN ('active', 'trialing')
                OR (a.access_state = 'past_due' AND (a.grace_until IS NULL OR p_now < a.grace_until)))
           -- Lapsed grants still holding units are expired by the general path first, as the Python path does.
           AND NOT EXISTS (SELECT 1 FROM grants x WHERE x.account_id = a.id AND x.remaining > 0
                                                    AND x.expires_at <= p_now)
        RETURNING a.id, a.balance, a.access_state INTO v_account, v_balance, v_state;
        IF v_account IS NOT NULL THEN
            -- A fresh snapshot, taken under the lock: a committed first attempt of this request is seen.
            UPDATE grants g SET remaining = g.remaining - p_units
             WHERE g.id = (SELECT d.id FROM grants d
                            WHERE d.account_id = v_account AND d.remaining > 0
                              AND (d.expires_at IS NULL OR d.expires_at > p_now)
                            ORDER BY d.priority DESC, d.expires_at ASC NULLS LAST, d.id LIMIT 1)
               AND g.remaining >= p_units
               AND NOT EXISTS (SELECT 1 FROM entries e WHERE e.idempotency_key = p_key)
            RETURNING g.id INTO v_grant;
            IF v_grant IS NOT NULL THEN
                IF p_usage IS NOT NULL THEN
                    INSERT INTO usage_records (account_id, request_id, user_id, workspace, feature, provider, model,
                                               operation, input_tokens, output_tokens, cached_tokens,
                                               provider_cost_usd, units, billable, environment, occurred_at)
                         VALUES (v_account, p_request_id, p_usage->>'user_id', p_usage->>'workspace',
                                 p_usage->>'feature', p_usage->>'provider', p_usage->>'model', p_usage->>'operation',
                                 (p_usage->>'input_tokens')::bigint, (p_usage->>'output_tokens')::bigint,
                                 (p_usage->>'cached_tokens')::bigint, (p_usage->>'provider_cost_usd')::numeric,
                                 p_units, (p_usage->>'billable')::boolean, p_usage->>'environment',
                                 coalesce((p_usage->>'occurred_at')::timestamptz, p_now))
                      RETURNING id INTO v_usage;
                END IF;
                INSERT INTO entries (account_id, kind, units, balance_after, debt_delta, frozen_delta,
                                     idempotency_key, request_hash, grant_id, usage_id, actor, reason)
                     VALUES (v_account, 'consume', -p_units, v_balance, 0, 0, p_key, p_hash, v_grant, v_usage,
                             p_actor, p_reason)
                  RETURNING id INTO v_entry;
                SELECT 'ok'::text, v_entry, v_balance, v_usage, p_units, NULL::bigint, v_state, p_hash,
                       ARRAY[v_grant], ARRAY[p_units]
                  INTO status, entry_id, balance_after, usage_id, units, available, access_state, request_hash,
                       grant_ids, grant_units;
                RETURN;
            END IF;
            -- Not the simple case (a retry, or more than one grant to draw): undo, take the general path.
            UPDATE accounts SET balance = balance + p_units WHERE id = v_account;
            v_account := NULL;
        END IF;
    END IF;
    -- General path. The row lock serializes every movement on this account: no read-then-write race.
    SELECT a.id, a.balance, a.debt, a.overdraft_limit, a.access_state, a.grace_until
      INTO v_account, v_balance, v_debt, v_overdraft, v_state, v_grace
      FROM accounts a WHERE a.customer_id = p_customer FOR NO KEY UPDATE;
    IF v_account IS NULL THEN
        SELECT 'unknown_customer'::text, NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint,
            NULL::bigint, NULL::text, NULL::text, NULL::bigint[], NULL::bigint[]
          INTO status, entry_id, balance_after, usage_id, units, available, access_state, request_hash, grant_ids, grant_units;
        RETURN;
    END IF;
    -- After the lock (a fresh snapshot): a concurrent first attempt of this request is seen once it committed.
    -- Draw order: higher priority first, then earliest expiry (never-expiring last), then oldest.
    SELECT (SELECT e.id FROM entries e WHERE e.idempotency_key = p_key),
           array_agg(g.id ORDER BY g.priority DESC, g.expires_at ASC NULLS LAST, g.id),
           array_agg(g.remaining ORDER BY g.priority DESC, g.expires_at ASC NULLS LAST, g.id),
           array_agg(g.expires_at ORDER BY g.priority DESC, g.expires_at ASC NULLS LAST, g.id)
      INTO v_orig, v_gids, v_grem, v_gexp
      FROM grants g WHERE g.account_id = v_account AND g.remaining > 0;
    IF v_orig IS NOT NULL THEN
        SELECT e.id, e.units, e.debt_delta, e.balance_after, e.usage_id, e.request_hash, e.grant_id INTO o
          FROM entries e WHERE e.id = v_orig;
        SELECT array_agg(al.grant_id ORDER BY al.id), array_agg(-al.units ORDER BY al.id) INTO v_ids, v_takes
          FROM allocations al WHERE al.entry_id = o.id;
        IF v_ids IS NULL THEN  -- no allocation rows: the entry's one grant (if any) moved all of it
            IF o.grant_id IS NOT NULL AND o.units + o.debt_delta <> 0 THEN
                v_ids := ARRAY[o.grant_id];
                v_takes := ARRAY[-(o.units + o.debt_delta)];
            ELSE
                v_ids := '{}';
                v_takes := '{}';
            END IF;
        END IF;
        SELECT 'replay'::text, o.id, o.balance_after, o.usage_id, -o.units, NULL::bigint, v_state,
            o.request_hash::text, v_ids, v_takes
          INTO status, entry_id, balance_after, usage_id, units, available, access_state, request_hash, grant_ids, grant_units;
        RETURN;
    END IF;
    IF NOT (v_state IN ('active', 'trialing') OR (v_state = 'past_due' AND (v_grace IS NULL OR p_now < v_grace))) THEN
        SELECT 'access_refused'::text, NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint,
            NULL::bigint, v_state, NULL::text, NULL::bigint[], NULL::bigint[]
          INTO status, entry_id, balance_after, usage_id, units, available, access_state, request_hash, grant_ids, grant_units;
        RETURN;
    END IF;
    IF p_units > 0 THEN
        v_need := p_units;
        FOR i IN 1 .. coalesce(array_length(v_gids, 1), 0) LOOP
            IF v_gexp[i] IS NOT NULL AND v_gexp[i] <= p_now THEN
                v_lapsed_ids := v_lapsed_ids || v_gids[i];
                v_lapsed_units := v_lapsed_units || v_grem[i];
                v_lapsed := v_lapsed + v_grem[i];
            ELSIF v_need > 0 THEN
                v_take := least(v_need, v_grem[i]);
                v_ids := v_ids || v_gids[i];
                v_takes := v_takes || v_take;
                v_need := v_need - v_take;
            END IF;
        END LOOP;
        IF v_balance - v_lapsed + v_overdraft < p_units THEN
            SELECT 'insufficient'::text, NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint,
                greatest(0, v_balance - v_lapsed + v_overdraft), v_state, NULL::text, NULL::bigint[], NULL::bigint[]
              INTO status, entry_id, balance_after, usage_id, units, available, access_state, request_hash, grant_ids, grant_units;
            RETURN;
        END IF;
        FOR i IN 1 .. coalesce(array_length(v_lapsed_ids, 1), 0) LOOP
            UPDATE grants SET remaining = 0, expired_at = p_now WHERE id = v_lapsed_ids[i];
            v_balance := v_balance - v_lapsed_units[i];
            INSERT INTO entries (account_id, kind, units, balance_after, debt_delta, frozen_delta, idempotency_key,
                                 grant_id, actor, reason)
                 VALUES (v_account, 'expire', -v_lapsed_units[i], v_balance, 0, 0,
                         'expire:' || v_lapsed_ids[i] || ':' || v_lapsed_units[i] || ':' || p_now::text,
                         v_lapsed_ids[i], 'system', 'grant expired');
        END LOOP;
        IF array_length(v_ids, 1) = 1 THEN
            UPDATE grants SET remaining = remaining - v_takes[1] WHERE id = v_ids[1];
        ELSIF array_length(v_ids, 1) > 1 THEN
            UPDATE grants SET remaining = grants.remaining - t.take
              FROM unnest(v_ids, v_takes) AS t(id, take) WHERE grants.id = t.id;
        END IF;
    END IF;
    IF p_usage IS NOT NULL THEN
        INSERT INTO usage_records (account_id, request_id, user_id, workspace, feature, provider, model, operation,
                                   input_tokens, output_tokens, cached_tokens, provider_cost_usd, units, billable,
                                   environment, occurred_at)
             VALUES (v_account, p_request_id, p_usage->>'user_id', p_usage->>'workspace', p_usage->>'feature',
                     p_usage->>'provider', p_usage->>'model', p_usage->>'operation',
                     (p_usage->>'input_tokens')::bigint, (p_usage->>'output_tokens')::bigint,
                     (p_usage->>'cached_tokens')::bigint, (p_usage->>'provider_cost_usd')::numeric, p_units,
                     (p_usage->>'billable')::boolean, p_usage->>'environment',
                     coalesce((p_usage->>'occurred_at')::timestamptz, p_now))
          RETURNING id INTO v_usage;
    END IF;
    v_balance := v_balance - p_units;
    -- One grant funding the whole draw is named by the entry (no allocation row); several get one row each.
    INSERT INTO entries (account_id, kind, units, balance_after, debt_delta, frozen_delta, idempotency_key,
                         request_hash, grant_id, usage_id, actor, reason)
         VALUES (v_account, 'consume', -p_units, v_balance, v_need, 0, p_key, p_hash,
                 CASE WHEN array_length(v_ids, 1) = 1 THEN v_ids[1] END, v_usage, p_actor, p_reason)
      RETURNING id INTO v_entry;
    IF array_length(v_ids, 1) > 1 THEN
        INSERT INTO allocations (entry_id, grant_id, units)
             SELECT v_entry, t.id, -t.take FROM unnest(v_ids, v_takes) WITH ORDINALITY AS t(id, take, n) ORDER BY t.n;
    END IF;
    UPDATE accounts SET balance = v_balance, debt = v_debt + v_need, updated_at = p_now WHERE id = v_account;
    SELECT 'ok'::text, v_entry, v_balance, v_usage, p_units, NULL::bigint, v_state, p_hash, v_ids, v_takes
      INTO status, entry_id, balance_after, usage_id, units, available, access_state, request_hash, grant_ids, grant_units;
END
$fn$
"""


def upgrade() -> None:
    
    op.create_table('accounts',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('customer_id', sa.String(length=255), nullable=False),
    sa.Column('external_id', sa.String(length=255), nullable=True),
    sa.Column('balance', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('held', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('debt', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('overdraft_limit', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('access_state', sa.Enum('active', 'trialing', 'past_due', 'suspended', 'canceled', name='access_state', native_enum=False, length=32), server_default='active', nullable=False),
    sa.Column('grace_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('access_as_of', sa.DateTime(timezone=True), nullable=True),
    sa.Column('access_source', sa.String(length=255), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.CheckConstraint('debt >= 0', name=op.f('ck_accounts_debt_not_negative')),
    sa.CheckConstraint('held >= 0', name=op.f('ck_accounts_held_not_negative')),
    sa.CheckConstraint('overdraft_limit >= 0', name=op.f('ck_accounts_overdraft_not_negative')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_accounts')),
    sa.UniqueConstraint('customer_id', name=op.f('uq_accounts_customer_id'))
    )
    with op.batch_alter_table('accounts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_accounts_external_id'), ['external_id'], unique=False)

    op.create_table('stripe_events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('event_id', sa.String(length=255), nullable=False),
    sa.Column('type', sa.String(length=128), nullable=False),
    sa.Column('api_version', sa.String(length=64), nullable=True),
    sa.Column('created', sa.DateTime(timezone=True), nullable=False),
    sa.Column('livemode', sa.Boolean(), nullable=False),
    sa.Column('connected_account', sa.String(length=255), nullable=True),
    sa.Column('object_kind', sa.String(length=32), nullable=False),
    sa.Column('object_id', sa.String(length=255), nullable=True),
    sa.Column('customer_id', sa.String(length=255), nullable=True),
    sa.Column('payload', sa.LargeBinary(), nullable=False),
    sa.Column('source', sa.Enum('webhook', 'backfill', name='event_source', native_enum=False, length=32), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('status', sa.Enum('pending', 'processed', 'failed', 'ignored', 'waiting', name='event_status', native_enum=False, length=32), server_default='pending', nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('status_reason', sa.Text(), nullable=True),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('processed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('version', sa.BigInteger(), server_default='0', nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_stripe_events')),
    sa.UniqueConstraint('event_id', name=op.f('uq_stripe_events_event_id'))
    )
    with op.batch_alter_table('stripe_events', schema=None) as batch_op:
        batch_op.create_index('ix_stripe_events_created', ['created'], unique=False)
        batch_op.create_index('ix_stripe_events_customer_id', ['customer_id'], unique=False)
        batch_op.create_index('ix_stripe_events_object_id', ['object_id'], unique=False)
        batch_op.create_index('ix_stripe_events_status_received_at', ['status', 'received_at'], unique=False)

    op.create_table('grants',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('account_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('source', sa.Enum('top_up', 'renewal', 'promotion', 'adjustment', name='grant_source', native_enum=False, length=32), nullable=False),
    sa.Column('units', sa.BigInteger(), nullable=False),
    sa.Column('remaining', sa.BigInteger(), nullable=False),
    sa.Column('frozen', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('priority', sa.Integer(), server_default='0', nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('expired_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('stripe_object_id', sa.String(length=255), nullable=True),
    sa.Column('stripe_object_type', sa.String(length=64), nullable=True),
    sa.Column('amount_minor', sa.BigInteger(), nullable=True),
    sa.Column('currency', sa.String(length=3), nullable=True),
    sa.Column('clawed_back', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('refunded_minor', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('idempotency_key', sa.String(length=255), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('actor', sa.String(length=255), nullable=False),
    sa.Column('period_start', sa.DateTime(timezone=True), nullable=True),
    sa.Column('period_end', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.CheckConstraint('frozen >= 0', name=op.f('ck_grants_frozen_not_negative')),
    sa.CheckConstraint('remaining >= 0', name=op.f('ck_grants_remaining_not_negative')),
    sa.CheckConstraint('units > 0', name=op.f('ck_grants_units_positive')),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_grants_account_id_accounts')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_grants')),
    sa.UniqueConstraint('idempotency_key', name=op.f('uq_grants_idempotency_key'))
    )
    with op.batch_alter_table('grants', schema=None) as batch_op:
        batch_op.create_index('ix_grants_drawdown', ['account_id', 'priority', 'expires_at', 'id'], unique=False)
        batch_op.create_index('ix_grants_stripe_object', ['stripe_object_id'], unique=False)

    op.create_table('usage_records',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('account_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('request_id', sa.String(length=255), nullable=False),
    sa.Column('user_id', sa.String(length=255), nullable=True),
    sa.Column('workspace', sa.String(length=255), nullable=True),
    sa.Column('feature', sa.String(length=255), nullable=True),
    sa.Column('provider', sa.String(length=64), nullable=True),
    sa.Column('model', sa.String(length=255), nullable=True),
    sa.Column('operation', sa.String(length=64), nullable=True),
    sa.Column('input_tokens', sa.BigInteger(), nullable=False),
    sa.Column('output_tokens', sa.BigInteger(), nullable=False),
    sa.Column('cached_tokens', sa.BigInteger(), nullable=False),
    # Exact on SQLite too: integer 10^-10 USD there (see ledger.models.UsdAmount).
    sa.Column('provider_cost_usd', sa.Numeric(precision=20, scale=10).with_variant(sa.BigInteger(), 'sqlite'), nullable=False),
    sa.Column('units', sa.BigInteger(), nullable=False),
    sa.Column('billable', sa.Boolean(), nullable=False),
    sa.Column('environment', sa.Enum('production', 'test', 'internal', name='usage_environment', native_enum=False, length=32), nullable=False),
    sa.Column('occurred_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_usage_records_account_id_accounts')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_usage_records')),
    sa.UniqueConstraint('request_id', name=op.f('uq_usage_records_request_id'))
    )
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.create_index('ix_usage_account_occurred', ['account_id', 'occurred_at'], unique=False)
        batch_op.create_index('ix_usage_provider_model_occurred', ['provider', 'model', 'occurred_at'], unique=False)

    op.create_table('holds',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('account_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('request_id', sa.String(length=255), nullable=False),
    sa.Column('units', sa.BigInteger(), nullable=False),
    sa.Column('captured_units', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('shortfall', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('status', sa.Enum('open', 'captured', 'released', 'expired', name='hold_status', native_enum=False, length=32), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('usage_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.Column('settled_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint('units >= 0', name=op.f('ck_holds_units_not_negative')),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_holds_account_id_accounts')),
    sa.ForeignKeyConstraint(['usage_id'], ['usage_records.id'], name=op.f('fk_holds_usage_id_usage_records')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_holds')),
    sa.UniqueConstraint('request_id', name=op.f('uq_holds_request_id'))
    )
    with op.batch_alter_table('holds', schema=None) as batch_op:
        batch_op.create_index('ix_holds_status_expires_at', ['status', 'expires_at'], unique=False)

    op.create_table('entries',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('account_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('kind', sa.Enum('grant', 'consume', 'hold', 'capture', 'release', 'expire', 'clawback', 'adjustment', 'freeze', 'unfreeze', 'debt_settlement', name='entry_kind', native_enum=False, length=32), nullable=False),
    sa.Column('units', sa.BigInteger(), nullable=False),
    sa.Column('balance_after', sa.BigInteger(), nullable=False),
    sa.Column('debt_delta', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('frozen_delta', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('idempotency_key', sa.String(length=255), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=True),
    sa.Column('grant_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('hold_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('usage_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('stripe_object_id', sa.String(length=255), nullable=True),
    sa.Column('actor', sa.String(length=255), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_entries_account_id_accounts')),
    sa.ForeignKeyConstraint(['grant_id'], ['grants.id'], name=op.f('fk_entries_grant_id_grants')),
    sa.ForeignKeyConstraint(['hold_id'], ['holds.id'], name=op.f('fk_entries_hold_id_holds')),
    sa.ForeignKeyConstraint(['usage_id'], ['usage_records.id'], name=op.f('fk_entries_usage_id_usage_records')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_entries')),
    sa.UniqueConstraint('idempotency_key', name=op.f('uq_entries_idempotency_key'))
    )
    with op.batch_alter_table('entries', schema=None) as batch_op:
        batch_op.create_index('ix_entries_account_id_id', ['account_id', 'id'], unique=False)

    op.create_table('allocations',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('entry_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('grant_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('units', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['entry_id'], ['entries.id'], name=op.f('fk_allocations_entry_id_entries')),
    sa.ForeignKeyConstraint(['grant_id'], ['grants.id'], name=op.f('fk_allocations_grant_id_grants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_allocations'))
    )
    with op.batch_alter_table('allocations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_allocations_entry_id'), ['entry_id'], unique=False)
        batch_op.create_index('ix_allocations_grant_id', ['grant_id'], unique=False)

    if op.get_bind().dialect.name == "postgresql":
        op.execute(CONSUME_FUNCTION)
    


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS ledger_consume(text, text, text, bigint, text, text, text, timestamptz, jsonb)")
    with op.batch_alter_table('allocations', schema=None) as batch_op:
        batch_op.drop_index('ix_allocations_grant_id')
        batch_op.drop_index(batch_op.f('ix_allocations_entry_id'))

    op.drop_table('allocations')
    with op.batch_alter_table('entries', schema=None) as batch_op:
        batch_op.drop_index('ix_entries_account_id_id')

    op.drop_table('entries')
    with op.batch_alter_table('holds', schema=None) as batch_op:
        batch_op.drop_index('ix_holds_status_expires_at')

    op.drop_table('holds')
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_provider_model_occurred')
        batch_op.drop_index('ix_usage_account_occurred')

    op.drop_table('usage_records')
    with op.batch_alter_table('grants', schema=None) as batch_op:
        batch_op.drop_index('ix_grants_stripe_object')
        batch_op.drop_index('ix_grants_drawdown')

    op.drop_table('grants')
    with op.batch_alter_table('stripe_events', schema=None) as batch_op:
        batch_op.drop_index('ix_stripe_events_status_received_at')
        batch_op.drop_index('ix_stripe_events_object_id')
        batch_op.drop_index('ix_stripe_events_customer_id')
        batch_op.drop_index('ix_stripe_events_created')

    op.drop_table('stripe_events')
    with op.batch_alter_table('accounts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_accounts_external_id'))

    op.drop_table('accounts')
    
