"""Exactly once: a send with an Idempotency-Key is carried out at most once per key.

Real processes: simulator instances (their delivery logs are the truth about what was sent),
the proxy (one or two replicas, restarted where a test says so), Postgres or Redis as the store.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import API_KEY
from tests.helpers.postgres import TempDatabase
from tests.helpers.processes import ProxyProcess, Simulator
from tests.helpers.traffic import post_send
from tests.test_postgres import migrate
from tests.test_scaleout import RedisServer

SID = "webjs_1_1732800000_idem0001"


def send(
    proxy: ProxyProcess, key: str | None, message: str = "hello", session_id: str = SID
) -> httpx.Response:
    return post_send(proxy.url, session_id, message, key, timeout=30)


def deliveries(sims: list[Simulator], key: str) -> int:
    return sum(1 for sim in sims for e in sim.events("sent") if e.get("idempotency_key") == key)


@pytest.fixture
def owner(tmp_path: Path) -> Iterator[Simulator]:
    sim = Simulator.start(tmp_path, "owner", api_key=API_KEY, sessions=[SID], send_delay=0.5)
    try:
        yield sim
    finally:
        sim.stop()


def env_for(sims: list[Simulator], **extra: str) -> dict[str, str]:
    return {
        "SESSION_PROXY_INSTANCES": ",".join(s.url for s in sims),
        "SESSION_PROXY_API_KEY": API_KEY,
        "SESSION_PROXY_HEALTH_INTERVAL": "60",
        **extra,
    }


def test_the_same_key_twice_at_once_then_later_then_with_another_body(
    tmp_path: Path, owner: Simulator
) -> None:
    proxy = ProxyProcess.start(tmp_path, env_for([owner]))
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(send, proxy, "job-1")
            time.sleep(0.1)  # at once, not together: the second while the first takes its 0.5 s
            second = pool.submit(send, proxy, "job-1")
            answers = [first.result(), second.result()]
        assert [a.status_code for a in answers] == [200, 200]
        assert answers[0].json() == answers[1].json()  # the same message id
        # Whichever reached the proxy first was forwarded, the other answered from the store.
        replayed = [a.headers.get("x-proxy-idempotent-replay") for a in answers]
        assert sorted(replayed, key=str) == [None, "true"], replayed
        assert deliveries([owner], "job-1") == 1

        time.sleep(10)  # the "again 10 s later"
        later = send(proxy, "job-1")
        assert later.status_code == 200 and later.json() == answers[0].json()
        assert later.headers["x-proxy-idempotent-replay"] == "true"
        assert later.headers["x-proxy-instance"] == owner.url
        assert deliveries([owner], "job-1") == 1

        other = send(proxy, "job-1", message="another text")
        assert other.status_code == 422
        assert other.headers["x-proxy-error"] == "idempotency-key-mismatch"
        assert deliveries([owner], "job-1") == 1

        # Keys are per session: the same key on another session is another key; no key: no store.
        assert send(proxy, None).status_code == send(proxy, None).status_code == 200
        assert len(owner.events("sent")) == 3
    finally:
        proxy.stop()


def test_an_ambiguous_first_attempt_is_answered_the_same_and_never_sent_again(
    tmp_path: Path,
) -> None:
    dying = Simulator.start(tmp_path, "dying", api_key=API_KEY, sessions=[SID])
    heir = Simulator.start(tmp_path, "heir", api_key=API_KEY)
    proxy = ProxyProcess.start(tmp_path, env_for([dying, heir]))
    try:
        assert send(proxy, None, "warm").status_code == 200
        dying.set_faults(die_on_send=True)  # takes the send, then dies without answering
        heir.add_session(SID)  # the session is back elsewhere: a blind retry would send it
        first = send(proxy, "job-amb")
        assert first.status_code == 502 and first.headers["x-proxy-error"] == "upstream-ambiguous"
        repeats = [send(proxy, "job-amb") for _ in range(3)]
        for repeat in repeats:
            assert repeat.status_code == 502
            assert repeat.headers["x-proxy-error"] == "upstream-ambiguous"
            assert repeat.headers["x-proxy-idempotent-replay"] == "true"
            assert repeat.json() == first.json()
        assert deliveries([heir], "job-amb") == 0  # at most once: the dead one's, if at all
        # The application checks, then resends under a new key: that one goes.
        assert send(proxy, "job-amb-2").status_code == 200
        assert deliveries([heir], "job-amb-2") == 1
    finally:
        proxy.stop()
        heir.stop()


def test_postgres_store_survives_a_proxy_restart_and_is_shared_by_replicas(
    tmp_path: Path, owner: Simulator, pg_database: TempDatabase
) -> None:
    migrate(pg_database.url, "--create-table")
    env = env_for([owner], SESSION_PROXY_DATABASE_URL=pg_database.url)
    proxy = ProxyProcess.start(tmp_path, env, ready_path="/readyz")
    try:
        assert send(proxy, "pg-1").status_code == 200
    finally:
        proxy.stop()
    replicas = [ProxyProcess.start(tmp_path, env, ready_path="/readyz") for _ in range(2)]
    try:
        again = send(replicas[0], "pg-1")
        assert again.status_code == 200
        assert again.headers["x-proxy-idempotent-replay"] == "true"
        assert deliveries([owner], "pg-1") == 1  # the restarted proxy still knew the key
        with ThreadPoolExecutor(2) as pool:
            both = list(pool.map(lambda p: send(p, "pg-2"), replicas))
        assert [a.status_code for a in both] == [200, 200]
        assert both[0].json() == both[1].json()
        assert deliveries([owner], "pg-2") == 1  # a key sent to each replica: once
        rows = pg_database.fetch("SELECT state FROM session_proxy_idempotency")
        assert sorted(r[0] for r in rows) == ["done", "done"]
    finally:
        for replica in replicas:
            replica.stop()


def test_redis_store_is_shared_by_replicas(tmp_path: Path, owner: Simulator) -> None:
    redis = RedisServer(tmp_path).start()
    env = env_for([owner], SESSION_PROXY_CACHE_URL=f"redis://127.0.0.1:{redis.port}/0")
    replicas = [ProxyProcess.start(tmp_path, env) for _ in range(2)]
    try:
        with ThreadPoolExecutor(2) as pool:
            both = list(pool.map(lambda p: send(p, "redis-1"), replicas))
        assert [a.status_code for a in both] == [200, 200]
        assert both[0].json() == both[1].json()
        assert deliveries([owner], "redis-1") == 1
    finally:
        for replica in replicas:
            replica.stop()
        redis.stop()
