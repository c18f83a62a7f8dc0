"""Holds take limit room: a hold keeps the limit rows it reserved; capture settles them, release and expiry give
them back; PostgreSQL's hold functions do it in their own statement.

Revision ID: limits_2
Revises: money_1

``holds.limit_rows`` is what the hold took, as ``limits_reserve`` takes it (ledger.limits.PreparedLimits.as_json:
limit name, scope value, window, the request's requests / units / tokens / cost in 10^-10 USD): the counters to
settle are named by the hold itself, so a release in another window, or after the config changed, gives back
exactly the room that was taken, in the window it was taken in.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "limits_2"
down_revision = "money_1"
branch_labels = None
depends_on = None

OLD_HOLD = "ledger_hold(text, text, text, bigint, text, text, timestamptz, timestamptz)"
OLD_CAPTURE = "ledger_capture(text, bigint, text, text, timestamptz, jsonb)"
NEW_HOLD = "ledger_hold(text, text, text, bigint, text, text, timestamptz, timestamptz, jsonb)"
NEW_CAPTURE = "ledger_capture(text, bigint, text, text, timestamptz, jsonb, jsonb)"
LIMITED_CONSUME = "ledger_consume(text, text, text, bigint, text, text, text, timestamptz, jsonb, jsonb)"
LIMITED_MANY = (
    "ledger_consume_many(text[], text[], text[], bigint[], text[], text[], text[], timestamptz[], jsonb[], jsonb)"
)

# ledger.limits.settle_limits, server-side: move each counter a hold reserved from what the hold took to what it
# settled at (NULL: what it took, unchanged); never below zero. Every counter named is the hold's customer's, and
# every caller holds that customer's account lock, so settlements of one customer cannot deadlock each other.
SETTLE_FUNCTION = r"""
CREATE OR REPLACE FUNCTION limits_settle(
    p_rows jsonb, p_requests bigint, p_units bigint, p_tokens bigint, p_cost bigint
) RETURNS void LANGUAGE sql AS $fn$
    UPDATE limit_counters c
       SET requests = greatest(c.requests + coalesce(p_requests, r.requests) - r.requests, 0),
           units = greatest(c.units + coalesce(p_units, r.units) - r.units, 0),
           tokens = greatest(c.tokens + coalesce(p_tokens, r.tokens) - r.tokens, 0),
           cost_usd = greatest(c.cost_usd + coalesce(p_cost, r.cost_usd) - r.cost_usd, 0)
      FROM jsonb_to_recordset(p_rows) AS r(limit_name text, scope_value text, window_start timestamptz,
                                          requests bigint, units bigint, tokens bigint, cost_usd bigint)
     WHERE c.limit_name = r.limit_name AND c.scope_value = r.scope_value AND c.window_start = r.window_start
$fn$;
"""

# ledger_hold as in 0013, taking room in the limits (``p_limits``: the rows, NULL when no limit applies) after
# the draw, as ledger.holds' portable path does: a request the balance cannot cover is refused as insufficient
# first; one a limit refuses gives its grant draw back (lapsed grants it expired stay expired: that is true
# whatever this hold does) and answers ``limit_exceeded`` with the refused limit and what its counter held.
HOLD_FUNCTION = r"""
CREATE OR REPLACE FUNCTION ledger_hold(
    p_customer text, p_request_id text, p_key text, p_units bigint, p_hash text, p_actor text, p_now timestamptz,
    p_expires_at timestamptz, p_limits jsonb,
    OUT status text, OUT hold_units bigint, OUT expires_at timestamptz, OUT balance_after bigint,
    OUT available bigint, OUT access_state text, OUT request_hash text, OUT limit_name text, OUT limit_used bigint
) LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    a record;
    o record;
    d record;
    r record;
    v_hold bigint;
    v_entry bigint;
    v_balance bigint;
    v_threshold bigint;
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
    IF p_limits IS NOT NULL THEN
        r := limits_reserve(p_customer, p_limits);
        IF r.refused IS NOT NULL THEN
            UPDATE grants SET remaining = grants.remaining + t.take
              FROM unnest(d.grant_ids, d.grant_units) AS t(id, take) WHERE grants.id = t.id;
            IF d.balance <> a.balance THEN
                UPDATE accounts SET balance = d.balance, updated_at = p_now WHERE id = a.id;
            END IF;
            status := 'limit_exceeded';
            limit_name := r.refused;
            limit_used := r.used;
            RETURN;
        END IF;
    END IF;
    INSERT INTO holds (account_id, request_id, units, captured_units, shortfall, status, expires_at, limit_rows)
         VALUES (a.id, p_request_id, d.drawn, 0, 0, 'open', p_expires_at, p_limits)
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
    -- balance.low / balance.depleted when the hold took the spendable balance across a line (as ledger_consume).
    IF d.drawn > 0 THEN
        SELECT t.effective_units INTO v_threshold FROM balance_thresholds t WHERE t.account_id = a.id;
        IF (greatest(0, v_balance + a.overdraft_limit) < v_threshold
            AND v_threshold <= greatest(0, v_balance + d.drawn + a.overdraft_limit))
           OR (v_balance + a.overdraft_limit <= 0 AND v_balance + d.drawn + a.overdraft_limit > 0) THEN
            PERFORM balance_notice(a.id, p_customer, greatest(0, v_balance + d.drawn + a.overdraft_limit),
                                   greatest(0, v_balance + a.overdraft_limit), 'hold');
        END IF;
    END IF;
    status := 'ok';
    hold_units := d.drawn;
    expires_at := p_expires_at;
    balance_after := v_balance;
    request_hash := p_hash;
END
$fn$;
"""

# ledger_capture as in 0009, settling the hold's limit room: the request stays counted, the units counter ends at
# what was captured, tokens and cost at the capture's usage when it reports one (``p_limit_usage``:
# {"tokens", "cost_usd" in 10^-10 USD}), else at the hold's estimate. Never refused: the call was served.
CAPTURE_FUNCTION = r"""
CREATE OR REPLACE FUNCTION ledger_capture(
    p_request_id text, p_wanted bigint, p_hash text, p_actor text, p_now timestamptz, p_usage jsonb,
    p_limit_usage jsonb,
    OUT status text, OUT customer_id text, OUT held bigint, OUT captured bigint, OUT released bigint,
    OUT shortfall bigint, OUT balance_after bigint, OUT hold_status text, OUT request_hash text
) LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    h record;
    a record;
    o record;
    d record;
    b record;
    v_account bigint;
    v_wanted bigint;
    v_extra bigint := 0;
    v_uncovered bigint := 0;
    v_ids bigint[] := '{}';
    v_takes bigint[] := '{}';
    v_balance bigint;
    v_debt bigint;
    v_usage bigint;
    v_entry bigint;
    v_key text := 'capture:' || p_request_id;
    v_threshold bigint;
BEGIN
    SELECT x.account_id INTO v_account FROM holds x WHERE x.request_id = p_request_id;
    IF v_account IS NULL THEN
        status := 'unknown_hold';
        RETURN;
    END IF;
    SELECT x.id, x.customer_id, x.balance, x.held, x.debt, x.overdraft_limit INTO a
      FROM accounts x WHERE x.id = v_account FOR NO KEY UPDATE;
    customer_id := a.customer_id;
    -- Re-read under the account lock.
    SELECT x.id, x.units, x.captured_units, x.shortfall, x.status, x.limit_rows INTO h
      FROM holds x WHERE x.request_id = p_request_id;
    hold_status := h.status;
    SELECT x.request_hash INTO o FROM entries x WHERE x.idempotency_key = v_key;
    IF FOUND THEN
        status := 'replay';
        request_hash := o.request_hash;
        held := h.units;
        captured := h.captured_units;
        released := greatest(0, h.units - h.captured_units);
        shortfall := h.shortfall;
        SELECT x.balance_after INTO balance_after FROM entries x
         WHERE x.idempotency_key IN (v_key, 'capture-release:' || p_request_id) ORDER BY x.id DESC LIMIT 1;
        RETURN;
    END IF;
    IF h.status <> 'open' THEN
        status := 'not_open';
        RETURN;
    END IF;
    v_wanted := coalesce(p_wanted, h.units);
    held := h.units;
    v_balance := a.balance;
    v_debt := a.debt;
    shortfall := 0;
    IF v_wanted > held THEN
        -- The call used more than was held: charge what the balance (and overdraft) allows, report the rest.
        d := ledger_draw(a.id, a.balance, a.overdraft_limit, v_wanted - held, p_now, true);
        v_extra := d.drawn;
        v_uncovered := d.uncovered;
        v_ids := d.grant_ids;
        v_takes := d.grant_units;
        v_balance := d.balance;
        shortfall := v_wanted - held - v_extra;
    END IF;
    captured := least(v_wanted, held) + v_extra;
    IF p_usage IS NOT NULL THEN
        INSERT INTO usage_records (account_id, request_id, user_id, workspace, feature, provider, model, operation,
                                   input_tokens, output_tokens, cached_tokens, provider_cost_usd, units, billable,
                                   environment, occurred_at)
             VALUES (a.id, p_request_id, p_usage->>'user_id', p_usage->>'workspace', p_usage->>'feature',
                     p_usage->>'provider', p_usage->>'model', p_usage->>'operation',
                     (p_usage->>'input_tokens')::bigint, (p_usage->>'output_tokens')::bigint,
                     (p_usage->>'cached_tokens')::bigint, (p_usage->>'provider_cost_usd')::numeric, captured,
                     (p_usage->>'billable')::boolean, p_usage->>'environment',
                     coalesce((p_usage->>'occurred_at')::timestamptz, p_now))
          RETURNING id INTO v_usage;
    END IF;
    v_balance := v_balance - v_extra;
    v_debt := v_debt + v_uncovered;
    INSERT INTO entries (account_id, kind, units, balance_after, debt_delta, frozen_delta, idempotency_key,
                         request_hash, grant_id, hold_id, usage_id, actor, reason)
         VALUES (a.id, 'capture', -v_extra, v_balance, v_uncovered, 0, v_key, p_hash,
                 CASE WHEN array_length(v_ids, 1) = 1 THEN v_ids[1] END, h.id, v_usage, p_actor,
                 'captured ' || captured || ' of ' || held || ' held'
                 || CASE WHEN shortfall > 0 THEN ', ' || shortfall || ' short' ELSE '' END)
      RETURNING id INTO v_entry;
    IF array_length(v_ids, 1) > 1 THEN
        INSERT INTO allocations (entry_id, grant_id, units)
             SELECT v_entry, t.id, -t.take FROM unnest(v_ids, v_takes) WITH ORDINALITY AS t(id, take, n) ORDER BY t.n;
    END IF;
    released := held - least(v_wanted, held);
    IF released > 0 THEN
        b := ledger_give_back(a.id, 'hold:' || p_request_id, released, v_debt);
        v_balance := v_balance + released;
        v_debt := v_debt - b.debt_back;
        PERFORM ledger_release_entry(a.id, 'capture-release:' || p_request_id, released, b.debt_back, v_balance,
                                     h.id, p_actor, 'unused part of a captured hold', b.grant_ids, b.grant_units);
    END IF;
    IF h.limit_rows IS NOT NULL THEN
        PERFORM limits_settle(h.limit_rows, NULL, captured, (p_limit_usage->>'tokens')::bigint,
                              (p_limit_usage->>'cost_usd')::bigint);
    END IF;
    UPDATE holds SET status = 'captured', captured_units = captured, shortfall = ledger_capture.shortfall,
                     settled_at = p_now, usage_id = v_usage
     WHERE id = h.id;
    UPDATE accounts SET balance = v_balance, held = a.held - ledger_capture.held, debt = v_debt, updated_at = p_now
     WHERE id = a.id;
    -- A capture above what was held draws more (and then releases nothing): it may cross a line too.
    IF v_extra > 0 THEN
        SELECT t.effective_units INTO v_threshold FROM balance_thresholds t WHERE t.account_id = a.id;
        IF (greatest(0, v_balance + a.overdraft_limit) < v_threshold
            AND v_threshold <= greatest(0, v_balance + v_extra + a.overdraft_limit))
           OR (v_balance + a.overdraft_limit <= 0 AND v_balance + v_extra + a.overdraft_limit > 0) THEN
            PERFORM balance_notice(a.id, a.customer_id, greatest(0, v_balance + v_extra + a.overdraft_limit),
                                   greatest(0, v_balance + a.overdraft_limit), 'capture');
        END IF;
    END IF;
    status := 'ok';
    hold_status := 'captured';
    balance_after := v_balance;
    request_hash := p_hash;
END
$fn$;
"""

# ledger_release as in 0009, giving the hold's limit room back in the windows it was taken in.
RELEASE_FUNCTION = r"""
CREATE OR REPLACE FUNCTION ledger_release(
    p_request_id text, p_actor text, p_now timestamptz,
    OUT status text, OUT customer_id text, OUT hold_units bigint, OUT hold_status text, OUT expires_at timestamptz,
    OUT balance_after bigint
) LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    h record;
    a record;
    b record;
    v_account bigint;
    v_balance bigint;
BEGIN
    SELECT x.account_id INTO v_account FROM holds x WHERE x.request_id = p_request_id;
    IF v_account IS NULL THEN
        status := 'unknown_hold';
        RETURN;
    END IF;
    SELECT x.id, x.customer_id, x.balance, x.held, x.debt INTO a FROM accounts x WHERE x.id = v_account
       FOR NO KEY UPDATE;
    customer_id := a.customer_id;
    SELECT x.id, x.units, x.status, x.expires_at, x.limit_rows INTO h FROM holds x WHERE x.request_id = p_request_id;
    hold_units := h.units;
    hold_status := h.status;
    expires_at := h.expires_at;
    IF h.status IN ('released', 'expired') THEN
        status := 'replay';
        SELECT x.balance_after INTO balance_after FROM entries x
         WHERE x.idempotency_key IN ('hold:' || p_request_id, 'capture:' || p_request_id, 'release:' || p_request_id)
         ORDER BY x.id DESC LIMIT 1;
        RETURN;
    END IF;
    IF h.status = 'captured' THEN
        status := 'not_open';
        RETURN;
    END IF;
    b := ledger_give_back(a.id, 'hold:' || p_request_id, h.units, a.debt);
    v_balance := a.balance + h.units;
    PERFORM ledger_release_entry(a.id, 'release:' || p_request_id, h.units, b.debt_back, v_balance, h.id, p_actor,
                                 'hold released', b.grant_ids, b.grant_units);
    IF h.limit_rows IS NOT NULL THEN
        PERFORM limits_settle(h.limit_rows, 0, 0, 0, 0);
    END IF;
    UPDATE holds SET status = 'released', settled_at = p_now WHERE id = h.id;
    UPDATE accounts SET balance = v_balance, held = a.held - h.units, debt = a.debt - b.debt_back, updated_at = p_now
     WHERE id = a.id;
    status := 'ok';
    hold_status := 'released';
    balance_after := v_balance;
END
$fn$;
"""

# ledger_consume (as in 0013) with the low-balance check, and a second form that also takes the request's limits
# in the same statement (``p_limits``: ledger.limits.PreparedLimits.as_json), as ledger.consume's portable path does
# in the consumption's savepoint: after the replay, access and balance checks, before anything is written (on the
# fast path, after the conditional draw, which a refusal undoes). A replay takes no room.
CONSUME_TEMPLATE = r"""CREATE OR REPLACE FUNCTION ledger_consume(
    p_customer text, p_request_id text, p_key text, p_units bigint, p_hash text,
    p_actor text, p_reason text, p_now timestamptz, p_usage jsonb{limit_param},
    OUT status text, OUT entry_id bigint, OUT balance_after bigint, OUT usage_id bigint, OUT units bigint,
    OUT available bigint, OUT access_state text, OUT request_hash text, OUT grant_ids bigint[],
    OUT grant_units bigint[]{limit_outs}
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
    v_ids bigint[] := '{{}}';
    v_takes bigint[] := '{{}}';
    v_lapsed_ids bigint[] := '{{}}';
    v_lapsed_units bigint[] := '{{}}';
    v_entry bigint;
    v_usage bigint;
    v_grant bigint;
    v_allowed text[];
    v_gsrc text[];
    v_allowed_sum bigint := 0;
    i int;
    r record;
    v_threshold bigint;
    v_before bigint;
    v_after bigint;
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
        RETURNING a.id, a.balance, a.access_state, a.overdraft_limit
             INTO v_account, v_balance, v_state, v_overdraft;
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
            IF v_grant IS NOT NULL THEN{reserve_fast}
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
                  RETURNING id INTO v_entry;{notice_fast}
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
                v_ids := '{{}}';
                v_takes := '{{}}';
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
    END IF;{reserve_zero}
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
        END IF;{reserve_general}
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
    UPDATE accounts SET balance = v_balance, debt = v_debt + v_need, updated_at = p_now WHERE id = v_account;{notice}
    SELECT 'ok'::text, v_entry, v_balance, v_usage, p_units, NULL::bigint, v_state, p_hash, v_ids, v_takes
      INTO status, entry_id, balance_after, usage_id, units, available, access_state, request_hash, grant_ids, grant_units;
END
$fn$
"""

_RESERVE = """
    IF p_limits IS NOT NULL{also} THEN
        r := limits_reserve(p_customer, p_limits);
        IF r.refused IS NOT NULL THEN
            {undo}status := 'limit_exceeded';
            access_state := v_state;
            limit_name := r.refused;
            limit_used := r.used;
            RETURN;
        END IF;
    END IF;"""
# balance.low / balance.depleted (ledger.outbox.note_balance): one primary-key probe for the threshold; the outbox
# is written only when this consumption took the spendable balance across it, or to zero.
_NOTICE = """
    IF p_units > 0 THEN
        v_before := greatest(0, v_balance + p_units + v_overdraft);
        v_after := greatest(0, v_balance + v_overdraft);
        SELECT t.effective_units INTO v_threshold FROM balance_thresholds t WHERE t.account_id = v_account;
        IF (v_after < v_threshold AND v_threshold <= v_before) OR (v_after <= 0 AND v_before > 0) THEN
            PERFORM balance_notice(v_account, p_customer, v_before, v_after, 'usage');
        END IF;
    END IF;"""


def _indented(text: str, spaces: int) -> str:
    return "\n".join((" " * spaces + line) if line.strip() else line for line in text.split("\n"))


def consume_function(*, limited: bool) -> str:
    """ledger_consume's text: the 9-argument form, or (``limited``) the form taking the request's limits too."""
    fast_undo = (
        "UPDATE grants SET remaining = remaining + p_units WHERE id = v_grant;\n"
        "            UPDATE accounts SET balance = balance + p_units WHERE id = v_account;\n            "
    )
    return CONSUME_TEMPLATE.format(
        limit_param=", p_limits jsonb" if limited else "",
        limit_outs=", OUT limit_name text, OUT limit_used bigint" if limited else "",
        reserve_fast=_indented(_RESERVE.format(also="", undo=fast_undo), 12) if limited else "",
        reserve_zero=_RESERVE.format(also=" AND p_units = 0", undo="") if limited else "",
        reserve_general=_indented(_RESERVE.format(also="", undo=""), 4) if limited else "",
        notice_fast=_indented(_NOTICE, 12),
        notice=_NOTICE,
    )


# ledger_consume_many (0008) with each item's limit rows: the batch the usage API's writer groups, in one statement
# as without limits (each item one ledger_consume taking its limits; a refusal is that item's status). The items'
# rows come as one JSON array (an item's element null when no limit applies), not a jsonb[]: the driver quotes
# every element of a text array character by character, which cost more than the limits themselves.
MANY_LIMITED_FUNCTION = r"""
CREATE OR REPLACE FUNCTION ledger_consume_many(
    p_customers text[], p_request_ids text[], p_keys text[], p_units bigint[], p_hashes text[], p_actors text[],
    p_reasons text[], p_nows timestamptz[], p_usages jsonb[], p_limits jsonb
) RETURNS TABLE (
    idx integer, status text, entry_id bigint, balance_after bigint, usage_id bigint, units bigint,
    available bigint, access_state text, request_hash text, grant_ids bigint[], grant_units bigint[],
    limit_name text, limit_used bigint
) LANGUAGE plpgsql AS $fn$
DECLARE
    i integer;
    r record;
BEGIN
    FOR i IN SELECT t.n FROM unnest(p_customers) WITH ORDINALITY AS t(c, n) ORDER BY t.c COLLATE "C", t.n LOOP
        SELECT c.* INTO r
          FROM ledger_consume(p_customers[i], p_request_ids[i], p_keys[i], p_units[i], p_hashes[i], p_actors[i],
                              p_reasons[i], p_nows[i], p_usages[i], nullif(p_limits -> (i - 1), 'null')) c;
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
        grant_units := r.grant_units;
        limit_name := r.limit_name;
        limit_used := r.limit_used;
        RETURN NEXT;
    END LOOP;
END
$fn$;
"""

# limits_reserve (0014) as a loop over the request's rows, in limit-name order (the lock order): an UPDATE of the
# counter by its key, guarded by the maximum (the common case: one index probe and a HOT update per limit); a new
# window's counter inserted (ON CONFLICT DO NOTHING, then the guarded UPDATE again: a concurrent reservation may
# have created it first). Measured against 0014's one multi-row INSERT ... ON CONFLICT DO UPDATE with its CTEs,
# which cost more than the three updates themselves. The same results: all or none, the first refused row and
# its counter's value, limit.reached once when a counter reaches its maximum.
RESERVE_FUNCTION = r"""
CREATE OR REPLACE FUNCTION limits_reserve(
    p_customer text, p_rows jsonb, OUT refused text, OUT used bigint, OUT counters bigint[]
) LANGUAGE plpgsql AS $fn$
DECLARE
    r record;
    v_used bigint;
    v_amount bigint;
    v_reached int[] := '{}';
    i int := 0;
BEGIN
    counters := '{}';
    FOR r IN SELECT * FROM jsonb_to_recordset(p_rows) AS x(
                 limit_name text, scope_value text, window_start timestamptz, window_end timestamptz,
                 requests bigint, units bigint, tokens bigint, cost_usd bigint, measure text, maximum bigint,
                 scope text) LOOP
        i := i + 1;
        v_used := NULL;
        v_amount := CASE r.measure WHEN 'requests' THEN r.requests WHEN 'units' THEN r.units
                                   WHEN 'tokens' THEN r.tokens ELSE r.cost_usd END;
        UPDATE limit_counters c
           SET requests = c.requests + r.requests, units = c.units + r.units, tokens = c.tokens + r.tokens,
               cost_usd = c.cost_usd + r.cost_usd, measure = r.measure, maximum = r.maximum
         WHERE c.limit_name = r.limit_name AND c.scope_value = r.scope_value AND c.window_start = r.window_start
           AND CASE r.measure WHEN 'requests' THEN c.requests WHEN 'units' THEN c.units WHEN 'tokens' THEN c.tokens
                              ELSE c.cost_usd END + v_amount <= r.maximum
        RETURNING CASE c.measure WHEN 'requests' THEN c.requests WHEN 'units' THEN c.units
                                 WHEN 'tokens' THEN c.tokens ELSE c.cost_usd END INTO v_used;
        IF NOT FOUND AND v_amount <= r.maximum THEN
            -- A new window (or scope value): its counter starts at this request.
            INSERT INTO limit_counters (limit_name, scope_value, window_start, window_end, requests, units,
                                        tokens, cost_usd, measure, maximum)
                 VALUES (r.limit_name, r.scope_value, r.window_start, r.window_end, r.requests, r.units,
                         r.tokens, r.cost_usd, r.measure, r.maximum)
            ON CONFLICT (limit_name, scope_value, window_start) DO NOTHING
            RETURNING v_amount INTO v_used;
            IF NOT FOUND THEN
                -- A concurrent reservation created it first (this statement's snapshot sees it committed).
                UPDATE limit_counters c
                   SET requests = c.requests + r.requests, units = c.units + r.units, tokens = c.tokens + r.tokens,
                       cost_usd = c.cost_usd + r.cost_usd, measure = r.measure, maximum = r.maximum
                 WHERE c.limit_name = r.limit_name AND c.scope_value = r.scope_value AND c.window_start = r.window_start
                   AND CASE r.measure WHEN 'requests' THEN c.requests WHEN 'units' THEN c.units WHEN 'tokens' THEN c.tokens
                                      ELSE c.cost_usd END + v_amount <= r.maximum
                RETURNING CASE c.measure WHEN 'requests' THEN c.requests WHEN 'units' THEN c.units
                                         WHEN 'tokens' THEN c.tokens ELSE c.cost_usd END INTO v_used;
            END IF;
        END IF;
        IF v_used IS NULL THEN
            refused := r.limit_name;
            EXIT;
        END IF;
        counters := counters || v_used;
        IF v_used >= r.maximum AND v_used - v_amount < r.maximum THEN
            v_reached := v_reached || i;
        END IF;
    END LOOP;
    IF refused IS NULL THEN
        IF cardinality(v_reached) > 0 THEN
            INSERT INTO outbox (event_id, type, customer_id, data, created_at)
            SELECT 'evt_' || replace(gen_random_uuid()::text, '-', ''), 'limit.reached', p_customer,
                   json_build_object('limit', q.limit_name, 'scope', q.scope, 'scope_value', q.scope_value,
                                     'measure', q.measure, 'used', outbox_amount(q.measure, counters[q.pos::int]),
                                     'maximum', outbox_amount(q.measure, q.maximum),
                                     'window_start', outbox_iso(q.window_start), 'reset_at', outbox_iso(q.window_end)),
                   clock_timestamp()
              FROM ROWS FROM (jsonb_to_recordset(p_rows) AS (limit_name text, scope_value text,
                       window_start timestamptz, window_end timestamptz, measure text, maximum bigint, scope text))
                   WITH ORDINALITY AS q(limit_name, scope_value, window_start, window_end, measure, maximum, scope, pos)
             WHERE q.pos = ANY (v_reached) ORDER BY q.pos;
        END IF;
        RETURN;
    END IF;
    counters := NULL;
    -- Refused: give back what the rows before it took (all or none); answer the refused one and its use.
    UPDATE limit_counters c
       SET requests = greatest(c.requests - x.requests, 0), units = greatest(c.units - x.units, 0),
           tokens = greatest(c.tokens - x.tokens, 0), cost_usd = greatest(c.cost_usd - x.cost_usd, 0)
      FROM ROWS FROM (jsonb_to_recordset(p_rows) AS (limit_name text, scope_value text, window_start timestamptz,
                                                     requests bigint, units bigint, tokens bigint, cost_usd bigint))
           WITH ORDINALITY AS x(limit_name, scope_value, window_start, requests, units, tokens, cost_usd, pos)
     WHERE x.pos < i AND c.limit_name = x.limit_name AND c.scope_value = x.scope_value
       AND c.window_start = x.window_start;
    SELECT CASE r.measure WHEN 'requests' THEN c.requests WHEN 'units' THEN c.units WHEN 'tokens' THEN c.tokens
                          ELSE c.cost_usd END INTO used
      FROM limit_counters c
     WHERE c.limit_name = r.limit_name AND c.scope_value = r.scope_value AND c.window_start = r.window_start;
    used := coalesce(used, 0);
END
$fn$;
"""


def upgrade() -> None:
    op.add_column(
        "holds", sa.Column("limit_rows", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True)
    )
    if op.get_bind().dialect.name == "postgresql":
        # Every consumption under a limit updates its counters: with 70% fill half the updates found no room on
        # their page (measured: 48% HOT), so each also wrote all three indexes. A counter is a small row per scope
        # value and window; 20% fill keeps its new versions on its page (measured: 98% HOT).
        op.execute("ALTER TABLE limit_counters SET (fillfactor = 20)")
        op.execute(f"DROP FUNCTION IF EXISTS {OLD_HOLD}")
        op.execute(f"DROP FUNCTION IF EXISTS {OLD_CAPTURE}")
        op.execute(SETTLE_FUNCTION)
        op.execute(RESERVE_FUNCTION)
        op.execute(HOLD_FUNCTION)
        op.execute(CAPTURE_FUNCTION)
        op.execute(RELEASE_FUNCTION)
        op.execute(consume_function(limited=False))
        op.execute(consume_function(limited=True))
        op.execute(MANY_LIMITED_FUNCTION)


def _sibling(name: str) -> Any:
    """Another migration's module (to restore the functions as it created them)."""
    spec = importlib.util.spec_from_file_location(f"_migration_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE limit_counters SET (fillfactor = 70)")
        holds, access = _sibling("0009_ledger_holds"), _sibling("0013_subs_access_policy")
        op.execute(f"DROP FUNCTION IF EXISTS {NEW_HOLD}")
        op.execute(f"DROP FUNCTION IF EXISTS {NEW_CAPTURE}")
        op.execute(f"DROP FUNCTION IF EXISTS {LIMITED_MANY}")
        op.execute(f"DROP FUNCTION IF EXISTS {LIMITED_CONSUME}")
        op.execute(access.CONSUME_FUNCTION)
        op.execute("DROP FUNCTION IF EXISTS limits_settle(jsonb, bigint, bigint, bigint, bigint)")
        op.execute(_sibling("0014_notify_limits_outbox").PG_LIMIT_FUNCTIONS)
        # capture and release as they were (and 0009's draw and hold, which 0013's replace next)
        op.execute("DROP FUNCTION IF EXISTS ledger_draw(bigint, bigint, bigint, bigint, timestamptz, boolean)")
        op.execute(holds.FUNCTIONS)
        op.execute(access.DRAW_FUNCTION)
        op.execute(access.HOLD_FUNCTION)
    with op.batch_alter_table("holds") as batch:
        batch.drop_column("limit_rows")
