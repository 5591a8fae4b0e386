"""Scale-out properties with several real replicas (small sizes; ``bench/scaleout.py`` has the
big ones): one reconcile writer however often the leader is killed, an UPDATE of a row reaching
every replica's routing, and a replica's death invisible to the clients of the others.

Robust on a loaded machine: every wait polls until a generous deadline, and nothing asserts a
tight upper bound on a time (the times are printed)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import API_KEY
from tests.helpers.faults import FaultyHop
from tests.helpers.postgres import TempDatabase
from tests.helpers.processes import ProxyProcess, Simulator
from tests.test_postgres import add_rows, migrate

LOCK_KEY = "session-proxy-reconcile:whatsapp_accounts"
LOCK_HOLDERS = """
SELECT a.application_name, l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtext($1)::bigint
"""


def stored(port: int) -> str:
    """How the application's table spells an instance (a loopback alias of the proxy's)."""
    return f"http://localhost:{port}"


def start_replicas(
    tmp: Path, count: int, env: dict[str, str], db: str | None
) -> list[ProxyProcess]:
    def one(n: int) -> ProxyProcess:
        own = dict(env)
        if db is not None:
            # The replica's name on its connections, so pg_stat_activity says who holds a lock.
            own["SESSION_PROXY_DATABASE_URL"] = f"{db}?application_name=replica-{n}"
        return ProxyProcess.start(tmp, own, ready_path="/readyz", start_timeout=60)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = predicate()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.02)


def status(proxy: ProxyProcess, sid: str, client: httpx.Client | None = None) -> httpx.Response:
    target = f"{proxy.url}/api/sessions/{sid}/status"
    if client is not None:
        return client.get(target, params={"api_key": API_KEY})
    return httpx.get(target, params={"api_key": API_KEY}, trust_env=False, timeout=30)


def listening(proxy: ProxyProcess) -> bool:
    ready = httpx.get(proxy.url + "/readyz", trust_env=False, timeout=30).json()
    return bool(ready["database"]["listening"])


def routes_to(proxy: ProxyProcess, sid: str, url: str) -> bool:
    return bool(status(proxy, sid).headers.get("x-proxy-instance") == url)


class LockWatcher:
    """Samples, every 10 ms on a thread of its own, which replicas hold the reconcile lock."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples: list[tuple[float, list[str]]] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            while not self._stop.is_set():
                rows = await conn.fetch(LOCK_HOLDERS, LOCK_KEY)
                self.samples.append((time.time(), [r[0] for r in rows]))
                await asyncio.sleep(0.01)
        except BaseException as exc:  # surfaced by the test
            self.errors.append(exc)
        finally:
            await conn.close()

    def __enter__(self) -> LockWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def holder(self, exclude: set[str], since: int = 0) -> tuple[str, float] | None:
        for t, names in self.samples[since:]:
            for name in names:
                if name not in exclude:
                    return name, t
        return None


def finished_passes(proxy: ProxyProcess, name: str) -> list[tuple[str, float, float]]:
    """(replica, start, end) of each reconcile pass the replica finished, from its log."""
    passes = []
    for line in proxy.log_text().splitlines():
        if '"reconcile finished"' in line:
            entry = json.loads(line)
            passes.append((name, entry["ts"] - entry["seconds"], entry["ts"]))
    return passes


@pytest.fixture
def two_instances(tmp_path: Path) -> Iterator[tuple[Simulator, Simulator]]:
    sims = (
        Simulator.start(tmp_path, "a", sessions=[f"a_{k:03d}" for k in range(20)], api_key=API_KEY),
        Simulator.start(tmp_path, "b", sessions=[f"b_{k:03d}" for k in range(20)], api_key=API_KEY),
    )
    try:
        yield sims
    finally:
        for sim in sims:
            sim.stop()


def test_one_reconcile_writer_while_the_leader_is_killed_twice(
    tmp_path: Path, pg_database: TempDatabase, two_instances: tuple[Simulator, Simulator]
) -> None:
    a, b = two_instances
    # B's answers come 0.4 s late each way, so every pass holds the lock for about a second:
    # long enough to find the holder in pg_locks and kill it mid-pass.
    with FaultyHop(b.port) as slow:
        slow.set_mode("latency", seconds=0.4)
        migrate(pg_database.url, "--create-table")
        add_rows(pg_database, {f"a_{k:03d}": stored(a.port) for k in range(20)})
        add_rows(pg_database, {f"b_{k:03d}": stored(slow.port) for k in range(20)})
        env = {
            "SESSION_PROXY_INSTANCES": f"{a.url},{slow.url}",
            "SESSION_PROXY_API_KEY": API_KEY,
            "SESSION_PROXY_RECONCILE_INTERVAL": "0.5",
            "SESSION_PROXY_HEALTH_INTERVAL": "60",
            "SESSION_PROXY_HEALTH_TIMEOUT": "5",
            "SESSION_PROXY_LOG_LEVEL": "info",
        }
        replicas = start_replicas(tmp_path, 3, env, pg_database.url)
        by_name = {f"replica-{n}": p for n, p in enumerate(replicas)}
        killed: set[str] = set()
        takeovers: list[float] = []
        try:
            with LockWatcher(pg_database.url) as watcher:
                for _ in range(2):
                    since = len(watcher.samples)
                    leader, _ = wait_until(
                        partial(watcher.holder, killed, since), 30, "a lock holder"
                    )
                    by_name[leader].kill()  # SIGKILL, mid-pass
                    killed_at = time.time()
                    killed.add(leader)
                    since = len(watcher.samples)
                    _, taken_at = wait_until(
                        partial(watcher.holder, killed, since), 30, "a new holder"
                    )
                    takeovers.append(taken_at - killed_at)
                # The last replica standing keeps reconciling alone.
                survivor = next(p for n, p in by_name.items() if n not in killed)
                wait_until(
                    lambda: len(finished_passes(survivor, "s")) >= 2, 30, "two finished passes"
                )
            assert not watcher.errors, watcher.errors
            most = max(len(names) for _, names in watcher.samples)
            passes = sorted(
                (p for n, proxy in by_name.items() for p in finished_passes(proxy, n)),
                key=lambda p: p[1],
            )
        finally:
            for proxy in replicas:
                proxy.stop()
    together = [
        (p, q)
        for i, p in enumerate(passes)
        for q in passes[i + 1 :]
        # 0.1 s of slack: a pass's time includes giving the lock back, which the next holder
        # may already have.
        if p[0] != q[0] and q[1] < p[2] - 0.1 and p[1] < q[2] - 0.1
    ]
    print(
        f"\n{len(watcher.samples)} pg_locks samples, at most {most} holder at once; killed "
        f"{sorted(killed)}; taken over after {[round(t, 2) for t in takeovers]} s; "
        f"{len(passes)} finished passes, {len(together)} overlapping"
    )
    assert most == 1
    assert len(takeovers) == 2
    assert not together, together


def test_an_update_of_the_owner_reaches_every_replica(
    tmp_path: Path, pg_database: TempDatabase, two_instances: tuple[Simulator, Simulator]
) -> None:
    a, b = two_instances
    migrate(pg_database.url, "--create-table")
    moved = [f"a_{k:03d}" for k in range(5)]
    add_rows(pg_database, {f"a_{k:03d}": stored(a.port) for k in range(20)})
    for sid in moved:
        b.add_session(sid)  # both hold it: only the row decides where requests go
    env = {
        "SESSION_PROXY_INSTANCES": f"{a.url},{b.url}",
        "SESSION_PROXY_API_KEY": API_KEY,
        "SESSION_PROXY_HEALTH_INTERVAL": "60",
        "SESSION_PROXY_LOG_LEVEL": "warning",
    }
    replicas = start_replicas(tmp_path, 3, env, pg_database.url)
    took: list[float] = []
    try:
        for proxy in replicas:
            wait_until(partial(listening, proxy), 30, "listening")
        for sid in moved:
            for proxy in replicas:
                assert status(proxy, sid).headers["x-proxy-instance"] == a.url
        for sid in moved:
            started = time.monotonic()
            pg_database.execute(
                "UPDATE whatsapp_accounts SET assigned_instance_url = $1 WHERE session_id = $2",
                stored(b.port),
                sid,
            )
            for proxy in replicas:
                wait_until(partial(routes_to, proxy, sid, b.url), 20, f"{proxy} routing {sid} to B")
            took.append(time.monotonic() - started)
        untouched = [status(p, "a_010").headers["x-proxy-instance"] for p in replicas]
    finally:
        for proxy in replicas:
            proxy.stop()
    print(
        f"\n{len(moved)} UPDATEs, each followed by all 3 replicas within "
        f"{[round(t * 1000) for t in took]} ms (TTL 3600 s)"
    )
    assert untouched == [a.url] * 3


def test_a_replica_killed_under_load_is_invisible_to_the_others_clients(
    tmp_path: Path, two_instances: tuple[Simulator, Simulator]
) -> None:
    a, b = two_instances
    sessions = [f"a_{k:03d}" for k in range(20)] + [f"b_{k:03d}" for k in range(20)]
    env = {
        "SESSION_PROXY_INSTANCES": f"{a.url},{b.url}",
        "SESSION_PROXY_API_KEY": API_KEY,
        "SESSION_PROXY_HEALTH_INTERVAL": "60",
        "SESSION_PROXY_LOG_LEVEL": "warning",
    }
    replicas = start_replicas(tmp_path, 3, env, None)
    stop = threading.Event()
    killed_at: list[float] = []
    lock = threading.Lock()
    # (client's home replica, replica asked, finished at, ok, what went wrong)
    results: list[tuple[int, int, float, bool, str]] = []

    def client(home: int, seed: int) -> None:
        target = home
        n = seed
        with httpx.Client(trust_env=False, timeout=30) as http:
            while not stop.is_set():
                sid = sessions[n % len(sessions)]
                n += 7
                try:
                    r = status(replicas[target], sid, http)
                    ok, why = r.status_code == 200, f"HTTP {r.status_code}"
                except httpx.HTTPError as exc:
                    ok, why = False, type(exc).__name__
                with lock:
                    results.append((home, target, time.monotonic(), ok, why))
                if not ok and home == 0:
                    target = (target + 1) % len(replicas)  # a client of the dead one moves on

    threads = [
        threading.Thread(target=client, args=(home, home * 10 + k), daemon=True)
        for home in range(3)
        for k in range(2)
    ]
    try:
        for t in threads:
            t.start()
        time.sleep(2.0)
        killed_at.append(time.monotonic())
        replicas[0].kill()
        # Load goes on until the dead replica's clients have been answered elsewhere for a while.
        wait_until(
            lambda: sum(1 for h, t, at, ok, _ in list(results) if h == 0 and t != 0 and ok) >= 20,
            30,
            "the dead replica's clients answered by another replica",
        )
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(35)
        for proxy in replicas:
            proxy.stop()
    on_survivors = [r for r in results if r[1] != 0]
    failed = [r for r in on_survivors if not r[3]]
    after_kill = [r for r in on_survivors if r[2] > killed_at[0]]
    dead_errors = [r for r in results if r[1] == 0 and not r[3]]
    recovered = min(r[2] for r in results if r[0] == 0 and r[1] != 0 and r[3]) - killed_at[0]
    print(
        f"\n{len(results)} requests; {len(on_survivors)} to the surviving replicas "
        f"({len(after_kill)} after the kill), {len(failed)} failed; the dead replica's clients "
        f"saw {len(dead_errors)} errors from it and were answered elsewhere "
        f"{recovered * 1000:.0f} ms after the kill"
    )
    assert not failed, sorted({r[4] for r in failed})
    assert len(after_kill) >= 20
