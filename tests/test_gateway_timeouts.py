"""Sends that kill their instance: the real gateway crashes when one of its route timeouts fires
(45 s for a send, 30 s for a bulk send), with the request received and no answer. Through the
proxy both must come back as ``502 upstream-ambiguous``, never replayed elsewhere.

The simulator's timeouts are scaled down (``--timeout-scale``) so the crash comes in seconds;
the proxy keeps its default route timeouts, which are longer than the instance's on every route.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import API_KEY
from tests.helpers.processes import ProxyProcess, Simulator

SCALE = 0.05  # 45 s -> 2.25 s for a send, 30 s -> 1.5 s for a bulk send


def _fleet(tmp_path: Path) -> tuple[list[Simulator], ProxyProcess, str]:
    sid = "webjs_1_1732800000_timeout1"
    doomed = Simulator.start(
        tmp_path,
        "doomed",
        sessions=[sid],
        api_key=API_KEY,
        timeout_scale=SCALE,
        bulk_interval=0.25,
    )
    # A second instance that also holds the session: a replay would have somewhere to go.
    other = Simulator.start(tmp_path, "other", sessions=[sid], api_key=API_KEY)
    proxy = ProxyProcess.start(
        tmp_path,
        {
            "SESSION_PROXY_INSTANCES": f"{doomed.url},{other.url}",
            "SESSION_PROXY_API_KEY": API_KEY,
            "SESSION_PROXY_HEALTH_INTERVAL": "60",
            "SESSION_PROXY_LOG_LEVEL": "warning",
        },
        ready_path="/readyz",
    )
    return [doomed, other], proxy, sid


def _learn_owner(proxy: ProxyProcess, sid: str) -> str:
    """One status call, so the proxy's table holds the owner; returns the owner's URL."""
    answer = httpx.get(
        f"{proxy.url}/api/sessions/{sid}/status",
        params={"api_key": API_KEY},
        timeout=10,
        trust_env=False,
    )
    assert answer.status_code == 200
    return answer.headers["x-proxy-instance"]


def test_a_bulk_send_that_kills_its_instance_is_ambiguous_and_not_replayed(
    tmp_path: Path,
) -> None:
    (doomed, other), proxy, sid = _fleet(tmp_path)
    try:
        other.drop_session(sid)  # the proxy learns the doomed owner...
        assert _learn_owner(proxy, sid) == doomed.url
        other.add_session(sid)  # ...then a second copy appears where a replay could go
        recipients = [f"62812000{n:04d}" for n in range(20)]  # 20 x 0.25 s > 1.5 s
        answer = httpx.post(
            f"{proxy.url}/api/messages/bulk-send",
            json={
                "session_id": sid,
                "workspace_id": 1,
                "recipients": recipients,
                "message": "hello",
                "type": "text",
                "api_key": API_KEY,
            },
            timeout=30,
            trust_env=False,
        )
        assert answer.status_code == 502, answer.text
        assert answer.headers["x-proxy-error"] == "upstream-ambiguous"
        assert answer.headers["x-proxy-instance"] == doomed.url  # the error names who failed
        doomed.wait(timeout=10)
        assert not doomed.alive  # the instance crashed, as the real one does
        sent_before_crash = len(doomed.events("sent"))
        assert 0 < sent_before_crash < len(recipients)
        assert other.events("sent") == []  # nothing was sent again elsewhere
    finally:
        proxy.stop()
        for sim in (doomed, other):
            sim.stop()


def test_a_send_that_hangs_until_its_instance_dies_is_ambiguous_and_not_replayed(
    tmp_path: Path,
) -> None:
    (doomed, other), proxy, sid = _fleet(tmp_path)
    try:
        other.drop_session(sid)
        assert _learn_owner(proxy, sid) == doomed.url
        other.add_session(sid)
        answer = httpx.post(
            f"{proxy.url}/api/messages/send",
            json={
                "session_id": sid,
                "workspace_id": 1,
                "recipient_phone": "628120001111",
                "message": "never answered __fake_hang__",
                "type": "text",
                "api_key": API_KEY,
            },
            timeout=30,
            trust_env=False,
        )
        assert answer.status_code == 502, answer.text
        assert answer.headers["x-proxy-error"] == "upstream-ambiguous"
        assert answer.headers["x-proxy-instance"] == doomed.url  # the error names who failed
        doomed.wait(timeout=10)
        assert not doomed.alive
        assert other.events("sent") == []
    finally:
        proxy.stop()
        for sim in (doomed, other):
            sim.stop()
