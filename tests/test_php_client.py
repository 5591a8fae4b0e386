"""A real PHP client (Guzzle, what Laravel's HTTP client is built on) talking to the proxy.

The Python tests prove the proxy's behaviour with httpx; these prove that the application the
proxy was built for, Blazz, gets from the proxy what it gets from an instance. ``tests/php/
blazz_client.php`` sends each request the way Blazz does: the method, path, body or query
string, and headers (content type, user agent, the ``X-Timestamp``/``X-Signature`` HMAC pair) of
``WhatsAppServiceClient`` (its own Guzzle client) or of the ``Http`` facade that
``AccountStatusService`` uses. Each case names the Blazz method whose request it reproduces.

What is asserted is what a real fleet must do: a call reaches the instance holding the session,
unchanged; a send after a crash is delivered once, by the new owner; and a reconnect, metadata
update or delete never acts on an instance that no longer holds the session (a real instance
answers those with success for a session it does not hold).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import API_KEY, Fleet, start_fleet, stop_fleet
from tests.helpers.processes import Simulator, child_env

GUZZLE_AUTOLOAD = "/usr/share/php/GuzzleHttp/autoload.php"
CLIENT_SCRIPT = Path(__file__).resolve().parent / "php" / "blazz_client.php"
MISSING_PHP = "php with Guzzle is missing: run ./dev test (it installs php-guzzlehttp-guzzle)"
PHP_TIMEOUT = 90.0  # above the longest client timeout below (a reconnect's 60 s)

# What Blazz sends, with the values its own configuration would put there.
HMAC_SECRET = "blazz-hmac-secret"  # services.whatsapp.hmac_secret (WHATSAPP_HMAC_SECRET)
SERVICE_TIMEOUT = 30  # services.whatsapp.timeout (WHATSAPP_TIMEOUT), WhatsAppServiceClient
WORKSPACE_ID = 1
ACCOUNT_ID = 42  # whatsapp_accounts.id, sent by AccountStatusService::reconnect
RECIPIENT = "6281234567890"  # Contact::phone with the leading '+' stripped, as getContactPhone does
SERVICE_HEADERS = {
    "content-type": "application/json",
    "accept": "application/json",
    "user-agent": "Laravel-WhatsApp-Service/1.0",
}


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def php() -> str:
    # Failing (not skipping) is deliberate: ./dev test installs PHP, so a missing one is a broken
    # setup that must be seen, not a silently thinner suite.
    binary = shutil.which("php")
    if binary is None:
        pytest.fail(MISSING_PHP, pytrace=False)
    probe = subprocess.run(
        [binary, "-r", f"require '{GUZZLE_AUTOLOAD}';"],
        capture_output=True,
        text=True,
        timeout=PHP_TIMEOUT,
        check=False,
    )
    if probe.returncode != 0:
        pytest.fail(f"{MISSING_PHP}\n{probe.stdout}{probe.stderr}", pytrace=False)
    return binary


@pytest.fixture(scope="module")
def shared_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """For the cases that change nothing but their own session: each test uses other sessions."""
    running = start_fleet(tmp_path_factory.mktemp("php-fleet"), sessions_per_instance=8)
    try:
        yield running
    finally:
        stop_fleet(running)


@pytest.fixture
def quiet_fleet(tmp_path: Path) -> Iterator[Fleet]:
    # Health checks every 60 s: the PHP request, not a background probe, is what finds the death
    # or the move. CONFIRM_MAX_AGE=0: no earlier answer counts as proof of the owner, as after a
    # move that happened a while after the proxy last heard from the old owner.
    running = start_fleet(
        tmp_path,
        sessions_per_instance=3,
        env={"SESSION_PROXY_HEALTH_INTERVAL": "60", "SESSION_PROXY_CONFIRM_MAX_AGE": "0"},
    )
    try:
        yield running
    finally:
        stop_fleet(running)


# --- running the PHP client ----------------------------------------------------------------------


def _php(
    php: str,
    fleet: Fleet,
    method: str,
    path: str,
    payload: dict[str, Any] | None,
    *,
    client: str = "service",
    headers: dict[str, str] | None = None,
    timeout: float = SERVICE_TIMEOUT,
) -> dict[str, Any]:
    """One request from ``tests/php/blazz_client.php``; the JSON line it prints."""
    spec = {
        "autoload": GUZZLE_AUTOLOAD,
        "client": client,
        "base_uri": fleet.proxy.url,
        "method": method,
        "path": path,
        "payload": payload or {},
        "headers": headers or {},
        "hmac_secret": HMAC_SECRET if client == "service" else None,
        "timeout": timeout,
    }
    # child_env sets NO_PROXY for loopback: Guzzle honours HTTP(S)_PROXY like curl does, and a
    # developer's proxy must not capture the request.
    done = subprocess.run(
        [php, str(CLIENT_SCRIPT), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=PHP_TIMEOUT,
        env=child_env(),
        check=False,
    )
    assert done.returncode == 0, f"php exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON line from php, got:\n{done.stdout}\n{done.stderr}"
    result: dict[str, Any] = json.loads(lines[0])
    return result


def _show(result: dict[str, Any]) -> str:
    # A string, so pytest prints the whole answer instead of a truncated repr.
    return json.dumps(result, indent=1, sort_keys=True)


# The request shapes, one per Blazz call (payload keys in the order Blazz builds them).


def _create(sid: str) -> dict[str, Any]:
    # WhatsAppServiceClient::createSession, with the $config AccountService passes.
    return {
        "workspace_id": WORKSPACE_ID,
        "session_id": sid,
        "api_key": API_KEY,
        "phone_number": RECIPIENT,
        "provider_type": "webjs",
    }


def _status_query() -> dict[str, Any]:
    # WhatsAppServiceClient::getSessionStatus: a GET, so the payload becomes the query string.
    return {"workspace_id": WORKSPACE_ID, "api_key": API_KEY}


def _send(sid: str, message: str) -> dict[str, Any]:
    # WhatsAppServiceClient::sendMessage, type 'text' (what sendMessageWithFailover posts).
    return {
        "workspace_id": WORKSPACE_ID,
        "session_id": sid,
        "recipient_phone": RECIPIENT,
        "message": message,
        "type": "text",
        "api_key": API_KEY,
    }


def _send_media(sid: str) -> dict[str, Any]:
    # WhatsAppServiceClient::sendMessage with any other type: caption, media_url, filename.
    return {
        "workspace_id": WORKSPACE_ID,
        "session_id": sid,
        "recipient_phone": RECIPIENT,
        "media_url": "https://blazz.example/storage/media/invoice.pdf",
        "caption": "your invoice",
        "filename": "invoice.pdf",
        "api_key": API_KEY,
    }


UPDATES = {"campaign": "spring-sale", "tier": 2}


def _metadata() -> dict[str, Any]:
    # The instance's PUT /api/sessions/{id}/metadata reads {api_key, updates}; Blazz has no
    # caller for it yet, so it goes out through WhatsAppServiceClient's client like the rest.
    return {"api_key": API_KEY, "updates": UPDATES}


def _reconnect() -> dict[str, Any]:
    # AccountStatusService::reconnect: Http::timeout(60) with an X-API-Key header (the instance
    # reads the body's api_key, and priority, which no Blazz caller sends, defaults to normal).
    return {"workspace_id": WORKSPACE_ID, "account_id": ACCOUNT_ID, "api_key": API_KEY}


def _disconnect() -> dict[str, Any]:
    # AccountStatusService::disconnect: Http::timeout(30)->delete(url, data), a JSON body.
    return {"workspace_id": WORKSPACE_ID, "api_key": API_KEY}


KEY_HEADER = {"X-API-Key": API_KEY}


def _reconnect_call(php: str, fleet: Fleet, sid: str) -> dict[str, Any]:
    path = f"/api/sessions/{sid}/reconnect"
    return _php(
        php, fleet, "POST", path, _reconnect(), client="http", headers=KEY_HEADER, timeout=60
    )


def _disconnect_call(php: str, fleet: Fleet, sid: str) -> dict[str, Any]:
    path = f"/api/sessions/{sid}"
    return _php(
        php, fleet, "DELETE", path, _disconnect(), client="http", headers=KEY_HEADER, timeout=30
    )


def _metadata_call(php: str, fleet: Fleet, sid: str) -> dict[str, Any]:
    return _php(php, fleet, "PUT", f"/api/sessions/{sid}/metadata", _metadata())


# --- reading what the instances saw --------------------------------------------------------------


def _session(fleet: Fleet, instance: int, k: int) -> str:
    """The k-th session the fleet started on instance ``instance``."""
    owner = fleet.instances[instance]
    return sorted(s for s, o in fleet.sessions.items() if o is owner)[k]


def _received(fleet: Fleet, request_id: str | None) -> list[tuple[Simulator, dict[str, Any]]]:
    """Every instance request carrying the proxy's id for one client request."""
    assert request_id, "the proxy answered without an X-Request-Id"
    return [
        (sim, event)
        for sim in fleet.instances
        for event in sim.requests()
        if event.get("request_id") == request_id
    ]


def _the_one_delivery(fleet: Fleet, r: dict[str, Any]) -> dict[str, Any]:
    """The single instance request that answered ``r``, sent by the instance that answered."""
    seen = _received(fleet, r["request_id"])
    answered = [(sim, e) for sim, e in seen if e["status"] == r["status"]]
    assert len(answered) == 1, seen
    sim, event = answered[0]
    assert sim.url == r["instance"], seen
    return event


def _assert_service_headers(event: dict[str, Any], r: dict[str, Any]) -> None:
    """The instance got WhatsAppServiceClient's headers, the signature still valid."""
    headers = event["headers"]
    for name, value in SERVICE_HEADERS.items():
        assert headers.get(name) == value, (name, headers)
    sent = r["sent_headers"]
    assert headers.get("x-timestamp") == sent["X-Timestamp"], headers
    assert headers.get("x-signature") == sent["X-Signature"], headers
    expected = hmac.new(
        HMAC_SECRET.encode(), headers["x-timestamp"].encode(), hashlib.sha256
    ).hexdigest()
    assert headers["x-signature"] == expected, headers


def _sent_for(fleet: Fleet, sid: str) -> dict[str, int]:
    return {
        sim.name: sum(1 for e in sim.events("sent") if e.get("session_id") == sid)
        for sim in fleet.instances
    }


def _direct_status(sim: Simulator, sid: str) -> int:
    """What the instance itself says about the session, bypassing the proxy."""
    response = httpx.get(
        f"{sim.url}/api/sessions/{sid}/status",
        params={"api_key": API_KEY},
        timeout=5.0,
        trust_env=False,
    )
    return response.status_code


# --- every request shape, on a healthy fleet -----------------------------------------------------


def test_create_session_then_status_as_whatsapp_service_client_sends_them(
    php: str, shared_fleet: Fleet
) -> None:
    fleet = shared_fleet
    sid = str(uuid.uuid4())  # createSession passes the account's uuid as session_id

    created = _php(php, fleet, "POST", "/api/sessions", _create(sid))

    assert created["exception"] is None, _show(created)
    assert created["status"] == 200, _show(created)
    assert created["body"]["success"] is True, _show(created)
    assert created["body"]["session_id"] == sid, _show(created)
    assert created["content_type"].startswith("application/json"), _show(created)
    _assert_service_headers(_the_one_delivery(fleet, created), created)

    status = _php(php, fleet, "GET", f"/api/sessions/{sid}/status", _status_query())

    assert status["exception"] is None, _show(status)
    assert status["status"] == 200, _show(status)
    assert status["instance"] == created["instance"], _show(status)  # the one that placed it
    assert status["body"]["session_id"] == sid, _show(status)
    assert status["body"]["status"] == "connected", _show(status)
    event = _the_one_delivery(fleet, status)
    _assert_service_headers(event, status)
    # http_build_query's string, in its order, with no body; the instance log masks the key.
    assert event["query"] == f"workspace_id={WORKSPACE_ID}&api_key=***", event


def test_text_send_with_recipient_phone_is_delivered_once_by_the_owner(
    php: str, shared_fleet: Fleet
) -> None:
    fleet = shared_fleet
    owner = fleet.instances[0]
    sid = _session(fleet, 0, 0)

    r = _php(php, fleet, "POST", "/api/messages/send", _send(sid, "hello from blazz"))

    assert r["exception"] is None, _show(r)
    assert r["status"] == 200, _show(r)
    assert r["body"]["success"] is True, _show(r)
    assert r["body"]["message_id"], _show(r)
    assert r["instance"] == owner.url, _show(r)
    _assert_service_headers(_the_one_delivery(fleet, r), r)
    assert _sent_for(fleet, sid) == {s.name: int(s is owner) for s in fleet.instances}


def test_media_send_is_delivered_once_by_the_owner(php: str, shared_fleet: Fleet) -> None:
    fleet = shared_fleet
    owner = fleet.instances[1]
    sid = _session(fleet, 1, 0)

    r = _php(php, fleet, "POST", "/api/messages/send-media", _send_media(sid))

    assert r["exception"] is None, _show(r)
    assert r["status"] == 200, _show(r)
    assert r["body"]["success"] is True, _show(r)
    assert r["instance"] == owner.url, _show(r)
    _assert_service_headers(_the_one_delivery(fleet, r), r)
    assert _sent_for(fleet, sid) == {s.name: int(s is owner) for s in fleet.instances}


def test_metadata_put_with_updates_reaches_the_owner(php: str, shared_fleet: Fleet) -> None:
    fleet = shared_fleet
    owner = fleet.instances[2]
    sid = _session(fleet, 2, 0)

    r = _metadata_call(php, fleet, sid)

    assert r["exception"] is None, _show(r)
    assert r["status"] == 200, _show(r)
    assert r["body"]["success"] is True, _show(r)
    assert r["instance"] == owner.url, _show(r)
    _assert_service_headers(_the_one_delivery(fleet, r), r)
    read = _php(php, fleet, "GET", f"/api/sessions/{sid}/metadata", {"api_key": API_KEY})
    assert read["status"] == 200, _show(read)
    assert read["instance"] == owner.url, _show(read)
    for key, value in UPDATES.items():
        assert read["body"]["metadata"].get(key) == value, _show(read)


def test_reconnect_as_account_status_service_sends_it(php: str, shared_fleet: Fleet) -> None:
    fleet = shared_fleet
    owner = fleet.instances[0]
    sid = _session(fleet, 0, 1)

    r = _reconnect_call(php, fleet, sid)

    assert r["exception"] is None, _show(r)
    assert r["status"] == 200, _show(r)
    assert r["body"]["success"] is True, _show(r)
    assert r["instance"] == owner.url, _show(r)
    event = _the_one_delivery(fleet, r)
    assert event["headers"].get("content-type") == "application/json", event
    assert event["headers"].get("x-api-key") == "***", event  # passed on (the log masks it)


def test_disconnect_with_a_json_body_deletes_on_the_owner(php: str, shared_fleet: Fleet) -> None:
    fleet = shared_fleet
    owner = fleet.instances[1]
    sid = _session(fleet, 1, 1)

    r = _disconnect_call(php, fleet, sid)

    assert r["exception"] is None, _show(r)
    assert r["status"] == 200, _show(r)
    assert r["body"]["success"] is True, _show(r)
    assert r["body"].get("alreadyDisconnected") is not True, _show(r)  # the owner deleted it
    assert r["instance"] == owner.url, _show(r)
    _the_one_delivery(fleet, r)
    assert _direct_status(owner, sid) == 404
    after = _php(php, fleet, "GET", f"/api/sessions/{sid}/status", _status_query())
    assert after["status"] == 404, _show(after)
    assert after["body"]["error"] == "Session not found", _show(after)


def test_bodyless_disconnect_is_refused_as_the_instance_refuses_it(
    php: str, shared_fleet: Fleet
) -> None:
    # WhatsAppServiceClient::disconnectSession goes through makeRequest, which attaches the
    # payload only to POST/PUT/PATCH (JSON) and GET (query): its DELETE carries no api_key, and
    # the instance answers 401. The proxy must neither add the key nor delete anything.
    fleet = shared_fleet
    owner = fleet.instances[2]
    sid = _session(fleet, 2, 1)

    r = _php(php, fleet, "DELETE", f"/api/sessions/{sid}", _disconnect())

    assert r["status"] == 401, _show(r)
    assert r["exception"] == "GuzzleHttp\\Exception\\ClientException", _show(r)
    assert r["body"] == {"error": "Invalid API key"}, _show(r)
    assert _direct_status(owner, sid) == 200  # still there


def test_guzzle_reads_the_proxys_own_404_like_laravel_does(php: str, shared_fleet: Fleet) -> None:
    fleet = shared_fleet

    r = _php(php, fleet, "POST", "/api/messages/send", _send("no_such_session_x", "hello"))

    # makeRequest catches the ClientException and returns status_code 404, which is where
    # sendMessageWithFailover decides; it must read like an instance's JSON answer.
    assert r["exception"] == "GuzzleHttp\\Exception\\ClientException", _show(r)
    assert r["status"] == 404, _show(r)
    assert r["content_type"].startswith("application/json"), _show(r)
    assert r["proxy_error"] == "session-not-found", _show(r)
    body = r["body"]
    assert isinstance(body, dict), _show(r)
    assert body["error"] == "Session not found", _show(r)
    assert body["code"] == "session-not-found", _show(r)
    assert body["request_id"] == r["request_id"], _show(r)
    assert _sent_for(fleet, "no_such_session_x") == {s.name: 0 for s in fleet.instances}


# --- failover ------------------------------------------------------------------------------------


def test_send_after_the_owner_is_sigkilled_gets_an_ordinary_success_from_the_heir(
    php: str, quiet_fleet: Fleet
) -> None:
    fleet = quiet_fleet
    dead, heir = fleet.instances[0], fleet.instances[1]
    sid = _session(fleet, 0, 0)

    warm = _php(php, fleet, "POST", "/api/messages/send", _send(sid, "warm"))
    assert warm["status"] == 200, _show(warm)
    assert warm["instance"] == dead.url  # the proxy now knows the owner; nothing will re-ask

    heir.add_session(sid)  # the fleet restores it elsewhere, as after a crash
    dead.kill()
    sent_by_dead_before = len(dead.events("sent"))

    r = _php(php, fleet, "POST", "/api/messages/send", _send(sid, "from blazz"))

    assert r["exception"] is None, _show(r)
    assert r["status"] == 200, _show(r)
    assert r["body"]["success"] is True, _show(r)
    assert r["content_type"].startswith("application/json"), _show(r)
    assert r["instance"] == heir.url, _show(r)
    assert r["attempts"] == "2", _show(r)
    assert r["proxy_error"] is None, _show(r)
    _assert_service_headers(_the_one_delivery(fleet, r), r)
    # Delivered exactly once, by the heir; the dead owner wrote nothing after the kill.
    assert len(dead.events("sent")) == sent_by_dead_before
    assert _sent_for(fleet, sid) == {dead.name: 1, heir.name: 1, fleet.instances[2].name: 0}


ACTING_CALLS = {
    "reconnect": ("POST", "/reconnect", _reconnect_call),
    "metadata": ("PUT", "/metadata", _metadata_call),
    "delete": ("DELETE", "", _disconnect_call),
}


def _calls_to(sim: Simulator, method: str, path: str) -> int:
    return sum(1 for e in sim.requests() if e["method"] == method and e["path"] == path)


def _assert_acted_on(php: str, fleet: Fleet, call: str, heir: Simulator, sid: str) -> None:
    if call == "metadata":
        read = _php(php, fleet, "GET", f"/api/sessions/{sid}/metadata", {"api_key": API_KEY})
        assert read["instance"] == heir.url, _show(read)
        for key, value in UPDATES.items():
            assert read["body"]["metadata"].get(key) == value, _show(read)
    elif call == "delete":
        assert _direct_status(heir, sid) == 404  # deleted where it lived
    else:
        assert _direct_status(heir, sid) == 200


@pytest.mark.parametrize("call", sorted(ACTING_CALLS))
def test_a_call_the_instance_acts_on_anyway_goes_only_to_the_new_owner_after_a_move(
    php: str, quiet_fleet: Fleet, call: str
) -> None:
    # A real instance answers reconnect (it starts the session), PUT metadata and DELETE with
    # success for a session it does not hold, so the old owner's answer cannot reveal the move:
    # the proxy has to confirm the owner before sending, and the old owner must never get it.
    fleet = quiet_fleet
    old, new = fleet.instances[0], fleet.instances[1]
    sid = _session(fleet, 0, 1)
    method, suffix, send = ACTING_CALLS[call]
    path = f"/api/sessions/{sid}{suffix}"

    warm = _php(php, fleet, "GET", f"/api/sessions/{sid}/status", _status_query())
    assert warm["instance"] == old.url, _show(warm)  # what the proxy now believes

    new.add_session(sid)  # moved: the old owner stays up without it
    old.drop_session(sid)
    before = _calls_to(old, method, path)

    r = send(php, fleet, sid)

    assert r["exception"] is None, _show(r)
    assert r["status"] == 200, _show(r)
    assert r["body"]["success"] is True, _show(r)
    assert r["body"].get("alreadyDisconnected") is not True, _show(r)
    assert r["instance"] == new.url, _show(r)
    assert _calls_to(old, method, path) == before, "the old owner got the call it would act on"
    assert _calls_to(new, method, path) == 1
    assert _direct_status(old, sid) == 404  # the old owner did not start it again
    _assert_acted_on(php, fleet, call, new, sid)


@pytest.mark.parametrize("call", sorted(ACTING_CALLS))
def test_a_call_the_instance_acts_on_anyway_reaches_the_heir_after_a_sigkill(
    php: str, quiet_fleet: Fleet, call: str
) -> None:
    fleet = quiet_fleet
    dead, heir = fleet.instances[0], fleet.instances[1]
    sid = _session(fleet, 0, 2)
    method, suffix, send = ACTING_CALLS[call]

    warm = _php(php, fleet, "GET", f"/api/sessions/{sid}/status", _status_query())
    assert warm["instance"] == dead.url, _show(warm)

    heir.add_session(sid)
    dead.kill()

    r = send(php, fleet, sid)

    assert r["exception"] is None, _show(r)
    assert r["status"] == 200, _show(r)
    assert r["body"]["success"] is True, _show(r)
    assert r["body"].get("alreadyDisconnected") is not True, _show(r)
    assert r["instance"] == heir.url, _show(r)
    assert _calls_to(heir, method, f"/api/sessions/{sid}{suffix}") == 1
    _assert_acted_on(php, fleet, call, heir, sid)
