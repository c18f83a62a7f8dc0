"""The batch call's array literals: what PostgreSQL's own parser reads back is exactly what was sent."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from ledger.pgfast import array_literal

# Text PostgreSQL can hold (no NUL), weighted towards the characters an array literal treats specially.
TEXT = st.sampled_from(["NULL", "null", ""]) | st.text(
    alphabet=st.sampled_from("\"\\{},; \t\nNUL'") | st.characters(exclude_characters="\x00")
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.one_of(st.none(), TEXT), max_size=12))
def test_postgresql_parses_the_literal_back_to_the_values(pg_engine: Engine, values: list[str | None]) -> None:
    with pg_engine.connect() as connection:
        parsed = connection.exec_driver_sql("SELECT %s::text[]", (array_literal(values),)).scalar_one()
    assert parsed == values


def test_hand_written_examples(pg_engine: Engine) -> None:
    cases: list[list[str | None]] = [
        [],
        ["NULL", None, ""],  # the word NULL quoted is text; None is the SQL null
        ['say "hi"', "C:\\path", "{a,b}", "  padded  "],
    ]
    with pg_engine.connect() as connection:
        for values in cases:
            assert connection.exec_driver_sql("SELECT %s::text[]", (array_literal(values),)).scalar_one() == values
    assert array_literal(['a"b', "c\\d", None]) == '{"a\\"b","c\\\\d",NULL}'
