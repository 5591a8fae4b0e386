"""Held requests: a session whose owner died waits, in order, until it is back; bounded.

Real processes: simulator instances, a Laravel stand-in for the start-up restore, the proxy.
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

from proxy.config import Settings
from proxy.hold import Holds
from proxy.instances import Instance
from tests.conftest import API_KEY
from tests.helpers.laravel import LaravelStandIn
from tests.helpers.postgres import TempDatabase
from tests.helpers.processes import ProxyProcess, Simulator
from tests.test_postgres import add_rows, laravel_form, migrate

SID = "webjs_1_1732800000_held0001"


def send(proxy: ProxyProcess, text: str) -> tuple[int, str, float, dict[str, str]]:
    started = time.monotonic()
    answer = httpx.post(
        f"{proxy.url}/api/messages/send",
        json={
            "session_id": SID,
            "workspace_id": 1,
            "recipient_phone": "628120001111",
            "message": text,
            "type": "text",
            "api_key": API_KEY,
        },
        headers={"x-request-id": text},  # the instance's "sent" events carry it
        timeout=40,
        trust_env=False,
    )
    return answer.status_code, answer.text, time.monotonic() - started, dict(answer.headers)


class HeldFleet:
    def __init__(self, tmp: Path, **env: str) -> None:
        self.laravel = LaravelStandIn([{"session_id": SID, "workspace_id": 1, "id": 7}]).start()
        # The owner restores its own sessions when it starts (as a real instance does), taking a
        # second to connect; the other instance holds nothing.
        self.owner = Simulator.start(
            tmp,
            "owner",
            sessions=[SID],
            api_key=API_KEY,
            connect_delay=1.0,
            laravel_url=self.laravel.url,
        )
        self.other = Simulator.start(tmp, "other", api_key=API_KEY)
        self.proxy = ProxyProcess.start(
            tmp,
            {
                "SESSION_PROXY_INSTANCES": f"{self.owner.url},{self.other.url}",
                "SESSION_PROXY_API_KEY": API_KEY,
                "SESSION_PROXY_HEALTH_INTERVAL": "0.5",
                "SESSION_PROXY_LOG_LEVEL": "info",
                **env,
            },
            ready_path="/readyz",
        )
        status, text, _, _ = send(self.proxy, "warm")
        assert status == 200, text

    def close(self) -> None:
        self.proxy.stop()
        for sim in (self.owner, self.other):
            sim.stop()
        self.laravel.stop()


@pytest.fixture
def held_fleet(tmp_path: Path) -> Iterator[HeldFleet]:
    fleet = HeldFleet(tmp_path)
    try:
        yield fleet
    finally:
        fleet.close()


def test_sends_during_an_owner_restart_are_held_and_delivered_once_in_order(
    held_fleet: HeldFleet,
) -> None:
    """Without RESTORE: the owner is SIGKILLed and started again 3 s later, restoring its own
    sessions; every send in the gap answers 200 after the restart, not 502."""
    fleet = held_fleet
    fleet.owner.kill()
    killed_at = time.monotonic()
    texts = [f"seq-{n}" for n in range(6)]
    with ThreadPoolExecutor(len(texts)) as pool:
        futures = []
        for text in texts:
            futures.append(pool.submit(send, fleet.proxy, text))
            time.sleep(0.3)  # arrival order is the order they are sent in
        time.sleep(max(0.0, 3.0 - (time.monotonic() - killed_at)))
        fleet.owner.restart()
        restarted_at = time.monotonic()
        results = [f.result() for f in futures]
    for status, text, _, _ in results:
        assert status == 200, text
    delivered = [e for e in fleet.owner.events("sent") if str(e["request_id"]).startswith("seq-")]
    sent_texts = [e["request_id"] for e in delivered]
    assert sent_texts == texts, sent_texts  # each once, in the order sent
    assert fleet.other.events("sent") == []
    held = sorted(elapsed for _, _, elapsed, _ in results)
    connected_after = restarted_at - killed_at + 1.0
    print(
        f"\nheld {len(held)} sends: {held[0]:.2f}-{held[-1]:.2f} s; the owner was back "
        f"(restarted, then connected after its 1 s) about {connected_after:.1f} s after the kill"
    )
    # Nothing waited much past the session's return.
    assert held[-1] < connected_after + 2.0


def test_a_session_that_does_not_come_back_is_503_session_restoring_then_fails_fast(
    tmp_path: Path,
) -> None:
    fleet = HeldFleet(tmp_path, SESSION_PROXY_HOLD_TIMEOUT="1", SESSION_PROXY_HOLD_FAIL_FAST="5")
    try:
        fleet.owner.kill()
        status, text, elapsed, headers = send(fleet.proxy, "never")
        assert status == 503, text
        assert headers["x-proxy-error"] == "session-restoring"
        assert int(headers["retry-after"]) >= 1
        assert 1.0 <= elapsed < 5.0
        # The next one does not wait again.
        status, _, elapsed, headers = send(fleet.proxy, "never again")
        assert status == 503 and headers["x-proxy-error"] == "session-restoring"
        assert elapsed < 0.5
        assert fleet.other.events("sent") == []
    finally:
        fleet.close()


def test_the_per_session_bound_refuses_at_once(tmp_path: Path) -> None:
    fleet = HeldFleet(
        tmp_path, SESSION_PROXY_HOLD_TIMEOUT="3", SESSION_PROXY_HOLD_MAX_PER_SESSION="2"
    )
    try:
        fleet.owner.kill()
        with ThreadPoolExecutor(3) as pool:
            waiting = [pool.submit(send, fleet.proxy, f"w{n}") for n in range(2)]
            time.sleep(0.5)  # the two are held by now
            status, text, elapsed, headers = send(fleet.proxy, "third")
            assert status == 503, text
            assert headers["x-proxy-error"] == "session-restoring" and elapsed < 0.5
            assert [f.result()[0] for f in waiting] == [503, 503]  # the owner never came back
    finally:
        fleet.close()


def test_an_active_row_nobody_holds_is_held_a_logged_out_one_is_not(
    tmp_path: Path, pg_database: TempDatabase
) -> None:
    """After a proxy restart nothing is in its table: the database row says which sessions the
    application expects to run."""
    active, logged_out = "webjs_1_1732800000_rowactiv", "webjs_1_1732800000_rowgone0"
    sim = Simulator.start(tmp_path, "empty", api_key=API_KEY)
    migrate(pg_database.url, "--create-table")
    add_rows(pg_database, {active: laravel_form(sim), logged_out: laravel_form(sim)})
    pg_database.execute(
        "UPDATE whatsapp_accounts SET status = 'disconnected' WHERE session_id = $1", logged_out
    )
    proxy = ProxyProcess.start(
        tmp_path,
        {
            "SESSION_PROXY_INSTANCES": sim.url,
            "SESSION_PROXY_API_KEY": API_KEY,
            "SESSION_PROXY_DATABASE_URL": pg_database.url,
            "SESSION_PROXY_HOLD_TIMEOUT": "10",
        },
        ready_path="/readyz",
    )
    try:

        def status_of(sid: str) -> tuple[int, float]:
            started = time.monotonic()
            answer = httpx.get(
                f"{proxy.url}/api/sessions/{sid}/status",
                params={"api_key": API_KEY},
                timeout=20,
                trust_env=False,
            )
            return answer.status_code, time.monotonic() - started

        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(status_of, active)
            time.sleep(1.0)  # held meanwhile; then the session starts on the instance
            sim.add_session(active)
            code, elapsed = waiting.result()
        assert code == 200 and 1.0 <= elapsed < 3.0
        code, elapsed = status_of(logged_out)
        assert code == 404 and elapsed < 1.0  # not expected to run: not held
    finally:
        proxy.stop()
        sim.stop()


# --- pause and release (a move), arrival (a restore): the queue alone, in one process ----------


def _holds(find_result: list[Instance | None], **settings: Any) -> Holds:
    async def find(_session_id: str) -> Instance | None:
        return find_result[0]

    return Holds(Settings(hold_poll_interval=0.01, **settings), find)


def test_a_paused_session_waits_for_release_even_when_found_connected() -> None:
    source, target = Instance("http://127.0.0.1:1"), Instance("http://127.0.0.1:2")

    async def main() -> list[str]:
        holds = _holds([source])  # the watcher would find it on the source: it must not look
        holds.pause(SID)
        order: list[str] = []

        async def held(name: str) -> None:
            async with holds.turn(SID, 10) as owner:
                order.append(f"{name}->{owner.url}")
                await asyncio.sleep(0.01)

        waiting = [asyncio.create_task(held(f"r{n}")) for n in range(3)]
        await asyncio.sleep(0.1)
        assert order == [] and holds.queued(SID)
        holds.release(SID, target)
        await asyncio.gather(*waiting)
        assert not holds.queued(SID)  # closed once the last one went
        return order

    assert asyncio.run(main()) == [f"r{n}->{target.url}" for n in range(3)]


def test_a_pause_with_nobody_waiting_stays_until_released() -> None:
    async def main() -> None:
        holds = _holds([None])
        holds.pause(SID)
        await asyncio.sleep(0.05)
        assert holds.queued(SID)  # a request arriving now must queue
        holds.release(SID, None)
        assert not holds.queued(SID)

    asyncio.run(main())


def test_arrival_releases_at_once_without_waiting_for_the_watcher() -> None:
    owner = Instance("http://127.0.0.1:3")

    async def main() -> float:
        holds = _holds([None], hold_timeout=5.0)
        got: list[float] = []

        async def held() -> None:
            async with holds.turn(SID, 1) as instance:
                assert instance is owner
                got.append(time.monotonic())

        task = asyncio.create_task(held())
        await asyncio.sleep(0.05)
        arrived = time.monotonic()
        holds.arrived(SID, owner)
        await task
        return got[0] - arrived

    assert asyncio.run(main()) < 0.01


def test_a_send_to_a_session_still_starting_is_held_until_it_is_connected(
    tmp_path: Path, pg_database: TempDatabase
) -> None:
    """The instance restores its sessions at start, each taking 8 s to connect (long enough for
    the proxy to start beside it on a loaded machine, before the session connects); meanwhile it
    answers sends `400 Session not connected`. With the row active, the send waits instead."""
    laravel = LaravelStandIn([{"session_id": SID, "workspace_id": 1, "id": 7}]).start()
    owner = Simulator.start(
        tmp_path, "starting", api_key=API_KEY, connect_delay=8.0, laravel_url=laravel.url
    )
    migrate(pg_database.url, "--create-table")
    add_rows(pg_database, {SID: laravel_form(owner)})
    proxy = ProxyProcess.start(
        tmp_path,
        {
            "SESSION_PROXY_INSTANCES": owner.url,
            "SESSION_PROXY_API_KEY": API_KEY,
            "SESSION_PROXY_DATABASE_URL": pg_database.url,
        },
        ready_path="/readyz",
    )
    try:
        owner.restored()  # its start-up restore ran: the session is starting
        direct = httpx.post(
            f"{owner.url}/api/messages/send",
            json={
                "session_id": SID,
                "recipient_phone": "628120001111",
                "message": "x",
                "api_key": API_KEY,
            },
            trust_env=False,
        )
        assert direct.status_code == 400 and "not connected" in direct.text  # what it says
        status, text, elapsed, _ = send(proxy, "while-starting")
        assert status == 200, text
        assert 0.3 < elapsed < 12.0
        delivered = [e["request_id"] for e in owner.events("sent")]
        assert delivered == ["while-starting"]
        # Nobody expects a session without an active row (one waiting for its first QR scan,
        # started on the instance directly): its 400 comes back at once.
        other = "webjs_1_1732800000_fresh001"
        created = httpx.post(
            f"{owner.url}/api/sessions",
            json={"session_id": other, "workspace_id": 1, "api_key": API_KEY},
            trust_env=False,
        )
        assert created.status_code == 200
        started = time.monotonic()
        answer = httpx.post(
            f"{proxy.url}/api/messages/send",
            json={
                "session_id": other,
                "recipient_phone": "628120001111",
                "message": "y",
                "api_key": API_KEY,
            },
            trust_env=False,
        )
        assert answer.status_code == 400 and "not connected" in answer.text
        assert time.monotonic() - started < 1.0
    finally:
        proxy.stop()
        owner.stop()
        laravel.stop()
