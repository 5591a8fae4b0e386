"""The Redis-shared routing table across replicas (issue 16, findings 4 and 5), on a real Redis:
replicas that meet a new session at once share one lookup (a lease), and a Redis outage does
not make them learn the sessions they knew again from the fleet."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from proxy import table as table_module
from proxy.table import NEGATIVE, RoutingTable, make_cache
from tests.conftest import API_KEY
from tests.helpers.faults import FaultyHop
from tests.helpers.processes import ProxyProcess, Simulator
from tests.test_scaleout import RedisServer


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


def tables(redis: RedisServer, count: int) -> list[RoutingTable]:
    """``count`` replicas' tables: each its own client of the one Redis."""
    return [RoutingTable(make_cache(f"redis://127.0.0.1:{redis.port}/0")) for _ in range(count)]


async def test_eight_tables_meeting_a_new_session_at_once_run_one_lookup(
    redis: RedisServer,
) -> None:
    replicas = tables(redis, 8)
    calls: list[int] = []

    def lookup_on(n: int, found: str | None) -> Callable[[], Awaitable[str | None]]:
        async def lookup() -> str | None:
            calls.append(n)
            await asyncio.sleep(0.2)  # a probe round over a slow fleet
            if found is None:
                await replicas[n].put_negative("ghost")
            else:
                await replicas[n].put("fresh", found)
            return found

        return lookup

    try:
        answers = await asyncio.gather(
            *(t.single_flight("fresh", lookup_on(n, "http://a:1")) for n, t in enumerate(replicas))
        )
        assert answers == ["http://a:1"] * 8
        assert len(calls) == 1, f"{len(calls)} lookups for one new session"
        assert sum(t.shared_answers for t in replicas) == 7
        # Each replica keeps what it learned this way, for a Redis outage.
        assert [await t.local.get("fresh") for t in replicas] == ["http://a:1"] * 8

        calls.clear()
        unknown = await asyncio.gather(
            *(t.single_flight("ghost", lookup_on(n, None)) for n, t in enumerate(replicas))
        )
        assert unknown == [None] * 8 and len(calls) == 1  # a remembered unknown is shared too
        assert await replicas[0].get("ghost") == NEGATIVE
    finally:
        for t in replicas:
            await t.close()


async def test_a_lease_that_runs_out_lets_the_others_look_it_up_themselves(
    redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder hangs (a replica SIGKILLed mid-lookup leaves its lease behind): the others
    wait no longer than the lease and then look the session up themselves."""
    monkeypatch.setattr(table_module, "LEASE_SECONDS", 0.5)
    holder, waiter = tables(redis, 2)
    stuck = asyncio.Event()

    async def hangs() -> str | None:
        stuck.set()
        await asyncio.sleep(30)
        return None

    async def finds() -> str | None:
        await waiter.put("s1", "http://b:2")
        return "http://b:2"

    hung = asyncio.create_task(holder.single_flight("s1", hangs))
    try:
        await stuck.wait()
        started = time.monotonic()
        assert await waiter.single_flight("s1", finds) == "http://b:2"
        waited = time.monotonic() - started
        assert waiter.lookups == 1 and waiter.shared_answers == 0
        assert 0.4 <= waited < 5.0, waited
    finally:
        hung.cancel()
        for t in (holder, waiter):
            await t.close()


async def test_a_holder_whose_lookup_fails_hands_over_at_once(redis: RedisServer) -> None:
    """A lookup that fails ends its lease: a waiter takes over without waiting it out."""
    holder, waiter = tables(redis, 2)
    started_lookup = asyncio.Event()

    async def fails() -> str | None:
        started_lookup.set()
        await asyncio.sleep(0.1)
        raise LookupError("fleet unreachable")

    async def finds() -> str | None:
        await waiter.put("s2", "http://c:3")
        return "http://c:3"

    failing = asyncio.create_task(holder.single_flight("s2", fails))
    try:
        await started_lookup.wait()
        started = time.monotonic()
        assert await waiter.single_flight("s2", finds) == "http://c:3"
        assert time.monotonic() - started < table_module.LEASE_SECONDS
        with pytest.raises(LookupError):
            await failing
    finally:
        for t in (holder, waiter):
            await t.close()


async def test_redis_dying_while_a_replica_waits_falls_back_to_its_own_lookup(
    redis: RedisServer,
) -> None:
    holder, waiter = tables(redis, 2)
    stuck = asyncio.Event()

    async def hangs() -> str | None:
        stuck.set()
        await asyncio.sleep(30)
        return None

    async def finds() -> str | None:
        return "http://d:4"

    hung = asyncio.create_task(holder.single_flight("s3", hangs))
    try:
        await stuck.wait()
        looking = asyncio.create_task(waiter.single_flight("s3", finds))
        await asyncio.sleep(0.1)  # polling the table key by now
        redis.stop()
        assert await asyncio.wait_for(looking, 5.0) == "http://d:4"
        assert waiter.shared_up is False
    finally:
        hung.cancel()
        for t in (holder, waiter):
            await t.close()


# --- real replicas --------------------------------------------------------------------------------


def probes(sims: list[Simulator]) -> int:
    """Status requests the proxies sent on their own (a client's forwarded one has an id)."""
    return sum(
        1
        for s in sims
        for e in s.requests()
        if e["path"].endswith("/status") and not e["request_id"]
    )


def status(proxy: ProxyProcess, sid: str) -> int:
    return httpx.get(
        f"{proxy.url}/api/sessions/{sid}/status",
        params={"api_key": API_KEY},
        trust_env=False,
        timeout=30,
    ).status_code


def test_four_replicas_meeting_new_sessions_at_once_probe_the_fleet_once(
    tmp_path: Path, redis: RedisServer
) -> None:
    sims = [
        Simulator.start(
            tmp_path, f"i{n}", sessions=[f"new_{n}_{k}" for k in range(3)], api_key=API_KEY
        )
        for n in range(3)
    ]
    # Slow answers (0.3 s a probe), so every replica asks before any lookup has finished.
    hops = [FaultyHop(s.port).start() for s in sims]
    for hop in hops:
        hop.set_mode("latency", seconds=0.3)
    env = {
        "SESSION_PROXY_INSTANCES": ",".join(h.url for h in hops),
        "SESSION_PROXY_API_KEY": API_KEY,
        "SESSION_PROXY_CACHE_URL": f"redis://127.0.0.1:{redis.port}/0",
        "SESSION_PROXY_HEALTH_INTERVAL": "60",
    }
    with ThreadPoolExecutor(max_workers=4) as pool:
        replicas = list(pool.map(lambda _: ProxyProcess.start(tmp_path, env), range(4)))
    try:
        sessions = [f"new_{n}_{k}" for n in range(3) for k in range(3)]
        before = probes(sims)
        with ThreadPoolExecutor(max_workers=len(replicas)) as pool:
            for sid in sessions:
                barrier = threading.Barrier(len(replicas))

                def ask(
                    proxy: ProxyProcess, sid: str = sid, barrier: threading.Barrier = barrier
                ) -> int:
                    barrier.wait()
                    return status(proxy, sid)

                assert list(pool.map(ask, replicas)) == [200] * len(replicas)
        sent = probes(sims) - before
    finally:
        for proxy in replicas:
            proxy.stop()
        for hop in hops:
            hop.stop()
        for sim in sims:
            sim.stop()
    rounds = sent / len(sims)
    print(
        f"\n{len(sessions)} new sessions, each asked on 4 replicas at once: {sent} probes, "
        f"{rounds / len(sessions):.2f} rounds a session"
    )
    assert sent == len(sessions) * len(sims), (
        f"{rounds:.1f} probe rounds for {len(sessions)} sessions"
    )


def test_a_redis_outage_costs_no_probes_for_sessions_already_known(
    tmp_path: Path, redis: RedisServer
) -> None:
    """Sessions learned through Redis (by one replica, read by the other) are still known to
    both when Redis dies under traffic: no new probe round for any of them."""
    sims = [
        Simulator.start(
            tmp_path, f"k{n}", sessions=[f"known_{n}_{k}" for k in range(10)], api_key=API_KEY
        )
        for n in range(2)
    ]
    env = {
        "SESSION_PROXY_INSTANCES": ",".join(s.url for s in sims),
        "SESSION_PROXY_API_KEY": API_KEY,
        "SESSION_PROXY_CACHE_URL": f"redis://127.0.0.1:{redis.port}/0",
        "SESSION_PROXY_HEALTH_INTERVAL": "60",
    }
    first, second = ProxyProcess.start(tmp_path, env), ProxyProcess.start(tmp_path, env)
    sessions = [f"known_{n}_{k}" for n in range(2) for k in range(10)]
    outcomes: list[int] = []
    stop = threading.Event()

    def traffic(proxy: ProxyProcess) -> None:
        with httpx.Client(trust_env=False, timeout=30) as client:
            while not stop.is_set():
                for sid in sessions:
                    r = client.get(
                        f"{proxy.url}/api/sessions/{sid}/status", params={"api_key": API_KEY}
                    )
                    outcomes.append(r.status_code)

    try:
        for sid in sessions[:10]:
            assert status(first, sid) == 200  # the first replica learns half
        for sid in sessions[10:]:
            assert status(second, sid) == 200  # the second the other half
        for sid in sessions:
            assert status(first, sid) == 200 and status(second, sid) == 200  # both read all
        learned = probes(sims)
        threads = [threading.Thread(target=traffic, args=(p,)) for p in (first, second)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        redis.stop()
        time.sleep(3.0)  # past SHARED_RETRY_AFTER: Redis is tried again, and fails again
        stop.set()
        for t in threads:
            t.join(30)
        after = probes(sims) - learned
        logs = first.log_text() + second.log_text()
    finally:
        stop.set()
        first.stop()
        second.stop()
        for sim in sims:
            sim.stop()
    print(f"\n{len(outcomes)} requests across a Redis outage; {after} new probes")
    assert "shared routing table failed" in logs
    assert set(outcomes) == {200}
    assert after == 0, f"{after} probes to re-learn sessions both replicas knew"
