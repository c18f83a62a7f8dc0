"""ledger_consume_many applies the common case of a batch set-wise: a few statements for the whole batch.

Revision ID: hot_1
Revises: client_2
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from alembic import op

revision = "hot_1"
down_revision = "client_2"
branch_labels = None
depends_on = None

SIGNATURE = "ledger_consume_many(text[], text[], text[], bigint[], text[], text[], text[], timestamptz[], jsonb[])"

# The batch's outcome stays exactly "its items applied one after another" (migration 0008), but the common case
# no longer pays a function call and four statements per item. After locking every account of the batch in one
# order (customer id, byte order: two batches never deadlock), a customer's items are applied together when
# nothing about them needs the item-by-item rules: every item charges units and is new (no replay, no repeat
# inside the batch), the account owes nothing, may spend every grant source, has no lapsed grant, and its first
# grant in draw order covers all of its items (so each item draws that grant, as ledger_consume's fast path
# would), and the balance stays above its low-balance threshold and above zero (no balance.low or
# balance.depleted to emit). Each item's entry carries the balance after it, in the batch's order. Every other
# customer's items go through ledger_consume one by one, as before, under the locks already held.
_MANY_TEMPLATE = r"""
CREATE OR REPLACE FUNCTION ledger_consume_many(
    p_customers text[], p_request_ids text[], p_keys text[], p_units bigint[], p_hashes text[], p_actors text[],
    p_reasons text[], p_nows timestamptz[], p_usages jsonb[]@LIMITS_PARAM@
) RETURNS TABLE (
    idx integer, status text, entry_id bigint, balance_after bigint, usage_id bigint, units bigint,
    available bigint, access_state text, request_hash text, grant_ids bigint[], grant_units bigint[]@LIMIT_COLUMNS@
) LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    i integer;
    r record;
    v_set text[];
    v_accounts bigint[];
    v_grants bigint[];
    v_first timestamptz;
    v_last timestamptz;
BEGIN
    SELECT min(t), max(t) INTO v_first, v_last FROM unnest(p_nows) AS t;
    -- Every account of the batch, locked in one order before anything is read for a decision.
    PERFORM 1 FROM accounts a WHERE a.customer_id = ANY(p_customers)
     ORDER BY a.customer_id COLLATE "C" FOR NO KEY UPDATE;

    -- A new statement, so a new snapshot: what committed before the locks were granted is seen.
    WITH items AS (
        SELECT t.c AS customer, t.r AS request_id, t.k AS key, t.u AS units, t.n
          FROM unnest(p_customers, p_request_ids, p_keys, p_units) WITH ORDINALITY AS t(c, r, k, u, n)
    ), per AS (
        SELECT i.customer, sum(i.units)::bigint AS total, min(i.units) AS smallest, count(*) AS n,
               count(DISTINCT i.key) AS keys, count(DISTINCT i.request_id) AS rids
          FROM items i GROUP BY i.customer
    ), replayed AS (  -- customers with an item whose key is already taken: a replay or a conflict
        SELECT DISTINCT i.customer FROM items i JOIN entries e ON e.idempotency_key = i.key
    )@LIMIT_CTES@, acc AS (
        SELECT p.*, a.id, a.customer_id, a.balance, a.overdraft_limit, a.debt, a.access_state, a.grace_until
          FROM per p JOIN accounts a ON a.customer_id = p.customer
    ), states AS MATERIALIZED (  -- so that the policy below is asked once per state, not once per account
        SELECT DISTINCT c.access_state, c.grace_until FROM acc c
    ), spends_all AS MATERIALIZED (  -- the access policy at both ends of the batch's times
        SELECT s.access_state, s.grace_until
          FROM states s
         WHERE ledger_spendable(s.access_state, s.grace_until, v_first) IS NULL
           AND ledger_spendable(s.access_state, s.grace_until, v_last) IS NULL
    )
    SELECT array_agg(a.customer_id), array_agg(a.id), array_agg(g.id)
      INTO v_set, v_accounts, v_grants
      FROM acc a
      JOIN spends_all sa ON sa.access_state = a.access_state
                        AND sa.grace_until IS NOT DISTINCT FROM a.grace_until
      CROSS JOIN LATERAL (
          SELECT d.id, d.remaining FROM grants d
           WHERE d.account_id = a.id AND d.remaining > 0 AND (d.expires_at IS NULL OR d.expires_at > v_last)
           ORDER BY d.priority DESC, d.expires_at ASC NULLS LAST, d.id LIMIT 1) g
      LEFT JOIN balance_thresholds t ON t.account_id = a.id
     WHERE a.smallest > 0 AND a.keys = a.n AND a.rids = a.n
       AND a.debt = 0
       AND g.remaining >= a.total
       AND a.balance + a.overdraft_limit - a.total > 0
       AND (t.effective_units IS NULL OR a.balance + a.overdraft_limit - a.total >= t.effective_units)
       AND NOT EXISTS (SELECT 1 FROM grants x WHERE x.account_id = a.id AND x.remaining > 0
                                                AND x.expires_at <= v_last)
       AND NOT EXISTS (SELECT 1 FROM replayed rp WHERE rp.customer = a.customer)@LIMIT_CONDITION@;
@LIMIT_WRITE@
    IF v_set IS NOT NULL THEN
        RETURN QUERY
        WITH chosen AS (
            SELECT c.customer, c.account_id, c.grant_id
              FROM unnest(v_set, v_accounts, v_grants) AS c(customer, account_id, grant_id)
        ), items AS (
            SELECT t.n::integer AS idx, t.c AS customer, t.r AS request_id, t.k AS key, t.u AS units, t.h AS hash,
                   t.a AS actor, t.rs AS reason, t.ts AS at, t.us AS usage, c.account_id, c.grant_id
              FROM unnest(p_customers, p_request_ids, p_keys, p_units, p_hashes, p_actors, p_reasons, p_nows,
                          p_usages) WITH ORDINALITY AS t(c, r, k, u, h, a, rs, ts, us, n)
              JOIN chosen c ON c.customer = t.c
        ), totals AS (
            SELECT i.account_id, i.grant_id, sum(i.units)::bigint AS total, max(i.at) AS last_at
              FROM items i GROUP BY i.account_id, i.grant_id
        ), moved AS (
            UPDATE accounts a SET balance = a.balance - s.total, updated_at = s.last_at
              FROM totals s WHERE a.id = s.account_id
            RETURNING a.id, a.balance + s.total AS balance_before, a.access_state
        ), drawn AS (  -- runs though nothing reads it: a data-modifying WITH always runs, exactly once
            UPDATE grants g SET remaining = g.remaining - s.total FROM totals s WHERE g.id = s.grant_id
            RETURNING g.id
        ), ordered AS (
            SELECT i.*, m.access_state,
                   (m.balance_before - sum(i.units) OVER (PARTITION BY i.account_id ORDER BY i.idx))::bigint AS after
              FROM items i JOIN moved m ON m.id = i.account_id
        ), used AS (
            INSERT INTO usage_records (account_id, request_id, user_id, workspace, feature, provider, model,
                                       operation, input_tokens, output_tokens, cached_tokens, provider_cost_usd,
                                       units, billable, environment, occurred_at)
            SELECT o.account_id, o.request_id, o.usage->>'user_id', o.usage->>'workspace', o.usage->>'feature',
                   o.usage->>'provider', o.usage->>'model', o.usage->>'operation',
                   (o.usage->>'input_tokens')::bigint, (o.usage->>'output_tokens')::bigint,
                   (o.usage->>'cached_tokens')::bigint, (o.usage->>'provider_cost_usd')::numeric, o.units,
                   (o.usage->>'billable')::boolean, o.usage->>'environment',
                   coalesce((o.usage->>'occurred_at')::timestamptz, o.at)
              FROM ordered o WHERE o.usage IS NOT NULL ORDER BY o.idx
            RETURNING id, request_id
        ), written AS (
            INSERT INTO entries (account_id, kind, units, balance_after, debt_delta, frozen_delta, idempotency_key,
                                 request_hash, grant_id, usage_id, actor, reason)
            SELECT o.account_id, 'consume', -o.units, o.after, 0, 0, o.key, o.hash, o.grant_id, u.id, o.actor,
                   o.reason
              FROM ordered o LEFT JOIN used u ON u.request_id = o.request_id
             -- Entry ids rise in the batch's order, so each account's entries read in id order tie their
             -- balances one to the next.
             ORDER BY o.idx
            RETURNING id, idempotency_key, usage_id
        )
        SELECT o.idx, 'ok'::text, w.id, o.after, w.usage_id, o.units, NULL::bigint, o.access_state::text, o.hash,
               ARRAY[o.grant_id], ARRAY[o.units]@LIMIT_OK@
          FROM ordered o JOIN written w ON w.idempotency_key = o.key;
    END IF;

    FOR i IN SELECT t.n FROM unnest(p_customers) WITH ORDINALITY AS t(c, n)
              WHERE v_set IS NULL OR NOT (t.c = ANY(v_set))
              ORDER BY t.c COLLATE "C", t.n LOOP
        SELECT c.* INTO r
          FROM ledger_consume(p_customers[i], p_request_ids[i], p_keys[i], p_units[i], p_hashes[i], p_actors[i],
                              p_reasons[i], p_nows[i], p_usages[i]@LIMIT_ARG@) c;
        idx := i;
        status := r.status;
        entry_id := r.entry_id;
        balance_after := r.balance_after;
        usage_id := r.usage_id;
        units := r.units;
        available := r.available;
        access_state := r.access_state;
        request_hash := r.request_hash;
        grant_ids := r.grant_ids;
        grant_units := r.grant_units;@LIMIT_ASSIGN@
        RETURN NEXT;
    END LOOP;
END
$fn$
"""

# With limits (the form migration limits_2 added, taking each item's limit rows as one JSON array): a customer's
# items also go together only when every counter they touch exists and stays below its maximum after all of them
# (so none is refused and none reaches its maximum: no limit.reached to emit); the counters then take the
# items' sums in one statement. Counters change only under their customer's account lock, which the batch holds,
# so the check cannot go stale; the guarded update still re-checks, and a batch that finds it did is undone and
# applied item by item (the caller retries it so on a serialization failure).
_LIMITED = {
    "@LIMITS_PARAM@": ", p_limits jsonb",
    "@LIMIT_COLUMNS@": ",\n    limit_name text, limit_used bigint",
    "@LIMIT_CTES@": """, lim AS (  -- each customer's items' limit rows, summed per counter in its own measure
        SELECT i.customer, x.limit_name, x.scope_value, x.window_start, x.measure, x.maximum,
               sum(CASE x.measure WHEN 'requests' THEN x.requests WHEN 'units' THEN x.units
                                  WHEN 'tokens' THEN x.tokens ELSE x.cost_usd END) AS amount
          FROM items i
         CROSS JOIN LATERAL jsonb_to_recordset(nullif(p_limits -> (i.n::integer - 1), 'null')) AS x(
               limit_name text, scope_value text, window_start timestamptz, requests bigint, units bigint,
               tokens bigint, cost_usd bigint, measure text, maximum bigint)
         GROUP BY i.customer, x.limit_name, x.scope_value, x.window_start, x.measure, x.maximum
    ), lim_blocked AS (  -- a new counter, or one the batch would take to its maximum or past it
        SELECT DISTINCT l.customer
          FROM lim l
          LEFT JOIN limit_counters c ON c.limit_name = l.limit_name AND c.scope_value = l.scope_value
                                    AND c.window_start = l.window_start
         WHERE c.limit_name IS NULL
            OR CASE l.measure WHEN 'requests' THEN c.requests WHEN 'units' THEN c.units WHEN 'tokens' THEN c.tokens
                              ELSE c.cost_usd END + l.amount >= l.maximum
    )""",
    "@LIMIT_CONDITION@": "\n       AND NOT EXISTS (SELECT 1 FROM lim_blocked lb WHERE lb.customer = a.customer)",
    "@LIMIT_WRITE@": """
    IF v_set IS NOT NULL THEN
        WITH rows AS (
            SELECT x.*
              FROM unnest(p_customers) WITH ORDINALITY AS t(c, n)
             CROSS JOIN LATERAL jsonb_to_recordset(nullif(p_limits -> (t.n::integer - 1), 'null')) AS x(
                   limit_name text, scope_value text, window_start timestamptz, requests bigint, units bigint,
                   tokens bigint, cost_usd bigint, measure text, maximum bigint)
             WHERE t.c = ANY(v_set)
        ), sums AS (
            SELECT r.limit_name, r.scope_value, r.window_start, max(r.measure) AS measure, max(r.maximum) AS maximum,
                   sum(r.requests) AS requests, sum(r.units) AS units, sum(r.tokens) AS tokens,
                   sum(r.cost_usd) AS cost_usd
              FROM rows r GROUP BY r.limit_name, r.scope_value, r.window_start
        ), taken AS (
            UPDATE limit_counters c
               SET requests = c.requests + s.requests, units = c.units + s.units, tokens = c.tokens + s.tokens,
                   cost_usd = c.cost_usd + s.cost_usd, measure = s.measure, maximum = s.maximum
              FROM sums s
             WHERE c.limit_name = s.limit_name AND c.scope_value = s.scope_value AND c.window_start = s.window_start
               AND CASE s.measure WHEN 'requests' THEN c.requests WHEN 'units' THEN c.units
                                  WHEN 'tokens' THEN c.tokens ELSE c.cost_usd END
                   + CASE s.measure WHEN 'requests' THEN s.requests WHEN 'units' THEN s.units
                                    WHEN 'tokens' THEN s.tokens ELSE s.cost_usd END < s.maximum
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM taken) = (SELECT count(*) FROM sums) INTO v_counted;
        IF NOT v_counted THEN
            RAISE EXCEPTION 'a limit counter moved under the batch' USING ERRCODE = 'serialization_failure';
        END IF;
    END IF;
""",
    "@LIMIT_OK@": ", NULL::text, NULL::bigint",
    "@LIMIT_ARG@": ", nullif(p_limits -> (i - 1), 'null')",
    "@LIMIT_ASSIGN@": "\n        limit_name := r.limit_name;\n        limit_used := r.limit_used;",
}


def many_function(*, limited: bool) -> str:
    """ledger_consume_many as this migration defines it: without limits (0008's signature) or with (limits_2's)."""
    sql = _MANY_TEMPLATE
    for marker, text in _LIMITED.items():
        sql = sql.replace(marker, text if limited else "")
    if limited:
        sql = sql.replace("    v_last timestamptz;\n", "    v_last timestamptz;\n    v_counted boolean;\n", 1)
    return sql


MANY_FUNCTION = many_function(limited=False)

def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(MANY_FUNCTION)
        op.execute(many_function(limited=True))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_sibling("0008_ledger_consume_many").MANY_FUNCTION)
        op.execute(_sibling("0016_limits_holds").MANY_LIMITED_FUNCTION)


def _sibling(name: str) -> Any:
    """Another migration's module (migrations do not import the code they would freeze)."""
    spec = importlib.util.spec_from_file_location(f"_migration_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
