"""Per-session pacing (``SEND_RATE``): sends over a session's budget wait in order, bounded.

Real processes (simulator instances, the proxy, a throwaway redis-server) for what a client
sees; in-process tests for the GCRA arithmetic, cancellation and a Redis outage. Deliveries are
read from the instances' own logs (``sent`` events: ``t``, ``session_id``, ``text``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.attempts import StreamedBody
from proxy.config import Settings
from proxy.errors import RateLimited
from proxy.pacing import Pacer, gcra, send_cost
from tests.conftest import API_KEY
from tests.helpers.processes import ProxyProcess, Simulator, free_port
from tests.test_scaleout import RedisServer

SEND = "/api/messages/send"
BULK = "/api/messages/bulk-send"
WAITING = "session_proxy_paced_sends_waiting"


def pacing_proxy(tmp: Path, sims: list[Simulator], **env: str) -> ProxyProcess:
    return ProxyProcess.start(
        tmp,
        {
            "SESSION_PROXY_INSTANCES": ",".join(s.url for s in sims),
            "SESSION_PROXY_API_KEY": API_KEY,
            "SESSION_PROXY_HEALTH_INTERVAL": "0.5",
            "SESSION_PROXY_LOG_LEVEL": "warning",
            **{f"SESSION_PROXY_{k.upper()}": v for k, v in env.items()},
        },
        ready_path="/readyz",
    )


def message(sid: str, text: str) -> dict[str, Any]:
    return {
        "session_id": sid,
        "recipient_phone": "628120001111",
        "message": text,
        "type": "text",
        "api_key": API_KEY,
    }


def client(proxy: ProxyProcess, timeout: float = 30.0) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(base_url=proxy.url, timeout=timeout, limits=limits, trust_env=False)


async def waiting(http: httpx.AsyncClient) -> float:
    """The proxy's gauge of sends waiting for their budget."""
    text = (await http.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == WAITING:
                return float(sample.value)
    return 0.0


async def until_waiting(http: httpx.AsyncClient, count: int) -> None:
    deadline = time.monotonic() + 10.0
    while (now := await waiting(http)) != count:
        assert time.monotonic() < deadline, f"{now:g} sends waiting, expected {count}"
        await asyncio.sleep(0.01)


def delivered(sims: list[Simulator]) -> list[dict[str, Any]]:
    return sorted((e for s in sims for e in s.events("sent")), key=lambda e: float(e["t"]))


def assert_rate_limited(answer: httpx.Response) -> None:
    assert answer.status_code == 429, answer.text
    assert answer.headers["x-proxy-error"] == "rate-limited"
    assert int(answer.headers["retry-after"]) >= 1
    assert answer.json()["code"] == "rate-limited"


# --- the must-show -----------------------------------------------------------------------


async def test_a_thousand_sends_at_50_per_second_leave_each_session_a_second_apart(
    tmp_path: Path,
) -> None:
    """1,000 sends offered at ~50/s over 10 sessions, SEND_RATE=60/min: every session's
    deliveries at least 1.0 s apart (at the instance), none lost, none refused."""
    sessions = [f"webjs_1_1732800000_pace{n:04d}" for n in range(10)]
    sims = [
        Simulator.start(tmp_path, f"i{n}", sessions=sessions[n::2], api_key=API_KEY)
        for n in range(2)
    ]
    proxy = pacing_proxy(
        tmp_path,
        sims,
        send_rate="60/min",
        send_max_wait="150",
        send_queue_max="200",
        max_in_flight_per_client="4096",
        log_level="info",  # the access log says when the proxy received each send
        log_format="json",
    )
    total, offered_gap = 1000, 0.02  # ~50 sends a second, 5 a second per session
    try:
        async with client(proxy, timeout=200.0) as http:
            began = time.monotonic()

            async def one(n: int) -> tuple[int, str]:
                await asyncio.sleep(max(0.0, began + n * offered_gap - time.monotonic()))
                sid = sessions[n % len(sessions)]
                text = f"{sid}/{n // len(sessions)}"
                answer = await http.post(
                    SEND, json=message(sid, text), headers={"x-request-id": text}
                )
                return answer.status_code, answer.text

            answers = await asyncio.gather(*(one(n) for n in range(total)))
            took = time.monotonic() - began
        sent = delivered(sims)
    finally:
        proxy.stop()
        for sim in sims:
            sim.stop()
    refused = [text for status, text in answers if status != 200]
    gaps: dict[str, float] = {}
    by_session: dict[str, list[dict[str, Any]]] = {}
    for event in sent:
        by_session.setdefault(event["session_id"], []).append(event)
    for sid, events in by_session.items():
        times = [float(e["t"]) for e in events]
        gaps[sid] = min(b - a for a, b in itertools.pairwise(times))
    print(
        f"\n{total} sends offered at {1 / offered_gap:.0f}/s over {len(sessions)} sessions, "
        f"SEND_RATE=60/min: {len(sent)} delivered, {len(refused)} non-200, all answered in "
        f"{took:.1f} s; min gap per session (s): "
        + ", ".join(f"…{sid[-4:]} {gap:.4f}" for sid, gap in sorted(gaps.items()))
        + f"; overall min {min(gaps.values()):.4f}"
    )
    assert refused == []
    texts = [e["text"] for e in sent]
    assert len(texts) == total and len(set(texts)) == total  # none lost, each once
    assert sorted(by_session) == sorted(sessions)
    # Order is the order the proxy received them in. Sends on separate connections can reach it
    # out of the order they were offered when this machine is loaded (the client's and the
    # proxy's loops are only scheduled so often; once, after a 0.9 s stall, five sends of one
    # session arrived within 80 ms in a shuffled order), so arrival is read from the proxy's
    # access log: when each request began there (its log time less its duration). Requests that
    # began within ORDER_RESOLUTION of each other came in one burst, and the order in which their
    # bodies were read decides; past that, a send that began first must leave first.
    began = began_at(proxy.log_text())
    late = 0
    for sid, events in by_session.items():
        delivered_texts = [e["text"] for e in events]
        for i, earlier in enumerate(delivered_texts):
            for later in delivered_texts[i + 1 :]:
                assert began[later] + ORDER_RESOLUTION > began[earlier], (
                    f"{later} reached the proxy {began[earlier] - began[later]:.3f} s before "
                    f"{earlier} but left after it"
                )
        numbers = [int(t.rsplit("/", 1)[1]) for t in delivered_texts]
        late += sum(1 for a, b in itertools.pairwise(numbers) if b < a)
        assert gaps[sid] >= 1.0, f"{sid}: two deliveries {gaps[sid]:.4f} s apart"
    print(f"sends delivered after a later-offered one of their session: {late}")


ORDER_RESOLUTION = 0.05  # seconds; offered sends of one session are 0.2 s apart


def began_at(log_text: str) -> dict[str, float]:
    """When each request of the proxy's access log began, by request id (wall clock)."""
    began: dict[str, float] = {}
    for line in log_text.splitlines():
        if '"msg":"request"' in line:
            record = json.loads(line)
            began[record["request_id"]] = float(record["ts"]) - float(record["ms"]) / 1000
    return began


# --- bounds: the queue and the wait --------------------------------------------------------------


@pytest.fixture
def one_instance(tmp_path: Path) -> Iterator[Simulator]:
    sim = Simulator.start(tmp_path, "solo", sessions=["paced_1", "paced_2"], api_key=API_KEY)
    try:
        yield sim
    finally:
        sim.stop()


async def test_only_sends_beyond_a_full_queue_are_refused_and_the_rest_leave_in_order(
    tmp_path: Path, one_instance: Simulator
) -> None:
    proxy = pacing_proxy(tmp_path, [one_instance], send_rate="30/min", send_queue_max="3")
    try:
        async with client(proxy) as http:
            first = await http.post(SEND, json=message("paced_1", "q0"))  # the budget's one send
            assert first.status_code == 200, first.text
            queued: list[asyncio.Task[httpx.Response]] = []
            for n in range(1, 4):  # each in the queue before the next is sent: a defined order
                queued.append(
                    asyncio.create_task(http.post(SEND, json=message("paced_1", f"q{n}")))
                )
                await until_waiting(http, n)
            started = time.monotonic()
            refused = [await http.post(SEND, json=message("paced_1", f"x{n}")) for n in range(4)]
            refused_in = time.monotonic() - started
            assert await waiting(http) == 3  # still full: every refusal met a full queue
            other = await http.post(SEND, json=message("paced_2", "other"))  # its own budget
            answers = await asyncio.gather(*queued)
    finally:
        proxy.stop()
    texts = [e["text"] for e in delivered([one_instance])]
    print(
        f"\nSEND_QUEUE_MAX=3 at 30/min: 1 immediate, 3 queued, 4 refused in {refused_in:.3f} s "
        f"(Retry-After {[r.headers['retry-after'] for r in refused]}); delivered {texts}"
    )
    for answer in refused:
        assert_rate_limited(answer)
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert other.status_code == 200
    assert [t for t in texts if t != "other"] == ["q0", "q1", "q2", "q3"]


async def test_a_send_that_would_wait_past_the_limit_is_refused_at_once(
    tmp_path: Path, one_instance: Simulator
) -> None:
    """SEND_MAX_WAIT=3 at 30/min (2 s apart): the third send would wait 4 s, so it gets 429 at
    once; its refusal reserves nothing, so the next send after that waits one interval only."""
    proxy = pacing_proxy(tmp_path, [one_instance], send_rate="30/min", send_max_wait="3")
    try:
        async with client(proxy) as http:
            assert (await http.post(SEND, json=message("paced_1", "m0"))).status_code == 200
            second = asyncio.create_task(http.post(SEND, json=message("paced_1", "m1")))
            await until_waiting(http, 1)
            started = time.monotonic()
            third = await http.post(SEND, json=message("paced_1", "m2"))
            refused_in = time.monotonic() - started
            assert (await second).status_code == 200
            fourth = await http.post(SEND, json=message("paced_1", "m3"))
    finally:
        proxy.stop()
    sent = {e["text"]: float(e["t"]) for e in delivered([one_instance])}
    print(
        f"\nSEND_MAX_WAIT=3 s, a 4 s wait: 429 in {refused_in:.3f} s, Retry-After "
        f"{third.headers.get('retry-after')}; m0->m1 {sent['m1'] - sent['m0']:.3f} s, "
        f"m1->m3 {sent['m3'] - sent['m1']:.3f} s"
    )
    assert_rate_limited(third)
    assert third.headers["retry-after"] == "1"  # 4 s wanted, 3 allowed
    assert refused_in < 1.0  # not after waiting (it would have waited 4 s)
    assert fourth.status_code == 200
    assert "m2" not in sent
    assert sent["m1"] - sent["m0"] >= 1.9
    assert 1.9 <= sent["m3"] - sent["m1"] < 3.5  # one interval: the refusal took no slot


async def test_a_bulk_send_counts_one_message_per_recipient(
    tmp_path: Path, one_instance: Simulator
) -> None:
    proxy = pacing_proxy(tmp_path, [one_instance], send_rate="60/min")
    bulk = {
        "session_id": "paced_1",
        "recipients": ["628120001111", "628120002222", "628120003333"],
        "message": "bulk",
        "api_key": API_KEY,
    }
    try:
        async with client(proxy) as http:
            answer = await http.post(BULK, json=bulk)
            assert answer.status_code == 200 and answer.json()["successful"] == 3, answer.text
            assert (await http.post(SEND, json=message("paced_1", "after"))).status_code == 200
            assert (await http.post(SEND, json=message("paced_1", "next"))).status_code == 200
    finally:
        proxy.stop()
    sent = delivered([one_instance])
    first_bulk = min(float(e["t"]) for e in sent if e["text"] == "bulk")
    at = {e["text"]: float(e["t"]) for e in sent if e["text"] != "bulk"}
    print(
        f"\nbulk send of 3 at 60/min: the next send {at['after'] - first_bulk:.3f} s after it, "
        f"the one after {at['next'] - at['after']:.3f} s later"
    )
    assert 2.9 <= at["after"] - first_bulk < 3.9  # three intervals, not one
    assert 0.95 <= at["next"] - at["after"] < 1.9


# --- replicas sharing Redis ----------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


async def test_two_replicas_on_redis_share_one_budget(
    tmp_path: Path, one_instance: Simulator, redis_server: RedisServer
) -> None:
    """Two proxies, one Redis, 10/s: 120 sends to one session split across both replicas are
    delivered at the rate (within 5%), not at twice it."""
    env = {
        "send_rate": "10/s",
        "send_max_wait": "30",
        "send_queue_max": "200",
        "cache_url": f"redis://127.0.0.1:{redis_server.port}/0",
    }
    replicas = [pacing_proxy(tmp_path, [one_instance], **env) for _ in range(2)]
    total = 120
    try:
        clients = [client(p, timeout=60.0) for p in replicas]
        began = time.monotonic()

        async def one(n: int) -> int:
            await asyncio.sleep(max(0.0, began + n * 0.005 - time.monotonic()))
            answer = await clients[n % 2].post(SEND, json=message("paced_1", f"r{n}"))
            return answer.status_code

        statuses = await asyncio.gather(*(one(n) for n in range(total)))
        for http in clients:
            await http.aclose()
    finally:
        for proxy in replicas:
            proxy.stop()
    times = [float(e["t"]) for e in delivered([one_instance])]
    span = times[-1] - times[0]
    rate = (len(times) - 1) / span
    gaps = [b - a for a, b in itertools.pairwise(times)]
    print(
        f"\ntwo replicas, one Redis, SEND_RATE=10/s: {len(times)} delivered over {span:.2f} s "
        f"= {rate:.3f}/s ({(rate / 10 - 1) * 100:+.2f}%), gaps min {min(gaps):.4f} s / "
        f"max {max(gaps):.4f} s"
    )
    assert statuses == [200] * total
    assert len(times) == total
    assert abs(rate - 10.0) <= 0.5


# --- in process: the arithmetic, cancellation, Redis going away ----------------------------------


def test_gcra_reserves_a_burst_then_one_slot_per_interval() -> None:
    interval, tolerance = 1.0, 2.0  # SEND_BURST=3
    tat, delays = 0.0, []
    for _ in range(5):
        reserved, delay, tat = gcra(tat, 100.0, interval, tolerance, max_wait=10.0)
        assert reserved
        delays.append(delay)
    assert delays == [0.0, 0.0, 0.0, 1.0, 2.0]
    assert tat == 105.0
    # Too long a wait: refused, the budget untouched; the refusal says by how much.
    reserved, delay, after = gcra(tat, 100.0, interval, tolerance, max_wait=2.5)
    assert (reserved, delay, after) == (False, 3.0, 105.0)
    # An idle session has its whole budget again; a bulk of 3 moves it by three intervals.
    assert gcra(105.0, 200.0, 3 * interval, 0.0, 10.0) == (True, 0.0, 203.0)
    assert gcra(203.0, 200.0, interval, 0.0, 10.0) == (True, 3.0, 204.0)


def test_a_send_costs_its_recipients_and_at_least_one() -> None:
    assert send_cost(b'{"session_id":"s","recipients":["1","2","3"]}') == 3
    assert send_cost(b'{"session_id":"s","recipients":[]}') == 1
    assert send_cost(b'{"session_id":"s","recipients":"1,2"}') == 1
    assert send_cost(b'{"session_id":"s","message":"hi"}') == 1
    assert send_cost(b"not json") == 1

    async def nothing() -> Any:
        yield b""

    assert send_cost(StreamedBody(b"{", nothing())) == 1


def pacer(**values: Any) -> Pacer:
    return Pacer(Settings(**values))


async def test_sends_leave_in_order_and_a_cancelled_one_gives_way() -> None:
    """10/s in process: five sends wait in order; the third is cancelled while it waits (the
    ones behind it keep their slots, its slot stays a gap); the last one is cancelled too, and
    as nobody reserved after it, its slot is given back to the next arrival."""
    paced = pacer(send_rate=10.0, send_max_wait=5.0)
    gone: list[tuple[str, float]] = []
    two_gone = asyncio.Event()
    began = time.monotonic()

    async def send(name: str) -> None:
        await paced.wait("POST", SEND, "s1", b'{"session_id":"s1"}')
        gone.append((name, time.monotonic() - began))
        if len(gone) == 2:
            two_gone.set()

    tasks = [asyncio.create_task(send(f"m{n}")) for n in range(5)]
    await two_gone.wait()  # m0 and m1 have gone; m2 waits for its slot at 0.2 s
    tasks[2].cancel()
    tasks[4].cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    # Reserved from m0's moment: m0, m1, m2 (spent, a gap), m3; m4's slot was given back.
    assert abs(paced._sessions["s1"].tat - (began + dict(gone)["m0"]) - 0.4) < 0.005
    await send("late")  # takes m4's slot
    assert [name for name, _ in gone] == ["m0", "m1", "m3", "late"]
    at = dict(gone)
    assert at["m3"] - at["m0"] >= 0.3 and at["late"] - at["m3"] >= 0.1
    # A send that is not paced, and a session of its own, go at once.
    started = time.monotonic()
    await paced.wait("GET", "/api/sessions/s1/status", "s1", b"")
    await paced.wait("POST", SEND, "s2", b'{"session_id":"s2"}')
    assert time.monotonic() - started < 0.05
    await paced.close()


async def test_releases_stay_an_interval_apart_even_when_one_leaves_late() -> None:
    """The next send's slot counts from when the previous one was actually let go."""
    paced = pacer(send_rate=10.0, send_max_wait=5.0)
    await paced.wait("POST", SEND, "s1", b"{}")
    first = time.monotonic()
    loop_blocked = asyncio.create_task(paced.wait("POST", SEND, "s1", b"{}"))
    await asyncio.sleep(0.09)
    time.sleep(0.03)  # noqa: ASYNC251  the event loop is late: the second send leaves ~0.12 s, not 0.1 s
    await loop_blocked
    second = time.monotonic()
    await paced.wait("POST", SEND, "s1", b"{}")
    third = time.monotonic()
    assert second - first >= 0.1
    assert third - second >= 0.1  # not 0.08 (its reserved slot at 0.2 s)
    await paced.close()


async def test_queue_and_wait_bounds_in_process() -> None:
    paced = pacer(send_rate=10.0, send_queue_max=2, send_max_wait=5.0)
    await paced.wait("POST", SEND, "s1", b"{}")
    waiters = [asyncio.create_task(paced.wait("POST", SEND, "s1", b"{}")) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(RateLimited) as full:
        await paced.wait("POST", SEND, "s1", b"{}")
    assert full.value.retry_after == 1
    await asyncio.gather(*waiters)
    short = pacer(send_rate=1.0, send_max_wait=2.5)
    pending = [asyncio.create_task(short.wait("POST", SEND, "s1", b"{}")) for _ in range(3)]
    await asyncio.sleep(0)  # reserved: delays 0, 1 and 2 s
    with pytest.raises(RateLimited) as long:
        await short.wait("POST", SEND, "s1", b"{}")  # would wait 3 s
    assert long.value.retry_after == 1
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    await short.close()
    await paced.close()


async def test_a_redis_outage_falls_back_to_local_pacing_with_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    paced = pacer(send_rate=20.0, cache_url=f"redis://127.0.0.1:{free_port()}/0")
    caplog.set_level(logging.INFO, logger="session_proxy.pacing")
    started = time.monotonic()
    for _ in range(4):
        await paced.wait("POST", SEND, "s1", b"{}")
    took = time.monotonic() - started
    await paced.close()
    warnings = [r for r in caplog.records if "shared pacing (Redis) failed" in r.getMessage()]
    assert len(warnings) == 1
    assert 0.15 <= took < 1.0  # paced all the same: three intervals


async def test_pacers_on_one_redis_share_the_budget_and_refunds(
    redis_server: RedisServer,
) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/0"
    one, two = pacer(send_rate=20.0, cache_url=url), pacer(send_rate=20.0, cache_url=url)
    began = time.monotonic()
    for n in range(10):
        await (one if n % 2 else two).wait("POST", SEND, "s1", b"{}")
    shared = time.monotonic() - began
    assert shared >= 9 * 0.05 - 0.01  # one budget for both, not one each
    await one.close()
    await two.close()
    # A cancelled last reservation is given back in Redis: the next arrival takes its slot.
    one, two = pacer(send_rate=2.0, cache_url=url), pacer(send_rate=2.0, cache_url=url)
    await one.wait("POST", SEND, "s2", b"{}")
    began = time.monotonic()
    doomed = asyncio.create_task(one.wait("POST", SEND, "s2", b"{}"))
    await asyncio.sleep(0.05)
    doomed.cancel()
    await asyncio.gather(doomed, return_exceptions=True)
    await asyncio.sleep(0.05)  # the refund runs in the background
    await two.wait("POST", SEND, "s2", b"{}")
    took = time.monotonic() - began
    assert 0.4 <= took < 0.8  # the given-back slot (0.5 s), not the next one (1 s)
    await one.close()
    await two.close()
