"""Fixtures of the ledger tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from ledger import pgfast


@pytest.fixture(params=["sqlite", "postgresql", "postgresql-python"])
def ledger_engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """A clean database on SQLite and on PostgreSQL, the latter through both consumption paths.

    ``postgresql`` consumes through the ``ledger_consume`` function, ``postgresql-python`` through the portable
    Python path: the same tests run on both, so the two implementations of the rules cannot drift apart.
    """
    if request.param == "sqlite":
        yield request.getfixturevalue("sqlite_engine")
        return
    engine = request.getfixturevalue("pg_engine")
    pgfast.use_function(request.param == "postgresql")
    try:
        yield engine
    finally:
        pgfast.use_function(True)
