"""What the proxy refuses: a clear JSON error from the proxy itself, and nothing forwarded."""

from __future__ import annotations

import socket

import pytest

from tests.conftest import API_KEY, Fleet

SID = "webjs_1_1732800000_00000002"


def _raw_get(fleet: Fleet, raw_target: bytes) -> tuple[int, bytes]:
    """Send a request line exactly as given (httpx would normalise the path)."""
    with socket.create_connection(("127.0.0.1", fleet.proxy.port), timeout=5) as sock:
        sock.sendall(
            b"GET " + raw_target + b" HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n"
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def _forwarded_count(fleet: Fleet) -> int:
    """Requests the instances saw, less the proxy's own health checks: those run every 0.5 s
    whatever the test does, and counting them made these tests fail on a loaded machine."""
    return sum(1 for event in fleet.request_events() if event["path"] != "/health")


@pytest.mark.parametrize(
    ("raw_id", "code"),
    [
        (b"..", "bad-path"),
        (b"a%2Fb", "bad-path"),
        (b"x" * 200, "bad-session-id"),
        (b"bad.id", "bad-session-id"),
        (b"a%00b", "bad-session-id"),
        (b"a%0Db%0Ac", "bad-session-id"),
        (b"a%09b", "bad-session-id"),
        (b"%2e%2e", "bad-path"),
    ],
)
def test_bad_session_ids_in_the_path_are_refused(fleet: Fleet, raw_id: bytes, code: str) -> None:
    before = _forwarded_count(fleet)
    status, body = _raw_get(
        fleet, b"/api/sessions/" + raw_id + b"/status?api_key=" + API_KEY.encode()
    )
    assert status == 400
    assert f'"code":"{code}"'.encode() in body
    assert b'"request_id"' in body
    assert _forwarded_count(fleet) == before


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"session_id": "' + SID.encode() + b'", "message": ', "malformed-body"),
        (b"session_id=" + SID.encode(), "malformed-body"),
        (b'["' + SID.encode() + b'"]', "malformed-body"),
        (b'{"message": "hi", "api_key": "demo-key"}', "missing-session-id"),
        (b'{"session_id": "../../etc", "api_key": "demo-key"}', "bad-session-id"),
        (b'{"session_id": 7, "api_key": "demo-key"}', "bad-session-id"),
    ],
)
def test_bad_bodies_on_body_addressed_routes_are_refused(
    fleet: Fleet, body: bytes, code: str
) -> None:
    before = _forwarded_count(fleet)
    with fleet.client() as client:
        r = client.post(
            "/api/messages/send", content=body, headers={"content-type": "application/json"}
        )
    assert r.status_code == 400
    assert r.headers["x-proxy-error"] == code
    assert r.json()["code"] == code
    assert r.json()["request_id"] == r.headers["x-request-id"]
    assert _forwarded_count(fleet) == before


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/admin"), ("POST", "/api/unknown"), ("GET", "/etc/passwd"), ("DELETE", "/api")],
)
def test_unknown_routes_are_refused_without_forwarding(
    fleet: Fleet, method: str, path: str
) -> None:
    before = _forwarded_count(fleet)
    with fleet.client() as client:
        r = client.request(method, path)
    assert r.status_code == 404
    assert r.headers["x-proxy-error"] == "unknown-route"
    assert r.json()["code"] == "unknown-route"
    assert _forwarded_count(fleet) == before


def test_an_unknown_sub_route_of_a_session_is_the_instances_own_404(fleet: Fleet) -> None:
    """The owner answers "Endpoint not found"; that is passed through, not a rediscovery."""
    sid = "webjs_1_1732800003_subroute"
    fleet.instances[0].add_session(sid)
    with fleet.client() as client:
        r = client.get(f"/api/sessions/{sid}/nonexistent", params={"api_key": API_KEY})
    assert r.status_code == 404
    assert r.json()["error"] == "Endpoint not found"
    assert "x-proxy-error" not in r.headers
    assert r.headers["x-proxy-instance"] == fleet.instances[0].url


def test_a_session_nobody_holds_is_session_not_found(fleet: Fleet) -> None:
    with fleet.client() as client:
        r = client.get("/api/sessions/webjs_9_nobody/status", params={"api_key": API_KEY})
    assert r.status_code == 404
    assert r.headers["x-proxy-error"] == "session-not-found"
    assert r.json()["error"] == "Session not found"


def test_an_oversized_declared_body_is_refused_before_it_is_read(fleet: Fleet) -> None:
    with socket.create_connection(("127.0.0.1", fleet.proxy.port), timeout=5) as sock:
        sock.sendall(
            b"POST /api/messages/send HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
            b"Content-Length: 999999999999\r\nConnection: close\r\n\r\n{"
        )
        data = sock.recv(65536)
    assert data.startswith(b"HTTP/1.1 413")
    assert b"body-too-large" in data
