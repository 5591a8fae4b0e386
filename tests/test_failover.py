"""Failover with real processes: owners killed, sessions moved, sends that die half-way.

The rule under test (DESIGN.md's replay table): a request that never reached an instance, or that
the instance refused with "Session not found", is replayed for any method; a request that was sent
before the connection died is replayed only when its method is idempotent (an Idempotency-Key
makes a send happen at most once, not twice), so a message is never sent twice.
"""

from __future__ import annotations

import asyncio
import random
import string
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import API_KEY, Fleet, start_fleet, stop_fleet
from tests.helpers.faults import FaultyHop
from tests.helpers.processes import ProxyProcess, Simulator

SLOW_HEALTH = {"SESSION_PROXY_HEALTH_INTERVAL": "60"}  # only real traffic notices a death


@pytest.fixture
def quiet_fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A fleet whose health checks will not run during the test: failures are found by traffic."""
    running = start_fleet(tmp_path, sessions_per_instance=5, env=SLOW_HEALTH)
    try:
        yield running
    finally:
        stop_fleet(running)


def _send(client: httpx.Client, sid: str, text: str, **headers: str) -> httpx.Response:
    return client.post(
        "/api/messages/send",
        json={"session_id": sid, "api_key": API_KEY, "recipient_phone": "628100", "message": text},
        headers=headers,
    )


def _sessions_of(fleet: Fleet, sim: Simulator) -> list[str]:
    return sorted(sid for sid, owner in fleet.sessions.items() if owner is sim)


def _delivered(fleet: Fleet, text_request_id: str) -> list[str]:
    return [
        sim.name
        for sim in fleet.instances
        for event in sim.events("sent")
        if event.get("request_id") == text_request_id
    ]


def test_owner_sigkilled_and_restored_elsewhere_one_replay_no_error(quiet_fleet: Fleet) -> None:
    fleet = quiet_fleet
    dead, heir = fleet.instances[0], fleet.instances[1]
    sid = _sessions_of(fleet, dead)[0]
    with fleet.client() as client:
        assert _send(client, sid, "before").headers["x-proxy-instance"] == dead.url
        heir.add_session(sid)  # the fleet restores it, as a restart does
        dead.kill()
        r = _send(client, sid, "after", **{"x-request-id": "after-crash"})
    assert r.status_code == 200, r.text
    assert r.json()["success"] is True
    assert r.headers["x-proxy-instance"] == heir.url
    assert r.headers["x-proxy-attempts"] == "2"
    assert _delivered(fleet, "after-crash") == [heir.name]


def test_other_sessions_of_a_dead_owner_go_straight_to_their_new_instance(
    quiet_fleet: Fleet,
) -> None:
    """The refused connection ejected the owner: no more attempts are wasted on it."""
    fleet = quiet_fleet
    dead, heir = fleet.instances[0], fleet.instances[2]
    first, second = _sessions_of(fleet, dead)[:2]
    with fleet.client() as client:
        for sid in (first, second):
            assert _send(client, sid, "warm").status_code == 200
        heir.add_session(first)
        heir.add_session(second)
        dead.kill()
        assert _send(client, first, "x").headers["x-proxy-attempts"] == "2"
        r = _send(client, second, "y")
    assert r.status_code == 200
    assert r.headers["x-proxy-instance"] == heir.url
    assert "x-proxy-attempts" not in r.headers


def test_a_session_moved_between_live_instances_is_followed(quiet_fleet: Fleet) -> None:
    fleet = quiet_fleet
    old, new = fleet.instances[1], fleet.instances[2]
    sid = _sessions_of(fleet, old)[0]
    with fleet.client() as client:
        assert _send(client, sid, "warm").headers["x-proxy-instance"] == old.url
        old.drop_session(sid)
        new.add_session(sid)
        r = _send(client, sid, "moved", **{"x-request-id": "after-move"})
    assert r.status_code == 200, r.text
    assert r.headers["x-proxy-instance"] == new.url
    assert r.headers["x-proxy-attempts"] == "2"
    # The old owner refused it (its own 404), the new one delivered it, once.
    old_saw = [e for e in old.requests() if e.get("request_id") == "after-move"]
    assert [e["status"] for e in old_saw] == [404]
    assert _delivered(fleet, "after-move") == [new.name]


def test_a_send_the_instance_received_before_dying_is_not_replayed(quiet_fleet: Fleet) -> None:
    fleet = quiet_fleet
    dying, holder = fleet.instances[0], fleet.instances[1]
    sid = _sessions_of(fleet, dying)[0]
    with fleet.client() as client:
        assert _send(client, sid, "warm").status_code == 200
        holder.add_session(sid)  # another instance could take it, but must not be asked to
        dying.set_faults(die_on_send=True)
        r = _send(client, sid, "maybe", **{"x-request-id": "ambiguous-1"})
    assert r.status_code == 502
    assert r.headers["x-proxy-error"] == "upstream-ambiguous"
    assert r.json()["code"] == "upstream-ambiguous"
    assert r.headers["x-proxy-attempts"] == "1"
    received = [e for e in dying.events("received") if e.get("request_id") == "ambiguous-1"]
    assert len(received) == 1  # it got there...
    assert _delivered(fleet, "ambiguous-1") == []  # ...and was not sent again anywhere
    assert not [e for e in holder.requests() if e.get("request_id") == "ambiguous-1"]


def test_a_keyed_send_cut_off_is_answered_ambiguous_and_never_sent_twice(
    quiet_fleet: Fleet,
) -> None:
    """The instance dies under the send: it may have sent it. With an Idempotency-Key the
    answer is stored: the client's retry under the same key gets the same 502, not a second
    message, though a live instance holds the session now."""
    fleet = quiet_fleet
    dying, holder = fleet.instances[1], fleet.instances[2]
    sid = _sessions_of(fleet, dying)[0]
    with fleet.client() as client:
        assert _send(client, sid, "warm").status_code == 200
        holder.add_session(sid)
        dying.set_faults(die_on_send=True)
        keyed = {"x-request-id": "keyed-1", "idempotency-key": "order-42"}
        first = _send(client, sid, "keyed", **keyed)
        retry = _send(client, sid, "keyed", **{**keyed, "x-request-id": "keyed-2"})
    assert first.status_code == 502 and first.headers["x-proxy-error"] == "upstream-ambiguous"
    assert retry.status_code == 502 and retry.headers["x-proxy-error"] == "upstream-ambiguous"
    assert retry.headers["x-proxy-idempotent-replay"] == "true"
    assert retry.json() == first.json()
    assert _delivered(fleet, "keyed-1") == [] and _delivered(fleet, "keyed-2") == []
    assert not [e for e in holder.requests() if str(e.get("request_id")).startswith("keyed-")]


@pytest.fixture
def hop_fleet(tmp_path: Path) -> Iterator[tuple[Simulator, Simulator, FaultyHop, ProxyProcess]]:
    """Instance A behind a fault-injecting hop, instance B direct, a proxy in front of both."""
    a = Simulator.start(tmp_path, "a", sessions=["sess_on_a"], api_key=API_KEY)
    b = Simulator.start(tmp_path, "b", api_key=API_KEY)
    hop = FaultyHop(a.port).start()
    proxy = ProxyProcess.start(
        tmp_path,
        {
            "SESSION_PROXY_INSTANCES": f"{hop.url},{b.url}",
            "SESSION_PROXY_API_KEY": API_KEY,
            "SESSION_PROXY_ROUTE_TIMEOUTS": "/=1.5",
            "SESSION_PROXY_DISCOVERY_TIMEOUT": "1",
            **SLOW_HEALTH,
        },
        ready_path="/readyz",
    )
    try:
        yield a, b, hop, proxy
    finally:
        proxy.stop()
        hop.stop()
        a.stop()
        b.stop()


def _client(proxy: ProxyProcess) -> httpx.Client:
    return httpx.Client(base_url=proxy.url, trust_env=False, timeout=30.0)


def test_a_get_cut_off_by_a_reset_is_replayed(hop_fleet: tuple[Simulator, ...]) -> None:
    _a, b, hop, proxy = hop_fleet  # type: ignore[misc]
    with _client(proxy) as client:
        warm = client.get("/api/sessions/sess_on_a/status", params={"api_key": API_KEY})
        assert warm.headers["x-proxy-instance"] == hop.url
        b.add_session("sess_on_a")
        hop.set_mode("reset_after_request")
        r = client.get("/api/sessions/sess_on_a/status", params={"api_key": API_KEY})
    assert r.status_code == 200, r.text
    assert r.headers["x-proxy-instance"] == b.url
    assert r.headers["x-proxy-attempts"] == "2"


def test_a_post_cut_off_by_a_reset_is_ambiguous(hop_fleet: tuple[Simulator, ...]) -> None:
    a, b, hop, proxy = hop_fleet  # type: ignore[misc]
    with _client(proxy) as client:
        assert client.get("/api/sessions/sess_on_a/status", params={"api_key": API_KEY}).is_success
        b.add_session("sess_on_a")
        hop.set_mode("reset_after_request")
        r = client.post(
            "/api/messages/send",
            json={
                "session_id": "sess_on_a",
                "api_key": API_KEY,
                "recipient_phone": "1",
                "message": "m",
            },
            headers={"x-request-id": "reset-post"},
        )
    assert r.status_code == 502
    assert r.headers["x-proxy-error"] == "upstream-ambiguous"
    # A really sent it (the hop forwarded the request); B was never asked to send it again.
    assert [e["request_id"] for e in a.events("sent")] == ["reset-post"]
    assert b.events("sent") == []


def test_a_post_that_gets_no_answer_in_time_is_a_timeout_not_a_replay(
    hop_fleet: tuple[Simulator, ...],
) -> None:
    _a, _b, hop, proxy = hop_fleet  # type: ignore[misc]
    with _client(proxy) as client:
        assert client.get("/api/sessions/sess_on_a/status", params={"api_key": API_KEY}).is_success
        hop.set_mode("stall")
        started = time.monotonic()
        r = client.post(
            "/api/messages/send",
            json={
                "session_id": "sess_on_a",
                "api_key": API_KEY,
                "recipient_phone": "1",
                "message": "m",
            },
        )
        elapsed = time.monotonic() - started
    assert r.status_code == 504
    assert r.headers["x-proxy-error"] == "upstream-timeout"
    assert 1.4 < elapsed < 5


def test_a_streamed_body_is_never_replayed(hop_fleet: tuple[Simulator, ...]) -> None:
    """PUT is idempotent, but a body over the replay buffer is gone once sent."""
    _a, b, hop, proxy = hop_fleet  # type: ignore[misc]
    big = {"api_key": API_KEY, "updates": {"blob": "x" * (2 * 1024 * 1024)}}
    with _client(proxy) as client:
        assert client.get("/api/sessions/sess_on_a/status", params={"api_key": API_KEY}).is_success
        b.add_session("sess_on_a")
        hop.set_mode("reset_after_request")
        r = client.put("/api/sessions/sess_on_a/metadata", json=big)
    assert r.status_code == 502
    assert r.headers["x-proxy-error"] == "upstream-ambiguous"
    assert not [e for e in b.requests() if e["method"] == "PUT"]


def test_with_holding_off_an_unreachable_owner_nobody_replaced_is_upstream_unreachable(
    tmp_path: Path,
) -> None:
    """HOLD_TIMEOUT=0: no waiting for the session to come back (tests/test_hold.py waits)."""
    fleet = start_fleet(
        tmp_path, sessions_per_instance=2, env={**SLOW_HEALTH, "SESSION_PROXY_HOLD_TIMEOUT": "0"}
    )
    try:
        _unreachable_owner_nobody_replaced(fleet)
    finally:
        stop_fleet(fleet)


def _unreachable_owner_nobody_replaced(fleet: Fleet) -> None:
    dead = fleet.instances[2]
    sid = _sessions_of(fleet, dead)[0]
    with fleet.client() as client:
        assert _send(client, sid, "warm").status_code == 200
        dead.kill()
        r = _send(client, sid, "lost")
    assert r.status_code == 502
    assert r.headers["x-proxy-error"] == "upstream-unreachable"
    assert dead.url in r.json()["error"]


def test_no_healthy_instance(quiet_fleet: Fleet) -> None:
    fleet = quiet_fleet
    for sim in fleet.instances:
        sim.kill()
    with fleet.client() as client:
        # The first requests find out; after that every instance is ejected.
        for _ in range(3):
            client.get("/health")
        r = client.post("/api/sessions", json={"session_id": "brand_new", "api_key": API_KEY})
        ready = client.get("/readyz")
    assert r.status_code == 503
    assert r.headers["x-proxy-error"] == "no-healthy-instance"
    assert ready.status_code == 503


def test_a_flood_of_unknown_ids_costs_the_fleet_a_bounded_number_of_probes(
    tmp_path: Path,
) -> None:
    fleet = start_fleet(tmp_path, sessions_per_instance=3)
    try:
        results = asyncio.run(_flood(fleet, 1000))
    finally:
        stop_fleet(fleet)
    statuses, codes, elapsed = results
    probes = sum(
        1
        for sim in fleet.instances
        for e in sim.requests()
        if e["path"].endswith("/status") and e["request_id"] is None
    )
    lists = sum(
        1 for sim in fleet.instances for e in sim.requests() if e["path"] == "/api/sessions"
    )
    print(
        f"\n1000 unknown ids in {elapsed:.2f} s: statuses {statuses}, codes {codes}; "
        f"the fleet saw {probes} status probes and {lists} list calls"
    )
    assert statuses == {404: 1000}
    assert codes == {"session-not-found": 1000}
    # Token bucket: 20 lookups up front plus 20 a second, each asking 3 instances; snapshots at
    # most once a second. Nothing here scales with the number of requests.
    assert probes <= 3 * (20 + 20 * elapsed + 1)
    assert lists <= 3 * (elapsed / 1.0 + 2)
    assert probes + lists < 1000


async def _flood(fleet: Fleet, count: int) -> tuple[dict[int, int], dict[str, int], float]:
    rng = random.Random(7)
    ids = ["".join(rng.choices(string.ascii_letters, k=16)) for _ in range(count)]
    statuses: dict[int, int] = {}
    codes: dict[str, int] = {}
    limit = asyncio.Semaphore(50)
    async with httpx.AsyncClient(base_url=fleet.proxy.url, trust_env=False, timeout=30) as client:

        async def one(sid: str) -> None:
            async with limit:
                r = await client.get(f"/api/sessions/{sid}/status", params={"api_key": API_KEY})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            code = r.headers.get("x-proxy-error", "")
            codes[code] = codes.get(code, 0) + 1

        started = time.monotonic()
        await asyncio.gather(*(one(sid) for sid in ids))
        return statuses, codes, time.monotonic() - started
