"""Scaling out: instances found through DNS, and one routing table shared through Redis."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.app import create_app
from proxy.config import load_settings
from tests.conftest import API_KEY
from tests.helpers.processes import ProxyProcess, Simulator, free_port
from tests.test_operate import samples, value


class FakeDns:
    """An injected resolver: the test decides what the headless Service resolves to."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.asked = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked += 1
        return list(self.addresses)


async def test_dns_changes_add_and_drain_instances(tmp_path: Path) -> None:
    port = free_port()
    sims = {
        host: Simulator.start(
            tmp_path, host, sessions=[f"on_{host[-1]}"], api_key=API_KEY, port=port, host=host
        )
        for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4")
    }
    dns = FakeDns(["127.0.0.2", "127.0.0.3"])
    settings = load_settings(
        {
            "SESSION_PROXY_INSTANCES_DNS": f"gateways.example.svc:{port}",
            "SESSION_PROXY_API_KEY": API_KEY,
            "SESSION_PROXY_HEALTH_INTERVAL": "60",
            "SESSION_PROXY_INSTANCES_DNS_INTERVAL": "60",
        }
    )
    app = create_app(settings, resolver=dns)
    await app.start()
    url = {h: f"http://{h}:{port}" for h in sims}
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://proxy"
        ) as client:

            async def owner(sid: str) -> str:
                r = await client.get(f"/api/sessions/{sid}/status", params={"api_key": API_KEY})
                assert r.status_code == 200, r.text
                return r.headers["x-proxy-instance"]

            assert {i.url for i in app.instances.available()} == {
                url["127.0.0.2"],
                url["127.0.0.3"],
            }
            assert await owner("on_2") == url["127.0.0.2"]
            assert (await client.get("/api/sessions/on_4/status")).status_code == 404

            dns.addresses = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]  # scaled up
            added, _ = await app.dns.refresh()  # type: ignore[union-attr]
            assert [i.url for i in added] == [url["127.0.0.4"]]
            app.table.negative_ttl = 0
            await app.table.forget("on_4")
            assert await owner("on_4") == url["127.0.0.4"]

            assert await owner("on_3") == url["127.0.0.3"]
            dns.addresses = ["127.0.0.2", "127.0.0.4"]  # .3 leaves the Service
            _, drained = await app.dns.refresh()  # type: ignore[union-attr]
            assert [i.url for i in drained] == [url["127.0.0.3"]]
            # Draining: its known sessions are still served, new ones go elsewhere.
            assert await owner("on_3") == url["127.0.0.3"]
            for n in range(4):
                created = await client.post(
                    "/api/sessions", json={"session_id": f"fresh_{n}", "api_key": API_KEY}
                )
                assert created.headers["x-proxy-instance"] != url["127.0.0.3"]
            sims["127.0.0.3"].kill()
            await app.health.check_all()  # the drained instance is gone: it leaves the set
            assert url["127.0.0.3"] not in {i.url for i in app.instances.all}
            print(f"\nDNS asked {dns.asked} times; set now {[i.url for i in app.instances.all]}")
    finally:
        await app.stop()
        for sim in sims.values():
            sim.stop()


def test_dns_with_the_real_resolver(tmp_path: Path) -> None:
    sim = Simulator.start(tmp_path, "real", sessions=["resolved1"], api_key=API_KEY)
    proxy = ProxyProcess.start(
        tmp_path,
        {
            "SESSION_PROXY_INSTANCES_DNS": f"localhost:{sim.port}",
            "SESSION_PROXY_API_KEY": API_KEY,
        },
        ready_path="/readyz",
    )
    try:
        ready = httpx.get(proxy.url + "/readyz", trust_env=False).json()
        r = httpx.get(
            proxy.url + "/api/sessions/resolved1/status",
            params={"api_key": API_KEY},
            trust_env=False,
        )
    finally:
        proxy.stop()
        sim.stop()
    urls = {i["url"] for i in ready["instance_states"]}
    print(f"\nlocalhost resolved to {sorted(urls)}")
    assert sim.url in urls
    assert r.status_code == 200 and r.headers["x-proxy-instance"] == sim.url


class RedisServer:
    """A throwaway redis-server of the test's own, so stopping it harms nobody."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.tmp),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if (
                subprocess.run(
                    ["redis-cli", "-p", str(self.port), "ping"], capture_output=True
                ).stdout.strip()
                == b"PONG"
            ):
                return self
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


def test_two_replicas_share_one_table_and_survive_a_redis_outage(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    sims = [
        Simulator.start(
            tmp_path, f"r{n}", sessions=[f"shared_{n}_{k}" for k in range(5)], api_key=API_KEY
        )
        for n in range(2)
    ]
    env = {
        "SESSION_PROXY_INSTANCES": ",".join(s.url for s in sims),
        "SESSION_PROXY_API_KEY": API_KEY,
        "SESSION_PROXY_CACHE_URL": f"redis://127.0.0.1:{redis_server.port}/0",
        "SESSION_PROXY_HEALTH_INTERVAL": "60",
    }
    first, second = ProxyProcess.start(tmp_path, env), ProxyProcess.start(tmp_path, env)

    def probes() -> int:
        return sum(
            1
            for s in sims
            for e in s.requests()
            if e["path"].endswith("/status") and e["request_id"] is None
        )

    def get(proxy: ProxyProcess, sid: str) -> httpx.Response:
        return httpx.get(
            f"{proxy.url}/api/sessions/{sid}/status", params={"api_key": API_KEY}, trust_env=False
        )

    try:
        sessions = [f"shared_{n}_{k}" for n in range(2) for k in range(5)]
        for sid in sessions:
            assert get(first, sid).status_code == 200  # the first replica learns every owner
        learned = probes()
        for sid in sessions:
            assert get(second, sid).status_code == 200  # the second one knows them already
        assert probes() == learned

        redis_server.stop()
        during = [get(p, sid).status_code for p in (first, second) for sid in sessions]
        ready = httpx.get(first.url + "/readyz", trust_env=False).json()
        found = samples(first.url)
    finally:
        first.stop()
        second.stop()
        for sim in sims:
            sim.stop()
    fallbacks = value(found, "session_proxy_cache_fallbacks_total")
    print(
        f"\n{learned} probes to learn {len(sessions)} owners on one replica, 0 more on the "
        f"other; with Redis down: statuses {sorted(set(during))}, fallbacks {fallbacks:.0f}"
    )
    assert set(during) == {200}
    assert ready["ready"] is True and ready["shared_table"]["up"] is False
    assert fallbacks >= 1
    assert "shared routing table failed" in first.log_text()
