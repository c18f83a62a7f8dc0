"""ledger_consume_many with limits finds and updates each counter once: the guarded update is the check.

Revision ID: limits_3
Revises: hot_1
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from alembic import op

revision = "limits_3"
down_revision = "hot_1"
branch_labels = None
depends_on = None

# The limited form's limit rows come as json, not jsonb (hot_1's form, dropped here).
SIGNATURE = (
    "ledger_consume_many(text[], text[], text[], bigint[], text[], text[], text[], timestamptz[], jsonb[], json)"
)
HOT_1_SIGNATURE = (
    "ledger_consume_many(text[], text[], text[], bigint[], text[], text[], text[], timestamptz[], jsonb[], jsonb)"
)

# hot_1's limited form read every counter of the batch twice: once to decide which customers go set-wise (a
# LEFT JOIN probing each counter's three-column key, after expanding and summing the items' JSON rows), then
# again in the guarded UPDATE that adds the sums (the JSON expanded and summed again, each counter probed
# again). auto_explain on the running benchmark: of the ~1.8 ms a 16-item batch spent on its 48 counters,
# ~1 ms was that first read. Now the batch's customers are chosen as without limits, and the guarded UPDATE
# (each counter found once by its key, summed in bigint, not numeric) is the check: a customer any of whose
# counters it did not take (a new window's counter, or one the batch would take to its maximum or past it) is
# the rare case, and is undone exactly (the sums subtracted again from the counters it took, by id) and applied
# item by item, as before (the undo subtracts exactly what the UPDATE added). The outcome of every item is
# unchanged. The sums go through arrays so that the UPDATE's plan probes the counters' key whatever the table's
# statistics say.
_LIMITED = {
    "@LIMITS_PARAM@": ", p_limits json",
    "@LIMIT_COLUMNS@": ",\n    limit_name text, limit_used bigint",
    "@LIMIT_CTES@": "",
    "@LIMIT_CONDITION@": "",
    "@LIMIT_WRITE@": """
    IF v_set IS NOT NULL THEN
        -- Each chosen customer's rows, summed per counter (a counter is one customer's), into arrays: the UPDATE
        -- below then joins an unnest of a few dozen rows to the counters by their key (an index probe each).
        -- Joined to the JSON functions directly, the planner guesses a thousand rows and, once the counters are
        -- analyzed, hashes the whole table instead (measured: 44 ms a batch at 44,000 counters).
        SELECT array_agg(s.customer), array_agg(s.limit_name), array_agg(s.scope_value), array_agg(s.window_start),
               array_agg(s.measure), array_agg(s.maximum), array_agg(s.requests), array_agg(s.units),
               array_agg(s.tokens), array_agg(s.cost_usd)
          INTO v_sum_customers, v_sum_names, v_sum_scopes, v_sum_starts, v_sum_measures, v_sum_maxima,
               v_sum_requests, v_sum_units, v_sum_tokens, v_sum_cost
          FROM (SELECT t.c AS customer, x.limit_name, x.scope_value, x.window_start, max(x.measure) AS measure,
                       max(x.maximum) AS maximum, sum(x.requests)::bigint AS requests,
                       sum(x.units)::bigint AS units, sum(x.tokens)::bigint AS tokens,
                       sum(x.cost_usd)::bigint AS cost_usd
                  FROM ROWS FROM (unnest(p_customers), json_array_elements(p_limits)) AS t(c, r)
                 CROSS JOIN LATERAL json_to_recordset(CASE WHEN json_typeof(t.r) = 'array' THEN t.r END) AS x(
                       limit_name text, scope_value text, window_start timestamptz, requests bigint, units bigint,
                       tokens bigint, cost_usd bigint, measure text, maximum bigint)
                 WHERE t.c = ANY(v_set)
                 GROUP BY t.c, x.limit_name, x.scope_value, x.window_start) s;
        WITH sums AS (
            SELECT * FROM unnest(v_sum_customers, v_sum_names, v_sum_scopes, v_sum_starts, v_sum_measures,
                                 v_sum_maxima, v_sum_requests, v_sum_units, v_sum_tokens, v_sum_cost)
                       AS s(customer, limit_name, scope_value, window_start, measure, maximum, requests, units,
                            tokens, cost_usd)
        ), taken AS (  -- only while the counter stays below its maximum: no refusal, no limit.reached to emit
            UPDATE limit_counters c
               SET requests = c.requests + s.requests, units = c.units + s.units, tokens = c.tokens + s.tokens,
                   cost_usd = c.cost_usd + s.cost_usd, measure = s.measure, maximum = s.maximum
              FROM sums s
             WHERE c.limit_name = s.limit_name AND c.scope_value = s.scope_value AND c.window_start = s.window_start
               AND CASE s.measure WHEN 'requests' THEN c.requests + s.requests WHEN 'units' THEN c.units + s.units
                                  WHEN 'tokens' THEN c.tokens + s.tokens ELSE c.cost_usd + s.cost_usd END
                   < s.maximum
            RETURNING s.customer, c.id, s.requests, s.units, s.tokens, s.cost_usd
        ), blocked AS (  -- customers with a counter not taken
            SELECT s.customer FROM sums s GROUP BY s.customer
            HAVING count(*) > (SELECT count(*) FROM taken k WHERE k.customer = s.customer)
        )
        SELECT (SELECT array_agg(b.customer) FROM blocked b),
               array_agg(k.id), array_agg(k.requests), array_agg(k.units), array_agg(k.tokens), array_agg(k.cost_usd)
          INTO v_blocked, v_undo_ids, v_undo_requests, v_undo_units, v_undo_tokens, v_undo_cost
          FROM taken k WHERE k.customer IN (SELECT b.customer FROM blocked b);
        IF v_blocked IS NOT NULL THEN
            -- Give back what the blocked customers' other counters took; they go item by item below.
            UPDATE limit_counters c
               SET requests = c.requests - u.requests, units = c.units - u.units, tokens = c.tokens - u.tokens,
                   cost_usd = c.cost_usd - u.cost_usd
              FROM unnest(v_undo_ids, v_undo_requests, v_undo_units, v_undo_tokens, v_undo_cost)
                   AS u(id, requests, units, tokens, cost_usd)
             WHERE c.id = u.id;
            SELECT array_agg(k.c), array_agg(k.a), array_agg(k.g) INTO v_set, v_accounts, v_grants
              FROM unnest(v_set, v_accounts, v_grants) AS k(c, a, g)
             WHERE NOT (k.c = ANY(v_blocked));
        END IF;
    END IF;
""",
    "@LIMIT_OK@": ", NULL::text, NULL::bigint",
    "@LIMIT_ARG@": ",\n                              CASE WHEN json_typeof(p_limits -> (i - 1)) = 'array' THEN (p_limits -> (i - 1))::jsonb END",
    "@LIMIT_ASSIGN@": "\n        limit_name := r.limit_name;\n        limit_used := r.limit_used;",
}
_DECLARE = """    v_last timestamptz;
    v_sum_customers text[];
    v_sum_names text[];
    v_sum_scopes text[];
    v_sum_starts timestamptz[];
    v_sum_measures text[];
    v_sum_maxima bigint[];
    v_sum_requests bigint[];
    v_sum_units bigint[];
    v_sum_tokens bigint[];
    v_sum_cost bigint[];
    v_blocked text[];
    v_undo_ids bigint[];
    v_undo_requests bigint[];
    v_undo_units bigint[];
    v_undo_tokens bigint[];
    v_undo_cost bigint[];
"""


def many_limited_function() -> str:
    """The limited ledger_consume_many as this migration defines it (hot_1's template, its limit parts replaced)."""
    sql: str = _sibling("0019_hot_consume_many_set")._MANY_TEMPLATE
    for marker, text in _LIMITED.items():
        sql = sql.replace(marker, text)
    return sql.replace("    v_last timestamptz;\n", _DECLARE, 1)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS {HOT_1_SIGNATURE}")
        op.execute(many_limited_function())


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS {SIGNATURE}")
        op.execute(_sibling("0019_hot_consume_many_set").many_function(limited=True))


def _sibling(name: str) -> Any:
    """Another migration's module (migrations do not import the code they would freeze)."""
    spec = importlib.util.spec_from_file_location(f"_migration_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
