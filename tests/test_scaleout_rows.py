"""Reconcile's comparison inside Postgres (issue 16): the fleet's lists COPYed into a snapshot of
the active rows and only what disagrees read back, on a real Postgres: NULL owners, deleted rows,
other spellings of an owner, values that need COPY's escapes, and a block that fails."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from proxy.config import load_settings
from proxy.store import Lock, Store, listed_block
from tests.helpers.postgres import TempDatabase
from tests.test_postgres import add_rows, migrate

Found = list[tuple[str | None, str | None, str | None, str | None]]


@contextlib.asynccontextmanager
async def leading(db: TempDatabase) -> AsyncIterator[tuple[Store, Lock]]:
    """An open store holding the reconcile lock."""
    store = Store(load_settings({"SESSION_PROXY_DATABASE_URL": db.url}))
    await store.open()
    try:
        async with store.lead() as lock:
            assert lock is not None
            yield store, lock
    finally:
        await store.close()


async def no_transaction_left(lock: Lock) -> None:
    """The snapshot's transaction ended with its block, and its table with it."""
    assert not lock.conn.is_closed()
    assert not lock.conn.is_in_transaction()
    assert await lock.conn.fetchval("SELECT to_regclass('session_proxy_listed')") is None


async def compare(
    db: TempDatabase, lists: dict[str, list[str]], canonical: dict[str, str]
) -> tuple[dict[str | None, int], Found]:
    async def blocks() -> AsyncIterator[bytes]:
        for url, ids in lists.items():
            yield listed_block(url, ids)

    async with leading(db) as (store, lock):
        async with store.snapshot(lock) as snapshot:
            forms = await snapshot.forms()
            await snapshot.load(blocks())
            found = await snapshot.disagreements(canonical)
        await no_transaction_left(lock)
    return forms, sorted(found, key=repr)


async def test_only_what_disagrees_comes_back(pg_database: TempDatabase) -> None:
    migrate(pg_database.url, "--create-table")
    add_rows(pg_database, {f"s{k}": f"http://localhost:{3000 + k}" for k in range(5)})
    pg_database.execute(
        "INSERT INTO whatsapp_accounts (session_id, assigned_instance_url) VALUES ('nobody', NULL)"
    )
    pg_database.execute("UPDATE whatsapp_accounts SET deleted_at = now() WHERE session_id = 's4'")
    lists = {
        "http://localhost:3000": ["s0", "s1"],  # s0 agrees; s1's row says 3001
        "http://localhost:3002": ["s2", "stranger"],  # s2 agrees; no row for the stranger
        "http://localhost:3004": ["s4"],  # s4's row is deleted: the session is unknown
    }
    canonical = {f"http://localhost:{3000 + k}": f"http://localhost:{3000 + k}" for k in range(5)}
    forms, found = await compare(pg_database, lists, canonical)
    assert forms == {**{f"http://localhost:{3000 + k}": 1 for k in range(4)}, None: 1}
    assert found == sorted(
        [
            ("s1", "http://localhost:3001", "s1", "http://localhost:3000"),
            ("s3", "http://localhost:3003", None, None),  # listed nowhere
            ("nobody", None, None, None),
            (None, None, "stranger", "http://localhost:3002"),
            (None, None, "s4", "http://localhost:3004"),
        ],
        key=repr,
    )


async def test_another_spelling_of_the_owner_agrees(pg_database: TempDatabase) -> None:
    migrate(pg_database.url, "--create-table")
    add_rows(pg_database, {"a": "localhost:3000/", "b": "http://localhost:3000"})
    canonical = {"localhost:3000/": "http://localhost:3000"}  # "b"'s spelling is not mapped
    forms, found = await compare(pg_database, {"http://localhost:3000": ["a", "b"]}, canonical)
    assert forms == {"localhost:3000/": 1, "http://localhost:3000": 1}
    assert found == [("b", "http://localhost:3000", "b", "http://localhost:3000")]


@pytest.mark.parametrize(
    "odd",
    ["back\\slash", "tab\there", "new\nline", "\\N", "ends\\", "crlf\r\n"],
)
async def test_values_that_need_escapes(pg_database: TempDatabase, odd: str) -> None:
    migrate(pg_database.url, "--create-table")
    add_rows(pg_database, {odd: f"http://{odd}", "plain": "http://localhost:1"})
    lists = {f"http://{odd}": [odd, f"{odd}-new"], "http://localhost:2": ["plain"]}
    canonical = {f"http://{odd}": f"http://{odd}", "http://localhost:1": "http://localhost:1"}
    forms, found = await compare(pg_database, lists, canonical)
    assert forms == {f"http://{odd}": 1, "http://localhost:1": 1}
    # The odd row agrees (its id and URL went in and compared intact); the new one comes back
    # exactly as listed.
    assert found == sorted(
        [
            ("plain", "http://localhost:1", "plain", "http://localhost:2"),
            (None, None, f"{odd}-new", f"http://{odd}"),
        ],
        key=repr,
    )


async def test_a_failing_block_rolls_back_and_leaves_the_connection_clean(
    pg_database: TempDatabase,
) -> None:
    migrate(pg_database.url, "--create-table")
    add_rows(pg_database, {"s1": "http://localhost:1"})

    async def broken() -> AsyncIterator[bytes]:
        yield listed_block("http://localhost:1", ["s1"])
        raise RuntimeError("the inventory failed")

    async with leading(pg_database) as (store, lock):
        with pytest.raises(RuntimeError):
            async with store.snapshot(lock) as snapshot:
                await snapshot.forms()
                await snapshot.load(broken())
        await no_transaction_left(lock)
        assert await store.owner("s1") == "http://localhost:1"


async def test_a_listed_id_postgres_cannot_hold_is_left_out(pg_database: TempDatabase) -> None:
    """An instance that lists an id with a NUL (no text column can hold one) does not fail the
    COPY, and the pass with it, for every other instance: that id is left out."""
    migrate(pg_database.url, "--create-table")
    add_rows(pg_database, {"s1": "http://localhost:1"})
    lists = {
        "http://localhost:1": ["s1", "bad\x00id"],
        "http://localhost:2": ["s2"],
        "http://localhost:3": ["only\x00bad"],
    }
    _, found = await compare(pg_database, lists, {"http://localhost:1": "http://localhost:1"})
    assert found == [(None, None, "s2", "http://localhost:2")]
