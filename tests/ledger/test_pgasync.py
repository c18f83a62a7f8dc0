"""ledger.pgasync: the event loop's own connections for the ledger's one-statement calls (PostgreSQL)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import DataError, OperationalError

from ledger.pgasync import AutocommitPool, conninfo_of

pytestmark = pytest.mark.postgres


def run(pool_size: int, engine: Engine, steps: object) -> object:
    async def main() -> object:
        pool = AutocommitPool(engine, size=pool_size)
        try:
            return await steps(pool)  # type: ignore[operator]
        finally:
            await pool.aclose()

    return asyncio.run(main())


class TestAutocommitPool:
    def test_a_statement_is_its_own_committed_transaction(self, pg_engine: Engine) -> None:
        with pg_engine.begin() as setup:
            setup.exec_driver_sql("CREATE TABLE IF NOT EXISTS t_pgasync (n int)")
            setup.exec_driver_sql("TRUNCATE t_pgasync")

        async def steps(pool: AutocommitPool) -> object:
            return await pool.fetchone("INSERT INTO t_pgasync VALUES (%s) RETURNING n + 1", (41,))

        try:
            assert run(1, pg_engine, steps) == (42,)
            # Seen from another connection: committed, nothing left to commit or roll back.
            with pg_engine.connect() as other:
                assert other.exec_driver_sql("SELECT array_agg(n) FROM t_pgasync").scalar() == [41]
        finally:
            with pg_engine.begin() as cleanup:
                cleanup.exec_driver_sql("DROP TABLE t_pgasync")

    def test_no_more_connections_than_its_size_however_many_statements_wait(self, pg_engine: Engine) -> None:
        async def steps(pool: AutocommitPool) -> object:
            rows = await asyncio.gather(
                *(pool.fetchone("SELECT pg_backend_pid(), pg_sleep(0.02)::text", ()) for _ in range(6))
            )
            return rows

        rows = run(2, pg_engine, steps)
        assert isinstance(rows, list) and len(rows) == 6
        assert len({pid for pid, _ in rows}) <= 2

    def test_an_error_is_sqlalchemys_and_the_connection_serves_the_next_statement(self, pg_engine: Engine) -> None:
        async def steps(pool: AutocommitPool) -> object:
            (before,) = await pool.fetchone("SELECT pg_backend_pid()", ())
            with pytest.raises(DataError):
                await pool.fetchone("SELECT 1 / %s", (0,))
            (after,) = await pool.fetchone("SELECT pg_backend_pid()", ())
            return before == after

        assert run(1, pg_engine, steps) is True

    def test_a_connection_the_server_closed_is_replaced(self, pg_engine: Engine) -> None:
        async def steps(pool: AutocommitPool) -> object:
            (first,) = await pool.fetchone("SELECT pg_backend_pid()", ())
            with pg_engine.connect() as other:
                other.exec_driver_sql(f"SELECT pg_terminate_backend({int(first)})")
            with pytest.raises(OperationalError):
                await pool.fetchone("SELECT pg_backend_pid()", ())
            (second,) = await pool.fetchone("SELECT pg_backend_pid()", ())
            return first != second

        assert run(1, pg_engine, steps) is True

    def test_its_connection_string_is_the_engines_database_with_a_connect_timeout(self, pg_engine: Engine) -> None:
        conninfo = conninfo_of(pg_engine)
        assert conninfo.startswith("postgresql://")
        assert f"/{pg_engine.url.database}?" in conninfo
        assert conninfo.endswith("connect_timeout=10")
