"""Postgres stays the truth: lookups only on misses, write-back of moves, NOTIFY coherence
across replicas, and a row pointing outside the instance set never contacted."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import API_KEY
from tests.helpers.postgres import TempDatabase
from tests.helpers.processes import ProxyProcess, Simulator

ROOT = Path(__file__).resolve().parent.parent


def migrate(url: str, *extra: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "migrate", *extra],
        env={"SESSION_PROXY_DATABASE_URL": url, "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def laravel_form(sim: Simulator) -> str:
    """How Laravel stores an instance: what the instance calls itself in its webhooks."""
    return f"http://localhost:{sim.port}"


def add_rows(db: TempDatabase, rows: dict[str, str]) -> None:
    db.execute(
        "INSERT INTO whatsapp_accounts (session_id, assigned_instance_url) "
        "SELECT * FROM unnest($1::text[], $2::text[])",
        list(rows),
        list(rows.values()),
    )


def row(db: TempDatabase, sid: str) -> dict[str, Any]:
    found = db.fetch(
        "SELECT assigned_instance_url, instance_migration_count, last_instance_migration_at "
        "FROM whatsapp_accounts WHERE session_id = $1",
        sid,
    )
    return dict(found[0])


def readiness(proxy: ProxyProcess) -> dict[str, Any]:
    ready: dict[str, Any] = httpx.get(proxy.url + "/readyz", trust_env=False).json()
    return ready


def wait_for(predicate: Any, timeout: float = 10.0, what: str = "condition") -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"{what} not reached within {timeout} s")


class DbFleet:
    def __init__(self, tmp: Path, db: TempDatabase, sessions_per_instance: int = 10) -> None:
        self.db = db
        self.tmp = tmp
        self.instances = [
            Simulator.start(
                tmp,
                f"i{n}",
                sessions=[f"s{n}_{k:04d}" for k in range(sessions_per_instance)],
                api_key=API_KEY,
            )
            for n in range(3)
        ]
        self.owner = {
            f"s{n}_{k:04d}": sim
            for n, sim in enumerate(self.instances)
            for k in range(sessions_per_instance)
        }
        migrate(db.url, "--create-table")
        add_rows(db, {sid: laravel_form(sim) for sid, sim in self.owner.items()})
        self.proxies: list[ProxyProcess] = []

    def proxy(self, **env: str) -> ProxyProcess:
        proxy = ProxyProcess.start(
            self.tmp,
            {
                "SESSION_PROXY_INSTANCES": ",".join(s.url for s in self.instances),
                "SESSION_PROXY_API_KEY": API_KEY,
                "SESSION_PROXY_DATABASE_URL": self.db.url,
                "SESSION_PROXY_HEALTH_INTERVAL": "60",
                "SESSION_PROXY_LOG_LEVEL": "info",
                **env,
            },
            ready_path="/readyz",
        )
        self.proxies.append(proxy)
        wait_for(lambda: readiness(proxy)["database"]["listening"], what="listening")
        return proxy

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.stop()
        for sim in self.instances:
            sim.stop()


@pytest.fixture
def db_fleet(tmp_path: Path, pg_database: TempDatabase) -> Iterator[DbFleet]:
    fleet = DbFleet(tmp_path, pg_database)
    try:
        yield fleet
    finally:
        fleet.close()


def status(proxy: ProxyProcess, sid: str) -> httpx.Response:
    return httpx.get(
        f"{proxy.url}/api/sessions/{sid}/status", params={"api_key": API_KEY}, trust_env=False
    )


def test_steady_state_costs_zero_queries_per_request(db_fleet: DbFleet) -> None:
    proxy = db_fleet.proxy()
    sessions = sorted(db_fleet.owner)
    with httpx.Client(base_url=proxy.url, trust_env=False) as client:
        for sid in sessions:  # each owner learned once, from its row
            r = client.get(f"/api/sessions/{sid}/status", params={"api_key": API_KEY})
            assert r.headers["x-proxy-instance"] == db_fleet.owner[sid].url
        warm = readiness(proxy)["database"]["queries"]
        for n in range(1000):
            sid = sessions[n % len(sessions)]
            r = client.post(
                "/api/messages/send",
                json={
                    "session_id": sid,
                    "api_key": API_KEY,
                    "recipient_phone": "1",
                    "message": "m",
                },
            )
            assert r.status_code == 200
        after = readiness(proxy)["database"]["queries"]
    probes = sum(
        1
        for sim in db_fleet.instances
        for e in sim.requests()
        if e["path"].endswith("/status") and e["request_id"] is None
    )
    print(
        f"\nwarm-up: {warm['lookup']} row lookups for {len(sessions)} sessions; then 1000 sends: "
        f"{after['lookup'] - warm['lookup']} lookups, {after['write'] - warm['write']} writes "
        f"= {(after['lookup'] + after['write'] - warm['lookup'] - warm['write']) / 1000} per "
        f"request; fleet status probes: {probes}"
    )
    assert warm["lookup"] == len(sessions)
    assert after["lookup"] == warm["lookup"]
    assert after["write"] == warm["write"] == 0
    assert probes == 0  # the rows were right: no discovery was needed


def test_a_stale_row_is_followed_then_corrected_in_the_applications_own_form(
    db_fleet: DbFleet,
) -> None:
    proxy = db_fleet.proxy()
    a, b = db_fleet.instances[0], db_fleet.instances[1]
    sid = "s0_0003"
    a.drop_session(sid)
    b.add_session(sid)  # moved; the row still says A
    r = status(proxy, sid)
    assert r.status_code == 200
    assert r.headers["x-proxy-instance"] == b.url
    assert r.headers["x-proxy-attempts"] == "2"
    wait_for(lambda: row(db_fleet.db, sid)["assigned_instance_url"] == laravel_form(b), what="row")
    written = row(db_fleet.db, sid)
    assert written["instance_migration_count"] == 1
    assert written["last_instance_migration_at"] is not None


def test_a_row_pointing_outside_the_instance_set_is_never_used(db_fleet: DbFleet) -> None:
    proxy = db_fleet.proxy()
    a = db_fleet.instances[0]
    sid = "s0_0004"
    db_fleet.db.execute(
        "UPDATE whatsapp_accounts SET assigned_instance_url = 'http://169.254.169.254/' "
        "WHERE session_id = $1",
        sid,
    )
    r = status(proxy, sid)
    assert r.status_code == 200
    assert r.headers["x-proxy-instance"] == a.url
    assert "x-proxy-attempts" not in r.headers
    wait_for(lambda: row(db_fleet.db, sid)["assigned_instance_url"] == laravel_form(a), what="fix")
    assert "database row points outside the instance set" in proxy.log_text()


def test_an_update_by_another_client_reaches_both_replicas_through_notify(
    db_fleet: DbFleet,
) -> None:
    first, second = db_fleet.proxy(), db_fleet.proxy()
    a, c = db_fleet.instances[0], db_fleet.instances[2]
    sid = "s0_0005"
    c.add_session(sid)  # both hold it, so only the row decides where requests go
    for proxy in (first, second):
        assert status(proxy, sid).headers["x-proxy-instance"] == a.url
    # The application (another client) moves the session.
    subprocess.run(
        [
            "psql",
            db_fleet.db.url,
            "-qc",
            f"UPDATE whatsapp_accounts SET assigned_instance_url = '{laravel_form(c)}' "
            f"WHERE session_id = '{sid}'",
        ],
        check=True,
        timeout=30,
    )
    took = [
        wait_for(lambda p=p: status(p, sid).headers["x-proxy-instance"] == c.url, timeout=2.0)
        for p in (first, second)
    ]
    print(f"\nboth replicas followed the UPDATE within {max(took) * 1000:.0f} ms (TTL is 3600 s)")
    assert max(took) < 1.0


def test_readiness_says_whether_the_notify_trigger_is_installed_and_current(
    db_fleet: DbFleet,
) -> None:
    """An operator who forgot `migrate`, or ran an earlier version's, is told so (in /readyz and
    in one warning line) while routing goes on; running `migrate` shows within seconds."""
    db = db_fleet.db
    db.execute("DROP TRIGGER session_proxy_notify ON whatsapp_accounts")
    proxy = db_fleet.proxy()

    def trigger() -> str:
        state: str = readiness(proxy)["database"]["trigger"]
        return state

    wait_for(lambda: trigger() == "missing", what="trigger reported missing")
    assert "run `session-proxy migrate`" in proxy.log_text()
    assert trigger_gauge(proxy) == 0.0  # what SessionProxyNotifyTriggerNotCurrent alerts on
    assert status(proxy, "s0_0000").status_code == 200
    # What `migrate` installed before the proxy's writes notified in batches: no WHEN.
    db.execute(
        "CREATE TRIGGER session_proxy_notify AFTER INSERT OR UPDATE OR DELETE "
        "ON whatsapp_accounts FOR EACH ROW "
        "EXECUTE FUNCTION session_proxy_notify_whatsapp_accounts()"
    )
    wait_for(lambda: trigger() == "outdated", what="trigger reported outdated")
    assert "from an earlier version" in proxy.log_text()
    migrate(db.url)
    wait_for(lambda: trigger() == "current", what="trigger reported current")
    assert trigger_gauge(proxy) == 1.0


def trigger_gauge(proxy: ProxyProcess) -> float:
    text = httpx.get(proxy.url + "/metrics", trust_env=False).text
    (line,) = [x for x in text.splitlines() if x.startswith("session_proxy_notify_trigger_current")]
    return float(line.split()[-1])
