"""RESTORE=on: the proxy itself re-creates a dead instance's sessions on healthy ones.

Real processes: simulator instances (sharing session state, as with RemoteAuth: any instance can
start any session), the proxy, Postgres where a test says so. The instances' own start-up restore
is off (they restart empty), so whatever comes back was brought back by the proxy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import API_KEY
from tests.helpers.postgres import TempDatabase
from tests.helpers.processes import ProxyProcess, Simulator
from tests.helpers.traffic import post_send, wait_for
from tests.test_postgres import migrate
from tests.test_scaleout_lock import terminate_and_wait
from tests.test_scaleout_properties import LOCK_HOLDERS

TOKEN = "restore-admin-token"


def sid(n: int) -> str:
    return f"webjs_1_1732800000_rest{n:04d}"


def create(proxy: ProxyProcess, session_id: str, account_id: int) -> httpx.Response:
    return httpx.post(
        f"{proxy.url}/api/sessions",
        json={
            "session_id": session_id,
            "workspace_id": 1,
            "account_id": account_id,
            "api_key": API_KEY,
        },
        timeout=30,
        trust_env=False,
    )


def send(proxy: ProxyProcess, session_id: str, text: str) -> tuple[int, str, float]:
    started = time.monotonic()
    answer = post_send(proxy.url, session_id, text)
    return answer.status_code, answer.text, time.monotonic() - started


def admin(proxy: ProxyProcess, path: str) -> Any:
    answer = httpx.get(
        f"{proxy.url}{path}", headers={"authorization": f"Bearer {TOKEN}"}, trust_env=False
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def holders(sims: list[Simulator], session_id: str) -> list[tuple[str, str]]:
    """(instance, status) of every live instance holding the session, asked directly."""
    found = []
    for sim in sims:
        if not sim.alive:
            continue
        answer = httpx.get(
            f"{sim.url}/api/sessions/{session_id}/status",
            params={"api_key": API_KEY},
            timeout=5,
            trust_env=False,
        )
        if answer.status_code == 200:
            found.append((sim.name, answer.json()["status"]))
    return found


def proxy_env(sims: list[Simulator], **extra: str) -> dict[str, str]:
    return {
        "SESSION_PROXY_INSTANCES": ",".join(s.url for s in sims),
        "SESSION_PROXY_API_KEY": API_KEY,
        "SESSION_PROXY_ADMIN_TOKEN": TOKEN,
        "SESSION_PROXY_RESTORE": "on",
        "SESSION_PROXY_HEALTH_INTERVAL": "0.5",
        "SESSION_PROXY_LOG_LEVEL": "info",
        **extra,
    }


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[list[Simulator]]:
    sims = [
        Simulator.start(tmp_path, f"i{n}", api_key=API_KEY, connect_delay=1.0) for n in range(3)
    ]
    try:
        yield sims
    finally:
        for sim in sims:
            sim.stop()


def test_a_dead_instances_sessions_are_restored_and_held_sends_delivered(
    tmp_path: Path, fleet: list[Simulator]
) -> None:
    """No database: the proxy restores the sessions it placed, with the create it saw."""
    proxy = ProxyProcess.start(tmp_path, proxy_env(fleet), ready_path="/readyz")
    try:
        ids = [sid(n) for n in range(6)]
        for n, session_id in enumerate(ids):
            assert create(proxy, session_id, 100 + n).status_code == 200
        wait_for(
            lambda: all(holders(fleet, s) and holders(fleet, s)[0][1] == "connected" for s in ids),
            15,
            "every session connected",
        )
        victim = max(fleet, key=lambda sim: sum(1 for s in ids if holders([sim], s)))
        lost = [s for s in ids if holders([victim], s)]
        assert lost
        victim.kill()
        killed_at = time.monotonic()
        with ThreadPoolExecutor(len(lost)) as pool:
            results = list(pool.map(lambda s: send(proxy, s, f"after-{s}"), lost))
        for status, text, _ in results:
            assert status == 200, text  # held while restored, not 502
        for session_id in lost:
            found = holders(fleet, session_id)
            assert [status for _, status in found] == ["connected"], found
        # Created again with the create's own fields: account_id and workspace_id.
        restarted = [e for sim in fleet if sim is not victim for e in sim.events("session_started")]
        assert {e["session_id"] for e in restarted} >= set(lost)
        restores = admin(proxy, "/_proxy/restores")
        assert restores["counts"]["succeeded"] == len(lost), restores
        assert restores["counts"]["failed"] == 0
        held = sorted(elapsed for _, _, elapsed in results)
        print(
            f"\n{len(lost)} sessions restored; held sends answered 200 after "
            f"{held[0]:.2f}-{held[-1]:.2f} s (connect takes 1 s); "
            f"{time.monotonic() - killed_at:.2f} s after the kill"
        )
        for sim in fleet:
            if sim is not victim:
                metadata = [e for e in sim.events("session_started") if e["session_id"] in lost]
                for event in metadata:
                    assert event["workspace_id"] == 1
        assert victim.events("sent") == [] or all(
            not str(e.get("text", "")).startswith("after-") for e in victim.events("sent")
        )
    finally:
        proxy.stop()


def dead_and_live(
    tmp_path: Path, pg_database: TempDatabase, ids: list[str]
) -> tuple[Simulator, list[Simulator]]:
    """An instance holding ``ids`` (their rows name it, workspace 1) and two live ones that
    start sessions in 0.5 s; the caller kills the first and stops the others."""
    migrate(pg_database.url, "--create-table")
    pg_database.execute("ALTER TABLE whatsapp_accounts ADD COLUMN workspace_id integer")
    dead = Simulator.start(tmp_path, "dead", api_key=API_KEY, sessions=ids)
    live = [
        Simulator.start(tmp_path, f"live{n}", api_key=API_KEY, connect_delay=0.5) for n in range(2)
    ]
    for session_id in ids:
        pg_database.execute(
            "INSERT INTO whatsapp_accounts (session_id, assigned_instance_url, workspace_id) "
            "VALUES ($1, $2, 1)",
            session_id,
            dead.url,
        )
    return dead, live


def test_restores_are_bounded_per_instance_and_made_once_across_replicas(
    tmp_path: Path, pg_database: TempDatabase
) -> None:
    """Two replicas share a database: each lost session is started once, from its row (account
    id = the row's id), never more than RESTORE_CONCURRENCY at a time on one instance."""
    ids = [sid(n) for n in range(12)]
    dead, live = dead_and_live(tmp_path, pg_database, ids)
    env = proxy_env(
        [dead, *live],
        SESSION_PROXY_DATABASE_URL=pg_database.url,
        SESSION_PROXY_RESTORE_CONCURRENCY="2",
    )
    replicas = [ProxyProcess.start(tmp_path, env, ready_path="/readyz") for _ in range(2)]
    try:
        dead.kill()
        wait_for(
            lambda: (
                all(
                    holders(live, s) == [(h[0][0], "connected")]
                    for s in ids
                    if (h := holders(live, s))
                )
                and all(holders(live, s) for s in ids)
            ),
            30,
            "every session connected on one live instance",
        )
        starts = [e for sim in live for e in sim.events("session_started")]
        assert sorted(e["session_id"] for e in starts) == sorted(ids)  # each once

        def moved_rows() -> dict[str, str] | None:
            rows = dict(
                (r[0], r[1])
                for r in pg_database.fetch(
                    "SELECT session_id, assigned_instance_url FROM whatsapp_accounts"
                )
            )
            return None if dead.url in rows.values() else rows

        # Written back in batches, a moment after the proxy saw each one connected.
        rows = wait_for(moved_rows, 10, "every row written back")
        accounts = dict(
            (r[0], r[1]) for r in pg_database.fetch("SELECT session_id, id FROM whatsapp_accounts")
        )
        for session_id in ids:
            ((name, _),) = holders(live, session_id)
            owner = next(sim for sim in live if sim.name == name)
            assert rows[session_id] != dead.url
            assert owner.port == int(str(rows[session_id]).rsplit(":", 1)[1])
        for event in starts:
            metadata = httpx.get(
                f"{next(s for s in live if s.name == event['instance']).url}"
                f"/api/sessions/{event['session_id']}/metadata",
                params={"api_key": API_KEY},
                trust_env=False,
            ).json()["metadata"]
            assert metadata["accountId"] == accounts[event["session_id"]]
            assert metadata["workspaceId"] == 1
        most = [sim.starts()["max_starting"] for sim in live]
        assert max(most) <= 2, most
        counts = [admin(p, "/_proxy/restores")["counts"] for p in replicas]
        assert sum(c["succeeded"] for c in counts) == len(ids), counts
        print(f"\nrestored {len(ids)} sessions; most starts at once per instance: {most}")
    finally:
        for proxy in replicas:
            proxy.stop()
        for sim in live:
            sim.stop()


def test_without_shared_state_a_restore_fails_is_reported_and_leaves_no_copy(
    tmp_path: Path,
) -> None:
    """Each instance keeps its own logins (LocalAuth): a session started elsewhere waits for a
    QR scan. The restore gives up after RESTORE_CONNECT_TIMEOUT on each instance it tries,
    disconnects the half-started copies, and reports it; the held send gets 503."""
    ids = [sid(900)]
    dead = Simulator.start(
        tmp_path, "own-dead", api_key=API_KEY, sessions=ids, auth_dir=tmp_path / "auth-dead"
    )
    live = [
        Simulator.start(
            tmp_path, f"own{n}", api_key=API_KEY, connect_delay=0.2, auth_dir=tmp_path / f"a{n}"
        )
        for n in range(2)
    ]
    proxy = ProxyProcess.start(
        tmp_path,
        proxy_env(
            [dead, *live],
            SESSION_PROXY_RESTORE_CONNECT_TIMEOUT="1",
            SESSION_PROXY_HOLD_TIMEOUT="4",
        ),
        ready_path="/readyz",
    )
    try:
        status, text, _ = send(proxy, ids[0], "before")
        assert status == 200, text
        dead.kill()
        status, text, _ = send(proxy, ids[0], "after")
        assert status == 503 and "session-restoring" in text, text
        restores = wait_for(
            lambda: (r := admin(proxy, "/_proxy/restores"))["counts"]["failed"] == 1 and r,
            10,
            "the restore to be reported failed",
        )
        (failed,) = [r for r in restores["recent"] if r["result"] == "failed"]
        assert "QR" in failed["why"] and failed["session_id"] == ids[0]
        started = [e for sim in live for e in sim.events("session_started")]
        assert len(started) == 2  # tried on both, once each
        assert all(holders(live, s) == [] for s in ids)  # no half-started copy left behind
        print(f"\nrestore without shared state: reported failed ({failed['why'][:80]}...)")
    finally:
        proxy.stop()
        for sim in live:
            sim.stop()


RESTORE_LOCK_KEY = "session-proxy-reconcile:whatsapp_accounts:restore"


def test_a_restorer_whose_lock_connection_dies_stops_and_nothing_starts_twice(
    tmp_path: Path, pg_database: TempDatabase
) -> None:
    """The restore lock's connection is cut while its holder is restoring: the holder stops at
    once (another replica may take the lock now), the sessions it had not finished are restored
    by whoever holds the lock next, and every session is started exactly once."""
    ids = [sid(n) for n in range(16)]
    dead, live = dead_and_live(tmp_path, pg_database, ids)
    replicas = [
        ProxyProcess.start(
            tmp_path,
            proxy_env(
                [dead, *live],
                SESSION_PROXY_DATABASE_URL=f"{pg_database.url}?application_name=restorer{n}",
                SESSION_PROXY_RESTORE_CONCURRENCY="1",
            ),
            ready_path="/readyz",
        )
        for n in range(2)
    ]
    try:
        dead.kill()
        # The cut lands mid-restore: the lock held and the first starts made.
        holder = wait_for(
            lambda: (
                rows[0]
                if (rows := pg_database.fetch(LOCK_HOLDERS, RESTORE_LOCK_KEY))
                and any(sim.events("session_started") for sim in live)
                else None
            ),
            30,
            "a replica restoring",
        )
        cut_at = len([e for sim in live for e in sim.events("session_started")])
        asyncio.run(terminate_and_wait(pg_database.url, holder["pid"]))
        wait_for(
            lambda: (
                all(
                    holders(live, s) == [(h[0][0], "connected")]
                    for s in ids
                    if (h := holders(live, s))
                )
                and all(holders(live, s) for s in ids)
            ),
            60,
            "every session connected on one live instance",
        )
        starts = [e for sim in live for e in sim.events("session_started")]
        logs = "\n".join(p.log_text() for p in replicas)
    finally:
        for proxy in replicas:
            proxy.stop()
        for sim in live:
            sim.stop()
    print(
        f"\nrestore lock cut after {cut_at} of {len(ids)} starts ({holder['application_name']}); "
        f"{len(starts)} starts in all"
    )
    assert cut_at < len(ids), "the cut came after the restore was done"
    assert sorted(e["session_id"] for e in starts) == sorted(ids)  # each exactly once
    assert "restore stopped: the restore lock was lost" in logs
