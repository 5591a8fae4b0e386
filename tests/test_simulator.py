"""The simulator must answer like a real instance, since every proxy test trusts it to."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from proxy.simulator import SimulatorConfig, create_app, main

KEY = "test-key"
SID = "webjs_7_1732800000_abcd1234"
ROOT = Path(__file__).resolve().parent.parent


def make_app(**overrides: Any) -> Starlette:
    config = SimulatorConfig(name="sim-a", api_key=KEY, connect_delay=0.05, sessions=(SID,))
    for name, value in overrides.items():
        setattr(config, name, value)
    return create_app(config)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=make_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as c:
        yield c


def send_body(session_id: str = SID, **extra: Any) -> dict[str, Any]:
    body = {"api_key": KEY, "session_id": session_id, "phone_number": "6281234", "message": "hi"}
    body.update(extra)
    return body


# ---- api_key rules -------------------------------------------------------------------------


async def test_get_takes_the_key_from_the_query_only(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/sessions", params={"api_key": KEY})).status_code == 200
    for response in (
        await client.get("/api/sessions"),
        await client.get("/api/sessions", params={"api_key": "wrong"}),
        await client.get("/api/sessions", headers={"X-API-Key": KEY}),
        await client.get("/api/sessions", headers={"Authorization": f"Bearer {KEY}"}),
    ):
        assert response.status_code == 401
        assert response.json() == {"error": "Invalid API key"}


async def test_post_takes_the_key_from_the_body_only(client: httpx.AsyncClient) -> None:
    ok = await client.post("/api/sessions", json={"api_key": KEY, "session_id": "s1"})
    assert ok.status_code == 200
    in_query = await client.post(
        "/api/sessions", params={"api_key": KEY}, json={"session_id": "s2"}
    )
    in_header = await client.post(
        "/api/sessions", headers={"X-API-Key": KEY}, json={"session_id": "s3"}
    )
    wrong = await client.post("/api/sessions", json={"api_key": "nope", "session_id": "s4"})
    for response in (in_query, in_header, wrong):
        assert response.status_code == 401
        assert response.json() == {"error": "Invalid API key"}


async def test_key_is_checked_before_routing_under_api(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/whatever")).status_code == 401
    assert (await client.get("/api/sessions/nope/status")).status_code == 401
    assert (await client.get("/api/whatever", params={"api_key": KEY})).status_code == 404


async def test_health_and_info_need_no_key(client: httpx.AsyncClient) -> None:
    for path in ("/", "/info", "/health", "/health/ready", "/health/live", "/health/detailed"):
        assert (await client.get(path)).status_code == 200, path
    assert (await client.get("/health/metrics")).status_code == 200


# ---- shapes --------------------------------------------------------------------------------


async def test_health_shape_and_express_headers(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert response.headers["x-powered-by"] == "Express"
    body = response.json()
    assert body["status"] == "healthy"
    assert body["instance"] == "sim-a"
    assert body["sessions"] == {"total": 1, "connected": 1, "disconnected": 0}
    assert body["memory"]["rss"] > 0
    assert body["uptime"] >= 0
    assert body["timestamp"].endswith("Z")


async def test_status_and_list_shapes(client: httpx.AsyncClient) -> None:
    status = await client.get(f"/api/sessions/{SID}/status", params={"api_key": KEY})
    assert status.status_code == 200
    body = status.json()
    assert set(body) == {
        "session_id",
        "status",
        "phone_number",
        "workspace_id",
        "connected_at",
        "last_activity",
    }
    assert body["session_id"] == SID
    assert body["status"] == "connected"
    assert body["workspace_id"] == 7
    assert body["phone_number"]

    listing = (await client.get("/api/sessions", params={"api_key": KEY})).json()
    assert listing["success"] is True
    assert listing["total"] == 1
    assert listing["sessions"] == [
        {
            "session_id": SID,
            "workspace_id": 7,
            "status": "connected",
            "phone_number": body["phone_number"],
            "connected_at": body["connected_at"],
        }
    ]


async def test_session_not_found_differs_from_endpoint_not_found(
    client: httpx.AsyncClient,
) -> None:
    key = {"api_key": KEY}
    missing = await client.get("/api/sessions/nope/status", params=key)
    assert missing.status_code == 404
    assert missing.json() == {"error": "Session not found"}

    for method, path in (
        ("GET", "/api/sessions/nope/nonexistent"),
        ("GET", f"/api/sessions/{SID}/nonexistent"),
        ("GET", f"/api/sessions/{SID}"),
        ("GET", "/api/messages/send"),
        ("GET", "/nowhere"),
    ):
        response = await client.request(method, path, params=key)
        assert response.status_code == 404, path
        assert response.json() == {"error": "Endpoint not found", "path": path, "method": method}

    for path in (
        f"/api/messages/nope/status?message_id=x&api_key={KEY}",
        f"/api/messages/nope/validate?api_key={KEY}",
        f"/api/internal/sessions/nope/last-activity?api_key={KEY}",
        f"/api/sessions/nope/metadata?api_key={KEY}",
    ):
        response = await client.get(path)
        assert (response.status_code, response.json()) == (404, {"error": "Session not found"})
    for path in ("restore", "reconnect", "regenerate-qr"):
        response = await client.post(f"/api/sessions/nope/{path}", json={"api_key": KEY})
        assert (response.status_code, response.json()) == (404, {"error": "Session not found"})


async def test_known_session_routes_answer(client: httpx.AsyncClient) -> None:
    key = {"api_key": KEY}
    for path in (
        f"/api/messages/{SID}/validate",
        f"/api/internal/sessions/{SID}/last-activity",
        f"/api/sessions/{SID}/metadata",
    ):
        assert (await client.get(path, params=key)).status_code == 200, path
    for path in ("restore", "reconnect", "regenerate-qr"):
        response = await client.post(f"/api/sessions/{SID}/{path}", json=key)
        assert response.status_code == 200
        assert response.json()["success"] is True

    put = await client.put(
        f"/api/sessions/{SID}/metadata", json={"api_key": KEY, "metadata": {"plan": "pro"}}
    )
    assert put.status_code == 200
    got = await client.get(f"/api/sessions/{SID}/metadata", params=key)
    assert got.json()["metadata"] == {"plan": "pro"}


async def test_legacy_sessions_prefix_behaves_like_api(client: httpx.AsyncClient) -> None:
    key = {"api_key": KEY}
    assert (await client.get(f"/sessions/{SID}/status", params=key)).json()["session_id"] == SID
    assert (await client.get("/sessions/nope/status", params=key)).json() == {
        "error": "Session not found"
    }
    odd = await client.post(f"/sessions/{SID}/whatever", json=key)
    assert (odd.status_code, odd.json()["error"]) == (404, "Endpoint not found")
    assert (await client.get(f"/sessions/{SID}/status")).status_code == 401


# ---- lifecycle -----------------------------------------------------------------------------


async def test_create_then_connected_after_connect_delay(client: httpx.AsyncClient) -> None:
    created = await client.post(
        "/api/sessions",
        json={"api_key": KEY, "session_id": "new1", "workspace_id": 3, "account_id": 9},
    )
    assert created.status_code == 200
    assert created.json() == {
        "success": True,
        "session_id": "new1",
        "status": "qr_scanning",
        "qr_code": None,
    }
    status = (await client.get("/api/sessions/new1/status", params={"api_key": KEY})).json()
    assert status["status"] == "qr_scanning"
    assert status["connected_at"] is None

    early = await client.post("/api/messages/send", json=send_body("new1"))
    assert early.status_code == 400
    assert early.json() == {"error": "Session not connected. Please check session status."}

    await asyncio.sleep(0.08)
    status = (await client.get("/api/sessions/new1/status", params={"api_key": KEY})).json()
    assert status["status"] == "connected"
    assert status["workspace_id"] == 3

    again = await client.post("/api/sessions", json={"api_key": KEY, "session_id": "new1"})
    assert again.status_code == 200
    assert again.json()["status"] == "connected"


async def test_create_requires_session_id(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/sessions", json={"api_key": KEY})
    assert (response.status_code, response.json()) == (400, {"error": "session_id is required"})


async def test_delete_known_and_unknown(client: httpx.AsyncClient) -> None:
    gone = await client.request("DELETE", f"/api/sessions/{SID}", json={"api_key": KEY})
    assert (gone.status_code, gone.json()) == (200, {"success": True})
    status = await client.get(f"/api/sessions/{SID}/status", params={"api_key": KEY})
    assert status.status_code == 404

    unknown = await client.request("DELETE", "/api/sessions/nope", json={"api_key": KEY})
    assert (unknown.status_code, unknown.json()) == (
        200,
        {"success": True, "alreadyDisconnected": True},
    )


# ---- messages ------------------------------------------------------------------------------


async def test_send_success_unknown_and_status(client: httpx.AsyncClient) -> None:
    sent = await client.post(
        "/api/messages/send", json=send_body(), headers={"X-Request-Id": "req-1"}
    )
    assert sent.status_code == 200
    body = sent.json()
    assert body["success"] is True
    assert abs(body["timestamp"] - time.time()) < 5
    message_id = body["message_id"]

    other = (await client.post("/api/messages/send", json=send_body(to="1"))).json()
    assert other["message_id"] != message_id

    unknown = await client.post("/api/messages/send", json=send_body("nope"))
    assert (unknown.status_code, unknown.json()) == (404, {"error": "Session not found"})

    status = await client.get(
        f"/api/messages/{SID}/status", params={"api_key": KEY, "message_id": message_id}
    )
    assert status.status_code == 200
    assert status.json()["status"] == "delivered"

    delivered = (await client.get("/_sim/sent")).json()["messages"]
    assert [m["message_id"] for m in delivered] == [message_id, other["message_id"]]
    assert delivered[0]["session_id"] == SID
    assert delivered[0]["request_id"] == "req-1"


async def test_send_media_and_bulk_send(client: httpx.AsyncClient) -> None:
    media = await client.post(
        "/api/messages/send-media",
        json={"api_key": KEY, "session_id": SID, "to": "62812", "media_url": "http://x/y.png"},
    )
    assert media.status_code == 200
    assert media.json()["success"] is True

    started = time.monotonic()
    bulk = await client.post(
        "/api/messages/bulk-send",
        json={
            "api_key": KEY,
            "session_id": SID,
            "messages": [{"phone_number": "1", "message": "a"}, {"to": "2", "message": "b"}, {}],
        },
    )
    # The real instance paces one message a second; the simulator must not.
    assert time.monotonic() - started < 0.5
    body = bulk.json()
    assert bulk.status_code == 200
    assert (body["success"], body["total"], body["successful"], body["failed"]) == (
        True,
        3,
        2,
        1,
    )
    assert len(body["results"]) == 3
    assert len(body["errors"]) == 1
    assert len((await client.get("/_sim/sent")).json()["messages"]) == 3


async def test_send_delay_makes_sends_slow() -> None:
    transport = httpx.ASGITransport(app=make_app(send_delay=0.2))
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as c:
        started = time.monotonic()
        assert (await c.post("/api/messages/send", json=send_body())).status_code == 200
        assert time.monotonic() - started >= 0.2

        await c.post("/_sim/faults", json={"send_delay": 0})
        started = time.monotonic()
        assert (await c.post("/api/messages/send", json=send_body())).status_code == 200
        assert time.monotonic() - started < 0.15


async def test_malformed_json_is_an_express_html_400(client: httpx.AsyncClient) -> None:
    for raw in (b'{"api_key": nope', b"not json", b'{"a":1'):
        response = await client.post(
            "/api/messages/send", content=raw, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert response.text.startswith("<!DOCTYPE html>")
        assert "<pre>SyntaxError: Unexpected" in response.text
    put = await client.put(
        f"/api/sessions/{SID}/metadata", content=b"{", headers={"Content-Type": "application/json"}
    )
    assert put.status_code == 400


# ---- /_sim controls ------------------------------------------------------------------------


async def test_sim_controls_move_sessions(client: httpx.AsyncClient) -> None:
    added = await client.post("/_sim/sessions", json={"session_id": "moved"})
    assert added.json() == {"success": True, "session_id": "moved", "status": "connected"}
    await client.post("/_sim/sessions", json={"session_id": "offline", "status": "disconnected"})
    listed = (await client.get("/_sim/sessions")).json()["sessions"]
    assert {s["session_id"]: s["status"] for s in listed} == {
        SID: "connected",
        "moved": "connected",
        "offline": "disconnected",
    }
    assert (await client.post("/api/messages/send", json=send_body("moved"))).status_code == 200
    assert (await client.post("/api/messages/send", json=send_body("offline"))).status_code == 400

    dropped = await client.delete("/_sim/sessions/moved")
    assert dropped.json() == {"success": True, "removed": True}
    lost = await client.post("/api/messages/send", json=send_body("moved"))
    assert lost.json() == {"error": "Session not found"}

    bad = await client.post("/_sim/sessions", json={"session_id": "x", "status": "weird"})
    assert bad.status_code == 400


async def test_sim_log_records_requests_but_not_controls(client: httpx.AsyncClient) -> None:
    await client.get("/health", headers={"X-Request-Id": "abc"})
    await client.get(f"/api/sessions/{SID}/status", params={"api_key": KEY})
    await client.post("/api/messages/send", json=send_body())
    await client.get(f"/sessions/{SID}/status", params={"api_key": KEY})
    await client.get("/_sim/sessions")
    requests = (await client.get("/_sim/log")).json()["requests"]
    assert [(r["method"], r["path"], r["status"]) for r in requests] == [
        ("GET", "/health", 200),
        ("GET", f"/api/sessions/{SID}/status", 200),
        ("POST", "/api/messages/send", 200),
        ("GET", f"/sessions/{SID}/status", 200),
    ]
    assert requests[0]["request_id"] == "abc"
    assert requests[0]["headers"]["x-request-id"] == "abc"
    assert requests[1]["session_id"] == SID
    assert requests[1]["query"] == "api_key=***"
    assert requests[2]["session_id"] == SID
    assert requests[3]["session_id"] == SID

    await client.delete("/_sim/log")
    assert (await client.get("/_sim/log")).json()["requests"] == []


async def test_faults_validate_and_report(client: httpx.AsyncClient) -> None:
    state = (await client.post("/_sim/faults", json={"send_delay": 1.5})).json()
    assert state["send_delay"] == 1.5
    assert state["die_on_send"] is False
    assert (await client.post("/_sim/faults", json={"send_delay": "x"})).status_code == 400
    assert (await client.post("/_sim/faults", json={"die_on_send": 1})).status_code == 400

    await client.post("/_sim/faults", json={"unhealthy": True})
    assert (await client.get("/health")).status_code == 503


# ---- event log file ------------------------------------------------------------------------


async def test_log_file_has_one_line_per_event_and_no_key(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    transport = httpx.ASGITransport(app=make_app(log_path=str(log)))
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as c:
        await c.get("/api/sessions", params={"api_key": KEY})
        await c.get("/api/sessions", params={"api_key": "a-wrong-key"})
        sent = await c.post(
            "/api/messages/send",
            json=send_body(),
            headers={"X-Request-Id": "r-9", "Idempotency-Key": "k-1", "X-Api-Key": KEY},
        )
        # Each line is on disk as soon as the response exists: nothing waits for a flush.
        lines = [json.loads(line) for line in log.read_text().splitlines()]

    assert [e["event"] for e in lines] == ["request", "request", "sent", "request"]
    assert [e.get("status") for e in lines] == [200, 401, None, 200]
    assert all(e["instance"] == "sim-a" for e in lines)
    assert lines[1]["query"] == "api_key=***"
    delivered = lines[2]
    assert delivered["message_id"] == sent.json()["message_id"]
    assert (delivered["session_id"], delivered["request_id"], delivered["idempotency_key"]) == (
        SID,
        "r-9",
        "k-1",
    )
    assert lines[3]["headers"]["idempotency-key"] == "k-1"
    text = log.read_text()
    assert KEY not in text
    assert "a-wrong-key" not in text


# ---- a real process ------------------------------------------------------------------------


def test_cli_rejects_a_bad_delay() -> None:
    with pytest.raises(SystemExit):
        main(["--port", "1", "--connect-delay", "-1"])


async def test_real_process_dies_on_send_after_logging_it(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "proxy.simulator", "--port", "0", "--log", str(log)),
        *("--api-key", KEY, "--sessions", SID, "--name", "doomed"),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        # --port 0 picks a free port and announces it, so parallel runs cannot collide.
        announced = json.loads(await asyncio.wait_for(proc.stdout.readline(), 20))
        assert announced["event"] == "listening"
        async with httpx.AsyncClient(base_url=announced["url"], timeout=5) as c:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if (await c.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "simulator never became healthy"
                await asyncio.sleep(0.05)

            armed = await c.post("/_sim/faults", json={"die_on_send": True})
            assert armed.json()["die_on_send"] is True
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                await c.post(
                    "/api/messages/send", json=send_body(), headers={"X-Request-Id": "last"}
                )
        assert await asyncio.wait_for(proc.wait(), 10) == 1
        events = [json.loads(x) for x in log.read_text().splitlines()]
        assert events[-1]["event"] == "received"
        assert events[-1]["request_id"] == "last"
        assert events[-1]["session_id"] == SID
        assert events[-1]["instance"] == "doomed"
        assert not any(e["event"] == "sent" for e in events)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
