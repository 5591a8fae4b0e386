"""Soak: a bounded run at a steady rate with periodic instance kills; memory, file descriptors
and tasks must come back to where they were after warm-up.

SESSION_PROXY_TEST_SOAK_SECONDS sets the length: 45 s by default in the suite, with a kill every
7.5 s (a sixth of the run, at most 15 s: the five kills of the old 90 s default). A leak shows in
proportion to the run's length, so hunting one takes a longer run (the figures in the closing
note come from a 600 s run)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import API_KEY, Fleet, start_fleet, stop_fleet

SOAK = float(os.environ.get("SESSION_PROXY_TEST_SOAK_SECONDS", "45"))
WARM_UP = 15.0
RATE = 100.0
KILL_EVERY = min(15.0, SOAK / 6)
TOKEN = "soak-admin"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_soak_memory_fds_and_tasks_stay_flat(tmp_path: Path) -> None:
    fleet = start_fleet(
        tmp_path,
        count=3,
        sessions_per_instance=30,
        env={
            "SESSION_PROXY_ADMIN_TOKEN": TOKEN,
            "SESSION_PROXY_LOG_LEVEL": "warning",
            "SESSION_PROXY_HEALTH_INTERVAL": "1",
            "SESSION_PROXY_EJECT_BASE_SECONDS": "0.5",
        },
    )
    try:
        report = asyncio.run(_soak(fleet))
    finally:
        stop_fleet(fleet)
    print(
        f"\nsoak {SOAK:.0f} s at {RATE:.0f}/s: {report['requests']} requests {report['outcomes']}, "
        f"{report['kills']} kills; RSS {report['rss_warm']} KiB after warm-up -> "
        f"{report['rss_end']} KiB at the end ({report['rss_growth']:+.1%}); fds "
        f"{report['fds_warm']} -> {report['fds_end']}; tasks {report['tasks_warm']} -> "
        f"{report['tasks_end']}"
    )
    assert report["rss_end"] <= report["rss_warm"] * 1.10
    assert report["fds_end"] <= report["fds_warm"] + 8
    assert report["tasks_end"] <= report["tasks_warm"]
    failed = {k: v for k, v in report["outcomes"].items() if k != 200}
    allowed = {"send 502 upstream-ambiguous", "send 504 upstream-timeout"}
    # (How many a kill cuts off depends on the machine's load; tests/test_restore_chaos.py ties
    # each one to its kill.)
    assert set(failed) <= allowed, failed


async def _soak(fleet: Fleet) -> dict[str, Any]:
    rng = random.Random(3)
    owners = {sid: {sim} for sid, sim in fleet.sessions.items()}
    sessions = sorted(owners)
    outcomes: Counter[int | str] = Counter()
    auth = {"authorization": f"Bearer {TOKEN}"}
    pid = fleet.proxy.proc.pid
    state = {"kills": 0}
    async with httpx.AsyncClient(base_url=fleet.proxy.url, trust_env=False, timeout=30) as client:

        async def stats() -> dict[str, Any]:
            found: dict[str, Any] = (await client.get("/_proxy/stats", headers=auth)).json()
            return found

        async def one(n: int) -> None:
            sid = rng.choice(sessions)
            if n % 2:
                r = await client.get(f"/api/sessions/{sid}/status", params={"api_key": API_KEY})
            else:
                r = await client.post(
                    "/api/messages/send",
                    json={
                        "session_id": sid,
                        "api_key": API_KEY,
                        "recipient_phone": "1",
                        "message": "s",
                    },
                    headers={"idempotency-key": f"soak-{n}"},
                )
            if r.status_code == 200:
                outcomes[200] += 1
            else:
                # Which kind failed and how: only a send cut off by a kill may (it may or may
                # not have gone out; its Idempotency-Key makes the answer stick, not a replay).
                kind = "status" if n % 2 else "send"
                outcomes[f"{kind} {r.status_code} {r.headers.get('x-proxy-error')}"] += 1

        async def chaos(stop_at: float) -> None:
            while time.monotonic() + KILL_EVERY < stop_at:
                await asyncio.sleep(KILL_EVERY)  # paces the kills, on purpose
                victim = rng.choice(fleet.instances)
                others = [s for s in fleet.instances if s is not victim]
                for sid, where in owners.items():
                    if victim in where:
                        heir = rng.choice(others)
                        await asyncio.to_thread(heir.add_session, sid)
                        where.discard(victim)
                        where.add(heir)
                await asyncio.to_thread(victim.kill)
                state["kills"] += 1
                await asyncio.sleep(1)  # on purpose: the victim stays down for a second
                await asyncio.to_thread(victim.restart)

        started = time.monotonic()
        stop_at = started + SOAK
        chaos_task = asyncio.create_task(chaos(stop_at))
        pending: set[asyncio.Task[None]] = set()
        n = 0
        next_at = started
        warm: dict[str, Any] | None = None
        while time.monotonic() < stop_at:
            if warm is None and time.monotonic() - started >= WARM_UP:
                warm = {**await stats(), "rss": rss_kib(pid)}
            task = asyncio.create_task(one(n))
            pending.add(task)
            task.add_done_callback(pending.discard)
            n += 1
            next_at += 1 / RATE
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))  # paces the load at RATE
        await asyncio.gather(*pending)
        await chaos_task
        # Waits out a timeout on purpose: idle pooled connections expire after 4 s, and the end
        # figures are the idle proxy's, not a moment in the tail of the traffic (polling for the
        # asserted bounds would pass on the first moment they held).
        await asyncio.sleep(6)
        end = {**await stats(), "rss": rss_kib(pid)}
    return {
        "requests": n,
        "outcomes": dict(outcomes),
        "kills": state["kills"],
        "rss_warm": warm["rss"],
        "rss_end": end["rss"],
        "rss_growth": end["rss"] / warm["rss"] - 1,
        "fds_warm": warm["open_fds"],
        "fds_end": end["open_fds"],
        "tasks_warm": warm["asyncio_tasks"],
        "tasks_end": end["asyncio_tasks"],
    }
