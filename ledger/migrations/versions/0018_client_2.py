"""ledger_spendable in PL/pgSQL: the access policy looked up with a plan cached per session, not planned per call.

Every hold (ledger_hold, then ledger_draw), every capture past its hold and every usage call on the fast path
(ledger_consume) asks ledger_spendable which grant sources the account's state may spend. As a LANGUAGE sql
function whose body has a FROM clause it cannot be inlined, so PostgreSQL (before 18) parsed and planned its body
on every call from a statement: 66 µs a call from ledger_draw's ``SELECT ledger_spendable(...) FROM accounts``, and
about a third of ledger_hold's time, measured with track_functions (pg_stat_user_functions) under load. In
PL/pgSQL the lookup's plan is cached per session: 8 µs. Same arguments, same answers (a key without a row has the
default policy; NULL sources: every source; '' : none).

Revision ID: client_2
Revises: money_2
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from alembic import op

revision = "client_2"
down_revision = "money_2"
branch_labels = None
depends_on = None

SPENDABLE_FUNCTION = r"""
CREATE OR REPLACE FUNCTION ledger_spendable(p_state text, p_grace timestamptz, p_now timestamptz)
RETURNS text[] LANGUAGE plpgsql STABLE AS $fn$
DECLARE
    -- ledger.access.spendable_sources: past_due splits at its grace deadline.
    k text := CASE WHEN p_state = 'past_due' AND p_grace IS NOT NULL AND p_now >= p_grace
                   THEN 'past_due_after_grace' ELSE p_state END;
    p record;
BEGIN
    SELECT x.sources INTO p FROM ledger_access_policy x WHERE x.policy_key = k;
    IF NOT FOUND THEN
        -- A key without a row has the default policy ([access.spend]'s defaults in ledger.config).
        RETURN CASE k WHEN 'suspended' THEN '{}'::text[]
                      WHEN 'canceled' THEN '{adjustment,promotion,top_up}'::text[]
                      WHEN 'past_due_after_grace' THEN '{adjustment,promotion,top_up}'::text[] END;
    END IF;
    RETURN string_to_array(p.sources, ',');  -- NULL sources: NULL (every source); '': {} (none)
END
$fn$;
"""


def _sibling(name: str) -> Any:
    """Another migration's module (to restore the function as it created it)."""
    spec = importlib.util.spec_from_file_location(f"_migration_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(SPENDABLE_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_sibling("0013_subs_access_policy").SPENDABLE_FUNCTION)
