"""Session id extraction and validation, for every route of the upstream contract."""

from __future__ import annotations

import pytest

from proxy.config import load_settings
from proxy.errors import BadPath, BadSessionId, MalformedBody, MissingSessionId, UnknownRoute
from proxy.sessions import Kind, SessionRouter

ROUTER = SessionRouter(load_settings({}))
SID = "webjs_1_1732800000_ab12cd34"


@pytest.mark.parametrize(
    ("method", "path", "kind", "session_id"),
    [
        ("GET", f"/api/sessions/{SID}/status", Kind.PATH, SID),
        ("GET", f"/api/sessions/{SID}/metadata", Kind.PATH, SID),
        ("PUT", f"/api/sessions/{SID}/metadata", Kind.PATH, SID),
        ("POST", f"/api/sessions/{SID}/restore", Kind.PATH, SID),
        ("POST", f"/api/sessions/{SID}/reconnect", Kind.PATH, SID),
        ("POST", f"/api/sessions/{SID}/regenerate-qr", Kind.PATH, SID),
        ("DELETE", f"/api/sessions/{SID}", Kind.PATH, SID),
        ("GET", f"/api/messages/{SID}/status", Kind.PATH, SID),
        ("GET", f"/api/messages/{SID}/validate", Kind.PATH, SID),
        ("GET", f"/api/internal/sessions/{SID}/last-activity", Kind.PATH, SID),
        ("DELETE", f"/cleanup/{SID}", Kind.PATH, SID),
        ("POST", f"/remoteauth/migration/{SID}", Kind.PATH, SID),
        ("GET", f"/sessions/{SID}/status", Kind.PATH, SID),
        ("POST", "/api/messages/send", Kind.BODY, None),
        ("POST", "/api/messages/send-media", Kind.BODY, None),
        ("POST", "/api/messages/bulk-send", Kind.BODY, None),
        ("POST", "/api/sessions", Kind.CREATE, None),
        ("POST", "/api/sessions/", Kind.CREATE, None),
        ("GET", "/api/sessions", Kind.LIST, None),
        ("GET", "/health", Kind.PASSTHROUGH, None),
        ("GET", "/health/detailed", Kind.PASSTHROUGH, None),
        ("GET", "/info", Kind.PASSTHROUGH, None),
        ("GET", "/", Kind.PASSTHROUGH, None),
        ("POST", "/cleanup/run", Kind.PASSTHROUGH, None),
        ("GET", "/cleanup/stats", Kind.PASSTHROUGH, None),
    ],
)
def test_every_contract_route_is_classified(
    method: str, path: str, kind: Kind, session_id: str | None
) -> None:
    target = ROUTER.classify(method, path)
    assert target.kind is kind
    assert target.session_id == session_id


@pytest.mark.parametrize(
    "bad_id",
    ["..", "a%2Fb", "x" * 200, "bad.id", "a%00b", "a%0Ab", "é", "a b", "a%20b"],
)
def test_bad_ids_in_paths_are_refused(bad_id: str) -> None:
    with pytest.raises((BadSessionId, BadPath)):
        ROUTER.classify("GET", f"/api/sessions/{bad_id}/status")


@pytest.mark.parametrize(
    "path",
    [
        f"/api/sessions/{SID}/../../admin",
        f"/api/sessions/{SID}/%2e%2e/x",
        f"/api/sessions/{SID}/a%2fb",
        f"/api/sessions/{SID}/a%5cb",
        "/api/sessions/./x",
        f"/api/sessions/{SID}\\..\\x",
    ],
)
def test_paths_that_would_change_route_after_decoding_are_refused(path: str) -> None:
    with pytest.raises(BadPath):
        ROUTER.classify("GET", path)


@pytest.mark.parametrize("path", ["/admin", "/api/unknown", "/api", "/metricsx", "/api/sessions/"])
def test_unknown_routes_are_refused(path: str) -> None:
    method = "GET" if path != "/api/sessions/" else "DELETE"
    with pytest.raises(UnknownRoute):
        ROUTER.classify(method, path)


def test_session_id_from_the_body() -> None:
    assert ROUTER.session_from_body(b'{"session_id": "%s", "api_key": "k"}' % SID.encode()) == SID


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{not json", MalformedBody),
        (b"", MalformedBody),
        (b"[1, 2]", MalformedBody),
        (b"\xff\xfe", MalformedBody),
        (b'{"message": "hi"}', MissingSessionId),
        (b'{"session_id": 42}', BadSessionId),
        (b'{"session_id": "../etc"}', BadSessionId),
        (b'{"session_id": ""}', BadSessionId),
    ],
)
def test_bad_bodies_are_refused(body: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        ROUTER.session_from_body(body)


def test_patterns_are_configurable() -> None:
    router = SessionRouter(
        load_settings(
            {
                "SESSION_PROXY_PATH_PATTERNS": "/api/{id}/sessions",
                "SESSION_PROXY_SESSION_ID_PATTERN": "[a-z]{3}",
            }
        )
    )
    assert router.classify("GET", "/api/abc/sessions/status").session_id == "abc"
    with pytest.raises(BadSessionId):
        router.classify("GET", "/api/abcd/sessions")
