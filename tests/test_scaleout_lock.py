"""The reconcile lock fences the pass's writes (issue 16, finding 1), on a real Postgres.

The lock is a session-level advisory lock on one connection. When that connection dies (a
network blip, ``idle_session_timeout``, a DBA's ``pg_terminate_backend``), Postgres frees the
lock and another replica may take it: the pass that lost it must not go on writing, and the
loss must not read as a database outage (which would stop every row lookup of that replica).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

from proxy.client import create_client
from proxy.config import load_settings
from proxy.discovery import Discovery
from proxy.instances import InstanceSet
from proxy.reconcile import Reconciler
from proxy.store import LockLost, Store
from tests.conftest import API_KEY
from tests.helpers.faults import FaultyHop
from tests.helpers.postgres import TempDatabase
from tests.helpers.processes import Simulator
from tests.test_postgres import add_rows, laravel_form, migrate
from tests.test_scaleout_properties import LOCK_HOLDERS, LOCK_KEY

ROOT = Path(__file__).resolve().parent.parent


async def terminate_and_wait(db_url: str, pid: int) -> None:
    """pg_terminate_backend only signals: wait until the backend (and its lock) is gone."""
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("SELECT pg_terminate_backend($1)", pid)
        deadline = time.monotonic() + 10
        while await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
            assert time.monotonic() < deadline, "the terminated backend stayed"
            await asyncio.sleep(0.01)
    finally:
        await conn.close()


def test_a_pass_whose_lock_connection_dies_writes_nothing(
    tmp_path: Path, pg_database: TempDatabase
) -> None:
    """A pass that lost its lock mid-pass (before its read and write) leaves every row as it
    was, says why, and the next pass fixes the rows."""
    a = Simulator.start(tmp_path, "a", sessions=[f"m{k}" for k in range(50)], api_key=API_KEY)
    b = Simulator.start(tmp_path, "b", api_key=API_KEY)
    slow = FaultyHop(a.port).start()
    slow.set_mode("latency", seconds=1.0)  # the pass holds the lock while it lists
    try:
        migrate(pg_database.url, "--create-table")
        add_rows(pg_database, {f"m{k}": laravel_form(b) for k in range(50)})
        env = {
            "SESSION_PROXY_DATABASE_URL": f"{pg_database.url}?application_name=lockloss",
            "SESSION_PROXY_INSTANCES": f"{slow.url},{b.url}",
            "SESSION_PROXY_INSTANCE_ALIASES": f"{laravel_form(a)}={slow.url}",
            "SESSION_PROXY_API_KEY": API_KEY,
            "PATH": "/usr/bin:/bin",
        }
        command = [sys.executable, "-m", "proxy", "reconcile", "--json"]
        proc = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 30
        holders: list[object] = []
        while not holders:
            assert time.monotonic() < deadline, "the reconcile command never took the lock"
            assert proc.poll() is None, proc.communicate()
            holders = pg_database.fetch(LOCK_HOLDERS, LOCK_KEY)
            time.sleep(0.01)
        asyncio.run(terminate_and_wait(pg_database.url, holders[0]["pid"]))
        out, err = proc.communicate(timeout=60)
        sys.stderr.write(err)
        report = json.loads(out)
        still_wrong = pg_database.fetch(
            "SELECT count(*) AS n FROM whatsapp_accounts WHERE assigned_instance_url = $1",
            laravel_form(b),
        )[0]["n"]

        slow.set_mode("pass")
        again = subprocess.run(
            command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        fixed = json.loads(again.stdout)
    finally:
        slow.stop()
        a.stop()
        b.stop()
    print(f"\nlock lost mid-pass: skipped {report['skipped']!r}; next pass {fixed['counts']}")
    assert still_wrong == 50, "the pass went on writing after its lock was gone"
    assert report["rows_written"] == 0
    assert report["skipped"] and "lost the reconcile lock" in report["skipped"]
    assert fixed["skipped"] is None and fixed["rows_written"] == 50


async def test_a_lost_lock_is_not_a_database_outage(pg_database: TempDatabase) -> None:
    """The lock's connection dies while the block runs: its statements fail with LockLost,
    nothing is written, the block ends without an error of its own, the store stays up (row
    lookups go on) and the lock can be taken again."""
    migrate(pg_database.url, "--create-table")
    add_rows(pg_database, {"s1": "http://old:1"})
    store = Store(load_settings({"SESSION_PROXY_DATABASE_URL": pg_database.url}))
    await store.open()
    try:
        assert store.up
        async with store.lead() as lock:
            assert lock is not None
            pid = await lock.conn.fetchval("SELECT pg_backend_pid()")
            await terminate_and_wait(pg_database.url, pid)
            try:
                await store.write_owners({"s1": "http://new:2"}, purpose="reconcile", lock=lock)
            except LockLost:
                pass
            else:
                raise AssertionError("a write on a dead lock connection succeeded")
            try:
                async with store.snapshot(lock) as snapshot:
                    await snapshot.forms()
            except LockLost:
                pass
            else:
                raise AssertionError("a read on a dead lock connection succeeded")
        assert store.up, store.last_error
        assert await store.owner("s1") == "http://old:1"
        async with store.leader() as leading:  # the plain form, as restores use it
            assert leading
            pid = await store_lock_pid(pg_database.url)
            await terminate_and_wait(pg_database.url, pid)
        assert store.up, store.last_error
        async with store.lead() as lock:
            assert lock is not None
            async with store.snapshot(lock) as snapshot:
                assert await snapshot.forms() == {"http://old:1": 1}
    finally:
        await store.close()


async def store_lock_pid(db_url: str) -> int:
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch(LOCK_HOLDERS, LOCK_KEY)
    finally:
        await conn.close()
    assert len(rows) == 1, rows
    pid: int = rows[0]["pid"]
    return pid


async def test_a_pass_stops_as_soon_as_its_lock_connection_dies(
    tmp_path: Path, pg_database: TempDatabase
) -> None:
    """Not at its next statement: a pass waiting seconds for list calls when the lock goes
    ends at once, so it never runs beside the next leader's pass."""
    a = Simulator.start(tmp_path, "a", sessions=[f"m{k}" for k in range(20)], api_key=API_KEY)
    slow = FaultyHop(a.port).start()
    slow.set_mode("latency", seconds=5.0)
    try:
        migrate(pg_database.url, "--create-table")
        add_rows(pg_database, {f"m{k}": "http://elsewhere:1" for k in range(20)})
        settings = load_settings(
            {
                "SESSION_PROXY_DATABASE_URL": pg_database.url,
                "SESSION_PROXY_INSTANCES": slow.url,
                "SESSION_PROXY_API_KEY": API_KEY,
            }
        )
        store = Store(settings)
        await store.open()
        client = create_client(settings.upstream_client)
        instances = InstanceSet(settings)
        reconciler = Reconciler(settings, instances, Discovery(settings, instances, client), store)
        try:
            running = asyncio.create_task(reconciler.run_once())
            deadline = time.monotonic() + 30
            while not (
                holders := await asyncio.to_thread(pg_database.fetch, LOCK_HOLDERS, LOCK_KEY)
            ):
                assert time.monotonic() < deadline and not running.done()
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)  # well inside the 5 s list call
            await terminate_and_wait(pg_database.url, holders[0]["pid"])
            cut = time.monotonic()
            report = await asyncio.wait_for(running, 30)
            ended = time.monotonic() - cut
        finally:
            await client.aclose()
            await store.close()
    finally:
        slow.stop()
        a.stop()
    print(
        f"\nthe pass ended {ended * 1000:.0f} ms after its lock connection died: {report.skipped}"
    )
    assert report.skipped and "lost the reconcile lock" in report.skipped
    assert report.rows_written == 0 and store.up
    assert ended < 4.0, "the pass went on until its list calls ended"


async def test_two_replicas_writing_the_same_rows_at_once_never_deadlock(
    pg_database: TempDatabase,
) -> None:
    """Two replicas flush overlapping write-backs at the same moment, their moves learned in
    opposite orders (as a fleet restart makes them): both writes succeed. Rows locked in the
    order each replica learned them deadlock, and Postgres then fails one write."""
    migrate(pg_database.url, "--create-table")
    sids = [f"s{k:04d}" for k in range(2000)]
    add_rows(pg_database, dict.fromkeys(sids, "http://old:1"))
    settings = load_settings({"SESSION_PROXY_DATABASE_URL": pg_database.url})
    first, second = Store(settings), Store(settings)
    await first.open()
    await second.open()
    try:
        for attempt in range(5):
            forward = {sid: f"http://a:{attempt}" for sid in sids}
            backward = {sid: f"http://b:{attempt}" for sid in reversed(sids)}
            results = await asyncio.gather(
                first.write_owners(forward), second.write_owners(backward), return_exceptions=True
            )
            failed = [r for r in results if isinstance(r, BaseException)]
            assert not failed, f"attempt {attempt}: {failed[0]!r}"
            owners = {await first.owner(sid) for sid in (sids[0], sids[-1])}
            assert owners <= {f"http://a:{attempt}", f"http://b:{attempt}"}
    finally:
        await first.close()
        await second.close()
