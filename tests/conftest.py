"""Shared fixtures: a fleet of real simulator processes and a real proxy process in front of it."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.helpers.processes import ProxyProcess, Simulator

API_KEY = "demo-key"


@dataclass
class Fleet:
    instances: list[Simulator]
    proxy: ProxyProcess
    sessions: dict[str, Simulator] = field(default_factory=dict)  # session id -> initial owner

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.proxy.url, trust_env=False, timeout=30.0, **kwargs)  # type: ignore[arg-type]

    def by_url(self, url: str) -> Simulator:
        return next(i for i in self.instances if i.url == url)

    def request_events(self) -> list[dict[str, object]]:
        return [event for sim in self.instances for event in sim.requests()]


def start_fleet(
    tmp: Path,
    count: int = 3,
    sessions_per_instance: int = 10,
    env: dict[str, str] | None = None,
    prefix: str = "webjs_1_1732800000_",
) -> Fleet:
    owned = [[f"{prefix}{n}{k:07d}" for k in range(sessions_per_instance)] for n in range(count)]
    # The instances start side by side: each start is mostly waiting for a fresh interpreter.
    with ThreadPoolExecutor(max_workers=count) as pool:
        starting = [
            pool.submit(Simulator.start, tmp, f"instance-{n + 1}", sessions=ids, api_key=API_KEY)
            for n, ids in enumerate(owned)
        ]
        wait(starting)
    started = [f.result() for f in starting if f.exception() is None]
    failed = next((f.exception() for f in starting if f.exception() is not None), None)
    if failed is not None:
        for sim in started:
            sim.kill()
        raise failed
    instances: list[Simulator] = started
    owners: dict[str, Simulator] = {}
    for sim, ids in zip(instances, owned, strict=True):
        owners.update(dict.fromkeys(ids, sim))
    proxy_env = {
        "SESSION_PROXY_INSTANCES": ",".join(s.url for s in instances),
        "SESSION_PROXY_API_KEY": API_KEY,
        "SESSION_PROXY_HEALTH_INTERVAL": "0.5",
        "SESSION_PROXY_LOG_LEVEL": "warning",
        **(env or {}),
    }
    proxy = ProxyProcess.start(tmp, proxy_env, ready_path="/readyz")
    return Fleet(instances, proxy, owners)


def stop_fleet(fleet: Fleet) -> None:
    """SIGTERM to the proxy and every instance at once, then wait for each (SIGKILL after the
    grace): stopping them one by one paid every process's exit time in turn."""
    children = [fleet.proxy, *fleet.instances]
    for child in children:
        child.terminate()
    for child in children:
        try:
            child.wait()
        except subprocess.TimeoutExpired:
            child.kill()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Three instances holding forty sessions each, and a proxy; shared by one test module."""
    running = start_fleet(tmp_path_factory.mktemp("fleet"), sessions_per_instance=40)
    try:
        yield running
    finally:
        stop_fleet(running)


# Real Postgres for the database tests: a fresh database per test, or a cluster of its own.
from tests.helpers.pg_fixtures import pg_database, throwaway_pg  # noqa: E402, F401
