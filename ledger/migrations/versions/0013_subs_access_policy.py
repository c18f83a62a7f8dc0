"""The access policy in PostgreSQL's ledger functions: which grant sources each access state may spend.

Revision ID: subs_2
Revises: subs_1
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "subs_2"
down_revision = "subs_1"
branch_labels = None
depends_on = None

# ledger_access_policy holds [access.spend] per policy key (NULL: every source; '': none; else a comma list); the
# migration writes the default, ``billing-reconciler migrate`` writes the config's (ledger.access.sync_access_policy).
DEFAULT_POLICY = {
    "active": None,
    "trialing": None,
    "past_due": None,
    "past_due_after_grace": "adjustment,promotion,top_up",
    "suspended": "",
    "canceled": "adjustment,promotion,top_up",
}

SPENDABLE_FUNCTION = r"""
CREATE OR REPLACE FUNCTION ledger_spendable(p_state text, p_grace timestamptz, p_now timestamptz)
RETURNS text[] LANGUAGE sql STABLE AS $fn$
    -- ledger.access.spendable_sources: past_due splits at its grace deadline; a key without a row has the
    -- default policy ([access.spend]'s defaults in ledger.config).
    SELECT CASE WHEN p.policy_key IS NULL THEN
                    CASE s.k WHEN 'suspended' THEN '{}'::text[]
                             WHEN 'canceled' THEN '{adjustment,promotion,top_up}'::text[]
                             WHEN 'past_due_after_grace' THEN '{adjustment,promotion,top_up}'::text[] END
                WHEN p.sources IS NULL THEN NULL
                ELSE string_to_array(p.sources, ',') END
      FROM (SELECT CASE WHEN p_state = 'past_due' AND p_grace IS NOT NULL AND p_now >= p_grace
                        THEN 'past_due_after_grace' ELSE p_state END AS k) s
      LEFT JOIN ledger_access_policy p ON p.policy_key = s.k
$fn$;
"""

# ledger_consume (0001), ledger_draw and ledger_hold (0009) as they were, but drawing only the grant sources the
# account's state may spend, as ledger.portable.debit and ledger.posting.check_access do: a state that spends
# nothing is refused; a limited one draws what its sources hold, without overdraft or new debt, and is refused as
# access (not insufficient credits) when the credits it may not spend would have covered the request.
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
    v_allowed text[];
    v_gsrc text[];
    v_allowed_sum bigint := 0;
    i int;
BEGIN
    -- Fast path, the common case: no debt, no lapsed grant, access allowed, and the first grant in draw order
    -- covers it all. Its outcome is what the general path would give; it only takes fewer statements.
    -- The conditional UPDATE takes the account's row lock and applies the guard in one statement (a concurrent
    -- consumer waits, then the guard is re-checked against the row it committed), so nothing can overdraw.
    IF p_units > 0 THEN
        UPDATE accounts a SET balance = a.balance - p_units, updated_at = p_now
         WHERE a.customer_id = p_customer AND a.debt = 0 AND a.balance + a.overdraft_limit >= p_units
           -- Only a state that may spend every grant source takes the fast path (the access policy).
           AND ledger_spendable(a.access_state, a.grace_until, p_now) IS NULL
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
           array_agg(g.expires_at ORDER BY g.priority DESC, g.expires_at ASC NULLS LAST, g.id),
           array_agg(g.source ORDER BY g.priority DESC, g.expires_at ASC NULLS LAST, g.id)
      INTO v_orig, v_gids, v_grem, v_gexp, v_gsrc
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
    -- The access policy: NULL spends every grant source, an empty list none (refused), else only those listed.
    v_allowed := ledger_spendable(v_state, v_grace, p_now);
    IF cardinality(v_allowed) = 0 THEN
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
            ELSIF v_allowed IS NULL OR v_gsrc[i] = ANY(v_allowed) THEN
                v_allowed_sum := v_allowed_sum + v_grem[i];
                IF v_need > 0 THEN
                    v_take := least(v_need, v_grem[i]);
                    v_ids := v_ids || v_gids[i];
                    v_takes := v_takes || v_take;
                    v_need := v_need - v_take;
                END IF;
            END IF;
        END LOOP;
        -- Limited to some sources: what they hold (no overdraft, no new debt); refused as access when the
        -- credits it may not spend would have covered it.
        IF v_allowed IS NOT NULL AND least(v_allowed_sum, v_balance - v_lapsed) < p_units THEN
            SELECT CASE WHEN v_balance - v_lapsed + v_overdraft >= p_units THEN 'access_refused' ELSE 'insufficient' END,
                NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint,
                greatest(0, least(v_allowed_sum, v_balance - v_lapsed)), v_state, NULL::text, NULL::bigint[],
                NULL::bigint[]
              INTO status, entry_id, balance_after, usage_id, units, available, access_state, request_hash, grant_ids, grant_units;
            RETURN;
        END IF;
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

DRAW_FUNCTION = r"""
DROP FUNCTION IF EXISTS ledger_draw(bigint, bigint, bigint, bigint, timestamptz, boolean);
CREATE OR REPLACE FUNCTION ledger_draw(
    p_account bigint, p_balance bigint, p_overdraft bigint, p_units bigint, p_now timestamptz, p_partial boolean,
    OUT ok boolean, OUT drawn bigint, OUT uncovered bigint, OUT balance bigint, OUT available bigint,
    OUT grant_ids bigint[], OUT grant_units bigint[], OUT unrestricted bigint
) LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_gids bigint[];
    v_grem bigint[];
    v_gexp timestamptz[];
    v_lapsed bigint := 0;
    v_need bigint;
    v_take bigint;
    v_gsrc text[];
    v_allowed text[];
    v_allowed_sum bigint := 0;
    i int;
BEGIN
    ok := true; drawn := 0; uncovered := 0; balance := p_balance; grant_ids := '{}'; grant_units := '{}';
    available := greatest(0, p_balance + p_overdraft);
    unrestricted := available;
    IF p_units = 0 THEN
        RETURN;
    END IF;
    -- Draw order: higher priority first, then earliest expiry (never-expiring last), then oldest.
    SELECT array_agg(g.id ORDER BY g.priority DESC, g.expires_at ASC NULLS LAST, g.id),
           array_agg(g.remaining ORDER BY g.priority DESC, g.expires_at ASC NULLS LAST, g.id),
           array_agg(g.expires_at ORDER BY g.priority DESC, g.expires_at ASC NULLS LAST, g.id),
           array_agg(g.source ORDER BY g.priority DESC, g.expires_at ASC NULLS LAST, g.id)
      INTO v_gids, v_grem, v_gexp, v_gsrc
      FROM grants g WHERE g.account_id = p_account AND g.remaining > 0;
    -- The access policy of the (locked) account's state: NULL draws every source, else only those listed.
    SELECT ledger_spendable(x.access_state, x.grace_until, p_now) INTO v_allowed FROM accounts x WHERE x.id = p_account;
    FOR i IN 1 .. coalesce(array_length(v_gids, 1), 0) LOOP
        IF v_gexp[i] IS NOT NULL AND v_gexp[i] <= p_now THEN
            v_lapsed := v_lapsed + v_grem[i];
        ELSIF v_allowed IS NULL OR v_gsrc[i] = ANY(v_allowed) THEN
            v_allowed_sum := v_allowed_sum + v_grem[i];
        END IF;
    END LOOP;
    available := greatest(0, p_balance - v_lapsed + p_overdraft);
    unrestricted := available;
    IF v_allowed IS NOT NULL THEN
        -- Limited to some sources: what they hold, no overdraft, no new debt (as ledger.portable.debit).
        available := greatest(0, least(v_allowed_sum, p_balance - v_lapsed));
    END IF;
    drawn := p_units;
    IF available < p_units THEN
        IF NOT p_partial THEN
            ok := false;
            drawn := 0;
            RETURN;
        END IF;
        drawn := available;
    END IF;
    v_need := drawn;
    FOR i IN 1 .. coalesce(array_length(v_gids, 1), 0) LOOP
        IF v_gexp[i] IS NOT NULL AND v_gexp[i] <= p_now THEN
            -- A lapsed grant's units expire first (an EXPIRE entry naming it), as ledger.posting.expire_lapsed.
            UPDATE grants SET remaining = 0, expired_at = p_now WHERE id = v_gids[i];
            balance := balance - v_grem[i];
            INSERT INTO entries (account_id, kind, units, balance_after, debt_delta, frozen_delta, idempotency_key,
                                 grant_id, actor, reason)
                 VALUES (p_account, 'expire', -v_grem[i], balance, 0, 0,
                         'expire:' || v_gids[i] || ':' || v_grem[i] || ':' || p_now::text,
                         v_gids[i], 'system', 'grant expired');
        ELSIF v_need > 0 AND (v_allowed IS NULL OR v_gsrc[i] = ANY(v_allowed)) THEN
            v_take := least(v_need, v_grem[i]);
            grant_ids := grant_ids || v_gids[i];
            grant_units := grant_units || v_take;
            v_need := v_need - v_take;
        END IF;
    END LOOP;
    uncovered := v_need;
    UPDATE grants SET remaining = grants.remaining - t.take
      FROM unnest(grant_ids, grant_units) AS t(id, take) WHERE grants.id = t.id;
END
$fn$;

"""

HOLD_FUNCTION = r"""
CREATE OR REPLACE FUNCTION ledger_hold(
    p_customer text, p_request_id text, p_key text, p_units bigint, p_hash text, p_actor text, p_now timestamptz,
    p_expires_at timestamptz,
    OUT status text, OUT hold_units bigint, OUT expires_at timestamptz, OUT balance_after bigint,
    OUT available bigint, OUT access_state text, OUT request_hash text
) LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    a record;
    o record;
    d record;
    v_hold bigint;
    v_entry bigint;
    v_balance bigint;
BEGIN
    SELECT x.id, x.balance, x.held, x.debt, x.overdraft_limit, x.access_state, x.grace_until INTO a
      FROM accounts x WHERE x.customer_id = p_customer FOR NO KEY UPDATE;
    IF a.id IS NULL THEN
        status := 'unknown_customer';
        RETURN;
    END IF;
    access_state := a.access_state;
    -- After the lock (a fresh snapshot): a concurrent first attempt of this request is seen once it committed.
    SELECT x.balance_after, x.request_hash INTO o FROM entries x WHERE x.idempotency_key = p_key;
    IF FOUND THEN
        status := 'replay';
        request_hash := o.request_hash;
        balance_after := o.balance_after;
        SELECT h.units, h.expires_at INTO hold_units, expires_at FROM holds h WHERE h.request_id = p_request_id;
        RETURN;
    END IF;
    IF cardinality(ledger_spendable(a.access_state, a.grace_until, p_now)) = 0 THEN
        status := 'access_refused';
        RETURN;
    END IF;
    d := ledger_draw(a.id, a.balance, a.overdraft_limit, p_units, p_now, false);
    IF NOT d.ok THEN
        -- Refused as access when the credits the policy keeps from this state would have covered it.
        status := CASE WHEN d.available < p_units AND d.unrestricted >= p_units THEN 'access_refused'
                       ELSE 'insufficient' END;
        available := d.available;
        RETURN;
    END IF;
    INSERT INTO holds (account_id, request_id, units, captured_units, shortfall, status, expires_at)
         VALUES (a.id, p_request_id, d.drawn, 0, 0, 'open', p_expires_at)
      RETURNING id INTO v_hold;
    v_balance := d.balance - d.drawn;
    INSERT INTO entries (account_id, kind, units, balance_after, debt_delta, frozen_delta, idempotency_key,
                         request_hash, grant_id, hold_id, actor, reason)
         VALUES (a.id, 'hold', -d.drawn, v_balance, d.uncovered, 0, p_key, p_hash,
                 CASE WHEN array_length(d.grant_ids, 1) = 1 THEN d.grant_ids[1] END, v_hold, p_actor, 'hold placed')
      RETURNING id INTO v_entry;
    IF array_length(d.grant_ids, 1) > 1 THEN
        INSERT INTO allocations (entry_id, grant_id, units)
             SELECT v_entry, t.id, -t.take FROM unnest(d.grant_ids, d.grant_units) WITH ORDINALITY AS t(id, take, n)
              ORDER BY t.n;
    END IF;
    UPDATE accounts SET balance = v_balance, held = a.held + d.drawn, debt = a.debt + d.uncovered, updated_at = p_now
     WHERE id = a.id;
    status := 'ok';
    hold_units := d.drawn;
    expires_at := p_expires_at;
    balance_after := v_balance;
    request_hash := p_hash;
END
$fn$;

"""


def upgrade() -> None:
    table = op.create_table(
        "ledger_access_policy",
        sa.Column("policy_key", sa.String(length=32), nullable=False),
        sa.Column("sources", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("policy_key", name=op.f("pk_ledger_access_policy")),
    )
    op.bulk_insert(table, [{"policy_key": k, "sources": v} for k, v in DEFAULT_POLICY.items()])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(SPENDABLE_FUNCTION)
        op.execute(CONSUME_FUNCTION)
        op.execute(DRAW_FUNCTION)
        op.execute(HOLD_FUNCTION)


def _sibling(name: str) -> Any:
    """Another migration's module (to restore the functions as it created them)."""
    spec = importlib.util.spec_from_file_location(f"_migration_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        first, holds = _sibling("0001_ledger_and_inbox"), _sibling("0009_ledger_holds")
        op.execute("DROP FUNCTION IF EXISTS ledger_draw(bigint, bigint, bigint, bigint, timestamptz, boolean)")
        op.execute(first.CONSUME_FUNCTION)
        op.execute(holds.FUNCTIONS)
        op.execute("DROP FUNCTION IF EXISTS ledger_spendable(text, timestamptz, timestamptz)")
    op.drop_table("ledger_access_policy")
