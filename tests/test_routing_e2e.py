"""End to end: three simulator processes, the proxy under uvicorn, 1,000 mixed requests.

Every request must reach the instance that owns its session (proven by the instances' own
request logs, matched by X-Request-Id) and come back exactly as a direct call to that instance
answers it: same status, same body, same end-to-end headers.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import httpx

from tests.conftest import API_KEY, Fleet

# Headers that legitimately differ between two calls, or that the proxy adds by contract.
VOLATILE = {"date", "x-request-id", "x-proxy-instance", "x-proxy-attempts", "connection"}
# Fields that differ between two sends (a new message each time).
PER_CALL_FIELDS = {"message_id", "timestamp", "results"}


def _comparable_body(response: httpx.Response) -> Any:
    document = response.json()
    if isinstance(document, dict):
        return {k: v for k, v in document.items() if k not in PER_CALL_FIELDS}
    return document


def _headers(response: httpx.Response, body_varies: bool) -> dict[str, str]:
    skip = VOLATILE | ({"content-length", "etag"} if body_varies else set())
    return {k: v for k, v in response.headers.items() if k not in skip}


def _mixed_requests(sessions: list[str], count: int, rng: random.Random) -> list[dict[str, Any]]:
    kinds = [
        ("GET", "/api/sessions/{id}/status"),
        ("GET", "/api/sessions/{id}/metadata"),
        ("PUT", "/api/sessions/{id}/metadata"),
        ("GET", "/api/messages/{id}/validate"),
        ("GET", "/api/internal/sessions/{id}/last-activity"),
        ("POST", "/api/messages/send"),
        ("POST", "/api/messages/send-media"),
        ("POST", "/api/messages/bulk-send"),
    ]
    out = []
    for n in range(count):
        # A few deletes: each removes a session for good, so they stay rare.
        method, path = (
            ("DELETE", "/api/sessions/{id}") if rng.random() < 0.02 else rng.choice(kinds)
        )
        sid = rng.choice(sessions)
        request: dict[str, Any] = {"method": method, "id": f"e2e-{n}", "session_id": sid}
        if "{id}" in path:
            request["url"] = path.format(id=sid)
        else:
            request["url"] = path
        if method == "GET":
            request["params"] = {"api_key": API_KEY}
        elif path.endswith("metadata"):
            request["json"] = {"api_key": API_KEY, "updates": {"n": n}}
        elif method == "POST":
            request["json"] = {
                "session_id": sid,
                "api_key": API_KEY,
                "recipient_phone": f"62812{n:07d}",
                "message": f"message {n}",
                "recipients": [f"62812{n:07d}"],
                "media_url": "https://example.invalid/a.png",
            }
        else:  # DELETE: the session is gone afterwards, so it is not picked again
            request["json"] = {"api_key": API_KEY}
            sessions.remove(sid)
        out.append(request)
    return out


def test_a_thousand_mixed_requests_reach_their_owner_and_come_back_unchanged(
    fleet: Fleet,
) -> None:
    rng = random.Random(20261128)
    sessions = sorted(fleet.sessions)
    requests = _mixed_requests(list(sessions), 1000, rng)
    owner_url = {sid: sim.url for sid, sim in fleet.sessions.items()}
    served_by: Counter[str] = Counter()
    with fleet.client() as via_proxy, httpx.Client(trust_env=False, timeout=30.0) as direct:
        for request in requests:
            kwargs = {k: request[k] for k in ("params", "json") if k in request}
            proxied = via_proxy.request(
                request["method"], request["url"], headers={"x-request-id": request["id"]}, **kwargs
            )
            owner = owner_url[request["session_id"]]
            assert proxied.headers["x-proxy-instance"] == owner, request
            assert proxied.headers["x-request-id"] == request["id"]
            assert "x-proxy-error" not in proxied.headers, proxied.text
            served_by[owner] += 1
            if request["method"] == "DELETE":
                assert proxied.status_code == 200 and proxied.json()["success"] is True
                assert "alreadyDisconnected" not in proxied.json()  # the holder disconnected it
                continue
            reference = direct.request(
                request["method"],
                owner + request["url"],
                headers={"x-request-id": "direct-" + request["id"]},
                **kwargs,
            )
            varies = request["method"] != "GET"
            assert proxied.status_code == reference.status_code, (request, proxied.text)
            assert _comparable_body(proxied) == _comparable_body(reference), request
            assert _headers(proxied, varies) == _headers(reference, varies), request

    # The instances' own logs: each proxied request arrived exactly once, at its owner.
    arrived: dict[str, list[str]] = {}
    for sim in fleet.instances:
        for event in sim.requests():
            rid = event.get("request_id")
            if isinstance(rid, str) and rid.startswith("e2e-"):
                arrived.setdefault(rid, []).append(sim.url)
    for request in requests:
        assert arrived.get(request["id"]) == [owner_url[request["session_id"]]], request
    print(f"\n1000 requests, served by instance: {dict(served_by)}")
    assert len(served_by) == 3


def test_the_session_list_is_merged_across_the_fleet(fleet: Fleet) -> None:
    with fleet.client() as client:
        listing = client.get("/api/sessions", params={"api_key": API_KEY})
    assert listing.status_code == 200
    body = listing.json()
    direct_totals = [
        httpx.get(f"{s.url}/api/sessions", params={"api_key": API_KEY}, trust_env=False).json()[
            "total"
        ]
        for s in fleet.instances
    ]
    assert body["total"] == sum(direct_totals) == len(body["sessions"])
    assert body["failed_instances"] == []
    assert {entry["instance"] for entry in body["sessions"]} <= {s.url for s in fleet.instances}


def test_the_list_with_a_wrong_key_is_refused_as_the_instances_refuse_it(fleet: Fleet) -> None:
    with fleet.client() as client:
        listing = client.get("/api/sessions", params={"api_key": "wrong"})
    assert listing.status_code == 401
    assert listing.json() == {"error": "Invalid API key"}


def test_a_new_session_is_placed_on_the_least_loaded_instance(fleet: Fleet) -> None:
    loads = {
        s.url: httpx.get(f"{s.url}/health", trust_env=False).json()["sessions"]["total"]
        for s in fleet.instances
    }
    lightest = min(loads.values())
    with fleet.client() as client:
        created = client.post(
            "/api/sessions",
            json={
                "session_id": "webjs_1_1732800001_newone01",
                "workspace_id": 1,
                "api_key": API_KEY,
            },
        )
        assert created.status_code == 200, created.text
        placed_on = created.headers["x-proxy-instance"]
        assert loads[placed_on] == lightest
        # The owner is recorded: the next request goes straight there.
        status = client.get(
            "/api/sessions/webjs_1_1732800001_newone01/status", params={"api_key": API_KEY}
        )
    assert status.status_code == 200
    assert status.headers["x-proxy-instance"] == placed_on
    assert "x-proxy-attempts" not in status.headers


def test_requests_without_a_session_go_round_the_healthy_instances(fleet: Fleet) -> None:
    with fleet.client() as client:
        answers = [client.get("/health") for _ in range(6)]
    assert all(a.status_code == 200 for a in answers)
    assert {a.headers["x-proxy-instance"] for a in answers} == {s.url for s in fleet.instances}


def test_the_proxy_adds_forwarding_headers(fleet: Fleet) -> None:
    sid = "webjs_1_1732800002_headers1"
    fleet.instances[1].add_session(sid)
    with fleet.client() as client:
        r = client.get(
            f"/api/sessions/{sid}/status",
            params={"api_key": API_KEY},
            headers={"x-request-id": "fwd-1", "x-forwarded-for": "203.0.113.9", "te": "trailers"},
        )
    assert r.status_code == 200
    owner = fleet.by_url(r.headers["x-proxy-instance"])
    seen = next(e for e in owner.requests() if e.get("request_id") == "fwd-1")
    headers = seen["headers"]
    assert headers["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == fleet.proxy.url.removeprefix("http://")
    assert headers["host"] == owner.url.removeprefix("http://")
    assert "te" not in headers
    assert "***" in seen["query"] and API_KEY not in seen["query"]


def test_health_and_readiness(fleet: Fleet) -> None:
    with fleet.client() as client:
        assert client.get("/healthz").json()["status"] == "alive"
        ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["healthy_instances"] == 3
