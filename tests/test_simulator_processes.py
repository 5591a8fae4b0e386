"""What needs a real simulator process: the start-up restore and the crash on a route timeout."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.laravel import ACTIVE_PATH, LaravelStandIn
from tests.helpers.processes import Simulator, free_port

KEY = "proc-key"
S1 = "webjs_1_1732800000_aaaaaaaa"
S2 = "webjs_1_1732800001_bbbbbbbb"
S3 = "webjs_8_1732800002_cccccccc"
SCALE = 0.05  # route timeouts: sends 45 s -> 2.25 s, bulk-send 30 s -> 1.5 s


@pytest.fixture
def laravel() -> Iterator[LaravelStandIn]:
    with LaravelStandIn() as stand_in:
        yield stand_in


def _status(sim: Simulator, sid: str) -> httpx.Response:
    return httpx.get(
        f"{sim.url}/api/sessions/{sid}/status", params={"api_key": KEY}, trust_env=False
    )


def _held(sim: Simulator) -> dict[str, str]:
    listing = httpx.get(f"{sim.url}/api/sessions", params={"api_key": KEY}, trust_env=False)
    return {s["session_id"]: s["status"] for s in listing.json()["sessions"]}


def _wait_connected(sim: Simulator, sids: list[str], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while any(_status(sim, sid).json().get("status") != "connected" for sid in sids):
        assert time.monotonic() < deadline, _held(sim)
        time.sleep(0.05)


# ---- the start-up restore ------------------------------------------------------------------


def test_a_restarted_instance_restores_every_active_account_whoever_owns_it(
    tmp_path: Path, laravel: LaravelStandIn
) -> None:
    a = Simulator.start(tmp_path, "a", sessions=[S1], api_key=KEY)
    b = Simulator.start(
        tmp_path, "b", sessions=[S2], api_key=KEY, connect_delay=0.3, laravel_url=laravel.url
    )
    with a, b:
        assert b.restored()["total"] == 0  # nothing active yet: b holds only its own
        assert set(_held(b)) == {S2}
        laravel.accounts = [
            {"id": 11, "session_id": S1, "workspace_id": 1, "status": "connected"},
            {"id": 12, "session_id": S2, "workspace_id": 1, "phone_number": "628111"},
            {"id": 13, "session_id": S3, "workspace_id": "8"},
            {"id": 13, "session_id": S3, "workspace_id": "8"},  # listed twice
        ]
        asked = len(laravel.requests_to(ACTIVE_PATH))

        b.restart()  # its memory is gone; at start it asks Laravel and starts everything listed
        done = b.restored()
        assert (done["total"], done["restored"], done["skipped"]) == (4, [S1, S2, S3], [S3])
        requests = laravel.requests_to(ACTIVE_PATH)[asked:]
        assert len(requests) == 1
        assert requests[0]["method"] == "GET"
        assert requests[0]["headers"]["x-api-key"] == KEY
        # Started like a create: not connected at once, connected after connect_delay.
        _wait_connected(b, [S1, S2, S3])

        # S1 now runs on both instances: a never lost it, b restored it.
        assert _status(a, S1).json()["status"] == "connected"
        assert _status(b, S1).json()["status"] == "connected"
        started = [e["session_id"] for e in b.events("session_started") if e["via"] == "restore"]
        assert started == [S1, S2, S3]
        # The account id is lost on the way; the workspace is used as given.
        meta = httpx.get(
            f"{b.url}/api/sessions/{S3}/metadata", params={"api_key": KEY}, trust_env=False
        ).json()["metadata"]
        assert "accountId" not in meta
        assert meta["workspaceId"] == "8"
        assert KEY not in b.log_path.read_text()


def test_the_restore_sends_its_own_laravel_key(tmp_path: Path, laravel: LaravelStandIn) -> None:
    laravel.accounts = [{"id": 1, "session_id": S1, "workspace_id": 1}]
    with Simulator.start(
        tmp_path, "k", api_key=KEY, laravel_url=laravel.url, laravel_api_key="laravel-secret"
    ) as sim:
        assert sim.restored()["restored"] == [S1]
        assert laravel.requests_to(ACTIVE_PATH)[0]["headers"]["x-api-key"] == "laravel-secret"
        assert "laravel-secret" not in sim.log_path.read_text()


def test_a_failed_restore_call_is_logged_and_ignored(
    tmp_path: Path, laravel: LaravelStandIn
) -> None:
    laravel.accounts = [{"id": 1, "session_id": S1, "workspace_id": 1}]
    laravel.fail_with = 500
    with Simulator.start(tmp_path, "f", sessions=[S2], api_key=KEY, laravel_url=laravel.url) as sim:
        done = sim.restored()
        assert (done["total"], done["restored"]) == (0, [])
        failed = sim.events("restore_failed")
        assert len(failed) == 1 and "500" in failed[0]["error"]
        assert failed[0]["attempts"] == 1  # only a refused connection is tried again
        assert set(_held(sim)) == {S2}
        assert _status(sim, S2).status_code == 200


def test_an_unreachable_laravel_is_tried_three_times(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with Simulator.start(tmp_path, "u", api_key=KEY, laravel_url=closed) as sim:
        done = sim.restored(timeout=15)
        # 1 s and then 2 s between the attempts, as the real one backs off.
        assert time.monotonic() - started >= 3.0
        assert done["total"] == 0
        assert sim.events("restore_failed")[0]["attempts"] == 3
        assert sim.alive and _held(sim) == {}


# ---- route timeouts ------------------------------------------------------------------------


def _post_without_answer(sim: Simulator, path: str, body: dict[str, object]) -> float:
    started = time.monotonic()
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        httpx.post(
            sim.url + path,
            json=body,
            headers={"x-request-id": "doomed"},
            timeout=20,
            trust_env=False,
        )
    elapsed = time.monotonic() - started
    assert sim.wait(10) == 1
    return elapsed


def _crash_events(sim: Simulator) -> tuple[dict[str, object], dict[str, object]]:
    received = [e for e in sim.events("received") if e.get("request_id") == "doomed"]
    assert len(received) == 1  # it got there...
    assert not [e for e in sim.requests() if e.get("request_id") == "doomed"]  # ...no answer
    (crashed,) = sim.events("crashed")
    return received[0], crashed


def test_a_send_that_never_returns_kills_the_instance_at_the_send_timeout(
    tmp_path: Path,
) -> None:
    sim = Simulator.start(tmp_path, "hang", sessions=[S1], api_key=KEY, timeout_scale=SCALE)
    with sim:
        body = {
            "api_key": KEY,
            "session_id": S1,
            "recipient_phone": "628111",
            "message": "x __fake_hang__",
        }
        elapsed = _post_without_answer(sim, "/api/messages/send", body)
        assert 45 * SCALE - 0.1 <= elapsed < 45 * SCALE + 3
        received, crashed = _crash_events(sim)
        assert received["session_id"] == S1
        assert (crashed["reason"], crashed["path"]) == ("route timeout", "/api/messages/send")
        assert crashed["timeout"] == pytest.approx(45 * SCALE)
        assert sim.events("sent") == []


def test_send_media_has_the_send_timeout_too(tmp_path: Path) -> None:
    # Its path contains /api/messages/send: 45 s, not the 30 s default.
    sim = Simulator.start(
        tmp_path, "media", sessions=[S1], api_key=KEY, timeout_scale=SCALE, send_delay=30
    )
    with sim:
        body = {
            "api_key": KEY,
            "session_id": S1,
            "recipient_phone": "628111",
            "media_url": "http://127.0.0.1:9/x.png",
        }
        elapsed = _post_without_answer(sim, "/api/messages/send-media", body)
        assert elapsed >= 45 * SCALE - 0.1
        _received, crashed = _crash_events(sim)
        assert crashed["timeout"] == pytest.approx(45 * SCALE)


def test_a_bulk_send_past_the_default_timeout_sends_some_then_dies(tmp_path: Path) -> None:
    # Bulk-send matches no pattern: 30 s. One message per interval, so about 30 of 35 go out.
    sim = Simulator.start(
        tmp_path, "bulk", sessions=[S1], api_key=KEY, timeout_scale=SCALE, bulk_interval=0.05
    )
    with sim:
        body = {
            "api_key": KEY,
            "session_id": S1,
            "recipients": [f"6281{n:02d}" for n in range(35)],
            "message": "bulk",
        }
        elapsed = _post_without_answer(sim, "/api/messages/bulk-send", body)
        assert 30 * SCALE - 0.1 <= elapsed < 30 * SCALE + 3
        _received, crashed = _crash_events(sim)
        assert crashed["timeout"] == pytest.approx(30 * SCALE)
        sent = sim.events("sent")
        assert 10 <= len(sent) < 35, len(sent)
        assert all(e["request_id"] == "doomed" for e in sent)
