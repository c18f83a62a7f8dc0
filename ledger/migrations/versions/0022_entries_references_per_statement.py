"""An entry's account and grant are checked once per INSERT statement, set-wise, instead of by a trigger per row.

Revision ID: hot_2
Revises: limits_4
"""

from __future__ import annotations

from alembic import op

revision = "hot_2"
down_revision = "limits_4"
branch_labels = None
depends_on = None

# Every consumption, hold, capture and grant writes entries, and each entry's two foreign keys each ran a trigger
# per row that probed the referenced row and locked it FOR KEY SHARE (perf on the batch benchmark: ~20% of the
# backend's CPU; pgbench driving ledger_consume_many, 100 events a call: +20% without the two keys, +13% with this
# check). The check stays: one statement-level trigger reads the rows the INSERT wrote (a transition table) and
# probes each key once. The keys' row lock guarded against a concurrent delete of the referenced row: nothing in
# the ledger deletes accounts or grants, or changes an id (identity columns nothing updates), and a delete of one
# an entry refers to is still refused (below). A missing row is still foreign_key_violation (SQLSTATE 23503), at
# the same moment the keys raised it (the end of the statement). SQLite keeps its foreign keys.
KEYS = (
    ("fk_entries_account_id_accounts", "account_id", "accounts"),
    ("fk_entries_grant_id_grants", "grant_id", "grants"),
)

CHECK_FUNCTION = r"""
CREATE OR REPLACE FUNCTION entries_references_check() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
    v_account bigint;
    v_grant bigint;
BEGIN
    -- Scalar subqueries, so that each new row is one index probe per key whatever the planner guesses of the
    -- transition table's size (as NOT EXISTS ... OR NOT EXISTS it hashed both whole tables: 2x slower).
    SELECT n.account_id, n.grant_id INTO v_account, v_grant
      FROM new_entries n
     WHERE (SELECT a.id FROM accounts a WHERE a.id = n.account_id) IS NULL
        OR (n.grant_id IS NOT NULL AND (SELECT g.id FROM grants g WHERE g.id = n.grant_id) IS NULL)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert into entries refers to a missing account (%) or grant (%)', v_account, v_grant
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END
$fn$;
"""

# What the keys did when a referenced row was deleted (NO ACTION): refused while an entry refers to it. Nothing in
# the ledger deletes accounts or grants; a test's wipe deletes the entries first.
REFERENCED_FUNCTION = r"""
CREATE OR REPLACE FUNCTION entries_referenced_check() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF (TG_TABLE_NAME = 'accounts' AND EXISTS (SELECT 1 FROM entries e WHERE e.account_id = OLD.id))
       OR (TG_TABLE_NAME = 'grants' AND EXISTS (SELECT 1 FROM entries e WHERE e.grant_id = OLD.id)) THEN
        RAISE EXCEPTION 'delete from % refused: entries refer to row %', TG_TABLE_NAME, OLD.id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN OLD;
END
$fn$;
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(CHECK_FUNCTION)
    op.execute(REFERENCED_FUNCTION)
    for name, _, _ in KEYS:
        op.drop_constraint(name, "entries", type_="foreignkey")
    op.execute(
        "CREATE TRIGGER entries_references AFTER INSERT ON entries REFERENCING NEW TABLE AS new_entries "
        "FOR EACH STATEMENT EXECUTE FUNCTION entries_references_check()"
    )
    for table in ("accounts", "grants"):
        op.execute(
            f"CREATE TRIGGER {table}_referenced BEFORE DELETE ON {table} FOR EACH ROW "
            "EXECUTE FUNCTION entries_referenced_check()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in ("accounts", "grants"):
        op.execute(f"DROP TRIGGER IF EXISTS {table}_referenced ON {table}")
    op.execute("DROP TRIGGER IF EXISTS entries_references ON entries")
    for name, column, referred in KEYS:
        op.create_foreign_key(name, "entries", referred, [column], ["id"])
    op.execute("DROP FUNCTION IF EXISTS entries_referenced_check()")
    op.execute("DROP FUNCTION IF EXISTS entries_references_check()")
