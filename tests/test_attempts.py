"""The replay rules, one by one, through the whole app over httpx's MockTransport (unit tests of
the attempt loop; tests/test_failover.py shows the same rules with real processes)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import pytest

from proxy.app import create_app
from proxy.config import load_settings

A, B = "127.0.0.1:3001", "127.0.0.1:3002"
SID = "webjs_1_1732800000_abcdefgh"
RID = "request-under-test"


@dataclass
class Fleet:
    """Two instances; ``holder`` holds SID. ``fail`` maps an instance and route to what the
    client's next request there does instead of being answered."""

    holder: str = A
    fail: dict[tuple[str, str], Callable[[httpx.Request], httpx.Response]] = field(
        default_factory=dict
    )
    dead: set[str] = field(default_factory=set)  # instances that refuse every connection
    # (instance, method, path, request id): the client's requests carry RID, probes do not
    seen: list[tuple[str, str, str, str | None]] = field(default_factory=list)

    def handler(self, request: httpx.Request) -> httpx.Response:
        where = f"{request.url.host}:{request.url.port}"
        path = request.url.path
        if where in self.dead:
            return refused(request)
        self.seen.append((where, request.method, path, request.headers.get("x-request-id")))
        if path == "/health":
            return httpx.Response(200, json={"status": "healthy", "sessions": {"total": 1}})
        # Failures hit the client's request only, never the proxy's own probes.
        rid = request.headers.get("x-request-id")
        failure = self.fail.pop((where, f"{request.method} {path}"), None) if rid == RID else None
        if failure is not None:
            return failure(request)
        if where != self.holder:
            return httpx.Response(404, json={"error": "Session not found"})
        if path.endswith("/status"):
            return httpx.Response(200, json={"session_id": SID, "status": "connected"})
        return httpx.Response(200, json={"success": True, "instance": where})

    def sent(self, method: str, path: str) -> list[str]:
        """Where the client's request went, in order (the proxy's own probes left out)."""
        return [w for w, m, p, rid in self.seen if m == method and p == path and rid == RID]


def refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def reset_after_send(request: httpx.Request) -> httpx.Response:
    # httpcore's words when the connection closes with the request sent and no answer.
    raise httpx.RemoteProtocolError(
        "Server disconnected without sending a response.", request=request
    )


def call(
    fleet: Fleet,
    method: str,
    path: str,
    then: Callable[[Fleet], None] = lambda fleet: None,
    **kwargs: object,
) -> httpx.Response:
    """Learn SID's owner (A) with one status call, as traffic would; apply ``then`` (a move, a
    failure to come); send the request under test."""
    settings = load_settings(
        {
            "SESSION_PROXY_INSTANCES": f"http://{A},http://{B}",
            "SESSION_PROXY_UPSTREAM_CLIENT": "httpx",
            "SESSION_PROXY_HEALTH_INTERVAL": "60",
            "SESSION_PROXY_EJECT_BASE_SECONDS": "0",
            # Off, so a session nobody holds fails at once: holding is tests/test_hold.py's.
            "SESSION_PROXY_HOLD_TIMEOUT": "0",
        }
    )
    app = create_app(settings, transport=httpx.MockTransport(fleet.handler))

    async def run() -> httpx.Response:
        await app.start()
        try:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://proxy"
            ) as client:
                learned = await client.get(f"/api/sessions/{SID}/status")
                assert learned.headers["x-proxy-instance"] == f"http://{A}"
                fleet.seen.clear()
                then(fleet)
                return await client.request(
                    method,
                    path,
                    headers={"x-request-id": RID, **kwargs.pop("headers", {})},  # type: ignore[dict-item]
                    **kwargs,  # type: ignore[arg-type]
                )
        finally:
            await app.stop()

    return asyncio.run(run())


SEND = "/api/messages/send"
BODY = {"session_id": SID, "recipient_phone": "628100", "message": "hi", "api_key": "k"}
STATUS = f"/api/sessions/{SID}/status"


def fail_next(
    instance: str, route: str, failure: Callable[[httpx.Request], httpx.Response]
) -> Callable[[Fleet], None]:
    def apply(fleet: Fleet) -> None:
        fleet.fail[(instance, route)] = failure

    return apply


def test_a_refused_post_whose_session_nobody_else_holds_is_an_honest_502() -> None:
    fleet = Fleet()

    def crash(fleet: Fleet) -> None:
        fleet.dead.add(A)

    answer = call(fleet, "POST", SEND, crash, json=BODY)
    assert answer.status_code == 502
    assert answer.headers["x-proxy-error"] == "upstream-unreachable"
    assert "no other instance holds it" in answer.json()["error"]
    assert answer.headers["x-proxy-instance"] == f"http://{A}"  # names the dead owner


def test_a_refused_post_is_replayed_on_the_new_owner() -> None:
    fleet = Fleet()

    def refuse_and_move(request: httpx.Request) -> httpx.Response:
        fleet.holder = B  # the fleet restored it elsewhere; the refused try never reached A
        return refused(request)

    answer = call(fleet, "POST", SEND, fail_next(A, f"POST {SEND}", refuse_and_move), json=BODY)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-proxy-instance"] == f"http://{B}"
    assert answer.headers["x-proxy-attempts"] == "2"
    assert fleet.sent("POST", SEND) == [A, B]


def move_to_b(fleet: Fleet) -> None:
    fleet.holder = B  # A now answers "Session not found" on its own


@pytest.mark.parametrize("method", ["POST", "PUT", "GET"])
def test_session_not_found_is_replayed_for_any_method(method: str) -> None:
    fleet = Fleet()
    if method == "POST":
        answer = call(fleet, "POST", SEND, move_to_b, json=BODY)
        path = SEND
    elif method == "PUT":
        path = f"/api/sessions/{SID}/unknown-but-refusing"
        answer = call(fleet, "PUT", path, move_to_b, json={"api_key": "k"})
    else:
        path = STATUS
        answer = call(fleet, "GET", path, move_to_b)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-proxy-instance"] == f"http://{B}"
    assert fleet.sent(method, path) == [A, B]


def test_an_unknown_routes_404_is_passed_through_not_replayed() -> None:
    fleet = Fleet()

    def endpoint_not_found(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": "Endpoint not found", "path": STATUS})

    answer = call(fleet, "GET", STATUS, fail_next(A, f"GET {STATUS}", endpoint_not_found))
    assert answer.status_code == 404 and answer.json()["error"] == "Endpoint not found"
    assert "x-proxy-error" not in answer.headers
    assert fleet.sent("GET", STATUS) == [A]


def test_a_post_cut_off_after_it_was_sent_is_never_replayed() -> None:
    fleet = Fleet()

    def reset_and_move(request: httpx.Request) -> httpx.Response:
        fleet.holder = B
        return reset_after_send(request)

    answer = call(fleet, "POST", SEND, fail_next(A, f"POST {SEND}", reset_and_move), json=BODY)
    assert answer.status_code == 502
    assert answer.headers["x-proxy-error"] == "upstream-ambiguous"
    assert fleet.sent("POST", SEND) == [A]  # never sent twice


def test_with_an_idempotency_key_a_cut_off_post_is_not_replayed_either() -> None:
    """A key makes a POST happen at most once (the idempotency store), never twice: cut off
    after it was sent, it is answered ambiguous, and nothing is sent again."""
    fleet = Fleet()

    def reset_and_move(request: httpx.Request) -> httpx.Response:
        fleet.holder = B
        return reset_after_send(request)

    answer = call(
        fleet,
        "POST",
        SEND,
        fail_next(A, f"POST {SEND}", reset_and_move),
        json=BODY,
        headers={"idempotency-key": "job-1"},
    )
    assert answer.status_code == 502
    assert answer.headers["x-proxy-error"] == "upstream-ambiguous"
    assert fleet.sent("POST", SEND) == [A]


def test_a_get_cut_off_after_it_was_sent_is_replayed() -> None:
    fleet = Fleet()
    answer = call(fleet, "GET", STATUS, fail_next(A, f"GET {STATUS}", reset_after_send))
    assert answer.status_code == 200
    assert fleet.sent("GET", STATUS) == [A, A]  # a reset owner may still hold it: asked again


def test_attempts_are_bounded() -> None:
    fleet = Fleet()
    calls = 0

    def always_reset(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        fleet.fail[(A, f"GET {STATUS}")] = always_reset  # and again next time
        return reset_after_send(request)

    answer = call(fleet, "GET", STATUS, fail_next(A, f"GET {STATUS}", always_reset))
    assert answer.status_code == 502
    assert answer.headers["x-proxy-error"] == "replay-exhausted"
    assert calls == 3  # MAX_ATTEMPTS
    assert json.loads(answer.text)["code"] == "replay-exhausted"
