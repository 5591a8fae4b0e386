"""The routing table on its own: expiry on a fake clock, negative entries, single flight, and the
fall-back to the local table when the shared one fails (unit tests; the Redis table is tested
against a real Redis in tests/test_scaleout.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy import table as table_module
from proxy.table import NEGATIVE, LocalTable, RoutingTable


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(table_module.time, "monotonic", fake)
    return fake


async def test_entries_expire_after_their_ttl(clock: FakeClock) -> None:
    routes = RoutingTable(ttl=60.0, negative_ttl=5.0)
    await routes.put("s1", "http://a:1")
    clock.now += 59.9
    assert await routes.get("s1") == "http://a:1"
    clock.now += 0.2
    assert await routes.get("s1") is None


async def test_a_negative_entry_is_short_lived_and_distinct(clock: FakeClock) -> None:
    routes = RoutingTable(ttl=60.0, negative_ttl=5.0)
    await routes.put_negative("ghost")
    assert await routes.get("ghost") == NEGATIVE
    assert await routes.items() == []  # never listed as an owner
    clock.now += 5.1
    assert await routes.get("ghost") is None


async def test_a_negative_ttl_of_zero_remembers_nothing(clock: FakeClock) -> None:
    routes = RoutingTable(ttl=60.0, negative_ttl=0.0)
    await routes.put_negative("ghost")
    assert await routes.get("ghost") is None


async def test_hits_and_misses_are_counted() -> None:
    routes = RoutingTable()
    await routes.put("s1", "http://a:1")
    await routes.get("s1")
    await routes.get("s2")
    assert (routes.hits, routes.misses) == (1, 1)


async def test_expired_entries_are_swept_without_being_read(clock: FakeClock) -> None:
    """A flood of ids asked for once must not stay for ever."""
    local = LocalTable()
    for n in range(1000):
        await local.set(f"s{n}", "http://a:1", ttl=1.0)
    assert len(local) == 1000
    clock.now += table_module.SWEEP_EVERY + 1
    await local.set("fresh", "http://a:1", ttl=60.0)  # a write past the sweep time sweeps
    assert len(local) == 1


async def test_concurrent_misses_share_one_lookup() -> None:
    routes = RoutingTable()
    calls = 0
    release = asyncio.Event()

    async def lookup() -> str | None:
        nonlocal calls
        calls += 1
        await release.wait()
        return "http://a:1"

    waiters = [asyncio.create_task(routes.single_flight("s1", lookup)) for _ in range(50)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*waiters) == ["http://a:1"] * 50
    assert calls == 1


async def test_a_failed_lookup_fails_every_waiter_and_the_next_call_tries_again() -> None:
    routes = RoutingTable()
    calls = 0

    async def failing() -> str | None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        raise LookupError("fleet unreachable")

    waiters = [asyncio.create_task(routes.single_flight("s1", failing)) for _ in range(5)]
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, LookupError) for r in results) and calls == 1

    async def working() -> str | None:
        return "http://b:2"

    assert await routes.single_flight("s1", working) == "http://b:2"


async def test_a_cancelled_owner_of_a_lookup_does_not_cancel_the_others() -> None:
    routes = RoutingTable()
    started = asyncio.Event()

    async def slow() -> str | None:
        started.set()
        await asyncio.sleep(0.05)
        return "http://a:1"

    owner = asyncio.create_task(routes.single_flight("s1", slow))
    await started.wait()
    follower = asyncio.create_task(routes.single_flight("s1", slow))
    await asyncio.sleep(0)
    owner.cancel()
    assert await follower == "http://a:1"  # it looked the session up itself


class BrokenShared:
    """A shared table that fails like a Redis that went away."""

    namespace = "session-proxy"

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.calls = 0

    async def _fail(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        raise self.error

    get = set = delete = clear = _fail

    async def close(self) -> None:
        pass


async def test_a_failing_shared_table_is_answered_locally_then_left_alone(
    clock: FakeClock,
) -> None:
    shared = BrokenShared(ConnectionRefusedError("redis is down"))
    routes = RoutingTable(shared)
    await routes.put("s1", "http://a:1")  # fails over to the local table
    assert routes.shared_up is False
    assert await routes.get("s1") == "http://a:1"
    assert shared.calls == 1  # left alone while it is down: one timeout, not one per request
    clock.now += table_module.SHARED_RETRY_AFTER + 0.1
    assert routes.shared_up is True
    await routes.get("s1")
    assert shared.calls == 2


async def test_a_bug_in_the_shared_table_is_not_hidden_as_an_outage() -> None:
    routes = RoutingTable(BrokenShared(TypeError("a programming error")))
    with pytest.raises(TypeError):
        await routes.put("s1", "http://a:1")


class WorkingShared:
    """A shared table that works until it is told to fail like a Redis that went away."""

    namespace = "session-proxy"

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise ConnectionRefusedError("redis is down")

    async def get(self, key: str) -> str | None:
        self._check()
        return self.values.get(key)

    async def set(self, key: str, value: str, ttl: float | None = None) -> None:
        self._check()
        self.values[key] = value

    async def delete(self, key: str) -> int:
        self._check()
        return 1 if self.values.pop(key, None) is not None else 0

    async def close(self) -> None:
        pass


async def test_owners_outlive_an_outage_of_the_shared_table() -> None:
    """What a replica learned or read while Redis was up, it still knows when Redis dies; a
    forgotten entry is forgotten in both."""
    shared = WorkingShared()
    routes = RoutingTable(shared)
    await routes.put("learned", "http://a:1")
    shared.values["read"] = "http://b:2"  # written by another replica
    assert await routes.get("read") == "http://b:2"
    await routes.put("forgotten", "http://c:3")
    await routes.forget("forgotten")
    shared.down = True
    assert await routes.get("learned") == "http://a:1"
    assert await routes.get("read") == "http://b:2"
    assert await routes.get("forgotten") is None
