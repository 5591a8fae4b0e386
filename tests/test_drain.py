"""Drain and rebalance: sessions moved between instances, break before make, under load.

Real processes: simulator instances sharing session state (any instance can start any session),
the proxy, the ``session-proxy drain`` CLI.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import API_KEY
from tests.helpers.processes import ProxyProcess, Simulator, child_env
from tests.helpers.traffic import wait_for
from tests.test_restore import TOKEN, holders, send, sid

AUTH = {"authorization": f"Bearer {TOKEN}"}


def env_for(sims: list[Simulator], **extra: str) -> dict[str, str]:
    return {
        "SESSION_PROXY_INSTANCES": ",".join(s.url for s in sims),
        "SESSION_PROXY_API_KEY": API_KEY,
        "SESSION_PROXY_ADMIN_TOKEN": TOKEN,
        "SESSION_PROXY_HEALTH_INTERVAL": "0.5",
        "SESSION_PROXY_LOG_LEVEL": "info",
        **extra,
    }


def instance_states(proxy: ProxyProcess) -> dict[str, dict[str, Any]]:
    answer = httpx.get(f"{proxy.url}/_proxy/instances", headers=AUTH, trust_env=False)
    assert answer.status_code == 200, answer.text
    return {i["url"]: i for i in answer.json()["instances"]}


class Senders:
    """Threads sending to every session in turn until stopped; every answer is kept."""

    def __init__(self, proxy: ProxyProcess, ids: list[str], threads: int) -> None:
        self.proxy = proxy
        self.ids = ids
        self.results: list[tuple[str, int, str, float]] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(n, threads)) for n in range(threads)
        ]
        self._lock = threading.Lock()

    def _run(self, offset: int, step: int) -> None:
        n = offset
        while not self._stop.is_set() and len(self.results) < 20_000:
            session_id = self.ids[n % len(self.ids)]
            text = f"{session_id}:{n}"
            status, body, elapsed = send(self.proxy, session_id, text)
            with self._lock:
                self.results.append((text, status, body, elapsed))
            n += step

    def __enter__(self) -> Senders:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def test_drain_under_load_moves_every_session_with_no_error(tmp_path: Path) -> None:
    ids = [sid(n) for n in range(50)]
    source = Simulator.start(tmp_path, "source", api_key=API_KEY, sessions=ids)
    targets = [
        Simulator.start(tmp_path, f"target{n}", api_key=API_KEY, connect_delay=0.3)
        for n in range(2)
    ]
    fleet = [source, *targets]
    proxy = ProxyProcess.start(tmp_path, env_for(fleet), ready_path="/readyz")
    try:
        with Senders(proxy, ids, threads=6) as senders:
            time.sleep(1.0)  # flowing before the drain
            started = time.monotonic()
            drained = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "proxy",
                    "drain",
                    source.url,
                    "--wait",
                    "120",
                    "--url",
                    proxy.url,
                    "--admin-token",
                    TOKEN,
                ],
                capture_output=True,
                text=True,
                timeout=150,
                env=child_env(),
            )
            took = time.monotonic() - started
            time.sleep(1.0)  # and flowing after it
        assert drained.returncode == 0, drained.stdout + drained.stderr
        errors = [r for r in senders.results if r[1] != 200]
        assert errors == [], errors[:5]
        sent_texts = [e["text"] for sim in fleet for e in sim.events("sent")]
        assert len(sent_texts) == len(set(sent_texts)) == len(senders.results)  # each once
        for session_id in ids:
            found = holders(fleet, session_id)
            assert len(found) == 1 and found[0][0] != "source", (session_id, found)
        assert holders([source], ids[0]) == []
        assert (
            httpx.get(
                f"{source.url}/api/sessions", params={"api_key": API_KEY}, trust_env=False
            ).json()["sessions"]
            == []
        )
        state = instance_states(proxy)[source.url]
        assert state["state"] == "drained"
        assert (state["drain"]["moved"], state["drain"]["failed"]) == (50, 0), state
        assert state["drain"]["remaining"] == 0
        held = sorted(r[3] for r in senders.results)
        print(
            f"\ndrained 50 sessions in {took:.2f} s ({state['drain']['seconds']} s in the proxy) "
            f"with {len(senders.results)} sends flowing: 0 errors, each delivered once; "
            f"send latency p50 {held[len(held) // 2] * 1000:.0f} ms, max {held[-1]:.2f} s"
        )
        # A drained instance takes no new session.
        created = httpx.post(
            f"{proxy.url}/api/sessions",
            json={"session_id": sid(999), "workspace_id": 1, "api_key": API_KEY},
            trust_env=False,
        )
        assert created.status_code == 200
        assert created.headers["x-proxy-instance"] != source.url
    finally:
        proxy.stop()
        for sim in fleet:
            sim.stop()


def test_rebalance_dry_run_plans_and_the_run_evens_the_fleet(tmp_path: Path) -> None:
    ids = [sid(n) for n in range(12)]
    crowded = Simulator.start(tmp_path, "crowded", api_key=API_KEY, sessions=ids)
    empty = [
        Simulator.start(tmp_path, f"empty{n}", api_key=API_KEY, connect_delay=0.2) for n in range(2)
    ]
    fleet = [crowded, *empty]
    proxy = ProxyProcess.start(tmp_path, env_for(fleet), ready_path="/readyz")
    try:
        plan = httpx.post(
            f"{proxy.url}/_proxy/rebalance", params={"dry_run": "1"}, headers=AUTH, trust_env=False
        )
        assert plan.status_code == 200, plan.text
        body = plan.json()
        assert len(body["moves"]) == 8 and body["dry_run"] is True
        assert sorted(body["after"].values()) == [4, 4, 4]
        assert all(len(holders(fleet, s)) == 1 for s in ids)
        assert not any(sim.events("session_started") for sim in empty)  # nothing moved

        run = httpx.post(f"{proxy.url}/_proxy/rebalance", headers=AUTH, trust_env=False)
        assert run.status_code == 202, run.text

        def done() -> bool:
            last = httpx.get(f"{proxy.url}/_proxy/rebalance", headers=AUTH, trust_env=False)
            return bool(last.json()["last"]["done"])

        wait_for(done, 30, "the rebalance to finish")
        counts = {
            sim.name: len(
                httpx.get(
                    f"{sim.url}/api/sessions", params={"api_key": API_KEY}, trust_env=False
                ).json()["sessions"]
            )
            for sim in fleet
        }
        assert sorted(counts.values()) == [4, 4, 4], counts
        for session_id in ids:
            found = holders(fleet, session_id)
            assert len(found) == 1 and found[0][1] == "connected", found
            status, text, _ = send(proxy, session_id, f"after-{session_id}")
            assert status == 200, text
    finally:
        proxy.stop()
        for sim in fleet:
            sim.stop()


def test_drain_requests_are_checked_and_answered_in_the_proxys_shape(tmp_path: Path) -> None:
    sim = Simulator.start(tmp_path, "only", api_key=API_KEY)
    proxy = ProxyProcess.start(tmp_path, env_for([sim]), ready_path="/readyz")
    keyless = ProxyProcess.start(
        tmp_path, {**env_for([sim]), "SESSION_PROXY_API_KEY": ""}, ready_path="/readyz"
    )
    try:
        url = f"{proxy.url}/_proxy/instances/drain"

        def post(body: Any, headers: dict[str, str] = AUTH, at: str = url) -> httpx.Response:
            return httpx.post(at, json=body, headers=headers, trust_env=False)

        assert post({"instance": sim.url}, headers={}).status_code == 401
        bad = post(["not", "an", "object"])
        assert bad.status_code == 400 and bad.headers["x-proxy-error"] == "bad-request"
        unknown = post({"instance": "http://10.9.9.9:3000"})
        assert unknown.status_code == 404 and unknown.json()["code"] == "unknown-instance"
        no_key = post({"instance": sim.url}, at=f"{keyless.url}/_proxy/instances/drain")
        assert no_key.status_code == 409 and "API_KEY" in no_key.json()["error"]
        assert instance_states(keyless)[sim.url]["state"] == "active"  # nothing was drained

        started = post({"instance": sim.url})
        assert started.status_code == 202
        wait_for(lambda: instance_states(proxy)[sim.url]["state"] == "drained", 10, "drained")
        undrained = post({"instance": sim.url}, at=f"{proxy.url}/_proxy/instances/undrain")
        assert undrained.status_code == 200 and undrained.json()["state"] == "active"
        assert instance_states(proxy)[sim.url]["cordoned"] is False
    finally:
        keyless.stop()
        proxy.stop()
        sim.stop()
