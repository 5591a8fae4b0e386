"""The simulator must answer like a real instance, since every proxy test trusts it to.

These run the simulator in process (ASGI); ``test_contract_table.py`` holds a real process to
the measured answers route by route, and ``test_simulator_processes.py`` covers what needs one
(the start-up restore, the crash when a route timeout fires).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from proxy.simulator import SimulatorConfig, _iso, _route_timeout, create_app, main
from tests.helpers.laravel import LaravelStandIn
from tests.helpers.processes import Simulator

KEY = "test-key"
SID = "webjs_7_1732800000_abcd1234"
ROOT = Path(__file__).resolve().parent.parent
MESSAGE_ID = re.compile(r"true_(.+)@c\.us_[0-9A-F]{20}")


def make_app(**overrides: Any) -> Starlette:
    config = SimulatorConfig(
        name="sim-a", api_key=KEY, connect_delay=0.05, sessions=(SID,), bulk_interval=0.0
    )
    for name, value in overrides.items():
        setattr(config, name, value)
    app = create_app(config)
    crashes: list[int] = []
    # In process, a crash must fail the test, not end pytest.
    app.state.simulator.exit = crashes.append
    app.state.crashes = crashes
    return app


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = make_app()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as c:
        yield c
    assert app.state.crashes == []


def send_body(session_id: str = SID, **extra: Any) -> dict[str, Any]:
    body = {
        "api_key": KEY,
        "session_id": session_id,
        "workspace_id": 7,
        "recipient_phone": "6281234",
        "message": "hi",
        "type": "text",
    }
    body.update(extra)
    return body


async def create(c: httpx.AsyncClient, sid: str, **extra: Any) -> httpx.Response:
    return await c.post("/api/sessions", json={"api_key": KEY, "session_id": sid, **extra})


async def status_of(c: httpx.AsyncClient, sid: str) -> httpx.Response:
    return await c.get(f"/api/sessions/{sid}/status", params={"api_key": KEY})


async def wait_connected(c: httpx.AsyncClient, sid: str) -> None:
    deadline = time.monotonic() + 2.0
    while (await status_of(c, sid)).json().get("status") != "connected":
        assert time.monotonic() < deadline, f"{sid} never connected"
        await asyncio.sleep(0.01)


async def events(c: httpx.AsyncClient, kind: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = (await c.get("/_sim/events")).json()["events"]
    return [e for e in found if e["event"] == kind]


# ---- api_key rules -------------------------------------------------------------------------


async def test_get_takes_the_key_from_the_query_only(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/sessions", params={"api_key": KEY})).status_code == 200
    for response in (
        await client.get("/api/sessions"),
        await client.get("/api/sessions", params={"api_key": "wrong"}),
        await client.get("/api/sessions", params=[("api_key", KEY), ("api_key", KEY)]),
        await client.get("/api/sessions", headers={"X-API-Key": KEY}),
        await client.get("/api/sessions", headers={"Authorization": f"Bearer {KEY}"}),
    ):
        assert response.status_code == 401
        assert response.json() == {"error": "Invalid API key"}


async def test_post_takes_the_key_from_the_body_only(client: httpx.AsyncClient) -> None:
    assert (await create(client, "s1")).status_code == 200
    in_query = await client.post(
        "/api/sessions", params={"api_key": KEY}, json={"session_id": "s2"}
    )
    in_header = await client.post(
        "/api/sessions", headers={"X-API-Key": KEY}, json={"session_id": "s3"}
    )
    wrong = await client.post("/api/sessions", json={"api_key": "nope", "session_id": "s4"})
    no_body = await client.post(f"/api/sessions/{SID}/restore")
    in_query_delete = await client.request(
        "DELETE", f"/api/sessions/{SID}", params={"api_key": KEY}
    )
    for response in (in_query, in_header, wrong, no_body, in_query_delete):
        assert response.status_code == 401
        assert response.json() == {"error": "Invalid API key"}


async def test_the_key_comes_before_every_other_check(client: httpx.AsyncClient) -> None:
    bad = {"api_key": "bad"}
    for method, path, body in (
        ("POST", "/api/messages/send", {"workspace_id": 1, **bad}),
        ("POST", "/api/messages/bulk-send", bad),
        ("PUT", f"/api/sessions/{SID}/metadata", {"updates": "x", **bad}),
        ("POST", "/api/sessions/nope/reconnect", bad),
    ):
        response = await client.request(method, path, json=body)
        assert (response.status_code, response.json()) == (401, {"error": "Invalid API key"})
    response = await client.get(f"/api/messages/{SID}/status")  # no key and no message_id
    assert response.status_code == 401


async def test_unknown_routes_are_404_whatever_the_key(client: httpx.AsyncClient) -> None:
    # No middleware checks the key: each handler does, so an unknown route never gets a 401.
    for path in ("/api/whatever", "/api/whatever?api_key=x", "/sessions/x/status"):
        response = await client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"] == "Endpoint not found"


async def test_open_routes_need_no_key(client: httpx.AsyncClient) -> None:
    for path, status in (
        ("/", 200),
        ("/health", 200),
        ("/health/detailed", 200),
        ("/health/metrics", 200),
        ("/health/ready", 503),  # no Laravel URL configured
        ("/health/live", 503),  # never alive, for real
        ("/info", 500),  # a missing package.json, for real
        (f"/api/internal/sessions/{SID}/last-activity?api_key=bad", 200),
        ("/cleanup/stats", 200),
        ("/remoteauth/health", 200),
    ):
        assert (await client.get(path)).status_code == status, path


# ---- shapes --------------------------------------------------------------------------------


async def test_health_shape_and_express_headers(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    assert response.headers["x-powered-by"] == "Express"
    body = response.json()
    assert set(body) == {"status", "uptime", "sessions", "memory", "timestamp"}
    assert body["status"] == "healthy"
    assert body["sessions"] == {"total": 1, "connected": 1, "disconnected": 0}
    assert set(body["memory"]) == {"used", "total", "unit"}
    assert body["memory"]["unit"] == "MB"
    assert body["uptime"] >= 0
    assert body["timestamp"].endswith("Z")


async def test_ready_follows_the_laravel_configuration() -> None:
    app = make_app(laravel_url="http://127.0.0.1:9")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://s") as c:
        ready = await c.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {
        "laravel_configured": True,
        "api_key_configured": True,
        "active_sessions": True,
        "session_count": 1,
    }


async def test_status_and_list_shapes(client: httpx.AsyncClient) -> None:
    status = await status_of(client, SID)
    assert status.status_code == 200
    body = status.json()
    assert list(body) == [
        "session_id",
        "status",
        "phone_number",
        "workspace_id",
        "connected_at",
        "last_activity",
    ]
    assert (body["session_id"], body["status"], body["workspace_id"]) == (SID, "connected", 7)
    assert re.fullmatch(r"628\d{9}", body["phone_number"])

    listing = (await client.get("/api/sessions", params={"api_key": KEY})).json()
    assert listing == {
        "success": True,
        "sessions": [
            {
                "session_id": SID,
                "workspace_id": 7,
                "status": "connected",
                "phone_number": body["phone_number"],
                "connected_at": body["connected_at"],
            }
        ],
        "total": 1,
    }


async def test_undefined_keys_are_left_out(client: httpx.AsyncClient) -> None:
    # No workspace_id in the create: none in the answers; not connected yet: no connected_at.
    await client.post("/_sim/faults", json={"connect_delay": 60})
    assert (await create(client, "s1")).json() == {
        "success": True,
        "session_id": "s1",
        "status": "qr_scanning",
    }
    body = (await status_of(client, "s1")).json()
    assert set(body) == {"session_id", "status", "phone_number", "last_activity"}
    assert body["phone_number"] is None

    nameless = await client.post("/api/sessions", json={"api_key": KEY, "workspace_id": 5})
    assert nameless.json() == {"success": True, "status": "qr_scanning"}
    listing = (await client.get("/api/sessions", params={"api_key": KEY})).json()
    assert listing["total"] == 3
    assert listing["sessions"][2] == {
        "workspace_id": 5,
        "status": "qr_scanning",
        "phone_number": None,
    }


async def test_unknown_route_shape(client: httpx.AsyncClient) -> None:
    for method, path in (
        ("GET", f"/api/sessions/{SID}"),
        ("GET", f"/api/sessions/{SID}/nonexistent"),
        ("GET", "/api/messages/send"),
        ("POST", "/api/unknown"),
        ("DELETE", "/cleanup/x"),
        ("GET", "/nowhere"),
    ):
        response = await client.request(method, path)
        assert response.status_code == 404, path
        body = response.json()
        assert list(body) == ["error", "path", "method", "available_endpoints", "timestamp"]
        assert (body["error"], body["path"], body["method"]) == ("Endpoint not found", path, method)
        assert len(body["available_endpoints"]) == 9
    # The original URL, query and key included.
    echoed = await client.get("/api/unknown", params={"api_key": KEY, "x": "1"})
    assert echoed.json()["path"] == f"/api/unknown?api_key={KEY}&x=1"


async def test_session_not_found_routes(client: httpx.AsyncClient) -> None:
    key = {"api_key": KEY}
    for path in ("/api/sessions/nope/status", "/api/sessions/nope/metadata"):
        response = await client.get(path, params=key)
        assert (response.status_code, response.json()) == (404, {"error": "Session not found"})
    message = await client.get("/api/messages/nope/status", params={**key, "message_id": "x"})
    assert (message.status_code, message.json()) == (404, {"error": "Session not found"})
    validate = await client.get("/api/messages/nope/validate", params=key)
    assert (validate.status_code, validate.json()) == (
        404,
        {"success": False, "error": "Session not found", "can_send": False},
    )
    for path in ("/api/messages/send", "/api/messages/send-media"):
        response = await client.post(path, json=send_body("nope", media_url="http://x/y.png"))
        assert (response.status_code, response.json()) == (404, {"error": "Session not found"})


# ---- routes that do not reveal a stale owner ---------------------------------------------------


async def test_put_metadata_on_a_session_not_held_loses_the_write(
    client: httpx.AsyncClient,
) -> None:
    put = await client.put(
        "/api/sessions/nope/metadata", json={"api_key": KEY, "updates": {"plan": "pro"}}
    )
    assert (put.status_code, put.json()) == (
        200,
        {"success": True, "session_id": "nope", "metadata": None},
    )
    assert (await status_of(client, "nope")).status_code == 404
    # The object check comes first, held or not.
    for updates in ("x", None, 5, False):
        bad = await client.put(
            "/api/sessions/nope/metadata", json={"api_key": KEY, "updates": updates}
        )
        assert (bad.status_code, bad.json()) == (400, {"error": "Invalid updates object"})
    legacy = await client.put(
        f"/api/sessions/{SID}/metadata", json={"api_key": KEY, "metadata": {"a": 1}}
    )
    assert (legacy.status_code, legacy.json()) == (400, {"error": "Invalid updates object"})


async def test_put_metadata_merges_and_may_overwrite_the_status(
    client: httpx.AsyncClient,
) -> None:
    got = (await client.get(f"/api/sessions/{SID}/metadata", params={"api_key": KEY})).json()
    assert list(got["metadata"]) == [
        "workspaceId",
        "status",
        "createdAt",
        "phoneNumber",
        "lastActivity",
        "performanceStart",
        "qrCode",
        "qrGeneratedAt",
        "qrCount",
        "authenticatedAt",
        "platform",
        "connectedAt",
        "phoneExtractionMethod",
    ]  # no accountId: this session was not created with one
    put = await client.put(
        f"/api/sessions/{SID}/metadata", json={"api_key": KEY, "updates": {"plan": "pro"}}
    )
    assert put.json()["metadata"] == {**got["metadata"], "plan": "pro"}
    arrayed = await client.put(
        f"/api/sessions/{SID}/metadata", json={"api_key": KEY, "updates": ["z"]}
    )
    assert arrayed.json()["metadata"]["0"] == "z"

    await client.put(
        f"/api/sessions/{SID}/metadata", json={"api_key": KEY, "updates": {"status": "error"}}
    )
    assert (await status_of(client, SID)).json()["status"] == "error"
    refused = await client.post("/api/messages/send", json=send_body())
    assert refused.json() == {"error": "Session not connected. Please check session status."}


async def test_reconnect_and_regenerate_qr_start_the_session_here(
    client: httpx.AsyncClient,
) -> None:
    body = {"api_key": KEY, "workspace_id": 2, "account_id": 21}
    reconnect = await client.post("/api/sessions/elsewhere1/reconnect", json=body)
    assert (reconnect.status_code, reconnect.json()) == (
        200,
        {"success": True, "session_id": "elsewhere1", "status": "qr_scanning"},
    )
    regenerate = await client.post("/api/sessions/elsewhere2/regenerate-qr", json=body)
    assert (regenerate.status_code, regenerate.json()) == (200, {"expires_in": 300})
    for sid in ("elsewhere1", "elsewhere2"):
        await wait_connected(client, sid)
        meta = (await client.get(f"/api/sessions/{sid}/metadata", params={"api_key": KEY})).json()
        assert (meta["metadata"]["workspaceId"], meta["metadata"]["accountId"]) == (2, 21)
    started = await events(client, "session_started")
    assert [(e["session_id"], e["via"]) for e in started] == [
        ("elsewhere1", "reconnect"),
        ("elsewhere2", "regenerate-qr"),
    ]


async def test_reconnect_of_a_held_session_disconnects_then_creates(
    client: httpx.AsyncClient,
) -> None:
    await create(client, "second")
    await wait_connected(client, "second")
    await client.put(
        f"/api/sessions/{SID}/metadata", json={"api_key": KEY, "updates": {"plan": "pro"}}
    )
    again = await client.post(f"/api/sessions/{SID}/reconnect", json={"api_key": KEY})
    assert again.json() == {"success": True, "session_id": SID, "status": "qr_scanning"}
    status = (await status_of(client, SID)).json()
    assert status["status"] in ("qr_scanning", "authenticated")
    assert "workspace_id" not in status  # the reconnect body had none
    meta = (await client.get(f"/api/sessions/{SID}/metadata", params={"api_key": KEY})).json()
    assert "plan" not in meta["metadata"]
    # Deleted and added again: it moved to the end of the list.
    listing = (await client.get("/api/sessions", params={"api_key": KEY})).json()["sessions"]
    assert [s["session_id"] for s in listing] == ["second", SID]
    assert [e["session_id"] for e in await events(client, "session_stopped")] == [SID]
    await wait_connected(client, SID)


async def test_delete_held_and_not_held(client: httpx.AsyncClient) -> None:
    gone = await client.request("DELETE", f"/api/sessions/{SID}", json={"api_key": KEY})
    assert (gone.status_code, gone.json()) == (
        200,
        {"success": True, "message": "Session disconnected successfully"},
    )
    assert (await status_of(client, SID)).status_code == 404
    not_held = {
        "success": True,
        "message": "Session already disconnected or not found in memory",
        "alreadyDisconnected": True,
    }
    for sid in (SID, "foo"):
        unknown = await client.request("DELETE", f"/api/sessions/{sid}", json={"api_key": KEY})
        assert (unknown.status_code, unknown.json()) == (200, not_held)
    # A held DELETE destroys the client and touches no file; a DELETE of a webjs_ id that is
    # not held deletes sessions/{workspace}/{id} (not where the credentials are).
    deleted = await events(client, "session_files_deleted")
    assert [(e["session_id"], e["path"]) for e in deleted] == [(SID, f"sessions/7/{SID}")]


async def test_last_activity_is_always_empty_and_needs_no_key(client: httpx.AsyncClient) -> None:
    for sid in (SID, "never-existed"):
        response = await client.get(f"/api/internal/sessions/{sid}/last-activity")
        assert (response.status_code, response.json()) == (
            200,
            {
                "success": True,
                "data": {
                    "session_id": sid,
                    "last_activity": None,
                    "device_type": None,
                    "seconds_since_activity": None,
                    "message_count": 0,
                },
            },
        )


async def test_restore_always_fails(client: httpx.AsyncClient) -> None:
    for sid in (SID, "nope"):
        response = await client.post(f"/api/sessions/{sid}/restore", json={"api_key": KEY})
        assert (response.status_code, response.json()) == (
            500,
            {"error": "workspaceId is not defined"},
        )


# ---- lifecycle -----------------------------------------------------------------------------


async def test_create_goes_through_the_measured_states() -> None:
    app = make_app(connect_delay=0.6)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://s") as c:
        created = await create(c, "new1", workspace_id=3, account_id=9)
        assert created.json() == {"success": True, "session_id": "new1", "status": "qr_scanning"}
        seen = [(await status_of(c, "new1")).json()["status"]]
        early = await c.post("/api/messages/send", json=send_body("new1"))
        assert (early.status_code, early.json()) == (
            400,
            {"error": "Session not connected. Please check session status."},
        )
        deadline = time.monotonic() + 3
        while seen[-1] != "connected":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
            status = (await status_of(c, "new1")).json()
            if status["status"] != seen[-1]:
                seen.append(status["status"])
        assert seen == ["qr_scanning", "authenticated", "connected"]
        assert status["workspace_id"] == 3
        assert status["phone_number"] and status["connected_at"]
        meta = (await c.get("/api/sessions/new1/metadata", params={"api_key": KEY})).json()
        assert meta["metadata"]["accountId"] == 9


async def test_create_of_a_held_session_replaces_it(client: httpx.AsyncClient) -> None:
    await create(client, "first")
    await wait_connected(client, "first")
    await client.post("/_sim/faults", json={"connect_delay": 60})
    again = await create(client, SID, workspace_id=7)
    assert again.json() == {"success": True, "session_id": SID, "status": "qr_scanning"}
    status = (await status_of(client, SID)).json()
    assert (status["status"], status["phone_number"]) == ("qr_scanning", None)
    assert "connected_at" not in status
    # A replaced entry keeps its place in the list.
    listing = (await client.get("/api/sessions", params={"api_key": KEY})).json()["sessions"]
    assert [s["session_id"] for s in listing] == [SID, "first"]
    replaced = await events(client, "session_started")
    assert [(e["session_id"], e["replaced"]) for e in replaced] == [("first", False), (SID, True)]


async def test_create_with_an_id_the_library_refuses(client: httpx.AsyncClient) -> None:
    response = await create(client, "bad.id")
    assert (response.status_code, response.json()) == (
        500,
        {
            "error": "Invalid clientId. Only alphanumeric characters, underscores and hyphens"
            " are allowed."
        },
    )
    assert (await status_of(client, "bad.id")).status_code == 404


# ---- messages ------------------------------------------------------------------------------


async def test_send_checks_fields_then_phone_then_session(client: httpx.AsyncClient) -> None:
    missing = {
        "error": "Missing required fields",
        "required": ["session_id", "recipient_phone", "message"],
    }
    for body in (
        send_body(message=""),
        send_body(session_id=""),
        {k: v for k, v in send_body().items() if k != "recipient_phone"},
        send_body(recipient_phone=None, phone_number="6281234"),  # the old field is not read
        send_body(recipient_phone=None, to="6281234"),
    ):
        response = await client.post("/api/messages/send", json=body)
        assert (response.status_code, response.json()) == (400, missing)
    for sid in (SID, "nope"):  # the phone is checked before the session
        response = await client.post(
            "/api/messages/send", json=send_body(sid, recipient_phone="abc")
        )
        assert (response.status_code, response.json()) == (
            400,
            {"error": "Invalid phone number format"},
        )
    numeric = await client.post("/api/messages/send", json=send_body(recipient_phone=628111))
    assert (numeric.status_code, numeric.json()) == (
        500,
        {"error": "recipient_phone.replace is not a function"},
    )
    number_message = await client.post("/api/messages/send", json=send_body(message=5))
    assert number_message.json() == {"error": "Message must be string or object"}


async def test_send_success_and_what_was_sent(client: httpx.AsyncClient) -> None:
    sent = await client.post(
        "/api/messages/send",
        json=send_body(recipient_phone="+62 811-1"),
        headers={"X-Request-Id": "req-1"},
    )
    assert sent.status_code == 200
    body = sent.json()
    assert list(body) == ["success", "message_id", "timestamp"]
    assert abs(body["timestamp"] - time.time()) < 5
    # The recipient goes into the chat id as given.
    match = MESSAGE_ID.fullmatch(body["message_id"])
    assert match is not None and match.group(1) == "+62 811-1"

    untyped = {k: v for k, v in send_body().items() if k != "type"}
    assert MESSAGE_ID.fullmatch(
        (await client.post("/api/messages/send", json=untyped)).json()["message_id"]
    )
    # Any type but text sends nothing and still says success.
    image = await client.post("/api/messages/send", json=send_body(type="image"))
    assert (image.status_code, image.json()) == (200, {"success": True})
    failed = await client.post("/api/messages/send", json=send_body(message="x __fake_fail__"))
    assert (failed.status_code, failed.json()) == (500, {"error": "fake send failure"})

    delivered = (await client.get("/_sim/sent")).json()["messages"]
    assert len(delivered) == 2
    assert delivered[0]["message_id"] == body["message_id"]
    assert (delivered[0]["session_id"], delivered[0]["request_id"]) == (SID, "req-1")


async def test_send_media(client: httpx.AsyncClient) -> None:
    body = {
        "api_key": KEY,
        "session_id": SID,
        "workspace_id": 7,
        "recipient_phone": "628111",
        "media_url": "http://127.0.0.1:9/x.png",
        "caption": "c",
        "filename": "x.png",
    }
    media = await client.post("/api/messages/send-media", json=body)
    assert media.status_code == 200
    assert MESSAGE_ID.fullmatch(media.json()["message_id"])
    no_url = await client.post(
        "/api/messages/send-media", json={k: v for k, v in body.items() if k != "media_url"}
    )
    assert (no_url.status_code, no_url.json()) == (
        400,
        {
            "error": "Missing required fields",
            "required": ["session_id", "recipient_phone", "media_url"],
        },
    )


async def test_bulk_send_paces_and_reports_per_recipient() -> None:
    app = make_app(bulk_interval=0.1)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://s") as c:
        body = {
            "api_key": KEY,
            "session_id": SID,
            "workspace_id": 7,
            "recipients": ["628111", "628222", "628333"],
            "message": "bulk",
            "type": "text",
        }
        started = time.monotonic()
        bulk = await c.post("/api/messages/bulk-send", json=body)
        # A pause after every success, the last one included.
        assert time.monotonic() - started >= 0.3
        result = bulk.json()
        assert bulk.status_code == 200
        assert (result["success"], result["total"], result["successful"], result["failed"]) == (
            True,
            3,
            3,
            0,
        )
        assert result["errors"] == []
        assert [r["recipient"] for r in result["results"]] == body["recipients"]
        assert all(
            set(r) == {"recipient", "success", "message_id", "timestamp"} for r in result["results"]
        )

        # Not held or not connected: still a 200, one failure per recipient, no pause.
        await c.post("/_sim/sessions", json={"session_id": "waiting", "status": "qr_scanning"})
        for sid, error in (("nope", "Session not found"), ("waiting", "Session not connected")):
            started = time.monotonic()
            failed = (
                await c.post("/api/messages/bulk-send", json={**body, "session_id": sid})
            ).json()
            assert time.monotonic() - started < 0.1
            failures = [
                {"recipient": r, "success": False, "error": error} for r in body["recipients"]
            ]
            assert failed == {
                "success": True,
                "total": 3,
                "successful": 0,
                "failed": 3,
                "results": failures,
                "errors": failures,
            }


async def test_sent_events_carry_the_text(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    transport = httpx.ASGITransport(app=make_app(log_path=str(log)))
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as c:
        long_text = "x" * 499 + "é" + "tail that is cut off"
        for message in ("first", long_text, {"text": "an object"}):
            sent = await c.post("/api/messages/send", json=send_body(message=message))
            assert sent.status_code == 200, sent.text
        media = await c.post(
            "/api/messages/send-media",
            json={**send_body(), "media_url": "http://127.0.0.1:9/x.png", "caption": "c"},
        )
        assert media.status_code == 200
        bulk = await c.post(
            "/api/messages/bulk-send",
            json={**send_body(), "recipients": ["628111", "628222"], "message": "to all"},
        )
        assert bulk.json()["successful"] == 2
        delivered = (await c.get("/_sim/sent")).json()["messages"]
    texts = ["first", "x" * 499 + "é", '{"text": "an object"}', None, "to all", "to all"]
    assert [m["text"] for m in delivered] == texts
    assert [m["recipient"] for m in delivered[-2:]] == ["628111@c.us", "628222@c.us"]
    # The same in the log file, in the order they were sent.
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["text"] for e in logged if e["event"] == "sent"] == texts


async def test_bulk_send_checks(client: httpx.AsyncClient) -> None:
    body = {"api_key": KEY, "session_id": SID, "recipients": ["628111"], "message": "m"}
    missing = {"error": "Missing required fields", "required": ["session_id", "recipients (array)"]}
    for change, status, answer in (
        ({"recipients": []}, 400, missing),
        ({"recipients": "628111"}, 400, missing),
        ({"messages": [{"to": "1"}], "recipients": None}, 400, missing),
        ({"message": ""}, 400, {"error": "Message content is required"}),
        (
            {"recipients": ["628111", "abc"]},
            400,
            {
                "error": "Invalid phone number format for some recipients",
                "invalid_recipients": ["abc"],
            },
        ),
        ({"recipients": [628111]}, 500, {"error": "phone.replace is not a function"}),
    ):
        response = await client.post("/api/messages/bulk-send", json={**body, **change})
        assert (response.status_code, response.json()) == (status, answer), change


async def test_message_status_and_validate(client: httpx.AsyncClient) -> None:
    key = {"api_key": KEY}
    status = await client.get(f"/api/messages/{SID}/status", params={**key, "message_id": "X"})
    assert status.status_code == 200
    body = status.json()
    assert list(body) == [
        "success",
        "session_id",
        "message_id",
        "session_status",
        "connected_at",
        "last_activity",
        "note",
    ]
    assert (body["message_id"], body["session_status"]) == ("X", "connected")
    # The message id is checked before the session.
    for sid in (SID, "nope"):
        no_id = await client.get(f"/api/messages/{sid}/status", params=key)
        assert (no_id.status_code, no_id.json()) == (
            400,
            {"error": "Missing required field: message_id"},
        )
    validate = (await client.get(f"/api/messages/{SID}/validate", params=key)).json()
    assert {k: v for k, v in validate.items() if k not in ("last_activity", "phone_number")} == {
        "success": True,
        "session_id": SID,
        "status": "connected",
        "can_send": True,
        "is_healthy": True,
        "recommendations": ["Session is ready to send messages"],
    }

    await client.post("/_sim/sessions", json={"session_id": "waiting", "status": "qr_scanning"})
    short = await client.get("/api/messages/waiting/status", params={**key, "message_id": "X"})
    assert (short.status_code, short.json()) == (400, {"error": "Session not connected"})
    waiting = (await client.get("/api/messages/waiting/validate", params=key)).json()
    assert (waiting["can_send"], waiting["recommendations"]) == (
        False,
        ["Session is waiting for QR code scan"],
    )


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


async def test_a_session_closed_during_a_slow_send(client: httpx.AsyncClient) -> None:
    await client.post("/_sim/faults", json={"send_delay": 0.2})
    slow = asyncio.create_task(client.post("/api/messages/send", json=send_body()))
    await asyncio.sleep(0.05)  # on purpose: the send is in its 0.2 s delay (nothing shows that)
    await client.request("DELETE", f"/api/sessions/{SID}", json={"api_key": KEY})
    response = await slow
    assert (response.status_code, response.json()) == (
        500,
        {"error": "Protocol error (Runtime.callFunctionOn): Session closed."},
    )


# ---- bodies --------------------------------------------------------------------------------


async def test_malformed_json_is_an_express_html_400_with_v8s_message(
    client: httpx.AsyncClient,
) -> None:
    for raw, message in (
        (
            b'{"session_id": "x", bad json',
            "Expected double-quoted property name in JSON at position 20",
        ),
        (b"{bad", "Expected property name or &#39;}&#39; in JSON at position 1"),
        (
            b'{"a":1',
            "Expected &#39;,&#39; or &#39;}&#39; after property value in JSON at position 6",
        ),
        (
            b'{"api_key": nope',
            "Unexpected token &#39;o&#39;, &quot;{&quot;api_key&quot;: nope&quot;"
            " is not valid JSON",
        ),
        (b"not json", "Unexpected token &#39;n&#39;, &quot;not json&quot; is not valid JSON"),
        (b"   ", "Unexpected end of JSON input"),
    ):
        response = await client.post(
            "/api/messages/send", content=raw, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert response.headers["content-security-policy"] == "default-src 'none'"
        assert response.text.startswith("<!DOCTYPE html>")
        assert f"<pre>SyntaxError: {message}<br>" in response.text, response.text
    # No handler runs, so no key check either.
    put = await client.put(
        f"/api/sessions/{SID}/metadata", content=b"{", headers={"Content-Type": "application/json"}
    )
    assert put.status_code == 400


async def test_urlencoded_bodies_are_read_like_qs(client: httpx.AsyncClient) -> None:
    form = {
        "api_key": KEY,
        "session_id": SID,
        "recipients[]": ["628111", "628222"],
        "message": "m",
    }
    bulk = await client.post("/api/messages/bulk-send", data=form)
    assert bulk.json()["successful"] == 2
    put = await client.put(
        f"/api/sessions/{SID}/metadata", data={"api_key": KEY, "updates[plan]": "pro"}
    )
    assert put.json()["metadata"]["plan"] == "pro"


def test_route_timeouts_match_like_the_real_patterns() -> None:
    for path, seconds in (
        ("/api/sessions", 60),
        ("/api/sessions/x/status", 60),
        ("/api/sessions/x/regenerate-qr", 60),
        ("/api/messages/send", 45),
        ("/api/messages/send-media", 45),
        ("/api/messages/bulk-send", 30),
        ("/api/messages/x/status", 30),
        ("/health", 5),
        ("/health/ready", 5),
        ("/remoteauth/health", 5),
        ("/API/SESSIONS", 30),
        ("/api/internal/sessions/x/last-activity", 30),
    ):
        assert _route_timeout(path) == seconds, path


# ---- saved logins (--auth-dir) and starts in progress --------------------------------------


def make_client(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim")


async def wait_status(c: httpx.AsyncClient, sid: str, wanted: str) -> None:
    deadline = time.monotonic() + 10.0
    while (status := (await status_of(c, sid)).json().get("status")) != wanted:
        assert time.monotonic() < deadline, f"{sid} is {status}, never {wanted}"
        await asyncio.sleep(0.02)


async def stays(c: httpx.AsyncClient, sid: str, status: str, seconds: float) -> None:
    """``sid`` keeps ``status`` for at least ``seconds`` (a lower bound: no upper one)."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        assert (await status_of(c, sid)).json()["status"] == status
        await asyncio.sleep(0.05)


async def starts(c: httpx.AsyncClient) -> tuple[int, int]:
    listed = (await c.get("/_sim/sessions")).json()
    return listed["starting"], listed["max_starting"]


def login_file(auth_dir: Path, sid: str) -> Path:
    return auth_dir / f"session-{sid}.json"


async def test_without_an_auth_dir_every_start_connects_and_scan_is_refused(
    client: httpx.AsyncClient,
) -> None:
    await create(client, "plain")
    await wait_connected(client, "plain")
    refused = await client.post("/_sim/sessions/plain/scan")
    assert refused.status_code == 409
    assert refused.json()["status"] == "connected"
    missing = await client.post("/_sim/sessions/nobody/scan")
    assert (missing.status_code, missing.json()) == (404, {"error": "Session not found"})
    assert [e["needs_scan"] for e in await events(client, "session_started")] == [False]


async def test_a_shared_auth_dir_carries_logins_between_instances(tmp_path: Path) -> None:
    auth = tmp_path / "auth"
    a_app = make_app(name="sim-a", connect_delay=0.2, auth_dir=str(auth))
    b_app = make_app(name="sim-b", connect_delay=0.2, auth_dir=str(auth), sessions=())
    # The sessions given at start are there connected, with their login saved.
    assert login_file(auth, SID).exists()
    async with make_client(a_app) as a, make_client(b_app) as b:
        # Never logged in: it waits for a scan however long the connect delay has passed.
        created = await create(a, "linked")
        assert created.json() == {"success": True, "session_id": "linked", "status": "qr_scanning"}
        await stays(a, "linked", "qr_scanning", 0.6)
        assert not login_file(auth, "linked").exists()
        early = await a.post("/api/messages/send", json=send_body("linked"))
        assert early.status_code == 400
        scanned = await a.post("/_sim/sessions/linked/scan")
        assert scanned.status_code == 200, scanned.text
        await wait_status(a, "linked", "connected")
        assert json.loads(login_file(auth, "linked").read_text())["session_id"] == "linked"
        assert (await a.post("/_sim/sessions/linked/scan")).status_code == 409

        # A destroy (DELETE) leaves the login: the session starts on B with no new QR, as it
        # does on A again.
        gone = await a.request("DELETE", "/api/sessions/linked", json={"api_key": KEY})
        assert gone.json()["success"] is True
        assert login_file(auth, "linked").exists()
        await create(b, "linked")
        await wait_status(b, "linked", "connected")
        await b.post("/api/sessions/linked/reconnect", json={"api_key": KEY})
        await wait_status(b, "linked", "connected")
        started = await events(b, "session_started")
        assert [(e["via"], e["needs_scan"]) for e in started] == [
            ("create", False),
            ("reconnect", False),
        ]
        assert (await b.post("/api/messages/send", json=send_body("linked"))).status_code == 200

        # So does one that B was given; a session never logged in anywhere still waits on B.
        await create(b, SID)
        await create(b, "fresh")
        await wait_status(b, SID, "connected")
        assert (await status_of(b, "fresh")).json()["status"] == "qr_scanning"
        await b.post("/_sim/sessions/fresh/scan")
        await wait_status(b, "fresh", "connected")
        await create(a, "fresh")
        await wait_status(a, "fresh", "connected")
    assert sorted(p.name for p in auth.iterdir()) == [
        "session-fresh.json",
        "session-linked.json",
        f"session-{SID}.json",
    ]


async def test_with_its_own_auth_dir_a_moved_session_needs_a_new_qr(tmp_path: Path) -> None:
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_app = make_app(connect_delay=0.2, auth_dir=str(a_dir), sessions=())
    b_app = make_app(connect_delay=0.2, auth_dir=str(b_dir), sessions=())
    async with make_client(a_app) as a, make_client(b_app) as b:
        # Put connected through /_sim: its login is saved (on A only).
        await a.post("/_sim/sessions", json={"session_id": "moved"})
        assert login_file(a_dir, "moved").exists()
        await a.request("DELETE", "/api/sessions/moved", json={"api_key": KEY})
        await create(b, "moved")
        await stays(b, "moved", "qr_scanning", 0.5)
        # The scan is the rest of the start: authenticated, then connected, over the delays.
        await b.post("/_sim/sessions/moved/scan")
        await wait_status(b, "moved", "connected")
        meta = (await b.get("/api/sessions/moved/metadata", params={"api_key": KEY})).json()
        assert meta["metadata"]["authenticatedAt"] <= meta["metadata"]["connectedAt"]
        assert login_file(b_dir, "moved").exists()
        # Back on A, its own login is still there: no QR needed.
        await create(a, "moved")
        await wait_status(a, "moved", "connected")
        assert (await events(a, "session_started"))[-1]["needs_scan"] is False


async def test_max_starting_counts_overlapping_starts(tmp_path: Path) -> None:
    # Starts that wait for a scan overlap for as long as the test likes, however slow it runs.
    app = make_app(connect_delay=0.2, auth_dir=str(tmp_path / "auth"), sessions=())
    async with make_client(app) as c:
        assert await starts(c) == (0, 0)
        for sid in ("s1", "s2", "s3"):
            await create(c, sid)
        assert await starts(c) == (3, 3)
        # Replaced: still one start of that session; destroyed: no longer starting.
        await create(c, "s1")
        assert await starts(c) == (3, 3)
        await c.request("DELETE", "/api/sessions/s2", json={"api_key": KEY})
        assert await starts(c) == (2, 3)
        # Put in another state through /_sim: stopped.
        await c.post("/_sim/sessions", json={"session_id": "s3", "status": "disconnected"})
        assert await starts(c) == (1, 3)
        await c.post("/_sim/sessions/s1/scan")
        await wait_status(c, "s1", "connected")
        assert await starts(c) == (0, 3)
        await create(c, "s4")
        assert await starts(c) == (1, 3)


async def test_starts_one_after_another_never_overlap() -> None:
    app = make_app(connect_delay=0.2, sessions=())
    async with make_client(app) as c:
        for sid in ("one", "two", "three"):
            await create(c, sid)
            await wait_status(c, sid, "connected")
        assert await starts(c) == (0, 1)
        # A slow start and a quick one: the quick one ends at its connect time, the slow one
        # when it is destroyed.
        await c.post("/_sim/faults", json={"connect_delay": 60})
        await create(c, "slow")
        await c.post("/_sim/faults", json={"connect_delay": 0.2})
        await create(c, "quick")
        assert (await starts(c))[1] == 2
        await wait_status(c, "quick", "connected")
        assert await starts(c) == (1, 2)
        await c.request("DELETE", "/api/sessions/slow", json={"api_key": KEY})
        assert await starts(c) == (0, 2)


async def test_session_connected_is_logged_at_the_connect_moment(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"

    def logged(kind: str) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in log.read_text().splitlines()]
        return [e for e in lines if e["event"] == kind]

    app = make_app(connect_delay=0.3, log_path=str(log))
    async with make_client(app) as c:
        # Nobody reads the session: the connection is logged anyway, when it happens.
        await create(c, "watched")
        deadline = time.monotonic() + 10
        while not logged("session_connected"):
            assert time.monotonic() < deadline, "no session_connected in the log"
            await asyncio.sleep(0.02)
        (started,) = logged("session_started")
        (connected,) = logged("session_connected")
        assert (connected["session_id"], connected["via"]) == ("watched", "create")
        assert connected["instance"] == "sim-a"
        assert connected["started_at"] <= started["t"]
        assert connected["t"] == pytest.approx(connected["started_at"] + 0.3, abs=1e-6)
        status = (await status_of(c, "watched")).json()
        assert status["connected_at"] == _iso(connected["t"])

        # Noticed late (the loop blocked past the connect time): still the connect moment.
        await create(c, "late")
        created_at = time.time()
        time.sleep(0.8)  # noqa: ASYNC251 - on purpose: no timer can fire meanwhile
        assert (await status_of(c, "late")).json()["status"] == "connected"
        late = [e for e in logged("session_connected") if e["session_id"] == "late"]
        assert len(late) == 1
        assert late[0]["t"] == pytest.approx(late[0]["started_at"] + 0.3, abs=1e-6)
        assert late[0]["t"] < created_at + 0.5
        # A session put connected through /_sim is no start: nothing is logged for it.
        await c.post("/_sim/sessions", json={"session_id": "put"})
        assert [e["session_id"] for e in logged("session_connected")] == ["watched", "late"]


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
    await status_of(client, SID)
    await client.post("/api/messages/send", json=send_body())
    await client.get(f"/sessions/{SID}/status", params={"api_key": KEY})
    await client.get("/_sim/sessions")
    requests = (await client.get("/_sim/log")).json()["requests"]
    assert [(r["method"], r["path"], r["status"]) for r in requests] == [
        ("GET", "/health", 200),
        ("GET", f"/api/sessions/{SID}/status", 200),
        ("POST", "/api/messages/send", 200),
        ("GET", f"/sessions/{SID}/status", 404),
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
    assert state == {
        "die_on_send": False,
        "unhealthy": False,
        "send_delay": 1.5,
        "connect_delay": 0.05,
        "bulk_interval": 0.0,
        "timeout_scale": 1.0,
    }
    for bad in (
        {"send_delay": "x"},
        {"die_on_send": 1},
        {"bulk_interval": -1},
        {"timeout_scale": 0},
    ):
        assert (await client.post("/_sim/faults", json=bad)).status_code == 400, bad
    assert (await client.post("/_sim/faults", json={"timeout_scale": 0.5})).json()[
        "timeout_scale"
    ] == 0.5

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
        await c.request("DELETE", "/api/sessions/webjs_3_1_x", json={"api_key": KEY})
        # Each line is on disk as soon as the response exists: nothing waits for a flush.
        lines = [json.loads(line) for line in log.read_text().splitlines()]

    assert [e["event"] for e in lines] == [
        "request",
        "request",
        "sent",
        "request",
        "session_files_deleted",
        "request",
    ]
    assert [e.get("status") for e in lines] == [200, 401, None, 200, None, 200]
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
    assert lines[4]["path"] == "sessions/3/webjs_3_1_x"
    text = log.read_text()
    assert KEY not in text
    assert "a-wrong-key" not in text


# ---- a real process ------------------------------------------------------------------------


def test_cli_rejects_bad_numbers() -> None:
    for argv in (
        ["--port", "1", "--connect-delay", "-1"],
        ["--port", "1", "--bulk-interval", "-1"],
        ["--port", "1", "--timeout-scale", "0"],
    ):
        with pytest.raises(SystemExit):
            main(argv)


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
            # A rejected send does not get that far: the fault stays armed.
            assert (await c.post("/api/messages/send", json=send_body("nope"))).status_code == 404
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                await c.post(
                    "/api/messages/send", json=send_body(), headers={"X-Request-Id": "last"}
                )
        assert await asyncio.wait_for(proc.wait(), 10) == 1
        events = [json.loads(x) for x in log.read_text().splitlines()]
        assert [e["event"] for e in events[-2:]] == ["received", "crashed"]
        received = events[-2]
        assert (received["request_id"], received["session_id"], received["instance"]) == (
            "last",
            SID,
            "doomed",
        )
        assert events[-1]["reason"] == "die_on_send"
        assert not any(e["event"] == "sent" for e in events)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_auth_dir_flag_shares_logins_between_processes(tmp_path: Path) -> None:
    auth = tmp_path / "auth"
    saved, fresh = "webjs_1_1732800000_aaaaaaaa", "webjs_1_1732800001_bbbbbbbb"

    def status(sim: Simulator, sid: str) -> str:
        answer = httpx.get(
            f"{sim.url}/api/sessions/{sid}/status", params={"api_key": KEY}, trust_env=False
        )
        return str(answer.json().get("status"))

    def wait(sim: Simulator, sid: str, wanted: str) -> None:
        deadline = time.monotonic() + 15
        while (now := status(sim, sid)) != wanted:
            assert time.monotonic() < deadline, f"{sid} on {sim.name} is {now}, never {wanted}"
            time.sleep(0.05)

    with LaravelStandIn() as laravel:
        laravel.accounts = [
            {"id": 1, "session_id": saved, "workspace_id": 1, "status": "connected"},
            {"id": 2, "session_id": fresh, "workspace_id": 1, "status": "connected"},
        ]
        a = Simulator.start(tmp_path, "a", sessions=[saved], api_key=KEY, auth_dir=auth)
        with a:
            assert (auth / f"session-{saved}.json").exists()
            a.kill()
            b = Simulator.start(
                tmp_path,
                "b",
                api_key=KEY,
                connect_delay=0.3,
                laravel_url=laravel.url,
                auth_dir=auth,
            )
            with b:
                # The start-up restore starts both: the one with a saved login connects, the
                # other waits for its scan.
                assert b.restored()["restored"] == [saved, fresh]
                wait(b, saved, "connected")
                assert status(b, fresh) == "qr_scanning"
                assert b.starts() == {"starting": 1, "max_starting": 2}
                b.scan(fresh)
                wait(b, fresh, "connected")
                assert b.starts() == {"starting": 0, "max_starting": 2}
                connected = b.wait_event("session_connected", session_id=fresh)
                assert connected["via"] == "restore"
                assert (auth / f"session-{fresh}.json").exists()
