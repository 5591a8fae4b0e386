"""The upstream contract as a table: one row per (route, case), from the real service's answers.

Each row is measured on the real Blazz ``whatsapp-service`` (HEAD 5d71136, its WhatsApp library
replaced by the fake in ``shared/tools/real-gateway``), as recorded in the contract's "Measured
against the real service" section and the capture of exact answers; rows marked
``source="source"`` were read from the service's source and not measured. ``test_contract_table``
holds a simulator process to every row, so the two cannot drift apart.

A row names its session by kind (``setup``):

- ``"connected"``: created through ``POST /api/sessions`` (workspace 1, account 11), connected;
- ``"starting"``: created the same way but not connected yet (still ``qr_scanning``);
- ``"none"``: an id this instance does not hold (``webjs_1_...``, or ``plain`` ids ``foo-N``).

In paths, bodies, queries and expected values, ``{id}`` is that session's id, ``{key}`` the
instance's api key and ``{phone}`` the number the fake library gives the id. Expected bodies
must have exactly the keys shown; values are compared exactly, except the matchers below for
what changes from call to call (timestamps, message ids, uptimes).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

# ---- matchers for volatile values ------------------------------------------------------------


class Matcher:
    def ok(self, value: Any) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class Pattern(Matcher):
    regex: str

    def ok(self, value: Any) -> bool:
        return isinstance(value, str) and re.fullmatch(self.regex, value, re.DOTALL) is not None

    def __repr__(self) -> str:
        return f"Pattern({self.regex!r})"


@dataclass(frozen=True)
class Anything(Matcher):
    def ok(self, value: Any) -> bool:
        return True

    def __repr__(self) -> str:
        return "ANY"


@dataclass(frozen=True)
class Kind(Matcher):
    name: str

    def ok(self, value: Any) -> bool:
        if self.name == "bool":
            return isinstance(value, bool)
        if isinstance(value, bool):
            return False
        if self.name == "int":
            return isinstance(value, int)
        return isinstance(value, int | float)

    def __repr__(self) -> str:
        return self.name.upper()


@dataclass(frozen=True)
class Epoch(Matcher):
    """An integer time near now, in seconds or milliseconds."""

    per_second: int

    def ok(self, value: Any) -> bool:
        import time

        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and abs(value / self.per_second - time.time()) < 3600
        )

    def __repr__(self) -> str:
        return "UNIX" if self.per_second == 1 else "MS"


@dataclass(frozen=True)
class Listing(Matcher):
    """A session list: entries of the list shape, one of them equal to ``entry``."""

    entry: dict[str, Any]

    def ok(self, value: Any) -> bool:
        raise NotImplementedError  # compared by the test, which can substitute placeholders


ANY = Anything()
ISO = Pattern(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
INT = Kind("int")
NUM = Kind("number")
BOOL = Kind("bool")
UNIX = Epoch(1)
MS = Epoch(1000)
HEX20 = "[0-9A-F]{20}"


def message_id(recipient: str) -> Pattern:
    return Pattern(re.escape(f"true_{recipient}@c.us_") + HEX20)


def fake_phone(session_id: str) -> str:
    """The fake library's number for a client id: 628 and nine digits of its SHA-1."""
    digest = hashlib.sha1(session_id.encode()).digest()
    return "628" + "".join(str(digest[i % len(digest)] % 10) for i in range(9))


# ---- the rows ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    method: str
    path: str
    case: str
    status: int
    body: Any  # the expected JSON; None when ``html`` is the expectation
    setup: str = "none"
    json: Any = None
    query: dict[str, str] | None = None
    headers: dict[str, str] | None = None
    content: bytes | None = None
    html: str | None = None  # an HTML answer containing this
    after: tuple[int, Any] | None = None  # GET status of {id} afterwards: (code, body)
    event: dict[str, Any] | None = None  # a life-cycle event the request must leave
    no_event: str | None = None  # an event kind it must not leave for {id}
    plain_id: bool = False
    source: str = "measured"

    @property
    def name(self) -> str:
        return f"{self.method} {self.path} | {self.case}"


def row(route: str, case: str, status: int, body: Any, **options: Any) -> Row:
    method, path = route.split(" ", 1)
    return Row(method, path, case, status, body, **options)


KEY_Q = {"api_key": "{key}"}
BAD_Q = {"api_key": "bad"}
BAD_KEY = {"error": "Invalid API key"}
NOT_FOUND = {"error": "Session not found"}
NOT_CONNECTED = {"error": "Session not connected. Please check session status."}
HELD_CONNECTED = "held, connected"
HELD_STARTING = "held, not connected"
NOT_HELD = "not held"

CREATE = {
    "session_id": "{id}",
    "workspace_id": 1,
    "account_id": 11,
    "api_key": "{key}",
    "priority": "high",
}
RESTART = {"workspace_id": 1, "account_id": 11, "api_key": "{key}", "priority": "high"}
SEND = {
    "session_id": "{id}",
    "workspace_id": 1,
    "recipient_phone": "628111",
    "message": "hi",
    "type": "text",
    "api_key": "{key}",
}
MEDIA = {
    "session_id": "{id}",
    "workspace_id": 1,
    "recipient_phone": "628111",
    "media_url": "http://127.0.0.1:9/x.png",
    "caption": "c",
    "filename": "x.png",
    "api_key": "{key}",
}
BULK = {
    "session_id": "{id}",
    "workspace_id": 1,
    "recipients": ["628111", "628222"],
    "message": "bulk",
    "type": "text",
    "api_key": "{key}",
}


def without(body: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in names}


CREATED = {"success": True, "session_id": "{id}", "status": "qr_scanning"}
STATUS_CONNECTED = {
    "session_id": "{id}",
    "status": "connected",
    "phone_number": "{phone}",
    "workspace_id": 1,
    "connected_at": ISO,
    "last_activity": ISO,
}
STATUS_STARTING = {
    "session_id": "{id}",
    "status": "qr_scanning",
    "phone_number": None,
    "workspace_id": 1,
    "last_activity": ISO,
}
STARTED_AGAIN = (200, STATUS_STARTING)  # a fresh client, right after its create
GONE = (404, NOT_FOUND)
STILL_CONNECTED = (200, STATUS_CONNECTED)

META_FIRST = {  # right after a create
    "workspaceId": 1,
    "accountId": 11,
    "status": "qr_scanning",
    "createdAt": ISO,
    "phoneNumber": None,
    "lastActivity": ISO,
    "performanceStart": MS,
}
META_CONNECTED = {
    **META_FIRST,
    "status": "connected",
    "phoneNumber": "{phone}",
    "qrCode": Pattern(r"data:image/png;base64,.+"),
    "qrGeneratedAt": MS,
    "qrCount": 1,
    "authenticatedAt": ISO,
    "platform": "android",
    "connectedAt": ISO,
    "phoneExtractionMethod": "client.info.wid",
}
AVAILABLE = [
    "/health",
    "/health/detailed",
    "/health/ready",
    "/health/live",
    "/health/metrics",
    "/api/sessions",
    "/api/messages/send",
    "/api/messages/send-media",
    "/api/messages/bulk-send",
]


def endpoint_not_found(path: str, method: str) -> dict[str, Any]:
    return {
        "error": "Endpoint not found",
        "path": path,
        "method": method,
        "available_endpoints": AVAILABLE,
        "timestamp": ISO,
    }


MISSING_SEND = {
    "error": "Missing required fields",
    "required": ["session_id", "recipient_phone", "message"],
}
MISSING_MEDIA = {
    "error": "Missing required fields",
    "required": ["session_id", "recipient_phone", "media_url"],
}
MISSING_BULK = {
    "error": "Missing required fields",
    "required": ["session_id", "recipients (array)"],
}
INVALID_UPDATES = {"error": "Invalid updates object"}
NOT_HELD_DELETE = {
    "success": True,
    "message": "Session already disconnected or not found in memory",
    "alreadyDisconnected": True,
}


def sent(recipient: str) -> dict[str, Any]:
    return {
        "recipient": recipient,
        "success": True,
        "message_id": message_id(recipient),
        "timestamp": UNIX,
    }


def failed_bulk(error: str, *recipients: str) -> dict[str, Any]:
    failures = [{"recipient": r, "success": False, "error": error} for r in recipients]
    return {
        "success": True,
        "total": len(recipients),
        "successful": 0,
        "failed": len(recipients),
        "results": failures,
        "errors": failures,
    }


def last_activity_body() -> dict[str, Any]:
    return {
        "success": True,
        "data": {
            "session_id": "{id}",
            "last_activity": None,
            "device_type": None,
            "seconds_since_activity": None,
            "message_count": 0,
        },
    }


ROWS: list[Row] = [
    # ---- POST /api/sessions (create) -------------------------------------------------------
    row("POST /api/sessions", NOT_HELD, 200, CREATED, json=CREATE, after=STARTED_AGAIN),
    row(
        "POST /api/sessions",
        f"{HELD_CONNECTED}: the running session is replaced",
        200,
        CREATED,
        setup="connected",
        json=CREATE,
        after=STARTED_AGAIN,
    ),
    row("POST /api/sessions", HELD_STARTING, 200, CREATED, setup="starting", json=CREATE),
    row(
        "POST /api/sessions",
        "no session_id: held under an undefined key",
        200,
        {"success": True, "status": "qr_scanning"},
        json=without(CREATE, "session_id"),
    ),
    row(
        "POST /api/sessions",
        "no workspace_id",
        200,
        CREATED,
        json=without(CREATE, "workspace_id"),
        after=(200, without(STATUS_STARTING, "workspace_id")),
    ),
    row(
        "POST /api/sessions", "bad key", 401, BAD_KEY, json={**CREATE, "api_key": "bad"}, after=GONE
    ),
    row("POST /api/sessions", "no key", 401, BAD_KEY, json=without(CREATE, "api_key")),
    row(
        "POST /api/sessions",
        "key in a header only",
        401,
        BAD_KEY,
        json=without(CREATE, "api_key"),
        headers={"X-API-Key": "{key}"},
    ),
    row(
        "POST /api/sessions",
        "an id the library refuses",
        500,
        {
            "error": "Invalid clientId. Only alphanumeric characters, underscores and hyphens"
            " are allowed."
        },
        json={**CREATE, "session_id": "bad.id"},
        source="source",
    ),
    # ---- GET /api/sessions (list) -------------------------------------------------------------
    row(
        "GET /api/sessions",
        HELD_CONNECTED,
        200,
        {
            "success": True,
            "sessions": Listing(
                {
                    "session_id": "{id}",
                    "workspace_id": 1,
                    "status": "connected",
                    "phone_number": "{phone}",
                    "connected_at": ISO,
                }
            ),
            "total": INT,
        },
        setup="connected",
        query=KEY_Q,
    ),
    row(
        "GET /api/sessions",
        HELD_STARTING,
        200,
        {
            "success": True,
            "sessions": Listing(
                {
                    "session_id": "{id}",
                    "workspace_id": 1,
                    "status": "qr_scanning",
                    "phone_number": None,
                }
            ),
            "total": INT,
        },
        setup="starting",
        query=KEY_Q,
    ),
    row("GET /api/sessions", "bad key", 401, BAD_KEY, query=BAD_Q),
    row("GET /api/sessions", "no key", 401, BAD_KEY),
    row("GET /api/sessions", "key in a header only", 401, BAD_KEY, headers={"X-API-Key": "{key}"}),
    # ---- GET /api/sessions/{id}/status ----------------------------------------------------------
    row(
        "GET /api/sessions/{id}/status",
        HELD_CONNECTED,
        200,
        STATUS_CONNECTED,
        setup="connected",
        query=KEY_Q,
    ),
    row(
        "GET /api/sessions/{id}/status",
        HELD_STARTING,
        200,
        STATUS_STARTING,
        setup="starting",
        query=KEY_Q,
    ),
    row("GET /api/sessions/{id}/status", NOT_HELD, 404, NOT_FOUND, query=KEY_Q),
    row("GET /api/sessions/{id}/status", "bad key", 401, BAD_KEY, setup="connected", query=BAD_Q),
    row("GET /api/sessions/{id}/status", "no key, not held", 401, BAD_KEY),
    # ---- GET /api/sessions/{id}/metadata -------------------------------------------------------
    row(
        "GET /api/sessions/{id}/metadata",
        HELD_CONNECTED,
        200,
        {"success": True, "session_id": "{id}", "metadata": META_CONNECTED},
        setup="connected",
        query=KEY_Q,
    ),
    row(
        "GET /api/sessions/{id}/metadata",
        HELD_STARTING,
        200,
        {"success": True, "session_id": "{id}", "metadata": META_FIRST},
        setup="starting",
        query=KEY_Q,
    ),
    row("GET /api/sessions/{id}/metadata", NOT_HELD, 404, NOT_FOUND, query=KEY_Q),
    row("GET /api/sessions/{id}/metadata", "bad key", 401, BAD_KEY, setup="connected", query=BAD_Q),
    # ---- PUT /api/sessions/{id}/metadata --------------------------------------------------------
    row(
        "PUT /api/sessions/{id}/metadata",
        HELD_CONNECTED,
        200,
        {"success": True, "session_id": "{id}", "metadata": {**META_CONNECTED, "foo": "bar"}},
        setup="connected",
        json={"updates": {"foo": "bar"}, "api_key": "{key}"},
    ),
    row(
        "PUT /api/sessions/{id}/metadata",
        HELD_STARTING,
        200,
        {"success": True, "session_id": "{id}", "metadata": {**META_FIRST, "foo": "bar"}},
        setup="starting",
        json={"updates": {"foo": "bar"}, "api_key": "{key}"},
    ),
    row(
        "PUT /api/sessions/{id}/metadata",
        f"{NOT_HELD}: 200 and the write is lost",
        200,
        {"success": True, "session_id": "{id}", "metadata": None},
        json={"updates": {"foo": "bar"}, "api_key": "{key}"},
        after=GONE,
    ),
    row(
        "PUT /api/sessions/{id}/metadata",
        "an array is merged by index",
        200,
        {"success": True, "session_id": "{id}", "metadata": {**META_CONNECTED, "0": "z"}},
        setup="connected",
        json={"updates": ["z"], "api_key": "{key}"},
    ),
    row(
        "PUT /api/sessions/{id}/metadata",
        "the status can be overwritten",
        200,
        {"success": True, "session_id": "{id}", "metadata": {**META_CONNECTED, "status": "error"}},
        setup="connected",
        json={"updates": {"status": "error"}, "api_key": "{key}"},
        after=(200, {**STATUS_CONNECTED, "status": "error"}),
    ),
    *[
        row(
            "PUT /api/sessions/{id}/metadata",
            f"updates {label}",
            400,
            INVALID_UPDATES,
            setup=setup,
            json=body,
        )
        for label, setup, body in (
            ("a string, held", "connected", {"updates": "x", "api_key": "{key}"}),
            ("a string, not held", "none", {"updates": "x", "api_key": "{key}"}),
            ("null", "connected", {"updates": None, "api_key": "{key}"}),
            ("a number", "connected", {"updates": 5, "api_key": "{key}"}),
            (
                "missing (metadata sent instead)",
                "connected",
                {"metadata": {"a": 1}, "api_key": "{key}"},
            ),
        )
    ],
    row(
        "PUT /api/sessions/{id}/metadata",
        "bad key",
        401,
        BAD_KEY,
        setup="connected",
        json={"updates": {"a": 1}, "api_key": "bad"},
    ),
    row(
        "PUT /api/sessions/{id}/metadata",
        "no key",
        401,
        BAD_KEY,
        setup="connected",
        json={"updates": {"a": 1}},
    ),
    # ---- POST /api/sessions/{id}/restore ---------------------------------------------------------
    *[
        row(
            "POST /api/sessions/{id}/restore",
            case,
            500,
            {"error": "workspaceId is not defined"},
            setup=setup,
            json={"workspace_id": 1, "api_key": "{key}"},
        )
        for case, setup in ((HELD_CONNECTED, "connected"), (NOT_HELD, "none"))
    ],
    row(
        "POST /api/sessions/{id}/restore",
        "bad key",
        401,
        BAD_KEY,
        setup="connected",
        json={"workspace_id": 1, "api_key": "bad"},
    ),
    row("POST /api/sessions/{id}/restore", "no body", 401, BAD_KEY, setup="connected"),
    # ---- POST /api/sessions/{id}/reconnect -------------------------------------------------------
    row(
        "POST /api/sessions/{id}/reconnect",
        HELD_CONNECTED,
        200,
        CREATED,
        setup="connected",
        json=RESTART,
        after=STARTED_AGAIN,
        event={"event": "session_stopped", "session_id": "{id}"},
    ),
    row(
        "POST /api/sessions/{id}/reconnect",
        HELD_STARTING,
        200,
        CREATED,
        setup="starting",
        json=RESTART,
    ),
    row(
        "POST /api/sessions/{id}/reconnect",
        f"{NOT_HELD}: the session is started here",
        200,
        CREATED,
        json=RESTART,
        after=STARTED_AGAIN,
        event={"event": "session_started", "session_id": "{id}", "via": "reconnect"},
    ),
    row(
        "POST /api/sessions/{id}/reconnect",
        f"{NOT_HELD}, no workspace_id or account_id",
        200,
        CREATED,
        json={"api_key": "{key}"},
        after=(200, without(STATUS_STARTING, "workspace_id")),
    ),
    row(
        "POST /api/sessions/{id}/reconnect",
        "bad key",
        401,
        BAD_KEY,
        setup="connected",
        json={**RESTART, "api_key": "bad"},
        after=STILL_CONNECTED,
    ),
    # ---- POST /api/sessions/{id}/regenerate-qr ---------------------------------------------------
    *[
        row(
            "POST /api/sessions/{id}/regenerate-qr",
            case,
            200,
            {"expires_in": 300},
            setup=setup,
            json=RESTART,
            after=STARTED_AGAIN,
        )
        for case, setup in (
            (HELD_CONNECTED, "connected"),
            (HELD_STARTING, "starting"),
            (f"{NOT_HELD}: the session is started here", "none"),
        )
    ],
    row(
        "POST /api/sessions/{id}/regenerate-qr",
        "bad key",
        401,
        BAD_KEY,
        setup="connected",
        json={**RESTART, "api_key": "bad"},
    ),
    # ---- DELETE /api/sessions/{id} ---------------------------------------------------------------
    *[
        row(
            "DELETE /api/sessions/{id}",
            case,
            200,
            {"success": True, "message": "Session disconnected successfully"},
            setup=setup,
            json={"api_key": "{key}"},
            after=GONE,
            no_event="session_files_deleted",  # destroy(), not logout(): no file is touched
        )
        for case, setup in ((HELD_CONNECTED, "connected"), (HELD_STARTING, "starting"))
    ],
    row(
        "DELETE /api/sessions/{id}",
        f"{NOT_HELD}: 200, and sessions/<ws>/<id> is deleted",
        200,
        NOT_HELD_DELETE,
        json={"api_key": "{key}"},
        event={"event": "session_files_deleted", "session_id": "{id}", "path": "sessions/1/{id}"},
    ),
    row(
        "DELETE /api/sessions/{id}",
        f"{NOT_HELD}, an id not like webjs_<ws>_...",
        200,
        NOT_HELD_DELETE,
        json={"api_key": "{key}"},
        plain_id=True,
        no_event="session_files_deleted",
    ),
    row(
        "DELETE /api/sessions/{id}",
        "bad key",
        401,
        BAD_KEY,
        setup="connected",
        json={"api_key": "bad"},
        after=STILL_CONNECTED,
    ),
    row(
        "DELETE /api/sessions/{id}",
        "key in the query only",
        401,
        BAD_KEY,
        setup="connected",
        query=KEY_Q,
        after=STILL_CONNECTED,
    ),
    # ---- POST /api/messages/send -----------------------------------------------------------------
    row(
        "POST /api/messages/send",
        HELD_CONNECTED,
        200,
        {"success": True, "message_id": message_id("628111"), "timestamp": UNIX},
        setup="connected",
        json=SEND,
    ),
    row(
        "POST /api/messages/send",
        "no type: text",
        200,
        {"success": True, "message_id": message_id("628111"), "timestamp": UNIX},
        setup="connected",
        json=without(SEND, "type"),
    ),
    row(
        "POST /api/messages/send",
        "type image: nothing is sent",
        200,
        {"success": True},
        setup="connected",
        json={**SEND, "type": "image"},
    ),
    row(
        "POST /api/messages/send",
        "the phone goes into the chat id as given",
        200,
        {"success": True, "message_id": message_id("+62 811-1"), "timestamp": UNIX},
        setup="connected",
        json={**SEND, "recipient_phone": "+62 811-1"},
    ),
    *[
        row(
            "POST /api/messages/send",
            f"bad phone, {case}",
            400,
            {"error": "Invalid phone number format"},
            setup=setup,
            json={**SEND, "recipient_phone": "abc"},
        )
        for case, setup in (("held", "connected"), (NOT_HELD, "none"))
    ],
    row(
        "POST /api/messages/send",
        "a numeric phone",
        500,
        {"error": "recipient_phone.replace is not a function"},
        setup="connected",
        json={**SEND, "recipient_phone": 628111},
    ),
    *[
        row(
            "POST /api/messages/send",
            f"no {field}",
            400,
            MISSING_SEND,
            setup="connected",
            json=body,
        )
        for field, body in (
            ("message", without(SEND, "message")),
            ("session_id", without(SEND, "session_id")),
            ("recipient_phone", without(SEND, "recipient_phone")),
            (
                "recipient_phone (phone_number sent)",
                {**without(SEND, "recipient_phone"), "phone_number": "628111"},
            ),
            ("recipient_phone (to sent)", {**without(SEND, "recipient_phone"), "to": "628111"}),
        )
    ],
    row(
        "POST /api/messages/send",
        "the library fails",
        500,
        {"error": "fake send failure"},
        setup="connected",
        json={**SEND, "message": "x __fake_fail__"},
    ),
    row(
        "POST /api/messages/send",
        "a message neither string nor object",
        400,
        {"error": "Message must be string or object"},
        setup="connected",
        json={**SEND, "message": 5},
        source="source",
    ),
    row("POST /api/messages/send", HELD_STARTING, 400, NOT_CONNECTED, setup="starting", json=SEND),
    row("POST /api/messages/send", NOT_HELD, 404, NOT_FOUND, json=SEND),
    row(
        "POST /api/messages/send",
        "bad key",
        401,
        BAD_KEY,
        setup="connected",
        json={**SEND, "api_key": "bad"},
    ),
    row(
        "POST /api/messages/send",
        "bad key and fields missing",
        401,
        BAD_KEY,
        json={"workspace_id": 1, "api_key": "bad"},
    ),
    row(
        "POST /api/messages/send",
        "key in the query only",
        401,
        BAD_KEY,
        setup="connected",
        json=without(SEND, "api_key"),
        query=KEY_Q,
    ),
    # ---- POST /api/messages/send-media -----------------------------------------------------------
    row(
        "POST /api/messages/send-media",
        HELD_CONNECTED,
        200,
        {"success": True, "message_id": message_id("628111"), "timestamp": UNIX},
        setup="connected",
        json=MEDIA,
    ),
    row(
        "POST /api/messages/send-media",
        "no media_url",
        400,
        MISSING_MEDIA,
        setup="connected",
        json=without(MEDIA, "media_url", "caption", "filename"),
    ),
    row(
        "POST /api/messages/send-media",
        HELD_STARTING,
        400,
        NOT_CONNECTED,
        setup="starting",
        json=MEDIA,
    ),
    row("POST /api/messages/send-media", NOT_HELD, 404, NOT_FOUND, json=MEDIA),
    row(
        "POST /api/messages/send-media",
        "no key",
        401,
        BAD_KEY,
        setup="connected",
        json=without(MEDIA, "api_key"),
    ),
    # ---- POST /api/messages/bulk-send ------------------------------------------------------------
    row(
        "POST /api/messages/bulk-send",
        HELD_CONNECTED,
        200,
        {
            "success": True,
            "total": 2,
            "successful": 2,
            "failed": 0,
            "results": [sent("628111"), sent("628222")],
            "errors": [],
        },
        setup="connected",
        json=BULK,
    ),
    row(
        "POST /api/messages/bulk-send",
        "no recipients",
        400,
        MISSING_BULK,
        setup="connected",
        json=without(BULK, "recipients"),
    ),
    row(
        "POST /api/messages/bulk-send",
        "empty recipients",
        400,
        MISSING_BULK,
        setup="connected",
        json={**BULK, "recipients": []},
    ),
    row(
        "POST /api/messages/bulk-send",
        "no message",
        400,
        {"error": "Message content is required"},
        setup="connected",
        json=without(BULK, "message"),
    ),
    row(
        "POST /api/messages/bulk-send",
        "a bad recipient",
        400,
        {"error": "Invalid phone number format for some recipients", "invalid_recipients": ["abc"]},
        setup="connected",
        json={**BULK, "recipients": ["628111", "abc"]},
    ),
    row(
        "POST /api/messages/bulk-send",
        "the library fails for one",
        200,
        failed_bulk("fake send failure", "628111"),
        setup="connected",
        json={**BULK, "recipients": ["628111"], "message": "__fake_fail__"},
    ),
    row(
        "POST /api/messages/bulk-send",
        f"{HELD_STARTING}: 200, one failure each",
        200,
        failed_bulk("Session not connected", "628111", "628222"),
        setup="starting",
        json=BULK,
    ),
    row(
        "POST /api/messages/bulk-send",
        f"{NOT_HELD}: 200, one failure each",
        200,
        failed_bulk("Session not found", "628111", "628222"),
        json=BULK,
    ),
    row(
        "POST /api/messages/bulk-send",
        "bad key",
        401,
        BAD_KEY,
        setup="connected",
        json={**BULK, "api_key": "bad"},
    ),
    # ---- GET /api/messages/{id}/status -----------------------------------------------------------
    row(
        "GET /api/messages/{id}/status",
        f"{HELD_CONNECTED}, any message id",
        200,
        {
            "success": True,
            "session_id": "{id}",
            "message_id": "X",
            "session_status": "connected",
            "connected_at": ISO,
            "last_activity": ISO,
            "note": "Exact message status tracking depends on message_ack events",
        },
        setup="connected",
        query={"message_id": "X", "api_key": "{key}"},
    ),
    *[
        row(
            "GET /api/messages/{id}/status",
            f"no message_id, {case}",
            400,
            {"error": "Missing required field: message_id"},
            setup=setup,
            query=KEY_Q,
        )
        for case, setup in (("held", "connected"), (NOT_HELD, "none"))
    ],
    row(
        "GET /api/messages/{id}/status",
        HELD_STARTING,
        400,
        {"error": "Session not connected"},
        setup="starting",
        query={"message_id": "X", "api_key": "{key}"},
    ),
    row(
        "GET /api/messages/{id}/status",
        NOT_HELD,
        404,
        NOT_FOUND,
        query={"message_id": "X", "api_key": "{key}"},
    ),
    row(
        "GET /api/messages/{id}/status",
        "bad key",
        401,
        BAD_KEY,
        setup="connected",
        query={"message_id": "X", "api_key": "bad"},
    ),
    row("GET /api/messages/{id}/status", "no key, no message_id", 401, BAD_KEY, setup="connected"),
    # ---- GET /api/messages/{id}/validate ---------------------------------------------------------
    row(
        "GET /api/messages/{id}/validate",
        HELD_CONNECTED,
        200,
        {
            "success": True,
            "session_id": "{id}",
            "status": "connected",
            "can_send": True,
            "is_healthy": True,
            "last_activity": ISO,
            "phone_number": "{phone}",
            "recommendations": ["Session is ready to send messages"],
        },
        setup="connected",
        query=KEY_Q,
    ),
    row(
        "GET /api/messages/{id}/validate",
        HELD_STARTING,
        200,
        {
            "success": True,
            "session_id": "{id}",
            "status": "qr_scanning",
            "can_send": False,
            "is_healthy": True,
            "last_activity": ISO,
            "phone_number": None,
            "recommendations": ["Session is waiting for QR code scan"],
        },
        setup="starting",
        query=KEY_Q,
    ),
    row(
        "GET /api/messages/{id}/validate",
        NOT_HELD,
        404,
        {"success": False, "error": "Session not found", "can_send": False},
        query=KEY_Q,
    ),
    row("GET /api/messages/{id}/validate", "bad key", 401, BAD_KEY, setup="connected", query=BAD_Q),
    # ---- GET /api/internal/sessions/{id}/last-activity (no key) ----------------------------------
    *[
        row(
            "GET /api/internal/sessions/{id}/last-activity",
            case,
            200,
            last_activity_body(),
            setup=setup,
            query=query,
        )
        for case, setup, query in (
            (HELD_CONNECTED, "connected", None),
            (HELD_STARTING, "starting", None),
            (NOT_HELD, "none", None),
            ("a bad key is ignored", "connected", BAD_Q),
        )
    ],
    # ---- open routes -----------------------------------------------------------------------------
    *[
        row(
            "GET /health",
            case,
            200,
            {
                "status": "healthy",
                "uptime": NUM,
                "sessions": {"total": INT, "connected": INT, "disconnected": INT},
                "memory": {"used": INT, "total": INT, "unit": "MB"},
                "timestamp": ISO,
            },
            query=query,
        )
        for case, query in (("no key", None), ("a bad key is ignored", BAD_Q))
    ],
    row(
        "GET /health/ready",
        "with a Laravel URL",
        200,
        {
            "ready": True,
            "timestamp": ISO,
            "checks": {
                "laravel_configured": True,
                "api_key_configured": True,
                "active_sessions": BOOL,
                "session_count": INT,
            },
        },
    ),
    row(
        "GET /health/live",
        "never alive",
        503,
        {"alive": False, "uptime": NUM, "event_loop_delay_ms": {}, "timestamp": ISO},
    ),
    row(
        "GET /info",
        "a missing package.json",
        500,
        {
            "error": Pattern(
                r"Cannot find module '\.\./\.\./\.\./package\.json'\nRequire stack:\n- .+"
            ),
            "timestamp": ISO,
        },
    ),
    row(
        "GET /",
        "the welcome page",
        200,
        {
            "service": "WhatsApp Web.js Service",
            "version": "1.0.0",
            "status": "running",
            "endpoints": {
                "health_check": {
                    "basic": "/health",
                    "detailed": "/health/detailed",
                    "readiness": "/health/ready",
                    "liveness": "/health/live",
                    "metrics": "/health/metrics",
                },
                "session_management": {
                    "create": "POST /api/sessions",
                    "get_all": "GET /api/sessions",
                    "get_status": "GET /api/sessions/:sessionId/status",
                    "get_metadata": "GET /api/sessions/:sessionId/metadata",
                    "update_metadata": "PUT /api/sessions/:sessionId/metadata",
                    "restore": "POST /api/sessions/:sessionId/restore",
                    "disconnect": "DELETE /api/sessions/:sessionId",
                    "reconnect": "POST /api/sessions/:sessionId/reconnect",
                    "regenerate_qr": "POST /api/sessions/:sessionId/regenerate-qr",
                },
                "message_management": {
                    "send_text": "POST /api/messages/send",
                    "send_media": "POST /api/messages/send-media",
                    "bulk_send": "POST /api/messages/bulk-send",
                    "get_status": "GET /api/messages/:sessionId/status",
                    "validate_session": "GET /api/messages/:sessionId/validate",
                },
            },
            "documentation": "See API documentation for request/response formats",
            "timestamp": ISO,
        },
    ),
    row(
        "GET /health/detailed",
        "its keys",
        200,
        {
            "status": "healthy",
            "uptime": NUM,
            "start_time": ISO,
            "timestamp": ISO,
            "sessions": {
                "total": INT,
                "connected": INT,
                "disconnected": INT,
                "connection_rate": NUM,
                "details": {"by_status": ANY, "longest_uptime": ANY, "newest_session": ANY},
            },
            "memory": {
                "heap_used": INT,
                "heap_total": INT,
                "external": INT,
                "rss": INT,
                "unit": "MB",
            },
            "cpu": {"user": INT, "system": INT},
            "node": {
                "version": Pattern(r"v\d+\..+"),
                "platform": Pattern(".+"),
                "arch": Pattern(".+"),
                "pid": INT,
            },
            "environment": {"node_env": "development", "port": INT, "laravel_url": "configured"},
        },
        source="source",
    ),
    row(
        "POST /cleanup/run",
        "no key, no Laravel data",
        200,
        {
            "success": True,
            "message": "Cleanup cycle completed",
            "results": {"checked": 0, "cleaned": 0, "failed": 0, "skipped": 0, "errors": []},
            "timestamp": ISO,
        },
    ),
    row("GET /cleanup/stats", "no key", 200, {"success": True, "stats": {}, "timestamp": ISO}),
    row(
        "POST /cleanup/{id}",
        "Laravel has no such account",
        500,
        {"success": False, "error": "Cleanup failed", "sessionId": "{id}", "timestamp": ISO},
    ),
    # ---- unknown routes: 404 "Endpoint not found", never a rediscovery signal --------------------
    row("GET /api/unknown", "no key", 404, endpoint_not_found("/api/unknown", "GET")),
    row(
        "GET /api/unknown",
        "the query (key included) is echoed",
        404,
        endpoint_not_found("/api/unknown?api_key={key}&x=1", "GET"),
        query={"api_key": "{key}", "x": "1"},
    ),
    row(
        "POST /api/unknown",
        "with a key",
        404,
        endpoint_not_found("/api/unknown", "POST"),
        json={"api_key": "{key}"},
    ),
    row(
        "GET /sessions/{id}/status",
        "the Laravel shape is not a route, even for a held session",
        404,
        endpoint_not_found("/sessions/{id}/status?api_key={key}", "GET"),
        setup="connected",
        query=KEY_Q,
    ),
    row(
        "GET /api/sessions/{id}",
        "no sub-route",
        404,
        endpoint_not_found("/api/sessions/{id}?api_key={key}", "GET"),
        setup="connected",
        query=KEY_Q,
    ),
    row(
        "GET /api/messages/send",
        "the wrong method",
        404,
        endpoint_not_found("/api/messages/send?api_key={key}", "GET"),
        query=KEY_Q,
    ),
    # ---- malformed JSON: Express's HTML page -----------------------------------------------------
    row(
        "POST /api/messages/send",
        "malformed JSON",
        400,
        None,
        content=b'{"session_id": "x", bad json',
        html="<pre>SyntaxError: Expected double-quoted property name in JSON at position 20<br>",
    ),
    row(
        "POST /api/sessions",
        "malformed JSON",
        400,
        None,
        content=b"{bad",
        html="<pre>SyntaxError: Expected property name or &#39;}&#39; in JSON at position 1<br>",
    ),
]
