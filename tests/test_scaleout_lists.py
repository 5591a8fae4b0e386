"""List calls get LIST_TIMEOUT, not the status probe's DISCOVERY_TIMEOUT (issue 16, finding 3):
an instance that takes longer than a probe may to start listing its sessions is not unreachable
to reconcile, snapshots or start polls. Real simulator, real upstream client, a slow hop."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.client import create_client
from proxy.config import load_settings
from proxy.discovery import Discovery
from proxy.errors import ProxyError
from proxy.instances import InstanceSet
from tests.conftest import API_KEY
from tests.helpers.faults import FaultyHop
from tests.helpers.processes import Simulator

SESSIONS = [f"big_{k:05d}" for k in range(2000)]


@pytest.fixture
def slow_instance(tmp_path: Path) -> Iterator[FaultyHop]:
    sim = Simulator.start(tmp_path, "big", sessions=SESSIONS, api_key=API_KEY)
    hop = FaultyHop(sim.port).start()
    hop.set_mode("latency", seconds=0.6)  # every answer starts 0.6 s late (or more)
    try:
        yield hop
    finally:
        hop.stop()
        sim.stop()


def discovery_for(hop: FaultyHop, **env: str) -> Discovery:
    settings = load_settings(
        {
            "SESSION_PROXY_INSTANCES": hop.url,
            "SESSION_PROXY_API_KEY": API_KEY,
            "SESSION_PROXY_DISCOVERY_TIMEOUT": "0.3",
            **{f"SESSION_PROXY_{k.upper()}": v for k, v in env.items()},
        }
    )
    return Discovery(settings, InstanceSet(settings), create_client(settings.upstream_client))


async def test_a_list_slower_than_a_probe_is_still_read(slow_instance: FaultyHop) -> None:
    found = discovery_for(slow_instance)
    instance = next(iter(found._instances.all))
    inventory = await found.inventory()
    assert inventory.failed == {}
    assert len(inventory.sessions[slow_instance.url]) == len(SESSIONS)
    snapshot = await found.snapshot()
    assert snapshot.failed == 0 and len(snapshot.holders) == len(SESSIONS)
    assert len(await found.sessions_on(instance)) == len(SESSIONS)
    # A status probe still gets DISCOVERY_TIMEOUT: the same delay makes it fail.
    with pytest.raises(ProxyError):
        await found.probe(instance, SESSIONS[0])


async def test_list_timeout_is_honoured(slow_instance: FaultyHop) -> None:
    found = discovery_for(slow_instance, list_timeout="0.2")
    inventory = await found.inventory()
    assert slow_instance.url in inventory.failed, inventory.failed
    with pytest.raises(ProxyError):
        await found.sessions_on(next(iter(found._instances.all)))
