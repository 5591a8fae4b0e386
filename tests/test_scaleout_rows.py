"""Reconcile's row read (COPY in text form, issue 16) returns exactly what the table holds, on a
real Postgres: NULL owners, and values that need COPY's escapes."""

from __future__ import annotations

import pytest

from proxy.config import load_settings
from proxy.store import Store
from tests.helpers.postgres import TempDatabase
from tests.test_postgres import add_rows, migrate


async def rows_read(db: TempDatabase) -> list[tuple[str, str | None]]:
    store = Store(load_settings({"SESSION_PROXY_DATABASE_URL": db.url}))
    await store.open()
    try:
        return sorted(await store.active_rows(), key=lambda r: r[0])
    finally:
        await store.close()


async def test_plain_rows_and_null_owners(pg_database: TempDatabase) -> None:
    migrate(pg_database.url, "--create-table")
    add_rows(pg_database, {f"s{k}": f"http://localhost:{3000 + k}" for k in range(5)})
    pg_database.execute(
        "INSERT INTO whatsapp_accounts (session_id, assigned_instance_url) VALUES ('nobody', NULL)"
    )
    pg_database.execute("UPDATE whatsapp_accounts SET deleted_at = now() WHERE session_id = 's4'")
    assert await rows_read(pg_database) == [
        ("nobody", None),
        *[(f"s{k}", f"http://localhost:{3000 + k}") for k in range(4)],
    ]


@pytest.mark.parametrize(
    "odd",
    ["back\\slash", "tab\there", "new\nline", "\\N", "ends\\", "crlf\r\n"],
)
async def test_values_that_need_escapes(pg_database: TempDatabase, odd: str) -> None:
    migrate(pg_database.url, "--create-table")
    add_rows(pg_database, {odd: f"http://{odd}", "plain": "http://localhost:1"})
    pg_database.execute(
        "INSERT INTO whatsapp_accounts (session_id, assigned_instance_url) VALUES ('null', NULL)"
    )
    expected = sorted([(odd, f"http://{odd}"), ("plain", "http://localhost:1"), ("null", None)])
    assert await rows_read(pg_database) == expected
