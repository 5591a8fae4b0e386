"""The PostgreSQL helpers do what the database tests rely on: isolation and real outages."""

from __future__ import annotations

import asyncpg
import pytest

from tests.helpers import pg_fixtures
from tests.helpers.postgres import TempDatabase, ThrowawayPostgres, admin_url, fetch, free_port

# Bound here too, so this module runs whether or not the main conftest imports the fixtures.
pg_database = pg_fixtures.pg_database
throwaway_pg = pg_fixtures.throwaway_pg


def _databases() -> set[str]:
    return {row["datname"] for row in fetch(admin_url(), "SELECT datname FROM pg_database")}


async def test_temp_database_is_created_reachable_and_dropped() -> None:
    with TempDatabase() as db:
        assert db.name.startswith("sp_test_")
        assert db.name in _databases()
        conn = await asyncpg.connect(db.url)
        try:
            assert await conn.fetchval("SELECT current_database()") == db.name
        finally:
            await conn.close()
    assert db.name not in _databases()


async def test_drop_disconnects_clients_still_using_the_database() -> None:
    db = TempDatabase().create()
    conn = await db.connect()
    db.drop()
    assert db.name not in _databases()
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
        await conn.fetchval("SELECT 1")
    await conn.close()


def test_pg_database_fixture_gives_each_test_an_empty_database(pg_database: TempDatabase) -> None:
    assert pg_database.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'") == []
    pg_database.execute("CREATE TABLE sessions (id text PRIMARY KEY, owner text NOT NULL)")
    assert pg_database.execute("INSERT INTO sessions VALUES ($1, $2)", "s1", "i1") == "INSERT 0 1"
    rows = pg_database.fetch("SELECT id, owner FROM sessions")
    assert [tuple(r) for r in rows] == [("s1", "i1")]


async def test_throwaway_cluster_survives_a_stop_and_start(throwaway_pg: ThrowawayPostgres) -> None:
    assert throwaway_pg.port != 5432
    assert throwaway_pg.running
    conn = await throwaway_pg.connect()
    try:
        await conn.execute("CREATE TABLE owners (session text PRIMARY KEY, instance text)")
        await conn.execute("INSERT INTO owners VALUES ('s1', 'http://127.0.0.1:9001')")
    finally:
        await conn.close()

    throwaway_pg.stop()
    assert not throwaway_pg.running
    with pytest.raises(OSError):
        await asyncpg.connect(throwaway_pg.url, timeout=5)

    throwaway_pg.start_again()
    assert throwaway_pg.running
    conn = await throwaway_pg.connect()
    try:
        assert await conn.fetchval("SELECT instance FROM owners WHERE session = 's1'") == (
            "http://127.0.0.1:9001"
        )
    finally:
        await conn.close()


def test_throwaway_cluster_keeps_committed_rows_through_a_crash_and_destroy_removes_it() -> None:
    port = free_port()
    cluster = ThrowawayPostgres.start(port=port)
    try:
        assert cluster.url == f"postgresql://postgres@127.0.0.1:{port}/postgres"
        cluster.execute("CREATE TABLE t (n int)")
        cluster.execute("INSERT INTO t VALUES (1), (2)")
        cluster.stop("immediate")
        assert not cluster.running
        cluster.start_again()
        assert cluster.fetch("SELECT count(*) AS n FROM t")[0]["n"] == 2
    finally:
        cluster.destroy()
    assert not cluster.running
    assert not cluster.data_dir.exists()
    with pytest.raises(OSError):
        fetch(cluster.url, "SELECT 1")
