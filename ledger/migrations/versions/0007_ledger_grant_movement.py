"""ledger_grant_movement: PostgreSQL's clawback, freeze and unfreeze of a grant in one round trip.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# The same rules as ledger.clawback's portable path (the property tests run both against the same histories):
# lock the grant's account, read the grant under that lock, answer a known key with its original entry, else
# move the units and append the entry, write the account once. Six statements become one call; refunds and
# disputes make one or two of these each.
MOVEMENT_FUNCTION = r"""
CREATE OR REPLACE FUNCTION ledger_grant_movement(
    p_action text, p_grant bigint, p_units bigint, p_key text, p_hash text, p_reason text, p_actor text,
    p_object_id text, p_now timestamptz,
    OUT status text, OUT customer_id text, OUT units bigint, OUT debt_delta bigint, OUT frozen_delta bigint,
    OUT request_hash text
) LANGUAGE plpgsql AS $fn$
DECLARE
    v_account bigint;
    v_balance bigint;
    v_debt bigint;
    g record;
    o record;
    v_wanted bigint;
    v_remaining bigint := 0;
    v_frozen bigint := 0;
    v_new_debt bigint := 0;
BEGIN
    SELECT a.id, a.customer_id, a.balance, a.debt INTO v_account, customer_id, v_balance, v_debt
      FROM accounts a WHERE a.id = (SELECT x.account_id FROM grants x WHERE x.id = p_grant) FOR NO KEY UPDATE;
    IF v_account IS NULL THEN
        status := 'unknown_grant';
        RETURN;
    END IF;
    SELECT e.units, e.debt_delta, e.frozen_delta, e.request_hash INTO o
      FROM entries e WHERE e.idempotency_key = p_key;
    IF FOUND THEN
        SELECT 'replay'::text, o.units, o.debt_delta, o.frozen_delta, o.request_hash
          INTO status, units, debt_delta, frozen_delta, request_hash;
        RETURN;
    END IF;
    SELECT x.units, x.remaining, x.frozen, x.clawed_back INTO g FROM grants x WHERE x.id = p_grant;
    IF p_action = 'clawback' THEN
        -- Remaining units first, then frozen ones; what was already spent becomes recorded debt.
        v_wanted := least(p_units, g.units - g.clawed_back);
        v_remaining := least(v_wanted, g.remaining);
        v_frozen := least(v_wanted - v_remaining, g.frozen);
        v_new_debt := v_wanted - v_remaining - v_frozen;
        units := -(v_remaining + v_new_debt);
        frozen_delta := -v_frozen;
        IF v_wanted > 0 THEN
            UPDATE grants SET remaining = remaining - v_remaining, frozen = frozen - v_frozen,
                              clawed_back = clawed_back + v_wanted
             WHERE id = p_grant;
        END IF;
    ELSIF p_action = 'freeze' THEN
        units := -g.remaining;
        frozen_delta := g.remaining;
        UPDATE grants SET remaining = remaining - g.remaining, frozen = frozen + g.remaining WHERE id = p_grant;
    ELSIF p_action = 'unfreeze' THEN
        units := g.frozen;
        frozen_delta := -g.frozen;
        UPDATE grants SET remaining = remaining + g.frozen, frozen = frozen - g.frozen WHERE id = p_grant;
    ELSE
        RAISE EXCEPTION 'unknown grant movement %', p_action;
    END IF;
    debt_delta := v_new_debt;
    v_balance := v_balance + units;
    INSERT INTO entries (account_id, kind, units, balance_after, debt_delta, frozen_delta, idempotency_key,
                         request_hash, grant_id, stripe_object_id, actor, reason)
         VALUES (v_account, p_action, units, v_balance, debt_delta, frozen_delta, p_key, p_hash, p_grant,
                 p_object_id, p_actor, p_reason);
    UPDATE accounts SET balance = v_balance, debt = v_debt + v_new_debt, updated_at = p_now WHERE id = v_account;
    status := 'ok';
    request_hash := p_hash;
END
$fn$;
"""

SIGNATURE = "ledger_grant_movement(text, bigint, bigint, text, text, text, text, text, timestamptz)"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(MOVEMENT_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS {SIGNATURE}")
