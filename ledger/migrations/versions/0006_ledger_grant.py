"""ledger_grant: PostgreSQL's grant in one round trip.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# The same rules as ledger.grants.grant_credits' portable path (the property tests run both against the same
# histories): lock the account, insert the grant unless its key exists (then answer with the original), append the
# GRANT entry, settle outstanding debt from the new grant in a DEBT_SETTLEMENT entry, write the account once.
# Four statements and their round trips become one call; the worker makes a grant for most payment events.
GRANT_FUNCTION = r"""
CREATE OR REPLACE FUNCTION ledger_grant(
    p_customer text, p_units bigint, p_source text, p_key text, p_hash text, p_reason text, p_actor text,
    p_priority integer, p_expires_at timestamptz, p_object_id text, p_object_type text, p_amount_minor bigint,
    p_currency text, p_period_start timestamptz, p_period_end timestamptz, p_now timestamptz,
    OUT status text, OUT grant_id bigint, OUT units bigint, OUT balance_after bigint, OUT request_hash text
) LANGUAGE plpgsql AS $fn$
DECLARE
    v_account bigint;
    v_balance bigint;
    v_debt bigint;
    v_settle bigint;
BEGIN
    SELECT a.id, a.balance, a.debt INTO v_account, v_balance, v_debt
      FROM accounts a WHERE a.customer_id = p_customer FOR NO KEY UPDATE;
    IF v_account IS NULL THEN
        status := 'unknown_customer';
        RETURN;
    END IF;
    v_settle := least(p_units, v_debt);
    -- ON CONFLICT on the grant's unique key: a concurrent twin waits for the first, then finds it.
    INSERT INTO grants (account_id, source, units, remaining, frozen, clawed_back, priority, expires_at,
                        stripe_object_id, stripe_object_type, amount_minor, currency, idempotency_key, reason,
                        actor, period_start, period_end)
         VALUES (v_account, p_source, p_units, p_units - v_settle, 0, 0, p_priority, p_expires_at, p_object_id,
                 p_object_type, p_amount_minor, p_currency, p_key, p_reason, p_actor, p_period_start,
                 p_period_end)
    ON CONFLICT (idempotency_key) DO NOTHING
      RETURNING id INTO grant_id;
    IF grant_id IS NULL THEN
        SELECT 'replay'::text, e.grant_id, e.units, e.balance_after, e.request_hash
          INTO status, grant_id, units, balance_after, request_hash
          FROM entries e WHERE e.idempotency_key = 'grant:' || p_key;
        RETURN;
    END IF;
    v_balance := v_balance + p_units;
    INSERT INTO entries (account_id, kind, units, balance_after, debt_delta, frozen_delta, idempotency_key,
                         request_hash, grant_id, stripe_object_id, actor, reason)
         VALUES (v_account, 'grant', p_units, v_balance, 0, 0, 'grant:' || p_key, p_hash, grant_id, p_object_id,
                 p_actor, p_reason);
    IF v_settle > 0 THEN
        INSERT INTO entries (account_id, kind, units, balance_after, debt_delta, frozen_delta, idempotency_key,
                             grant_id, actor, reason)
             VALUES (v_account, 'debt_settlement', 0, v_balance, -v_settle, 0, 'settle:' || p_key, grant_id,
                     p_actor, 'outstanding debt settled from a new grant');
    END IF;
    UPDATE accounts SET balance = v_balance, debt = v_debt - v_settle, updated_at = p_now WHERE id = v_account;
    status := 'ok';
    units := p_units;
    balance_after := v_balance;
    request_hash := p_hash;
END
$fn$;
"""

SIGNATURE = (
    "ledger_grant(text, bigint, text, text, text, text, text, integer, timestamptz, text, text, bigint, text, "
    "timestamptz, timestamptz, timestamptz)"
)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(GRANT_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS {SIGNATURE}")
