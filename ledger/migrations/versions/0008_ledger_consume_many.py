"""ledger_consume_many: PostgreSQL's consumption of a batch in one round trip and one transaction.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

SIGNATURE = "ledger_consume_many(text[], text[], text[], bigint[], text[], text[], text[], timestamptz[], jsonb[])"

# Each item is one ledger_consume (the same rules, the same refusals as a status, never an exception), so a
# batch is exactly its items applied one after another. Items run grouped by customer id (byte order, as
# Python sorts strings), so every batch locks accounts in one order and two batches never deadlock; within a
# customer they keep their order, so a request id repeated in the batch replays its first use. The caller
# (ledger.pgfast) keeps a request id used by two customers out of the batch, so the first use wins there too.
MANY_FUNCTION = r"""
CREATE OR REPLACE FUNCTION ledger_consume_many(
    p_customers text[], p_request_ids text[], p_keys text[], p_units bigint[], p_hashes text[], p_actors text[],
    p_reasons text[], p_nows timestamptz[], p_usages jsonb[]
) RETURNS TABLE (
    idx integer, status text, entry_id bigint, balance_after bigint, usage_id bigint, units bigint,
    available bigint, access_state text, request_hash text, grant_ids bigint[], grant_units bigint[]
) LANGUAGE plpgsql AS $fn$
DECLARE
    i integer;
    r record;
BEGIN
    FOR i IN SELECT t.n FROM unnest(p_customers) WITH ORDINALITY AS t(c, n) ORDER BY t.c COLLATE "C", t.n LOOP
        SELECT c.* INTO r
          FROM ledger_consume(p_customers[i], p_request_ids[i], p_keys[i], p_units[i], p_hashes[i], p_actors[i],
                              p_reasons[i], p_nows[i], p_usages[i]) c;
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
        RETURN NEXT;
    END LOOP;
END
$fn$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(MANY_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS {SIGNATURE}")
