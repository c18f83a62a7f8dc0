"""ledger_consume_many with limits takes the batch's counter sums as arrays: no JSON read on the set-wise path.

Revision ID: limits_4
Revises: limits_3
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from alembic import op

revision = "limits_4"
down_revision = "limits_3"
branch_labels = None
depends_on = None

SIGNATURE = (
    "ledger_consume_many(text[], text[], text[], bigint[], text[], text[], text[], timestamptz[], jsonb[], json, "
    "text[], text[], text[], timestamptz[], text[], bigint[], bigint[], bigint[], bigint[], bigint[])"
)
LIMITS_3_SIGNATURE = (
    "ledger_consume_many(text[], text[], text[], bigint[], text[], text[], text[], timestamptz[], jsonb[], json)"
)

# limits_3 expanded every item's JSON rows and summed them per counter in a statement of its own before the
# guarded UPDATE (auto_explain under the --limits benchmark: ~0.36 ms of a 16-item batch's ~1.5 ms of limit work,
# beside the UPDATE's 1.1 ms, whose "blocked" check also scanned the taken rows once per customer). The caller
# has every item's rows in hand already, so it sends the sums per counter (each with its customer) as arrays,
# and the guarded UPDATE reads them directly. The items' JSON rows still come, read only by the item-by-item
# path (a blocked customer, a replay, a repeat). Outcomes are unchanged: the same UPDATE is the check, and a
# customer any of whose counters it did not take is undone exactly and applied item by item.
# The other parts (result columns, the item-by-item path's arguments) are limits_3's.
_CHANGED = {
    "@LIMITS_PARAM@": (
        ", p_limits json,\n    p_counter_customers text[], p_counter_names text[], p_counter_scopes text[],"
        "\n    p_counter_starts timestamptz[], p_counter_measures text[], p_counter_maxima bigint[],"
        "\n    p_counter_requests bigint[], p_counter_units bigint[], p_counter_tokens bigint[],"
        " p_counter_cost bigint[]"
    ),
    "@LIMIT_WRITE@": """
    IF v_set IS NOT NULL AND p_counter_names IS NOT NULL THEN
        WITH sums AS (  -- one row per counter, summed by the caller; only the customers applied set-wise
            SELECT s.*
              FROM unnest(p_counter_customers, p_counter_names, p_counter_scopes, p_counter_starts,
                          p_counter_measures, p_counter_maxima, p_counter_requests, p_counter_units,
                          p_counter_tokens, p_counter_cost) WITH ORDINALITY
                   AS s(customer, limit_name, scope_value, window_start, measure, maximum, requests, units,
                        tokens, cost_usd, n)
             WHERE s.customer = ANY(v_set)
        ), taken AS (  -- only while the counter stays below its maximum: no refusal, no limit.reached to emit
            UPDATE limit_counters c
               SET requests = c.requests + s.requests, units = c.units + s.units, tokens = c.tokens + s.tokens,
                   cost_usd = c.cost_usd + s.cost_usd, measure = s.measure, maximum = s.maximum
              FROM sums s
             WHERE c.limit_name = s.limit_name AND c.scope_value = s.scope_value AND c.window_start = s.window_start
               AND CASE s.measure WHEN 'requests' THEN c.requests + s.requests WHEN 'units' THEN c.units + s.units
                                  WHEN 'tokens' THEN c.tokens + s.tokens ELSE c.cost_usd + s.cost_usd END
                   < s.maximum
            RETURNING s.n, s.customer, c.id, s.requests, s.units, s.tokens, s.cost_usd
        )
        SELECT (SELECT array_agg(DISTINCT s.customer) FROM sums s WHERE s.n NOT IN (SELECT k.n FROM taken k)),
               array_agg(k.customer), array_agg(k.id), array_agg(k.requests), array_agg(k.units),
               array_agg(k.tokens), array_agg(k.cost_usd)
          INTO v_blocked, v_undo_customers, v_undo_ids, v_undo_requests, v_undo_units, v_undo_tokens, v_undo_cost
          FROM taken k;
        IF v_blocked IS NOT NULL THEN
            -- Give back what the blocked customers' other counters took; they go item by item below.
            UPDATE limit_counters c
               SET requests = c.requests - u.requests, units = c.units - u.units, tokens = c.tokens - u.tokens,
                   cost_usd = c.cost_usd - u.cost_usd
              FROM unnest(v_undo_customers, v_undo_ids, v_undo_requests, v_undo_units, v_undo_tokens, v_undo_cost)
                   AS u(customer, id, requests, units, tokens, cost_usd)
             WHERE c.id = u.id AND u.customer = ANY(v_blocked);
            SELECT array_agg(k.c), array_agg(k.a), array_agg(k.g) INTO v_set, v_accounts, v_grants
              FROM unnest(v_set, v_accounts, v_grants) AS k(c, a, g)
             WHERE NOT (k.c = ANY(v_blocked));
        END IF;
    END IF;
""",
}
_DECLARE = """    v_last timestamptz;
    v_blocked text[];
    v_undo_customers text[];
    v_undo_ids bigint[];
    v_undo_requests bigint[];
    v_undo_units bigint[];
    v_undo_tokens bigint[];
    v_undo_cost bigint[];
"""


def many_limited_function() -> str:
    """The limited ledger_consume_many as this migration defines it (hot_1's template, its limit parts replaced)."""
    sql: str = _sibling("0019_hot_consume_many_set")._MANY_TEMPLATE
    for marker, text in {**_sibling("0020_limits_counted_once")._LIMITED, **_CHANGED}.items():
        sql = sql.replace(marker, text)
    return sql.replace("    v_last timestamptz;\n", _DECLARE, 1)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS {LIMITS_3_SIGNATURE}")
        op.execute(many_limited_function())


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS {SIGNATURE}")
        op.execute(_sibling("0020_limits_counted_once").many_limited_function())


def _sibling(name: str) -> Any:
    """Another migration's module (migrations do not import the code they would freeze)."""
    spec = importlib.util.spec_from_file_location(f"_migration_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
