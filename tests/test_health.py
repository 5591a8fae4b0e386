"""Instance health: active checks eject and restore, back-off grows, placement skips the ejected."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import API_KEY, Fleet, start_fleet, stop_fleet
from tests.helpers.processes import Simulator


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    running = start_fleet(
        tmp_path,
        sessions_per_instance=2,
        env={
            "SESSION_PROXY_HEALTH_INTERVAL": "0.2",
            "SESSION_PROXY_HEALTH_TIMEOUT": "0.5",
            "SESSION_PROXY_EJECT_BASE_SECONDS": "1",
            "SESSION_PROXY_EJECT_MAX_SECONDS": "8",
        },
    )
    try:
        yield running
    finally:
        stop_fleet(running)


def _state(fleet: Fleet, url: str) -> dict[str, Any]:
    with fleet.client() as client:
        states = client.get("/readyz").json()["instance_states"]
    return next(s for s in states if s["url"] == url)


def _wait_for(predicate: Any, timeout: float = 10.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_a_dead_instance_is_ejected_and_skipped_by_placement(fleet: Fleet) -> None:
    dead = fleet.instances[0]
    dead.kill()
    took = _wait_for(lambda: _state(fleet, dead.url)["ejected"])
    print(f"\nejected {took:.2f} s after SIGKILL (health interval 0.2 s)")
    with fleet.client() as client:
        ready = client.get("/readyz").json()
        assert ready["healthy_instances"] == 2 and ready["ready"] is True
        placed = [
            client.post(
                "/api/sessions", json={"session_id": f"new_{n}", "api_key": API_KEY}
            ).headers["x-proxy-instance"]
            for n in range(6)
        ]
    assert dead.url not in placed
    assert set(placed) == {fleet.instances[1].url, fleet.instances[2].url}


def test_an_ejected_instance_returns_after_a_back_off_that_grows(fleet: Fleet) -> None:
    flapping = fleet.instances[1]
    flapping.set_faults(unhealthy=True)
    _wait_for(lambda: _state(fleet, flapping.url)["ejected"])
    first = _state(fleet, flapping.url)
    assert first["ejections_in_a_row"] == 1
    flapping.set_faults(unhealthy=False)
    back_after = _wait_for(lambda: not _state(fleet, flapping.url)["ejected"])
    assert back_after >= 0.5  # not before its 1 s back-off ran out

    flapping.set_faults(unhealthy=True)
    _wait_for(lambda: _state(fleet, flapping.url)["ejected"])
    second = _state(fleet, flapping.url)
    assert second["ejections_in_a_row"] == 2
    assert second["ejected_for_seconds"] > 1.2  # doubled: 2 s
    flapping.set_faults(unhealthy=False)
    _wait_for(lambda: not _state(fleet, flapping.url)["ejected"])
    print(f"\nback after {back_after:.2f} s the first time; second back-off 2 s")


def test_passing_checks_do_not_end_an_ejection_early(fleet: Fleet) -> None:
    sick = fleet.instances[2]
    sick.set_faults(unhealthy=True)
    _wait_for(lambda: _state(fleet, sick.url)["ejected"])
    sick.set_faults(unhealthy=False)
    passed_before = _passed_checks(sick)
    # Polled for: two passing checks reached it (a fixed 0.5 s only hoped for "several"), and the
    # 1 s back-off is not over yet.
    _wait_for(lambda: _passed_checks(sick) >= passed_before + 2, timeout=5.0)
    assert _state(fleet, sick.url)["ejected"] is True


def _passed_checks(sim: Simulator) -> int:
    return sum(1 for e in sim.requests() if e["path"] == "/health" and e["status"] == 200)


def test_a_flapping_instance_is_not_stormed_and_others_keep_serving(tmp_path: Path) -> None:
    """B goes down and up every second; sessions on A and C must not notice, and B must not
    receive more than the traffic meant for it."""
    fleet = start_fleet(
        tmp_path,
        sessions_per_instance=3,
        env={
            "SESSION_PROXY_HEALTH_INTERVAL": "0.2",
            "SESSION_PROXY_EJECT_BASE_SECONDS": "1",
            "SESSION_PROXY_EJECT_MAX_SECONDS": "8",
        },
    )
    b = fleet.instances[1]
    steady = sorted(s for s, o in fleet.sessions.items() if o is not b)
    on_b = sorted(s for s, o in fleet.sessions.items() if o is b)
    outcomes: dict[str, list[int]] = {"steady": [], "on_b": []}
    stop = time.monotonic() + 8
    try:
        before = len([e for e in b.requests() if not e["path"].startswith("/health")])
        with fleet.client() as client:
            flips = 0
            next_flip = time.monotonic() + 1
            n = 0
            while time.monotonic() < stop:
                if time.monotonic() >= next_flip:
                    if b.alive:
                        b.kill()
                    else:
                        b.restart(sessions=on_b)
                    flips += 1
                    next_flip = time.monotonic() + 1
                sid = steady[n % len(steady)]
                outcomes["steady"].append(
                    client.get(
                        f"/api/sessions/{sid}/status", params={"api_key": API_KEY}
                    ).status_code
                )
                if n % 4 == 0:
                    sid = on_b[n % len(on_b)]
                    outcomes["on_b"].append(
                        client.get(
                            f"/api/sessions/{sid}/status", params={"api_key": API_KEY}
                        ).status_code
                    )
                n += 1
                time.sleep(0.02)  # paces the traffic, on purpose
        if not b.alive:
            b.restart(sessions=on_b)
        reached_b = len([e for e in b.requests() if not e["path"].startswith("/health")]) - before
    finally:
        stop_fleet(fleet)
    steady_codes = Counter(outcomes["steady"])
    b_codes = Counter(outcomes["on_b"])
    print(
        f"\n{flips} flips of B in 8 s; steady sessions: {dict(steady_codes)}; sessions on B: "
        f"{dict(b_codes)}; requests that reached B (not health checks): {reached_b} for "
        f"{len(outcomes['on_b'])} meant for it"
    )
    assert set(steady_codes) == {200}
    # No retry storm: B sees at most its own traffic plus one status probe per lookup of it.
    assert reached_b <= 2 * len(outcomes["on_b"]) + 5
