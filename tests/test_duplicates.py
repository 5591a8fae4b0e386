"""A restart that duplicates sessions, settled: one copy per session for every replica.

The real gateway restores every active account Laravel lists when it starts, whichever instance
owns it (measured: one restart in a fleet of three with 15 sessions left 6 running twice). Here
one simulator is restarted with the start-up restore pointed at a Laravel stand-in listing all 15
accounts, so it starts the 10 it did not hold; two proxy replicas share Postgres.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import API_KEY
from tests.helpers.laravel import LaravelStandIn
from tests.helpers.postgres import TempDatabase
from tests.helpers.processes import ProxyProcess, Simulator
from tests.test_postgres import add_rows, laravel_form, migrate, readiness, wait_for

TOKEN = "admin-secret"


class DuplicatedFleet:
    def __init__(self, tmp: Path, db: TempDatabase) -> None:
        self.tmp = tmp
        self.db = db
        self.sessions = {f"webjs_1_1732800000_d{n}{k:07d}": n for n in range(3) for k in range(5)}
        self.laravel = LaravelStandIn(
            {"session_id": sid, "workspace_id": 1, "id": index}
            for index, sid in enumerate(self.sessions, 1)
        ).start()
        self.instances = [
            Simulator.start(
                tmp,
                f"instance-{n + 1}",
                sessions=[sid for sid, owner in self.sessions.items() if owner == n],
                api_key=API_KEY,
                connect_delay=0.2,
            )
            for n in range(3)
        ]
        migrate(db.url, "--create-table")
        add_rows(db, {sid: laravel_form(self.instances[n]) for sid, n in self.sessions.items()})
        self.proxies: list[ProxyProcess] = []

    def proxy(self, **env: str) -> ProxyProcess:
        proxy = ProxyProcess.start(
            self.tmp,
            {
                "SESSION_PROXY_INSTANCES": ",".join(s.url for s in self.instances),
                "SESSION_PROXY_API_KEY": API_KEY,
                "SESSION_PROXY_DATABASE_URL": self.db.url,
                "SESSION_PROXY_ADMIN_TOKEN": TOKEN,
                "SESSION_PROXY_RECONCILE_INTERVAL": "0",
                "SESSION_PROXY_HEALTH_INTERVAL": "0.5",
                "SESSION_PROXY_LOG_LEVEL": "warning",
                **env,
            },
            ready_path="/readyz",
        )
        self.proxies.append(proxy)
        wait_for(lambda: readiness(proxy)["database"]["listening"], what="listening")
        return proxy

    def restart_with_restore(self, sim: Simulator) -> None:
        sim.kill()
        sim.laravel_url = self.laravel.url
        sim.restart()
        summary = sim.restored()
        assert summary, "the restarted instance reported no start-up restore"

    def holders(self, sid: str) -> list[str]:
        names = []
        for sim in self.instances:
            listed = httpx.get(sim.url + "/_sim/sessions", timeout=5.0, trust_env=False).json()
            if any(s["session_id"] == sid for s in listed["sessions"]):
                names.append(sim.name)
        return names

    def routed_to(self, proxy: ProxyProcess, sid: str) -> str:
        answer = httpx.get(
            f"{proxy.url}/api/sessions/{sid}/status",
            params={"api_key": API_KEY},
            timeout=10.0,
            trust_env=False,
        )
        assert answer.status_code == 200, answer.text
        return answer.headers["x-proxy-instance"]

    def reconcile(self, proxy: ProxyProcess) -> dict[str, Any]:
        answer = httpx.post(
            f"{proxy.url}/_proxy/reconcile",
            headers={"authorization": f"Bearer {TOKEN}"},
            timeout=60.0,
            trust_env=False,
        )
        assert answer.status_code == 200, answer.text
        report: dict[str, Any] = answer.json()
        return report

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.stop()
        for sim in self.instances:
            sim.stop()
        self.laravel.stop()


@pytest.fixture
def duplicated(tmp_path: Path, pg_database: TempDatabase) -> Iterator[DuplicatedFleet]:
    fleet = DuplicatedFleet(tmp_path, pg_database)
    try:
        yield fleet
    finally:
        fleet.close()


def stored_owner(db: TempDatabase, sid: str) -> str:
    rows = db.fetch(
        "SELECT assigned_instance_url FROM whatsapp_accounts WHERE session_id = $1", sid
    )
    return str(rows[0]["assigned_instance_url"])


def wait_connected(fleet: DuplicatedFleet, sim: Simulator, count: int) -> None:
    def connected() -> bool:
        listed = httpx.get(sim.url + "/_sim/sessions", timeout=5.0, trust_env=False).json()
        return sum(1 for s in listed["sessions"] if s["status"] == "connected") >= count

    wait_for(connected, timeout=20.0, what=f"{count} sessions connected on {sim.name}")


@pytest.mark.parametrize("settle", [False, True], ids=["report-only", "settle-duplicates"])
def test_a_restart_that_duplicates_sessions_ends_with_one_owner_per_session(
    duplicated: DuplicatedFleet, settle: bool
) -> None:
    fleet = duplicated
    leader = fleet.proxy(SESSION_PROXY_SETTLE_DUPLICATES="on" if settle else "off")
    other = fleet.proxy()
    restarted = fleet.instances[0]
    # Both replicas know every owner before the restart.
    for sid in fleet.sessions:
        assert fleet.routed_to(leader, sid) == fleet.routed_to(other, sid)

    fleet.restart_with_restore(restarted)
    wait_connected(fleet, restarted, len(fleet.sessions))
    doubled = [sid for sid in fleet.sessions if len(fleet.holders(sid)) == 2]
    assert len(doubled) == 10  # every session of the two other instances now runs twice

    report = fleet.reconcile(leader)
    assert report["skipped"] is None, report
    assert report["counts"]["duplicated"] == 10
    assert sorted(d["session_id"] for d in report["duplicated"]) == sorted(doubled)
    # The database's owner holds each one connected: it stays the owner, no row changes.
    assert report["counts"]["verified"] == 15 and report["rows_written"] == 0

    by_url = {sim.url: sim for sim in fleet.instances}
    for sid, n in fleet.sessions.items():
        on_leader, on_other = fleet.routed_to(leader, sid), fleet.routed_to(other, sid)
        assert on_leader == on_other, f"{sid}: the replicas disagree"
        assert by_url[on_leader] is fleet.instances[n]  # the row's owner, for both
        assert stored_owner(fleet.db, sid) == laravel_form(fleet.instances[n])

    if settle:
        outcomes = [d["outcome"] for d in report["disconnected"]]
        assert outcomes == ["disconnected"] * 10, report["disconnected"]
        for sid, n in fleet.sessions.items():
            assert fleet.holders(sid) == [fleet.instances[n].name]
        # Only the extra copies were deleted: the kept ones never saw a DELETE.
        for sim in fleet.instances[1:]:
            assert not [e for e in sim.requests() if e["method"] == "DELETE"]
    else:
        assert report["disconnected"] == []
        assert all(len(fleet.holders(sid)) == 2 for sid in doubled)


def test_replicas_follow_the_row_between_two_connected_copies(
    duplicated: DuplicatedFleet,
) -> None:
    """Two connected copies, the row naming one: every replica routes to the row's copy, follows
    the row when it changes, and agrees again when that copy goes away."""
    fleet = duplicated
    replicas = [fleet.proxy(), fleet.proxy()]
    first, _, third = fleet.instances
    sid = next(s for s, n in fleet.sessions.items() if n == 2)  # held by instance-3
    first.add_session(sid)  # a second copy, on the instance whose URL may sort first
    for replica in replicas:
        assert fleet.routed_to(replica, sid) == third.url
    # The row moves to instance-1 (Laravel's webhook from the new copy): every replica follows.
    fleet.db.execute(
        "UPDATE whatsapp_accounts SET assigned_instance_url = $1 WHERE session_id = $2",
        laravel_form(first),
        sid,
    )
    wait_for(
        lambda: all(fleet.routed_to(r, sid) == first.url for r in replicas),
        what="both replicas following the row",
    )
    # The copy the row names disappears: both rediscover, both pick the one left, and the row
    # is corrected.
    first.drop_session(sid)
    assert [fleet.routed_to(r, sid) for r in replicas] == [third.url, third.url]
    wait_for(lambda: stored_owner(fleet.db, sid) == laravel_form(third), what="the row corrected")
