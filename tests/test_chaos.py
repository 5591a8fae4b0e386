"""Chaos: a bounded run at a steady rate while instances are killed, restarted and sessions move.

GETs must never fail. A send may fail, but only with an X-Proxy-Error code saying it may or may
not have gone out; no message is ever delivered twice. Sends with an Idempotency-Key are retried
by the client (as a Laravel job would be) with the same key after any failure: still never
delivered twice, and the ones whose first attempt was cut off stay ambiguous (counted). The test
prints its counts.

SESSION_PROXY_TEST_CHAOS_SECONDS sets the length of the traffic: 18 s by default, four kill and
restart cycles (what the assertions check holds per request, whatever the length).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.conftest import API_KEY, Fleet, start_fleet, stop_fleet
from tests.helpers.processes import Simulator

DURATION = float(os.environ.get("SESSION_PROXY_TEST_CHAOS_SECONDS", "18"))  # seconds of traffic
RATE = 40.0  # requests per second
CHAOS_EVERY = 3.0  # seconds between kills


@dataclass
class Tally:
    sent: Counter[str] = field(default_factory=Counter)  # kind -> requests
    ok: Counter[str] = field(default_factory=Counter)
    failed: list[tuple[str, int, str]] = field(default_factory=list)  # kind, status, code
    replayed: int = 0
    ids_by_kind: dict[str, list[str]] = field(default_factory=dict)
    kills: int = 0
    moves: int = 0
    retries: int = 0  # keyed sends sent again by the client under the same key


def test_chaos_run_loses_no_replayable_request_and_sends_nothing_twice(tmp_path: Path) -> None:
    fleet = start_fleet(
        tmp_path,
        count=4,
        sessions_per_instance=10,
        env={
            "SESSION_PROXY_HEALTH_INTERVAL": "0.5",
            "SESSION_PROXY_EJECT_BASE_SECONDS": "0.5",
            "SESSION_PROXY_LOG_LEVEL": "warning",
        },
    )
    try:
        tally = asyncio.run(_run(fleet))
        delivered = Counter(
            event["request_id"] for sim in fleet.instances for event in sim.events("sent")
        )
    finally:
        stop_fleet(fleet)

    plain = tally.ids_by_kind.get("send", [])
    keyed = tally.ids_by_kind.get("send+key", [])
    duplicated_plain = [rid for rid in plain if delivered[rid] > 1]
    duplicated_keyed = [rid for rid in keyed if delivered[rid] > 1]
    failures_by_kind = Counter(kind for kind, _, _ in tally.failed)
    codes = Counter(code for _, _, code in tally.failed)
    print(
        f"\nchaos: {sum(tally.sent.values())} requests in {DURATION:.0f} s "
        f"({dict(tally.sent)}), {tally.kills} kills, {tally.moves} session moves; "
        f"ok {dict(tally.ok)}; failed {dict(failures_by_kind)} with codes {dict(codes)}; "
        f"replayed {tally.replayed}; client retries under the same key {tally.retries}; "
        f"keyed sends left ambiguous {failures_by_kind['send+key']}; delivered twice: plain "
        f"{len(duplicated_plain)}, keyed {len(duplicated_keyed)}"
    )
    # A cycle is the pause, the kill, a third of a pause and the restart.
    assert tally.kills >= DURATION / (CHAOS_EVERY * 1.5) - 1
    assert failures_by_kind["status"] == 0
    assert all(code for _, _, code in tally.failed), "a failure without X-Proxy-Error"
    assert set(codes) <= {"upstream-ambiguous", "upstream-timeout"}
    assert duplicated_plain == [] and duplicated_keyed == []
    assert tally.replayed > 0


async def _run(fleet: Fleet) -> Tally:
    tally = Tally()
    holders: dict[str, set[Simulator]] = {sid: {sim} for sid, sim in fleet.sessions.items()}
    sessions = sorted(holders)
    rng = random.Random(11)
    stop_at = time.monotonic() + DURATION
    async with httpx.AsyncClient(base_url=fleet.proxy.url, trust_env=False, timeout=60) as client:
        chaos = asyncio.create_task(_chaos(fleet, holders, tally, stop_at, rng))
        pending: set[asyncio.Task[None]] = set()
        counter = itertools.count()
        next_at = time.monotonic()
        while time.monotonic() < stop_at:
            n = next(counter)
            kind = ("status", "send", "send+key")[n % 3]
            task = asyncio.create_task(_one(client, kind, rng.choice(sessions), n, tally))
            pending.add(task)
            task.add_done_callback(pending.discard)
            next_at += 1.0 / RATE
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))  # paces the load at RATE
        await asyncio.gather(*pending)
        await chaos
    return tally


async def _one(client: httpx.AsyncClient, kind: str, sid: str, n: int, tally: Tally) -> None:
    rid = f"chaos-{n}"
    tally.sent[kind] += 1
    tally.ids_by_kind.setdefault(kind, []).append(rid)
    headers = {"x-request-id": rid}
    if kind == "status":
        r = await client.get(
            f"/api/sessions/{sid}/status", params={"api_key": API_KEY}, headers=headers
        )
    else:
        body = {"session_id": sid, "api_key": API_KEY, "recipient_phone": "628100", "message": rid}
        if kind == "send+key":
            headers["idempotency-key"] = rid
        r = await client.post("/api/messages/send", json=body, headers=headers)
        for _ in range(3 if kind == "send+key" else 0):
            if r.status_code == 200:
                break
            await asyncio.sleep(0.5)  # the job's retry, under the same key
            tally.retries += 1
            r = await client.post("/api/messages/send", json=body, headers=headers)
    if r.status_code == 200:
        tally.ok[kind] += 1
    else:
        tally.failed.append((kind, r.status_code, r.headers.get("x-proxy-error", "")))
    if "x-proxy-attempts" in r.headers:
        tally.replayed += 1


async def _chaos(
    fleet: Fleet,
    holders: dict[str, set[Simulator]],
    tally: Tally,
    stop_at: float,
    rng: random.Random,
) -> None:
    """Every few seconds: move a victim's sessions to the others (as a restart restores them),
    SIGKILL it, restart it empty a moment later, and move a few sessions onto it."""
    while time.monotonic() + CHAOS_EVERY < stop_at:
        await asyncio.sleep(CHAOS_EVERY)  # paces the kills, on purpose
        victim = rng.choice([s for s in fleet.instances if s.alive])
        others = [s for s in fleet.instances if s is not victim and s.alive]
        for sid, where in holders.items():
            if victim in where:
                heir = rng.choice(others)
                await asyncio.to_thread(heir.add_session, sid)
                where.add(heir)
                where.discard(victim)
                tally.moves += 1
        await asyncio.to_thread(victim.kill)
        tally.kills += 1
        await asyncio.sleep(CHAOS_EVERY / 3)  # on purpose: the victim stays down a moment
        await asyncio.to_thread(victim.restart)
        # Live moves: a session leaves a running instance for the restarted one.
        for sid in rng.sample(sorted(holders), 3):
            where = holders[sid]
            source = next(iter(where))
            await asyncio.to_thread(victim.add_session, sid)
            where.add(victim)
            await asyncio.to_thread(source.drop_session, sid)
            where.discard(source)
            tally.moves += 1
