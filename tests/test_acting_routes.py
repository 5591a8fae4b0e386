"""The routes the real gateway never refuses, and starting sessions whose owner died.

Found with three real Blazz instances behind the proxy (the contract's "Measured against the real
service"): PUT metadata, reconnect, regenerate-qr, DELETE and last-activity answer success for a
session the instance does not hold, so a stale owner is never revealed by its answer. The proxy
must confirm the owner before acting there, place a start whose owner is gone, and send a DELETE
to every copy and to no other instance (one that does not hold the session deletes its files).
Each test drives real simulator processes, faithful to those answers, through a real proxy.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import API_KEY, Fleet, start_fleet, stop_fleet
from tests.helpers.processes import Simulator

# Only the requests themselves may reveal a death or a move: health checks stay out of the way.
# A move inside the confirmation age is invisible by design, so these tests confirm every time.
QUIET = {"SESSION_PROXY_HEALTH_INTERVAL": "60", "SESSION_PROXY_CONFIRM_MAX_AGE": "0"}


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    running = start_fleet(tmp_path, sessions_per_instance=3, env=QUIET)
    try:
        yield running
    finally:
        stop_fleet(running)


def held_by(fleet: Fleet, sid: str) -> list[str]:
    """Which instances hold the session right now, by name, from their own test controls."""
    holders = []
    for sim in fleet.instances:
        if not sim.alive:
            continue
        listed = httpx.get(sim.url + "/_sim/sessions", timeout=5.0, trust_env=False).json()
        if any(s["session_id"] == sid for s in listed["sessions"]):
            holders.append(sim.name)
    return holders


def reached(sim: Simulator, method: str, path: str) -> int:
    return sum(1 for e in sim.requests() if e["method"] == method and e["path"] == path)


def first_session(fleet: Fleet, sim: Simulator) -> str:
    return sorted(sid for sid, owner in fleet.sessions.items() if owner is sim)[0]


def learn(client: httpx.Client, sid: str) -> str:
    """One status call, so the proxy's table knows the owner; returns that owner's URL."""
    answer = client.get(f"/api/sessions/{sid}/status", params={"api_key": API_KEY})
    assert answer.status_code == 200, answer.text
    return answer.headers["x-proxy-instance"]


def move(fleet: Fleet, sid: str, source: Simulator, target: Simulator) -> None:
    """The session moves behind the proxy's back (a restart elsewhere, then the old copy stops)."""
    target.add_session(sid)
    source.drop_session(sid)


def start_body(sid: str) -> dict[str, Any]:
    # What Laravel's client sends for reconnect and regenerate-qr.
    return {"workspace_id": 1, "account_id": 7, "api_key": API_KEY, "priority": "normal"}


# --- starting a session whose owner died ---------------------------------------------------------


def test_recreate_after_sigkill_answers_200_at_the_first_try(fleet: Fleet) -> None:
    dead = fleet.instances[0]
    sid = first_session(fleet, dead)
    with fleet.client() as client:
        assert learn(client, sid) == dead.url
        dead.kill()
        created = client.post(
            "/api/sessions",
            json={
                "session_id": sid,
                "workspace_id": 1,
                "account_id": 7,
                "api_key": API_KEY,
                "priority": "normal",
            },
        )
        assert created.status_code == 200, created.text
        assert created.json()["success"] is True
        placed = fleet.by_url(created.headers["x-proxy-instance"])
        assert placed is not dead and placed.alive
        assert held_by(fleet, sid) == [placed.name]
        # The placement is the owner from now on.
        assert learn(client, sid) == placed.url


@pytest.mark.parametrize("route", ["reconnect", "regenerate-qr"])
def test_start_routes_after_sigkill_answer_200_on_a_live_instance(fleet: Fleet, route: str) -> None:
    dead = fleet.instances[1]
    sid = first_session(fleet, dead)
    with fleet.client() as client:
        assert learn(client, sid) == dead.url
        dead.kill()
        answer = client.post(f"/api/sessions/{sid}/{route}", json=start_body(sid))
        assert answer.status_code == 200, answer.text
        placed = fleet.by_url(answer.headers["x-proxy-instance"])
        assert placed is not dead
        assert held_by(fleet, sid) == [placed.name]


def test_reconnect_for_a_session_nobody_ever_held_is_placed(fleet: Fleet) -> None:
    sid = "webjs_1_1732800000_neverheld"
    with fleet.client() as client:
        answer = client.post(f"/api/sessions/{sid}/reconnect", json=start_body(sid))
    assert answer.status_code == 200, answer.text
    assert held_by(fleet, sid) == [fleet.by_url(answer.headers["x-proxy-instance"]).name]


# --- acting routes after a move ------------------------------------------------------------------


def test_after_a_move_put_metadata_lands_on_the_holder(fleet: Fleet) -> None:
    stale, holder = fleet.instances[0], fleet.instances[2]
    sid = first_session(fleet, stale)
    path = f"/api/sessions/{sid}/metadata"
    with fleet.client() as client:
        assert learn(client, sid) == stale.url
        move(fleet, sid, stale, holder)
        written = client.put(path, json={"updates": {"plan": "pro"}, "api_key": API_KEY})
        assert written.status_code == 200, written.text
        assert written.headers["x-proxy-instance"] == holder.url
        read = client.get(path, params={"api_key": API_KEY})
    assert read.status_code == 200
    assert read.headers["x-proxy-instance"] == holder.url
    assert read.json()["metadata"]["plan"] == "pro"
    # The stale owner was asked whether it holds the session, never told to write.
    assert reached(stale, "PUT", path) == 0


def test_after_a_move_a_reconnect_leaves_exactly_one_copy(fleet: Fleet) -> None:
    stale, holder = fleet.instances[1], fleet.instances[0]
    sid = first_session(fleet, stale)
    with fleet.client() as client:
        assert learn(client, sid) == stale.url
        move(fleet, sid, stale, holder)
        answer = client.post(f"/api/sessions/{sid}/reconnect", json=start_body(sid))
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-proxy-instance"] == holder.url
    assert held_by(fleet, sid) == [holder.name]
    assert reached(stale, "POST", f"/api/sessions/{sid}/reconnect") == 0


def test_after_a_move_last_activity_is_the_holders(fleet: Fleet) -> None:
    stale, holder = fleet.instances[2], fleet.instances[1]
    sid = first_session(fleet, stale)
    path = f"/api/internal/sessions/{sid}/last-activity"
    with fleet.client() as client:
        assert learn(client, sid) == stale.url
        move(fleet, sid, stale, holder)
        answer = client.get(path)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-proxy-instance"] == holder.url
    assert answer.json()["data"]["session_id"] == sid
    assert reached(stale, "GET", path) == 0


def test_acting_on_a_session_nobody_holds_is_a_clear_404(fleet: Fleet) -> None:
    sid = "webjs_1_1732800000_nobody00"
    with fleet.client() as client:
        answer = client.put(
            f"/api/sessions/{sid}/metadata", json={"updates": {"a": 1}, "api_key": API_KEY}
        )
    assert answer.status_code == 404
    assert answer.headers["x-proxy-error"] == "session-not-found"
    assert all(reached(s, "PUT", f"/api/sessions/{sid}/metadata") == 0 for s in fleet.instances)


def test_a_confirmed_owner_is_not_probed_again_within_the_confirmation_age(
    tmp_path: Path,
) -> None:
    fleet = start_fleet(
        tmp_path, count=2, sessions_per_instance=1, env={"SESSION_PROXY_CONFIRM_MAX_AGE": "30"}
    )
    try:
        owner = fleet.instances[0]
        sid = first_session(fleet, owner)
        path = f"/api/sessions/{sid}/metadata"
        status_path = f"/api/sessions/{sid}/status"
        with fleet.client() as client:
            learn(client, sid)  # a 200 from a route that refuses when wrong: a confirmation
            probes_before = reached(owner, "GET", status_path)
            for n in range(5):
                answer = client.put(path, json={"updates": {"n": n}, "api_key": API_KEY})
                assert answer.status_code == 200
        # Five writes right after a confirmation: no extra status probe.
        assert reached(owner, "GET", status_path) == probes_before
        assert reached(owner, "PUT", path) == 5
    finally:
        stop_fleet(fleet)


def test_with_no_confirmation_age_every_acting_request_probes_first(fleet: Fleet) -> None:
    """With a confirmation age of 0 every acting request probes its owner first."""
    owner = fleet.instances[1]
    sid = first_session(fleet, owner)
    status_path = f"/api/sessions/{sid}/status"
    with fleet.client() as client:
        for n in range(3):
            answer = client.put(
                f"/api/sessions/{sid}/metadata", json={"updates": {"n": n}, "api_key": API_KEY}
            )
            assert answer.status_code == 200
    probes = [e for e in owner.requests() if e["path"] == status_path]
    assert len(probes) == 1 + 3  # the first lookup, then one confirmation per write
    assert all("api_key=***" in e["query"] for e in probes)  # the proxy's own key, redacted


# --- DELETE --------------------------------------------------------------------------------------


def files_deleted(sim: Simulator, sid: str) -> int:
    return sum(1 for e in sim.events("session_files_deleted") if e.get("session_id") == sid)


def test_after_a_move_delete_disconnects_the_holder_and_spares_the_stale_instance(
    fleet: Fleet,
) -> None:
    stale, holder = fleet.instances[0], fleet.instances[1]
    sid = first_session(fleet, stale)
    with fleet.client() as client:
        assert learn(client, sid) == stale.url
        move(fleet, sid, stale, holder)
        answer = client.request("DELETE", f"/api/sessions/{sid}", json={"api_key": API_KEY})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-proxy-instance"] == holder.url
    assert answer.json().get("alreadyDisconnected") is not True
    assert held_by(fleet, sid) == []
    assert reached(stale, "DELETE", f"/api/sessions/{sid}") == 0
    assert files_deleted(stale, sid) == 0


def test_delete_reaches_every_copy_of_a_duplicated_session(fleet: Fleet) -> None:
    first, second = fleet.instances[0], fleet.instances[2]
    sid = first_session(fleet, first)
    second.add_session(sid)  # a restart started it twice
    with fleet.client() as client:
        answer = client.request("DELETE", f"/api/sessions/{sid}", json={"api_key": API_KEY})
    assert answer.status_code == 200, answer.text
    assert held_by(fleet, sid) == []
    bystander = fleet.instances[1]
    assert reached(bystander, "DELETE", f"/api/sessions/{sid}") == 0


def test_delete_of_a_session_nobody_holds_touches_no_instance(fleet: Fleet) -> None:
    sid = "webjs_1_1732800000_gone0000"
    with fleet.client() as client:
        answer = client.request("DELETE", f"/api/sessions/{sid}", json={"api_key": API_KEY})
    assert answer.status_code == 200
    assert answer.json() == {
        "success": True,
        "message": "Session already disconnected or not found in memory",
        "alreadyDisconnected": True,
    }
    for sim in fleet.instances:
        assert reached(sim, "DELETE", f"/api/sessions/{sid}") == 0
        assert files_deleted(sim, sid) == 0
