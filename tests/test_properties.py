"""Property-based tests: whatever a client sends, the proxy answers with a clean 4xx or forwards
to a member of the instance set; never a crash, never a forward elsewhere."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.app import create_app
from proxy.config import load_settings
from proxy.errors import ProxyError
from proxy.forward import HOP_BY_HOP, request_headers
from proxy.sessions import Kind, SessionRouter

SETTINGS = load_settings(
    {"SESSION_PROXY_INSTANCES": "http://10.200.0.1:3001,http://10.200.0.2:3002"}
)
ROUTER = SessionRouter(SETTINGS)
ID = re.compile(SETTINGS.session_id_pattern)
MEMBERS = {"10.200.0.1:3001", "10.200.0.2:3002"}

path_text = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=300
).map(lambda p: "/" + p)
known_prefixes = st.sampled_from(
    ["/api/sessions/", "/api/messages/", "/sessions/", "/cleanup/", "/api/internal/sessions/"]
)
segment = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])


@given(methods, st.one_of(path_text, st.tuples(known_prefixes, segment, segment).map("".join)))
@settings(max_examples=2000, deadline=None)
def test_classify_is_a_target_or_a_clean_4xx(method: str, path: str) -> None:
    try:
        target = ROUTER.classify(method, path)
    except ProxyError as error:
        assert 400 <= error.status < 500
        return
    if target.kind is Kind.PATH:
        assert target.session_id is not None and ID.fullmatch(target.session_id)
        assert "%" not in target.session_id and "." not in target.session_id
    segments = path.split("/")
    assert ".." not in segments and "." not in segments


@given(
    st.binary(max_size=400) | st.builds(lambda v: json.dumps({"session_id": v}).encode(), st.text())
)
@settings(max_examples=1000, deadline=None)
def test_body_session_ids_are_valid_or_refused(body: bytes) -> None:
    try:
        session_id = ROUTER.session_from_body(body)
    except ProxyError as error:
        assert error.status == 400
        return
    assert ID.fullmatch(session_id)


header_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20).map(
    str.encode
)
header_value = st.binary(max_size=60).filter(lambda v: b"\r" not in v and b"\n" not in v)
hop = st.sampled_from([*sorted(HOP_BY_HOP), b"host", b"x-forwarded-for", b"x-forwarded-proto"])


@given(st.lists(st.tuples(st.one_of(header_name, hop), header_value), max_size=20))
@settings(max_examples=1000, deadline=None)
def test_forwarded_headers_are_clean(headers: list[tuple[bytes, bytes]]) -> None:
    scope = {"headers": headers, "client": ("192.0.2.7", 5555), "scheme": "http"}
    out = request_headers(scope, b"10.200.0.1:3001", b"rid", None)
    names = [n for n, _ in out]
    assert names.count(b"host") == 1 and (b"host", b"10.200.0.1:3001") in out
    assert not set(names) & HOP_BY_HOP
    set_by_the_proxy = {
        b"host",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-request-id",
        b"content-length",
    }
    for name, value in headers:
        if name == b"connection":  # what the client's Connection names stops here too
            for token in value.split(b","):
                token = token.strip().lower()
                if token and token not in set_by_the_proxy:
                    assert token not in names
    forwarded_for = [v for n, v in out if n == b"x-forwarded-for"]
    assert len(forwarded_for) == 1 and forwarded_for[0].endswith(b"192.0.2.7")
    assert names.count(b"x-request-id") == 1


def _fleet_transport(contacted: list[str]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        contacted.append(f"{request.url.host}:{request.url.port}")
        if request.url.path.endswith("/status") and request.url.port == 3001:
            return httpx.Response(200, json={"status": "connected"})
        if request.url.path.endswith("/status"):
            return httpx.Response(404, json={"error": "Session not found"})
        return httpx.Response(200, json={"ok": True})

    return httpx.MockTransport(handler)


@given(
    methods,
    st.one_of(path_text, st.tuples(known_prefixes, segment, segment).map("".join)),
    st.binary(max_size=200),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_whole_app_answers_cleanly_and_contacts_only_members(
    method: str, path: str, body: bytes
) -> None:
    contacted: list[str] = []
    app = create_app(SETTINGS, transport=_fleet_transport(contacted))

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://proxy"
        ) as client:
            try:
                return await client.request(method, path, content=body)
            finally:
                await app.client.aclose()

    try:
        response = asyncio.run(run())
    except httpx.InvalidURL:
        return  # the client library itself refuses to send it
    assert set(contacted) <= MEMBERS
    if "x-proxy-error" in response.headers:
        assert 400 <= response.status_code < 600
        if method != "HEAD":  # a HEAD answer has no body
            assert response.json()["code"] == response.headers["x-proxy-error"]
    else:
        assert response.headers["x-proxy-instance"].removeprefix("http://") in MEMBERS
