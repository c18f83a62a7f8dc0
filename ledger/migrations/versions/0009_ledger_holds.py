"""ledger_hold, ledger_capture, ledger_release: PostgreSQL's holds in one round trip each.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

SIGNATURES = (
    "ledger_hold(text, text, text, bigint, text, text, timestamptz, timestamptz)",
    "ledger_capture(text, bigint, text, text, timestamptz, jsonb)",
    "ledger_release(text, text, timestamptz)",
    "ledger_draw(bigint, bigint, bigint, bigint, timestamptz, boolean)",
    "ledger_give_back(bigint, text, bigint, bigint)",
    "ledger_release_entry(bigint, text, bigint, bigint, bigint, bigint, text, text, bigint[], bigint[])",
)

# The same rules as ledger.holds' portable path (the property tests run both against the same histories): the
# account row lock serializes every movement on it; a known key answers with what it wrote; refusals are a status
# with nothing written. ledger_draw is ledger.portable.debit, ledger_give_back is ledger.holds._give_back's
# movement (ledger.posting.return_to_grants): shared by the three, so they cannot differ from each other.
FUNCTIONS = r"""
CREATE OR REPLACE FUNCTION ledger_draw(
    p_account bigint, p_balance bigint, p_overdraft bigint, p_units bigint, p_now timestamptz, p_partial boolean,
    OUT ok boolean, OUT drawn bigint, OUT uncovered bigint, OUT balance bigint, OUT available bigint,
    OUT grant_ids bigint[], OUT grant_units bigint[]
) LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    v_gids bigint[];
    v_grem bigint[];
    v_gexp timestamptz[];
    v_lapsed bigint := 0;
    v_need bigint;
    v_take bigint;
    i int;
BEGIN
    ok := true; drawn := 0; uncovered := 0; balance := p_balance; grant_ids := '{}'; grant_units := '{}';
    available := greatest(0, p_balance + p_overdraft);
    IF p_units = 0 THEN
        RETURN;
    END IF;
    -- Draw order: higher priority first, then earliest expiry (never-expiring last), then oldest.
    SELECT array_agg(g.id ORDER BY g.priority DESC, g.expires_at ASC NULLS LAST, g.id),
           array_agg(g.remaining ORDER BY g.priority DESC, g.expires_at ASC NULLS LAST, g.id),
           array_agg(g.expires_at ORDER BY g.priority DESC, g.expires_at ASC NULLS LAST, g.id)
      INTO v_gids, v_grem, v_gexp
      FROM grants g WHERE g.account_id = p_account AND g.remaining > 0;
    FOR i IN 1 .. coalesce(array_length(v_gids, 1), 0) LOOP
        IF v_gexp[i] IS NOT NULL AND v_gexp[i] <= p_now THEN
            v_lapsed := v_lapsed + v_grem[i];
        END IF;
    END LOOP;
    available := greatest(0, p_balance - v_lapsed + p_overdraft);
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
        ELSIF v_need > 0 THEN
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

CREATE OR REPLACE FUNCTION ledger_give_back(
    p_account bigint, p_hold_key text, p_units bigint, p_account_debt bigint,
    OUT grant_ids bigint[], OUT grant_units bigint[], OUT debt_back bigint
) LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    e record;
    v_ids bigint[];
    v_drawn bigint[];
    v_left bigint;
    v_give bigint;
    v_newest bigint;
    i int;
BEGIN
    grant_ids := '{}'; grant_units := '{}';
    SELECT x.id, x.grant_id, x.units, x.debt_delta INTO e FROM entries x WHERE x.idempotency_key = p_hold_key;
    -- How the hold drew its units: its allocation rows, else its one grant (ledger.posting.entry_movements).
    SELECT array_agg(al.grant_id ORDER BY al.id), array_agg(-al.units ORDER BY al.id) INTO v_ids, v_drawn
      FROM allocations al WHERE al.entry_id = e.id;
    IF v_ids IS NULL THEN
        IF e.grant_id IS NOT NULL AND e.units + e.debt_delta <> 0 THEN
            v_ids := ARRAY[e.grant_id];
            v_drawn := ARRAY[-(e.units + e.debt_delta)];
        ELSE
            v_ids := '{}';
            v_drawn := '{}';
        END IF;
    END IF;
    -- First cancel debt the draw created, then refill its grants, last drawn first.
    debt_back := least(p_units, e.debt_delta, p_account_debt);
    v_left := p_units - debt_back;
    FOR i IN REVERSE coalesce(array_length(v_ids, 1), 0) .. 1 LOOP
        EXIT WHEN v_left = 0;
        v_give := least(v_left, v_drawn[i]);
        grant_ids := grant_ids || v_ids[i];
        grant_units := grant_units || v_give;
        v_left := v_left - v_give;
    END LOOP;
    IF v_left > 0 THEN
        -- The debt this draw created was settled by a later grant meanwhile: that grant paid for these units.
        SELECT g.id INTO v_newest FROM grants g WHERE g.account_id = p_account ORDER BY g.id DESC LIMIT 1;
        grant_ids := grant_ids || v_newest;
        grant_units := grant_units || v_left;
    END IF;
    FOR i IN 1 .. coalesce(array_length(grant_ids, 1), 0) LOOP
        IF grant_units[i] <> 0 THEN
            UPDATE grants SET remaining = grants.remaining + grant_units[i] WHERE id = grant_ids[i];
        END IF;
    END LOOP;
END
$fn$;

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
    IF NOT (a.access_state IN ('active', 'trialing')
            OR (a.access_state = 'past_due' AND (a.grace_until IS NULL OR p_now < a.grace_until))) THEN
        status := 'access_refused';
        RETURN;
    END IF;
    d := ledger_draw(a.id, a.balance, a.overdraft_limit, p_units, p_now, false);
    IF NOT d.ok THEN
        status := 'insufficient';
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

CREATE OR REPLACE FUNCTION ledger_capture(
    p_request_id text, p_wanted bigint, p_hash text, p_actor text, p_now timestamptz, p_usage jsonb,
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
    SELECT x.id, x.units, x.captured_units, x.shortfall, x.status INTO h FROM holds x WHERE x.request_id = p_request_id;
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
    UPDATE holds SET status = 'captured', captured_units = captured, shortfall = ledger_capture.shortfall,
                     settled_at = p_now, usage_id = v_usage
     WHERE id = h.id;
    UPDATE accounts SET balance = v_balance, held = a.held - ledger_capture.held, debt = v_debt, updated_at = p_now
     WHERE id = a.id;
    status := 'ok';
    hold_status := 'captured';
    balance_after := v_balance;
    request_hash := p_hash;
END
$fn$;

CREATE OR REPLACE FUNCTION ledger_release_entry(
    p_account bigint, p_key text, p_units bigint, p_debt_back bigint, p_balance_after bigint, p_hold bigint,
    p_actor text, p_reason text, p_grant_ids bigint[], p_grant_units bigint[]
) RETURNS void LANGUAGE plpgsql AS $fn$
DECLARE
    v_entry bigint;
    v_ids bigint[];
    v_units bigint[];
BEGIN
    -- One grant taking the whole movement is named by the entry; several get an allocation row each
    -- (ledger.posting.insert_entry). Zero movements are not allocations.
    SELECT coalesce(array_agg(t.id ORDER BY t.n), '{}'), coalesce(array_agg(t.u ORDER BY t.n), '{}')
      INTO v_ids, v_units
      FROM unnest(p_grant_ids, p_grant_units) WITH ORDINALITY AS t(id, u, n) WHERE t.u <> 0;
    INSERT INTO entries (account_id, kind, units, balance_after, debt_delta, frozen_delta, idempotency_key,
                         grant_id, hold_id, actor, reason)
         VALUES (p_account, 'release', p_units, p_balance_after, -p_debt_back, 0, p_key,
                 CASE WHEN array_length(v_ids, 1) = 1 THEN v_ids[1] END, p_hold, p_actor, p_reason)
      RETURNING id INTO v_entry;
    IF array_length(v_ids, 1) > 1 THEN
        INSERT INTO allocations (entry_id, grant_id, units)
             SELECT v_entry, t.id, t.u FROM unnest(v_ids, v_units) WITH ORDINALITY AS t(id, u, n) ORDER BY t.n;
    END IF;
END
$fn$;

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
    SELECT x.id, x.units, x.status, x.expires_at INTO h FROM holds x WHERE x.request_id = p_request_id;
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
    UPDATE holds SET status = 'released', settled_at = p_now WHERE id = h.id;
    UPDATE accounts SET balance = v_balance, held = a.held - h.units, debt = a.debt - b.debt_back, updated_at = p_now
     WHERE id = a.id;
    status := 'ok';
    hold_status := 'released';
    balance_after := v_balance;
END
$fn$;
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(FUNCTIONS)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for signature in SIGNATURES:
            op.execute(f"DROP FUNCTION IF EXISTS {signature}")
