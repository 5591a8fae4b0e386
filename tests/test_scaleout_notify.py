"""A NOTIFY storm does not hold a replica's event loop (issue 16), on a real Postgres.

A reconcile that corrects 100,000 rows makes the trigger send 100,000 notifications to every
replica. Each one used to become a task of its own, thousands of them ready in one turn of the
loop that serves the replica's requests, which stalled while the storm was forgotten (440-592 ms
for 100,000 here). Now they gather in a set that one task forgets, a bounded number at a time.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg

from proxy.config import load_settings
from proxy.store import FORGET_AT_ONCE, Store
from proxy.tasks import Supervisor
from tests.helpers.postgres import TempDatabase
from tests.test_postgres import add_rows, migrate

ROWS = 100_000


async def _storm(url: str) -> tuple[set[str], int, int, float, float]:
    forgotten: set[str] = set()
    calls = running = most_at_once = 0

    async def invalidate(session_id: str | None) -> None:
        nonlocal calls, running, most_at_once
        calls += 1
        running += 1
        most_at_once = max(most_at_once, running)
        if session_id is not None:
            forgotten.add(session_id)
        await asyncio.sleep(0)  # as the routing table does: a delete is an await
        running -= 1

    store = Store(load_settings({"SESSION_PROXY_DATABASE_URL": url}), invalidate)
    supervisor = Supervisor()
    await store.start_background(supervisor)
    worst_gap = 0.0
    try:
        deadline = time.monotonic() + 30
        while not store.listening:
            assert time.monotonic() < deadline, "the store never started listening"
            await asyncio.sleep(0.01)
        conn = await asyncpg.connect(url)
        try:
            began = time.monotonic()
            await conn.execute("UPDATE whatsapp_accounts SET assigned_instance_url = 'http://b'")
        finally:
            await conn.close()
        last = time.monotonic()
        deadline = last + 60
        while len(forgotten) < ROWS and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            worst_gap = max(worst_gap, now - last)
            last = now
        took = time.monotonic() - began
    finally:
        await supervisor.close()
        await store.close()
    return forgotten, calls, most_at_once, worst_gap, took


def test_a_storm_of_notifications_is_forgotten_without_holding_the_loop(
    pg_database: TempDatabase,
) -> None:
    migrate(pg_database.url, "--create-table")
    add_rows(pg_database, {f"storm{k:06d}": "http://a" for k in range(ROWS)})
    forgotten, calls, most_at_once, worst_gap, took = asyncio.run(_storm(pg_database.url))
    print(
        f"\n{ROWS:,} rows changed in one UPDATE: {len(forgotten):,} forgotten in {took:.2f} s "
        f"({calls:,} calls, at most {most_at_once:,} at once), the loop's longest stall "
        f"{worst_gap * 1000:.0f} ms"
    )
    assert len(forgotten) == ROWS
    assert calls <= ROWS + 100  # each change forgotten once (a few may arrive twice)
    # Work per loop turn is bounded: a task per notification put tens of thousands of them in
    # one turn (a 440 ms stall of a 5 ms ticker here, against 78 ms now, on a quiet machine).
    assert most_at_once <= FORGET_AT_ONCE
    assert worst_gap < 1.0, f"the event loop stalled {worst_gap:.2f} s"
