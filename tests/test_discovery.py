"""Discovery on its own: who holds a session, with duplicates, slow instances, the probe budget and
the snapshot fallback (unit tests over httpx's MockTransport)."""

from __future__ import annotations

import asyncio
import time

import httpx

from proxy.client import create_client
from proxy.config import load_settings
from proxy.discovery import DUPLICATE_GRACE, Discovery
from proxy.instances import InstanceSet

URLS = ["http://127.0.0.1:3001", "http://127.0.0.1:3002", "http://127.0.0.1:3003"]
SID = "webjs_1_1732800000_abcdefgh"


class Fleet:
    """What each instance holds (session -> status), and how long each takes to answer."""

    def __init__(self) -> None:
        self.holds: dict[str, dict[str, str]] = {url: {} for url in URLS}
        self.delay: dict[str, float] = dict.fromkeys(URLS, 0.0)
        self.probes: list[str] = []
        self.lists: list[str] = []

    async def handler(self, request: httpx.Request) -> httpx.Response:
        url = f"http://{request.url.host}:{request.url.port}"
        await asyncio.sleep(self.delay[url])
        path = request.url.path
        if path == "/api/sessions":
            self.lists.append(url)
            sessions = [{"session_id": s, "status": st} for s, st in self.holds[url].items()]
            return httpx.Response(200, json={"success": True, "sessions": sessions})
        sid = path.split("/")[3]
        self.probes.append(url)
        if sid in self.holds[url]:
            return httpx.Response(200, json={"session_id": sid, "status": self.holds[url][sid]})
        return httpx.Response(404, json={"error": "Session not found"})


def discovery(fleet: Fleet, **env: str) -> tuple[Discovery, InstanceSet]:
    settings = load_settings(
        {
            "SESSION_PROXY_INSTANCES": ",".join(URLS),
            "SESSION_PROXY_UPSTREAM_CLIENT": "httpx",
            **{f"SESSION_PROXY_{k.upper()}": v for k, v in env.items()},
        }
    )
    instances = InstanceSet(settings)
    client = create_client("httpx", httpx.MockTransport(fleet.handler))
    return Discovery(settings, instances, client), instances


async def test_a_session_on_one_instance_is_found_there() -> None:
    fleet = Fleet()
    fleet.holds[URLS[1]][SID] = "connected"
    found, instances = discovery(fleet)
    located = await found.locate(SID)
    assert located.instance is instances.get(URLS[1])
    assert located.status == "connected" and located.probed and located.complete


async def test_nobody_holding_it_is_a_complete_miss() -> None:
    found, _ = discovery(Fleet())
    located = await found.locate(SID)
    assert located.instance is None and located.complete and located.asked == 3


async def test_two_connected_copies_give_the_same_owner_whichever_answers_first() -> None:
    owners = set()
    for slow in URLS[1:]:
        fleet = Fleet()
        fleet.holds[URLS[1]][SID] = "connected"
        fleet.holds[URLS[2]][SID] = "connected"
        fleet.delay[slow] = DUPLICATE_GRACE / 4  # the other copy answers first
        found, _ = discovery(fleet)
        located = await found.locate(SID)
        assert len(located.holders) == 2
        assert located.instance is not None
        owners.add(located.instance.url)
    assert owners == {URLS[1]}  # the lowest URL, both times


async def test_the_databases_owner_connected_ends_the_round_at_once() -> None:
    fleet = Fleet()
    fleet.holds[URLS[1]][SID] = "connected"
    fleet.holds[URLS[2]][SID] = "connected"
    fleet.delay[URLS[1]] = 1.0  # a slow instance with a copy
    found, instances = discovery(fleet)
    preferred = instances.get(URLS[2])
    started = time.monotonic()
    located = await found.locate(SID, preferred=preferred)
    assert located.instance is preferred
    assert time.monotonic() - started < 0.5  # neither the slow copy nor the grace waited for


async def test_a_slow_instance_is_not_waited_for_past_the_grace() -> None:
    fleet = Fleet()
    fleet.holds[URLS[0]][SID] = "connected"
    fleet.delay[URLS[2]] = 2.0  # holds nothing, answers late
    found, instances = discovery(fleet)
    started = time.monotonic()
    located = await found.locate(SID)
    assert located.instance is instances.get(URLS[0])
    assert time.monotonic() - started < DUPLICATE_GRACE + 0.5


async def test_every_holder_waits_for_every_answer() -> None:
    """A DELETE must reach every copy, including one on a slow instance."""
    fleet = Fleet()
    fleet.holds[URLS[0]][SID] = "connected"
    fleet.holds[URLS[2]][SID] = "qr_scanning"
    fleet.delay[URLS[2]] = DUPLICATE_GRACE * 2
    found, _ = discovery(fleet)
    located = await found.locate(SID, every_holder=True)
    assert sorted(i.url for i, _ in located.holders) == [URLS[0], URLS[2]]


async def test_a_connected_copy_wins_over_one_still_starting() -> None:
    fleet = Fleet()
    fleet.holds[URLS[0]][SID] = "qr_scanning"
    fleet.holds[URLS[2]][SID] = "connected"
    found, instances = discovery(fleet)
    located = await found.locate(SID)
    assert located.instance is instances.get(URLS[2])


async def test_past_the_probe_budget_lookups_share_one_snapshot() -> None:
    fleet = Fleet()
    ids = [f"webjs_1_1732800000_{n:08d}" for n in range(40)]
    for n, sid in enumerate(ids):
        fleet.holds[URLS[n % 3]][sid] = "connected"
    found, _ = discovery(fleet, rediscovery_rate="1")
    located = await asyncio.gather(*(found.locate(sid) for sid in ids))
    assert all(loc.instance is not None for loc in located)
    for n, loc in enumerate(located):
        assert loc.instance is not None and loc.instance.url == URLS[n % 3]
    assert len(fleet.probes) <= 3  # one lookup's worth of probes (the bucket held one token)
    assert sorted(fleet.lists) == sorted(URLS)  # then one round of list calls for the rest
