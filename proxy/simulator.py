"""A fake gateway instance that answers like one Node.js ``whatsapp-service`` process.

Built to ``reference/upstream-contract.md`` ("Measured against the real service") and to the
answers measured on the real service (Blazz ``whatsapp-service`` at HEAD 5d71136 with its
WhatsApp library replaced by a fake). What it reproduces:

- The request fields each route reads (``recipient_phone``, ``updates``, ``recipients``...), the
  order of the checks (api key, required fields, phone format, then the session) and every error
  text, including the ones that differ between routes ("Session not connected" vs "Session not
  connected. Please check session status.").
- The api key is checked by each handler, not by a middleware: GET routes read ``?api_key=``,
  the others the body's ``api_key``; headers are ignored; health, ``/``, ``/info``,
  last-activity, ``/cleanup`` and ``/remoteauth`` need no key, and an unknown route is a 404
  whatever the key.
- The routes that never say "Session not found" for a session held elsewhere: PUT metadata
  (200, the write is lost), reconnect and regenerate-qr (they start the session here), DELETE
  (200 ``alreadyDisconnected``, and the local session directory is deleted), last-activity
  (always 200, no key).
- JavaScript's ``undefined``: a key whose value was never given is left out of the JSON.
- The session life cycle of the measured run, scaled to ``connect_delay``: ``qr_scanning``, then
  ``authenticated`` after a tenth of it, then ``connected``. A create of a held id replaces it.
- With ``auth_dir`` (``--auth-dir``), saved logins as with a shared volume or RemoteAuth: one
  file per session, written when it connects (and for the sessions it is given connected). A
  start with no saved login stays ``qr_scanning`` until ``POST /_sim/sessions/{id}/scan``, then
  goes on over the usual delays. DELETE (a destroy, not a logout) leaves the file. Instances
  given the same directory share the logins; each its own directory is LocalAuth.
- The start-up restore: every active account Laravel lists is started here, whoever owns it.
- The route timeouts (60 s sessions, 45 s sends, 5 s health, 30 s otherwise, matched like the
  real unanchored patterns) and the crash when one fires: no answer, the process exits.
- Express's HTML page for malformed JSON, with V8's (Node 20) parser messages.

On top of that, ``/_sim/...`` lets tests move sessions, inject faults and read back what the
instance saw and sent (``sent`` events carry the text, cut to 500 characters), and how many
starts were in progress (``GET /_sim/sessions``: ``starting`` now, ``max_starting`` at once; a
start is in progress from its create until it connects, is replaced or is stopped). Each start
that connects logs ``session_connected`` with ``t`` the moment it connected. A message text
containing ``__fake_hang__`` never completes (as with the fake WhatsApp library), one containing
``__fake_fail__`` fails.

Run one with ``python -m proxy.simulator --port 3001``; ``--port 0`` picks a free port and prints
it on stdout as a JSON line (``{"event": "listening", "url": ...}``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import heapq
import itertools
import json
import math
import os
import re
import secrets
import socket
import sys
import tempfile
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, unquote

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

__all__ = ["SimulatorConfig", "create_app", "main", "serve"]

SESSION_NOT_FOUND = "Session not found"
ENDPOINT_NOT_FOUND = "Endpoint not found"
NOT_CONNECTED = "Session not connected. Please check session status."
NOT_CONNECTED_SHORT = "Session not connected"
INVALID_API_KEY = "Invalid API key"
STATUSES = ("qr_scanning", "authenticated", "connected", "disconnected", "error")
HANG_MARKER = "__fake_hang__"
FAIL_MARKER = "__fake_fail__"

# The in-memory copies are for tests; bound them so a long demo cannot grow without limit.
_MEMORY_EVENTS = 100_000
_SENT_TEXT_LIMIT = 500  # characters of a sent message's text kept in its "sent" event

# The route timeouts, tried in this order against the request path, unanchored and
# case-sensitive; the first match wins. So every /api/sessions... path gets 60 s (the last three
# patterns are never reached), /api/messages/send-media matches the send pattern (45 s), and
# /api/messages/bulk-send matches none: it gets the 30 s default.
_ROUTE_TIMEOUTS: tuple[tuple[re.Pattern[str], float], ...] = (
    (re.compile(r"/api/sessions"), 60.0),
    (re.compile(r"/api/messages/send"), 45.0),
    (re.compile(r"/health"), 5.0),
    (re.compile(r"/api/sessions/.*/status"), 10.0),
    (re.compile(r"/api/sessions/.*/reconnect"), 60.0),
    (re.compile(r"/api/sessions/.*/regenerate-qr"), 30.0),
)
_DEFAULT_TIMEOUT = 30.0

# The phone check of the send routes, applied after removing whitespace.
_PHONE = re.compile(r"\+?[0-9\s\-()]+")
_WHITESPACE = re.compile(r"\s")
# What the WhatsApp library accepts as a client id (LocalAuth refuses anything else).
_CLIENT_ID = re.compile(r"[-_A-Za-z0-9]+")
_INVALID_CLIENT_ID = (
    "Invalid clientId. Only alphanumeric characters, underscores and hyphens are allowed."
)
_HEALTHY_WINDOW = 300.0  # validate: is_healthy means a last activity younger than this

# The life cycle of the measured run (QR at 0.1 s, authenticated at 0.3 s, connected at 3.0 s),
# as fractions of connect_delay.
_QR_AT = 1 / 30
_AUTHENTICATED_AT = 1 / 10

_API_KEY_QUERY = re.compile(r"(^|&)(api_key=)[^&]*")
_AVAILABLE_ENDPOINTS = (
    "/health",
    "/health/detailed",
    "/health/ready",
    "/health/live",
    "/health/metrics",
    "/api/sessions",
    "/api/messages/send",
    "/api/messages/send-media",
    "/api/messages/bulk-send",
)
_ROOT_ENDPOINTS = {
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
}
_APP_ROOT = "/app"  # where the pages and messages below say the service is installed
_INFO_ERROR = (
    "Cannot find module '../../../package.json'\nRequire stack:\n"
    f"- {_APP_ROOT}/src/controllers/HealthController.js\n"
    f"- {_APP_ROOT}/src/routes/index.js\n"
    f"- {_APP_ROOT}/server.js"
)

_JSON_HEADERS = {"x-powered-by": "Express", "content-type": "application/json; charset=utf-8"}
_HTML_HEADERS = {
    "x-powered-by": "Express",
    "content-security-policy": "default-src 'none'",
    "x-content-type-options": "nosniff",
    "content-type": "text/html; charset=utf-8",
}


@dataclass
class SimulatorConfig:
    name: str = "sim"
    api_key: str = "demo-key"
    connect_delay: float = 3.0
    log_path: str | None = None
    sessions: tuple[str, ...] = ()
    send_delay: float = 0.0
    bulk_interval: float = 1.0  # the pause after each successful message of a bulk send
    timeout_scale: float = 1.0  # multiplies every route timeout
    laravel_url: str | None = None  # start-up restore from {laravel_url}/api/whatsapp/...
    laravel_api_key: str | None = None  # X-API-Key for Laravel; default: api_key
    # Where sessions' logins are saved (one file each), shared by the instances given the same
    # directory; None: every start connects after connect_delay, as if its QR were scanned.
    auth_dir: str | None = None


Reply = tuple[int, Any]


class _Undefined:
    """JavaScript's ``undefined``: a key holding it is left out of the JSON, a list item is null."""

    def __repr__(self) -> str:
        return "undefined"

    def __bool__(self) -> bool:
        return False


UNDEFINED: Any = _Undefined()
# A session's key in the instance's map: the id itself for a string; other JSON values (or none
# at all) are distinct keys that no path can name.
SessionKey = str | tuple[str, str]


def _session_key(session_id: Any) -> SessionKey:
    if isinstance(session_id, str):
        return session_id
    if session_id is UNDEFINED:
        return ("undefined", "")
    return ("json", json.dumps(session_id, sort_keys=True))


def _js(value: Any) -> Any:
    """``value`` as ``JSON.stringify`` would write it: undefined keys dropped."""
    if isinstance(value, dict):
        return {k: _js(v) for k, v in value.items() if v is not UNDEFINED}
    if isinstance(value, list):
        return [None if v is UNDEFINED else _js(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _truthy(value: Any) -> bool:
    """JavaScript truthiness for a parsed JSON value."""
    if value is UNDEFINED or value is None or value is False:
        return False
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value != 0 and value == value
    if isinstance(value, str):
        return value != ""
    return True


def _js_string(value: Any) -> str:
    """``String(value)`` for a parsed JSON value (as in a template string)."""
    if isinstance(value, str):
        return value
    if value is UNDEFINED:
        return "undefined"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, dict):
        return "[object Object]"
    if isinstance(value, list):
        return ",".join("" if v is None else _js_string(v) for v in value)
    return str(value)


def _type_error(name: str, value: Any) -> str:
    """The TypeError of ``name.replace(...)`` on something that is not a string."""
    if value is None or value is UNDEFINED:
        return f"Cannot read properties of {_js_string(value)} (reading 'replace')"
    return f"{name}.replace is not a function"


class _MalformedJSON(Exception):
    def __init__(self, message: str, strict: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.strict = strict


def _iso(t: float) -> str:
    """A timestamp the way JavaScript's ``Date.prototype.toISOString`` writes it."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _ms(t: float) -> int:
    return int(t * 1000)


def _parse_iso(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value / 1000
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _json_response(status: int, payload: Any) -> Response:
    # Compact and non-ASCII kept as is, like JSON.stringify.
    body = json.dumps(_js(payload), separators=(",", ":"), ensure_ascii=False).encode()
    return Response(body, status_code=status, headers=_JSON_HEADERS)


_HTML_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})


def _escape_html(text: str) -> str:
    """As the ``escape-html`` package Express uses (``'`` is ``&#39;``)."""
    return text.translate(_HTML_ESCAPES)


def _malformed_json_response(error: _MalformedJSON) -> Response:
    """The page Express's default error handler renders for a body-parser SyntaxError."""
    parser = f"{_APP_ROOT}/node_modules/body-parser/lib"
    raw_body = f"{_APP_ROOT}/node_modules/raw-body/index.js"
    frames = ["JSON.parse (<anonymous>)"]
    if error.strict:
        frames += [
            f"createStrictSyntaxError ({parser}/types/json.js:169:10)",
            f"parse ({parser}/types/json.js:86:15)",
        ]
    else:
        frames.append(f"parse ({parser}/types/json.js:92:19)")
    frames += [
        f"{parser}/read.js:128:18",
        "AsyncResource.runInAsyncScope (node:async_hooks:206:9)",
        f"invokeCallback ({raw_body}:238:16)",
        f"done ({raw_body}:227:7)",
        f"IncomingMessage.onEnd ({raw_body}:287:7)",
        "IncomingMessage.emit (node:events:524:28)",
        "endReadableNT (node:internal/streams/readable:1698:12)",
        "process.processTicksAndRejections (node:internal/process/task_queues:82:21)",
    ]
    stack = "".join(f"<br> &nbsp; &nbsp;at {_escape_html(frame)}" for frame in frames)
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        "<title>Error</title>\n</head>\n<body>\n"
        f"<pre>SyntaxError: {_escape_html(error.message)}{stack}</pre>\n</body>\n</html>\n"
    )
    return Response(page.encode(), status_code=400, headers=_HTML_HEADERS)


# ---- V8's JSON.parse messages ---------------------------------------------------------------


class _V8SyntaxError(Exception):
    pass


def _is_digit(ch: str) -> bool:
    return len(ch) == 1 and "0" <= ch <= "9"


def _unexpected_token(text: str, pos: int) -> str:
    """V8's "Unexpected token" message, with its context rules (10 characters either side)."""
    token = text[pos]
    if len(text) <= 20:
        context = f'"{text}"'
    elif pos < 10:
        context = f'"{text[: pos + 10]}"...'
    elif pos >= len(text) - 10:
        context = f'..."{text[pos - 10 :]}"'
    else:
        context = f'..."{text[pos - 10 : pos + 10]}"...'
    return f"Unexpected token '{token}', {context} is not valid JSON"


class _V8JsonScanner:
    """Finds where and why V8's ``JSON.parse`` (Node 20) rejects a text; it builds nothing."""

    _LITERALS = {"t": "true", "f": "false", "n": "null"}

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self) -> str:
        try:
            self._value()
            self._space()
            if self.pos < len(self.text):
                raise _V8SyntaxError(
                    f"Unexpected non-whitespace character after JSON at position {self.pos}"
                )
        except _V8SyntaxError as exc:
            return str(exc)
        return "Unexpected end of JSON input"  # not reached for a text json.loads refused

    def _fail(self, what: str) -> None:
        raise _V8SyntaxError(f"{what} in JSON at position {self.pos}")

    def _unexpected(self) -> None:
        ch = self._peek()
        if not ch:
            raise _V8SyntaxError("Unexpected end of JSON input")
        if _is_digit(ch) or ch == "-":
            self._fail("Unexpected number")
        if ch == '"':
            self._fail("Unexpected string")
        raise _V8SyntaxError(_unexpected_token(self.text, self.pos))

    def _peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t\n\r":
            self.pos += 1

    def _value(self) -> None:
        self._space()
        ch = self._peek()
        if ch == "{":
            self._object()
        elif ch == "[":
            self._array()
        elif ch == '"':
            self._string()
        elif ch == "-" or _is_digit(ch):
            self._number()
        elif ch in self._LITERALS:
            for expected in self._LITERALS[ch]:
                if self._peek() != expected:
                    self._unexpected()
                self.pos += 1
        else:
            self._unexpected()

    def _object(self) -> None:
        self.pos += 1
        self._space()
        if self._peek() == "}":
            self.pos += 1
            return
        if self._peek() != '"':
            self._fail("Expected property name or '}'")
        first = True
        while True:
            self._string()
            self._space()
            if self._peek() != ":":
                # Only the first property's colon has its own message.
                if first:
                    self._fail("Expected ':' after property name")
                self._unexpected()
            first = False
            self.pos += 1
            self._value()
            self._space()
            if self._peek() == "}":
                self.pos += 1
                return
            if self._peek() != ",":
                self._fail("Expected ',' or '}' after property value")
            self.pos += 1
            self._space()
            if self._peek() != '"':
                self._fail("Expected double-quoted property name")

    def _array(self) -> None:
        self.pos += 1
        self._space()
        if self._peek() == "]":
            self.pos += 1
            return
        while True:
            self._value()
            self._space()
            if self._peek() == "]":
                self.pos += 1
                return
            if self._peek() != ",":
                self._fail("Expected ',' or ']' after array element")
            self.pos += 1

    def _string(self) -> None:
        self.pos += 1
        while True:
            ch = self._peek()
            if not ch:
                self._fail("Unterminated string")
            if ch == '"':
                self.pos += 1
                return
            if ch < " ":
                self._fail("Bad control character in string literal")
            if ch == "\\":
                self.pos += 1
                escaped = self._peek()
                if not escaped:
                    self._unexpected()
                if escaped == "u":
                    for _ in range(4):
                        self.pos += 1
                        digit = self._peek()
                        if not digit or digit not in "0123456789abcdefABCDEF":
                            self._fail("Bad Unicode escape")
                elif escaped not in '"\\/bfnrt':
                    self._fail("Bad escaped character")
            self.pos += 1

    def _digits(self) -> int:
        start = self.pos
        while _is_digit(self._peek()):
            self.pos += 1
        return self.pos - start

    def _number(self) -> None:
        if self._peek() == "-":
            self.pos += 1
            if not _is_digit(self._peek()):
                self._fail("No number after minus sign")
        if self._peek() == "0":
            self.pos += 1
            if _is_digit(self._peek()):
                self._fail("Unexpected number")
        else:
            self._digits()
        if self._peek() == ".":
            self.pos += 1
            if not self._digits():
                self._fail("Unterminated fractional number")
        if self._peek() in ("e", "E"):
            self.pos += 1
            if self._peek() in ("+", "-"):
                self.pos += 1
            if not self._digits():
                self._fail("Exponent part is missing a number")


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def _parse_json_body(raw: bytes) -> Any:
    """Parse like ``express.json()`` (strict mode), raising with V8's wording on failure."""
    if not raw:
        return {}
    # body-parser decodes with replacement characters rather than failing on bad UTF-8.
    text = raw.decode("utf-8", errors="replace")
    stripped = text.lstrip(" \t\n\r")
    # Strict mode accepts only objects and arrays at the top level; its error names the first
    # character, with the context V8 would give it there.
    if not stripped:
        raise _MalformedJSON("Unexpected end of JSON input", strict=True)
    if stripped[0] not in "{[":
        pos = len(text) - len(stripped)
        raise _MalformedJSON(_unexpected_token(text, pos), strict=True)
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        raise _MalformedJSON(_V8JsonScanner(text).error()) from None


def _set_field(target: dict[str, Any], key: str, value: str) -> None:
    """One ``key=value`` pair of a urlencoded body, with qs's one-level brackets."""
    base, bracket, rest = key.partition("[")
    if not bracket or not base or not rest.endswith("]"):
        target[key] = value
        return
    inner = rest[:-1]
    if inner == "" or (inner.isdigit() and int(inner) <= 20):
        current = target.get(base)
        if not isinstance(current, list):
            current = [] if current is None else [current]
            target[base] = current
        current.append(value)
        return
    current = target.get(base)
    if not isinstance(current, dict):
        current = {}
        target[base] = current
    current[inner] = value


def _parse_form(raw: bytes) -> dict[str, Any]:
    form: dict[str, Any] = {}
    for key, value in parse_qsl(raw.decode("utf-8", errors="replace"), keep_blank_values=True):
        _set_field(form, key, value)
    return form


def _parse_query(raw: str) -> dict[str, Any]:
    """``req.query``: a repeated key becomes a list (which then matches no api key)."""
    query: dict[str, Any] = {}
    for key, value in parse_qsl(raw, keep_blank_values=True):
        if key in query:
            previous = query[key]
            query[key] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            query[key] = value
    return query


def _parse_body(content_type: str, raw: bytes) -> Any:
    """What ``req.body`` would be: parsed only for the content types Express is set up for."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json":
        return _parse_json_body(raw)
    if media == "application/x-www-form-urlencoded":
        return _parse_form(raw)
    return {}


def _route_timeout(path: str) -> float:
    for pattern, seconds in _ROUTE_TIMEOUTS:
        if pattern.search(path):
            return seconds
    return _DEFAULT_TIMEOUT


def _session_from_path(segs: list[str]) -> str | None:
    """The session id a path names, for the log; works for unknown sub-routes too."""
    n = len(segs)
    if n < 2:
        return None
    first, second = segs[0].lower(), segs[1].lower()
    if first == "api":
        if second == "sessions" and n >= 3:
            return unquote(segs[2]) or None
        if second == "messages" and n >= 4:
            return unquote(segs[2]) or None
        if second == "internal" and n >= 4 and segs[2].lower() == "sessions":
            return unquote(segs[3]) or None
    elif first == "sessions" and n >= 2:
        return unquote(segs[1]) or None  # an unknown route, but the session is still useful
    elif first == "cleanup" and n == 2 and second not in ("stats", "run"):
        return unquote(segs[1]) or None
    elif first == "remoteauth" and second == "migration" and n >= 3:
        return unquote(segs[2]) or None
    return None


def _login_file(session_id: Any) -> str:
    """The file name of a session's saved login: the id when it is a safe name, else a hash."""
    if isinstance(session_id, str) and _CLIENT_ID.fullmatch(session_id) and len(session_id) <= 200:
        return f"session-{session_id}.json"
    digest = hashlib.sha256(repr(_session_key(session_id)).encode()).hexdigest()[:40]
    return f"sessionhash-{digest}.json"


def _workspace_from_id(session_id: str) -> Any:
    # Real ids look like webjs_{workspace}_{unixtime}_{random8}.
    parts = session_id.split("_")
    if len(parts) >= 2 and parts[1].isdigit():
        return int(parts[1])
    return UNDEFINED


def _fake_phone(session_id: Any) -> str:
    """The number the fake WhatsApp library gives a client id: 628 and nine digits of its SHA-1."""
    digest = hashlib.sha1(_js_string(session_id).encode()).digest()
    return "628" + "".join(str(digest[i % len(digest)] % 10) for i in range(9))


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _cpu_micros() -> tuple[int, int]:
    times = os.times()
    return int(times.user * 1_000_000), int(times.system * 1_000_000)


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else min(a, b)


class _Session:
    """One session's metadata, as the instance keeps it, and where its start-up has got to.

    The metadata is the source of truth (PUT metadata may overwrite any key, status included);
    the start-up steps are applied lazily, at the first read after each is due, so no timer task
    exists per session. A start that waits for a QR scan (no saved login) has no ``auth_at`` or
    ``connect_at`` until ``scan`` sets them.
    """

    __slots__ = (
        "auth_at",
        "awaiting_scan",
        "connect_at",
        "delay",
        "meta",
        "phone",
        "qr_at",
        "session_id",
        "started_at",
        "via",
    )

    def __init__(self, session_id: Any, meta: dict[str, Any]) -> None:
        self.session_id = session_id
        self.meta = meta
        self.qr_at: float | None = None
        self.auth_at: float | None = None
        self.connect_at: float | None = None
        self.awaiting_scan = False
        self.delay = 0.0
        self.started_at: float | None = None
        self.via: str | None = None  # how it was started (create, reconnect...), None if put
        self.phone: str | None = None  # a number given through /_sim, kept over the fake one

    def start(
        self, now: float, delay: float, previous: _Session | None, needs_scan: bool = False
    ) -> None:
        self.delay = delay
        self.started_at = now
        self.qr_at = now + delay * _QR_AT
        self.auth_at = None if needs_scan else now + delay * _AUTHENTICATED_AT
        self.connect_at = None if needs_scan else now + delay
        if previous is not None:
            # The replaced client is not destroyed: its own pending events still arrive.
            self.auth_at = _earliest(self.auth_at, previous.auth_at)
            self.connect_at = _earliest(self.connect_at, previous.connect_at)
        self.awaiting_scan = self.connect_at is None

    def scan(self, now: float) -> bool:
        """The QR code is scanned: the rest of the start-up follows, over the usual delays."""
        if not self.awaiting_scan:
            return False
        base = now if self.qr_at is None else max(now, self.qr_at)  # no scan before the QR
        self.awaiting_scan = False
        self.auth_at = base + self.delay * (_AUTHENTICATED_AT - _QR_AT)
        self.connect_at = base + self.delay * (1 - _QR_AT)
        return True

    def stop_starting(self) -> None:
        self.qr_at = self.auth_at = self.connect_at = None
        self.awaiting_scan = False

    def advance(self, now: float) -> float | None:
        """Apply the start-up steps due by ``now``; the moment it connected, if it did now."""
        if self.qr_at is not None and now >= self.qr_at:
            qr_ms = _ms(self.qr_at)
            self.qr_at = None
            count = self.meta.get("qrCount")
            self.meta.update(
                status="qr_scanning",
                qrCode="data:image/png;base64," + base64.b64encode(os.urandom(96)).decode(),
                qrGeneratedAt=qr_ms,
                qrCount=count + 1 if isinstance(count, int) else 1,
            )
        if self.auth_at is not None and now >= self.auth_at:
            self.meta.update(status="authenticated", authenticatedAt=_iso(self.auth_at))
            self.auth_at = None
        if self.connect_at is not None and now >= self.connect_at:
            connected_at = self.connect_at
            self.meta.update(
                status="connected",
                phoneNumber=self.phone or _fake_phone(self.session_id),
                platform="android",
                connectedAt=_iso(connected_at),
                phoneExtractionMethod="client.info.wid",
            )
            self.connect_at = None
            return connected_at
        return None

    def field(self, name: str) -> Any:
        return self.meta.get(name, UNDEFINED)

    @property
    def connected(self) -> bool:
        return self.meta.get("status") == "connected"


def _new_meta(workspace_id: Any, account_id: Any, now: float) -> dict[str, Any]:
    return {
        "workspaceId": workspace_id,
        "accountId": account_id,
        "status": "qr_scanning",
        "createdAt": _iso(now),
        "phoneNumber": None,
        "lastActivity": _iso(now),
        "performanceStart": _ms(now),
    }


class _Flight:
    """A request being handled: what to log as "received" if the process dies under it."""

    __slots__ = ("event", "idempotency_key", "received")

    def __init__(self, event: dict[str, Any], idempotency_key: str | None) -> None:
        self.event = event
        self.idempotency_key = idempotency_key
        self.received = False


class _Call:
    """One request as the handlers see it, after body parsing."""

    __slots__ = ("body", "flight", "headers", "params", "query", "request_id", "t")

    def __init__(
        self,
        params: dict[str, str],
        query: dict[str, Any],
        body: Any,
        headers: dict[str, str],
        t: float,
    ) -> None:
        self.params = params
        self.query = query
        # Destructuring a non-object body reads undefined everywhere, as from an empty object.
        self.body: dict[str, Any] = body if isinstance(body, dict) else {}
        self.headers = headers
        self.request_id = headers.get("x-request-id")
        self.t = t
        self.flight: _Flight | None = None

    def field(self, name: str) -> Any:
        return self.body.get(name, UNDEFINED)


def _refused(exc: BaseException) -> bool:
    """Whether a connection was refused somewhere down the chain of ``exc`` (ECONNREFUSED)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _SendError(Exception):
    """The error the session manager or the library throws; the controller maps its message."""


Handler = Callable[[_Call], Awaitable[Reply]]

_UNAUTHORIZED: Reply = (401, {"error": INVALID_API_KEY})


class _Simulator:
    def __init__(self, config: SimulatorConfig) -> None:
        self.name = config.name
        self.api_key = config.api_key
        self.connect_delay = config.connect_delay
        self.send_delay = config.send_delay
        self.bulk_interval = config.bulk_interval
        self.timeout_scale = config.timeout_scale
        self.laravel_url = config.laravel_url
        self.laravel_api_key = config.laravel_api_key or config.api_key
        self.die_on_send = False
        self.unhealthy = False
        self.started = time.time()
        self.sessions: dict[SessionKey, _Session] = {}
        self.auth_dir = config.auth_dir
        if self.auth_dir is not None:
            os.makedirs(self.auth_dir, exist_ok=True)
        # The starts not yet connected (nor replaced or stopped), the most there were at once,
        # and their connect times in a heap (entries of replaced starts are skipped when due).
        self._starting: set[_Session] = set()
        self.max_starting = 0
        self._due: list[tuple[float, int, _Session]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        for sid in config.sessions:
            self._put_connected(sid, _workspace_from_id(sid), self.started)
        self.requests: deque[dict[str, Any]] = deque(maxlen=_MEMORY_EVENTS)
        self.sent: deque[dict[str, Any]] = deque(maxlen=_MEMORY_EVENTS)
        self.events: deque[dict[str, Any]] = deque(maxlen=_MEMORY_EVENTS)
        self._flights: set[_Flight] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        # How the process ends when a route timeout fires; replaceable for in-process tests.
        self.exit: Callable[[int], None] = os._exit
        self._fd: int | None = None
        self._close_fd: weakref.finalize[Any, Any] | None = None
        if config.log_path:
            # One os.write per line on an O_APPEND descriptor: nothing is buffered in Python, so
            # a line survives SIGKILL and os._exit, and several simulators may share one file.
            self._fd = os.open(config.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._close_fd = weakref.finalize(self, os.close, self._fd)
        self.routes: list[tuple[str, tuple[str, ...], Handler]] = [
            ("GET", (), self.root),
            ("GET", ("info",), self.info),
            ("GET", ("health",), self.health),
            ("GET", ("health", "detailed"), self.health_detailed),
            ("GET", ("health", "ready"), self.health_ready),
            ("GET", ("health", "live"), self.health_live),
            ("GET", ("health", "metrics"), self.health_metrics),
            ("POST", ("api", "sessions"), self.create_session),
            ("GET", ("api", "sessions"), self.list_sessions),
            ("GET", ("api", "sessions", ":id", "status"), self.session_status),
            ("GET", ("api", "sessions", ":id", "metadata"), self.get_metadata),
            ("PUT", ("api", "sessions", ":id", "metadata"), self.put_metadata),
            ("POST", ("api", "sessions", ":id", "restore"), self.restore),
            ("DELETE", ("api", "sessions", ":id"), self.delete_session),
            ("POST", ("api", "sessions", ":id", "reconnect"), self.reconnect),
            ("POST", ("api", "sessions", ":id", "regenerate-qr"), self.regenerate_qr),
            ("POST", ("api", "messages", "send"), self.send),
            ("POST", ("api", "messages", "send-media"), self.send_media),
            ("POST", ("api", "messages", "bulk-send"), self.bulk_send),
            ("GET", ("api", "messages", ":id", "status"), self.message_status),
            ("GET", ("api", "messages", ":id", "validate"), self.validate),
            ("GET", ("api", "internal", "sessions", ":id", "last-activity"), self.last_activity),
            ("POST", ("cleanup", "run"), self.cleanup_run),
            ("POST", ("cleanup", ":id"), self.cleanup_session),
            ("GET", ("cleanup", "stats"), self.cleanup_stats),
            ("GET", ("remoteauth", "health"), self.remoteauth_health),
            ("GET", ("remoteauth", "redis"), self.remoteauth_redis),
            ("GET", ("remoteauth", "sessions"), self.remoteauth_sessions),
            ("GET", ("remoteauth", "migration", ":id"), self.remoteauth_migration),
        ]

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._close_fd is not None:
            self._close_fd()
        self._fd = None

    # ---- event log ------------------------------------------------------------------------

    def _write(self, event: dict[str, Any]) -> None:
        if self._fd is not None:
            line = json.dumps(_js(event), separators=(",", ":"), ensure_ascii=False) + "\n"
            os.write(self._fd, line.encode())

    def _record(self, event: str, *, t: float | None = None, **fields: Any) -> dict[str, Any]:
        """A life-cycle event: in memory (``GET /_sim/events``) and in the log file.

        ``t`` is when it happened, if not now (a connection noticed after the moment it made).
        """
        entry = {
            "event": event,
            "instance": self.name,
            **fields,
            "t": time.time() if t is None else t,
        }
        self.events.append(entry)
        self._write(entry)
        return entry

    def _redact(self, value: str) -> str:
        for key in (self.api_key, self.laravel_api_key):
            if key:
                value = value.replace(key, "***")
        return value

    def _log_headers(self, request: Request) -> dict[str, str]:
        headers: dict[str, str] = {}
        for raw_name, raw_value in request.scope["headers"]:
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            # The instance ignores key headers, but a client may still send one: never log it.
            if "api-key" in name or "api_key" in name or "apikey" in name:
                value = "***"
            else:
                value = self._redact(value)
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return headers

    def _base_event(
        self,
        event: str,
        request: Request,
        session_id: str | None,
        headers: dict[str, str],
        t: float,
    ) -> dict[str, Any]:
        query = request.scope["query_string"].decode("latin-1")
        if query:
            query = self._redact(_API_KEY_QUERY.sub(r"\1\2***", query))
        return {
            "event": event,
            "instance": self.name,
            "method": request.method,
            "path": request.scope["path"],
            "query": query,
            "session_id": session_id,
            "request_id": request.headers.get("x-request-id"),
            "headers": headers,
            "status": None,
            "t": t,
        }

    def _mark_received(self, flight: _Flight | None) -> None:
        """Log that a request reached the instance, before its fate is known (once per request)."""
        if flight is None or flight.received:
            return
        flight.received = True
        event = {**flight.event, "event": "received", "idempotency_key": flight.idempotency_key}
        self.events.append(event)
        self._write(event)

    def _crash(self, reason: str, **fields: Any) -> None:
        """Die the way the real instance does: every request in flight is left without an answer."""
        for flight in list(self._flights):
            self._mark_received(flight)
        self._record("crashed", reason=reason, **fields)
        self.exit(1)

    # ---- dispatch -------------------------------------------------------------------------

    def _match(self, method: str, segs: list[str]) -> tuple[Handler | None, dict[str, str]]:
        # Express routing is case-insensitive for the literal parts and decodes parameters.
        n = len(segs)
        lowered = [s.lower() for s in segs]
        for route_method, pattern, handler in self.routes:
            if route_method != method or len(pattern) != n:
                continue
            params: dict[str, str] = {}
            for part, raw, low in zip(pattern, segs, lowered, strict=True):
                if part[0] == ":":
                    if not raw:
                        break
                    params[part[1:]] = unquote(raw)
                elif part != low:
                    break
            else:
                return handler, params
        return None, {}

    async def handle(self, request: Request) -> Response:
        t = time.time()
        scope = request.scope
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        path = raw_path.decode("latin-1")
        segs = path.split("/")[1:]
        # Express's non-strict routing: one trailing slash is ignored.
        if segs and segs[-1] == "":
            segs.pop()
        if segs and segs[0].lower() == "_sim":
            return await self._control(request, segs[1:])

        raw_body = await request.body()
        headers = self._log_headers(request)
        body: Any = {}
        malformed: _MalformedJSON | None = None
        try:
            body = _parse_body(request.headers.get("content-type", ""), raw_body)
        except _MalformedJSON as exc:
            malformed = exc
        session_id = _session_from_path(segs)
        if session_id is None and isinstance(body, dict):
            candidate = body.get("session_id")
            session_id = candidate if isinstance(candidate, str) else None
        method = "GET" if request.method == "HEAD" else request.method
        query_string = scope["query_string"].decode("latin-1")
        event = self._base_event("request", request, session_id, headers, t)

        status: int
        response: Response
        if malformed is not None:
            # The parser fails before any handler or timeout timer exists.
            status, response = 400, _malformed_json_response(malformed)
        else:
            handler, params = self._match(method, segs)
            if handler is None:
                url = f"{path}?{query_string}" if query_string else path
                status, payload = 404, self._endpoint_not_found(url, request.method, t)
            else:
                call = _Call(params, _parse_query(query_string), body, headers, t)
                status, payload = await self._run(handler, call, path, event)
            response = _json_response(status, payload)

        event["status"] = status
        self.requests.append(event)
        self._write(event)
        return response

    async def _run(self, handler: Handler, call: _Call, path: str, event: dict[str, Any]) -> Reply:
        """Run a handler under its route timeout; when the timer fires, the process dies."""
        limit = _route_timeout(path) * self.timeout_scale
        flight = _Flight(event, call.headers.get("idempotency-key"))
        call.flight = flight
        self._flights.add(flight)
        # A timer, not a wait: like the real one it fires even if the client has gone away.
        timer = asyncio.get_running_loop().call_later(
            limit, lambda: self._crash("route timeout", path=path, timeout=limit)
        )
        try:
            return await handler(call)
        finally:
            timer.cancel()
            self._flights.discard(flight)

    def _key_in_query(self, call: _Call) -> bool:
        key = call.query.get("api_key")
        return isinstance(key, str) and key == self.api_key

    def _key_in_body(self, call: _Call) -> bool:
        key = call.body.get("api_key")
        return isinstance(key, str) and key == self.api_key

    def _endpoint_not_found(self, url: str, method: str, now: float) -> dict[str, Any]:
        # `path` is the original URL, query (and any api_key in it) included.
        return {
            "error": ENDPOINT_NOT_FOUND,
            "path": url,
            "method": method,
            "available_endpoints": list(_AVAILABLE_ENDPOINTS),
            "timestamp": _iso(now),
        }

    # ---- sessions held ----------------------------------------------------------------------

    def _held(self, session_id: Any, now: float) -> _Session | None:
        session = self.sessions.get(_session_key(session_id))
        if session is not None:
            self._advance(session, now)
        return session

    def _all(self, now: float) -> list[_Session]:
        sessions = list(self.sessions.values())
        for session in sessions:
            self._advance(session, now)
        return sessions

    def _put_connected(self, session_id: str, workspace_id: Any, now: float) -> _Session:
        """A session that is simply there and connected (start-up list, /_sim)."""
        session = _Session(session_id, _new_meta(workspace_id, UNDEFINED, now))
        self.sessions[_session_key(session_id)] = session
        session.start(now, 0.0, None)
        self._advance(session, now)
        return session

    def _advance(self, session: _Session, now: float) -> None:
        """``session.advance``, and what follows when that connects it."""
        connected_at = session.advance(now)
        if connected_at is None:
            return
        self._save_login(session)
        if session in self._starting:
            self._starting.discard(session)
            self._record(
                "session_connected",
                t=connected_at,
                session_id=None if session.session_id is UNDEFINED else session.session_id,
                via=session.via,
                started_at=session.started_at,
            )

    # ---- saved logins (--auth-dir) -----------------------------------------------------------

    def _login_path(self, session_id: Any) -> str | None:
        if self.auth_dir is None:
            return None
        return os.path.join(self.auth_dir, _login_file(session_id))

    def _has_login(self, session_id: Any) -> bool:
        path = self._login_path(session_id)
        return path is not None and os.path.exists(path)

    def _save_login(self, session: _Session) -> None:
        """A connected session's login, written once (atomically) for any instance to start it."""
        path = self._login_path(session.session_id)
        if path is None or os.path.exists(path):
            return
        login = {
            "session_id": None if session.session_id is UNDEFINED else session.session_id,
            "phone_number": session.field("phoneNumber"),
            "linked_by": self.name,
            "linked_at": session.field("connectedAt"),
        }
        tmp: str | None = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.auth_dir, prefix=".login-", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(_js(login), handle)
            os.replace(tmp, path)
        except OSError as exc:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            with contextlib.suppress(OSError, ValueError):
                print(
                    f"simulator {self.name}: cannot save the login {path}: {exc}", file=sys.stderr
                )

    # ---- starts in progress ------------------------------------------------------------------

    def _process_due(self, now: float) -> None:
        """Apply every connection due by ``now`` of a start in progress (each once)."""
        while self._due and self._due[0][0] <= now:
            _, _, session = heapq.heappop(self._due)
            if session in self._starting:
                self._advance(session, now)

    def _starting_now(self, now: float) -> int:
        self._process_due(now)
        return len(self._starting)

    def _begin(self, session: _Session, now: float) -> None:
        """Count a new start, and make sure its connection happens (and is logged) on time."""
        self._process_due(now)
        self._starting.add(session)
        self.max_starting = max(self.max_starting, len(self._starting))
        self._expect(session)

    def _end(self, session: _Session | None) -> None:
        """A start that will not connect: replaced, destroyed or stopped."""
        if session is not None:
            self._starting.discard(session)

    def _expect(self, session: _Session) -> None:
        if session.connect_at is not None:
            heapq.heappush(self._due, (session.connect_at, next(self._seq), session))
            self._arm()

    def _arm(self) -> None:
        """One timer, for the earliest connection due: a start connects (and saves its login)
        even if nobody reads it."""
        if not self._due or self._due[0][0] >= self._timer_at:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (built outside one): reads still apply it lazily
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = self._due[0][0]
        self._timer = loop.call_later(max(0.0, self._timer_at - time.time()), self._tick)

    def _tick(self) -> None:
        self._timer, self._timer_at = None, math.inf
        self._process_due(time.time())
        self._arm()

    def _start(
        self, session_id: Any, workspace_id: Any, account_id: Any, now: float, via: str
    ) -> Reply:
        """The session manager's create: a new client under this id, replacing any held one."""
        if _truthy(session_id) and not _CLIENT_ID.fullmatch(_js_string(session_id)):
            return 500, {"error": _INVALID_CLIENT_ID}
        key = _session_key(session_id)
        # Whatever was due happened before this start (the replaced client's connection too).
        self._process_due(now)
        previous = self.sessions.get(key)
        self._end(previous)
        session = _Session(session_id, _new_meta(workspace_id, account_id, now))
        # Without a saved login (when logins are kept) it waits for a QR scan.
        needs_scan = self.auth_dir is not None and not self._has_login(session_id)
        session.start(now, self.connect_delay, previous, needs_scan)
        session.via = via
        # Assigning to a held key keeps its place in the list, as a JavaScript Map does.
        self.sessions[key] = session
        self._record(
            "session_started",
            session_id=None if session_id is UNDEFINED else session_id,
            workspace_id=None if workspace_id is UNDEFINED else workspace_id,
            via=via,
            replaced=previous is not None,
            needs_scan=session.awaiting_scan,
        )
        self._begin(session, now)
        return 200, {"success": True, "session_id": session_id, "status": "qr_scanning"}

    def _disconnect(self, session_id: str) -> dict[str, Any]:
        """The session manager's disconnect: destroy a held client, or clean up after one."""
        session = self.sessions.pop(_session_key(session_id), None)
        self._end(session)
        if session is not None:
            # client.destroy(), not logout(): the device stays linked, no file is touched (a
            # saved login stays where it is).
            self._record("session_stopped", session_id=session_id)
            return {"success": True, "message": "Session disconnected successfully"}
        parts = session_id.split("_")
        if len(parts) >= 2 and parts[0] == "webjs":
            # It deletes sessions/{workspace}/{id}; the LocalAuth credentials that create wrote
            # live under sessions/workspace_{workspace}/session-{id}, which it leaves alone.
            self._record(
                "session_files_deleted",
                session_id=session_id,
                path=f"sessions/{parts[1]}/{session_id}",
            )
        return {
            "success": True,
            "message": "Session already disconnected or not found in memory",
            "alreadyDisconnected": True,
        }

    # ---- open routes ----------------------------------------------------------------------

    def _counts(self, now: float) -> dict[str, int]:
        sessions = self._all(now)
        connected = sum(1 for s in sessions if s.connected)
        return {
            "total": len(sessions),
            "connected": connected,
            "disconnected": len(sessions) - connected,
        }

    def _uptime(self, now: float) -> float:
        return now - self.started

    def _memory_mb(self) -> int:
        return round(_rss_bytes() / 1024 / 1024)

    def _session_stats(self, now: float) -> dict[str, Any]:
        sessions = self._all(now)
        by_status: dict[str, int] = {}
        for s in sessions:
            status = _js_string(s.field("status"))
            by_status[status] = by_status.get(status, 0) + 1
        connected = [s for s in sessions if s.connected]
        oldest = min(
            connected, key=lambda s: _parse_iso(s.field("connectedAt")) or now, default=None
        )
        newest = max(
            connected, key=lambda s: _parse_iso(s.field("connectedAt")) or now, default=None
        )
        longest: dict[str, Any] | None = None
        if oldest is not None:
            since = _parse_iso(oldest.field("connectedAt")) or now
            longest = {
                "session_id": oldest.session_id,
                "connected_at": oldest.field("connectedAt"),
                "uptime_hours": (now - since) / 3600,
            }
        return {
            "by_status": by_status,
            "longest_uptime": longest,
            "newest_session": None
            if newest is None
            else {"session_id": newest.session_id, "connected_at": newest.field("connectedAt")},
        }

    async def root(self, call: _Call) -> Reply:
        return 200, {
            "service": "WhatsApp Web.js Service",
            "version": "1.0.0",
            "status": "running",
            "endpoints": _ROOT_ENDPOINTS,
            "documentation": "See API documentation for request/response formats",
            "timestamp": _iso(call.t),
        }

    async def info(self, call: _Call) -> Reply:
        # The handler requires a package.json three directories up, which is not there.
        return 500, {"error": _INFO_ERROR, "timestamp": _iso(call.t)}

    async def health(self, call: _Call) -> Reply:
        used = self._memory_mb()
        return (503 if self.unhealthy else 200), {
            "status": "unhealthy" if self.unhealthy else "healthy",
            "uptime": self._uptime(call.t),
            "sessions": self._counts(call.t),
            "memory": {"used": used, "total": used, "unit": "MB"},
            "timestamp": _iso(call.t),
        }

    async def health_detailed(self, call: _Call) -> Reply:
        counts = self._counts(call.t)
        total, connected = counts["total"], counts["connected"]
        rss = self._memory_mb()
        user, system = _cpu_micros()
        return (503 if self.unhealthy else 200), {
            "status": "unhealthy" if self.unhealthy else "healthy",
            "uptime": self._uptime(call.t),
            "start_time": _iso(self.started),
            "timestamp": _iso(call.t),
            "sessions": {
                **counts,
                "connection_rate": connected / total * 100 if total else 0,
                "details": self._session_stats(call.t),
            },
            "memory": {
                "heap_used": rss,
                "heap_total": rss,
                "external": 0,
                "rss": rss,
                "unit": "MB",
            },
            "cpu": {"user": user, "system": system},
            "node": {
                "version": "v20.20.2",
                "platform": sys.platform,
                "arch": "x64",
                "pid": os.getpid(),
            },
            "environment": {
                "node_env": "development",
                "port": 3001,
                "laravel_url": "configured" if self.laravel_url else "not_configured",
            },
        }

    async def health_ready(self, call: _Call) -> Reply:
        count = len(self.sessions)
        ready = bool(self.laravel_url) and bool(self.api_key) and not self.unhealthy
        return (200 if ready else 503), {
            "ready": ready,
            "timestamp": _iso(call.t),
            "checks": {
                "laravel_configured": bool(self.laravel_url),
                "api_key_configured": bool(self.api_key),
                "active_sessions": count > 0,
                "session_count": count,
            },
        }

    async def health_live(self, call: _Call) -> Reply:
        # The event-loop delay is a Promise nobody awaits: it is `{}` and never below 1000, so
        # the real liveness probe always fails.
        return 503, {
            "alive": False,
            "uptime": self._uptime(call.t),
            "event_loop_delay_ms": {},
            "timestamp": _iso(call.t),
        }

    async def health_metrics(self, call: _Call) -> Reply:
        rss = self._memory_mb()
        user, system = _cpu_micros()
        return 200, {
            "timestamp": _iso(call.t),
            "uptime_seconds": self._uptime(call.t),
            "memory": {
                "heap_used_mb": rss,
                "heap_total_mb": rss,
                "heap_usage_percent": 100,
                "external_mb": 0,
                "rss_mb": rss,
            },
            "performance": {"event_loop_delay_ms": {}, "cpu_user": user, "cpu_system": system},
            "sessions": self._session_stats(call.t),
        }

    async def last_activity(self, call: _Call) -> Reply:
        # Filled only by self-sent messages from a phone, which never happen here; whether the
        # session is held makes no difference, and no key is asked for.
        return 200, {
            "success": True,
            "data": {
                "session_id": call.params["id"],
                "last_activity": None,
                "device_type": None,
                "seconds_since_activity": None,
                "message_count": 0,
            },
        }

    # ---- sessions -------------------------------------------------------------------------

    async def create_session(self, call: _Call) -> Reply:
        if not self._key_in_body(call):
            return _UNAUTHORIZED
        return self._start(
            call.field("session_id"),
            call.field("workspace_id"),
            call.field("account_id"),
            call.t,
            "create",
        )

    async def list_sessions(self, call: _Call) -> Reply:
        if not self._key_in_query(call):
            return _UNAUTHORIZED
        sessions = [
            {
                "session_id": s.session_id,
                "workspace_id": s.field("workspaceId"),
                "status": s.field("status"),
                "phone_number": s.field("phoneNumber"),
                "connected_at": s.field("connectedAt"),
            }
            for s in self._all(call.t)
        ]
        return 200, {"success": True, "sessions": sessions, "total": len(sessions)}

    def _status_body(self, session_id: str, session: _Session) -> dict[str, Any]:
        return {
            "session_id": session_id,
            "status": session.field("status"),
            "phone_number": session.field("phoneNumber"),
            "workspace_id": session.field("workspaceId"),
            "connected_at": session.field("connectedAt"),
            "last_activity": session.field("lastActivity"),
        }

    async def session_status(self, call: _Call) -> Reply:
        if not self._key_in_query(call):
            return _UNAUTHORIZED
        session = self._held(call.params["id"], call.t)
        if session is None:
            return 404, {"error": SESSION_NOT_FOUND}
        return 200, self._status_body(call.params["id"], session)

    async def get_metadata(self, call: _Call) -> Reply:
        if not self._key_in_query(call):
            return _UNAUTHORIZED
        session = self._held(call.params["id"], call.t)
        if session is None:
            return 404, {"error": SESSION_NOT_FOUND}
        return 200, {
            "success": True,
            "session_id": call.params["id"],
            "metadata": dict(session.meta),
        }

    async def put_metadata(self, call: _Call) -> Reply:
        if not self._key_in_body(call):
            return _UNAUTHORIZED
        updates = call.field("updates")
        if not _truthy(updates) or not isinstance(updates, dict | list):
            return 400, {"error": "Invalid updates object"}
        session = self._held(call.params["id"], call.t)
        if session is None:
            # Not held: nothing is stored, and the answer is still a success.
            return 200, {"success": True, "session_id": call.params["id"], "metadata": None}
        if isinstance(updates, list):
            updates = {str(i): v for i, v in enumerate(updates)}
        # A shallow merge that may overwrite anything, status included.
        session.meta.update(updates)
        return 200, {
            "success": True,
            "session_id": call.params["id"],
            "metadata": dict(session.meta),
        }

    async def restore(self, call: _Call) -> Reply:
        if not self._key_in_body(call):
            return _UNAUTHORIZED
        # The handler passes a variable that does not exist: it fails on every call.
        return 500, {"error": "workspaceId is not defined"}

    async def delete_session(self, call: _Call) -> Reply:
        if not self._key_in_body(call):
            return _UNAUTHORIZED
        return 200, self._disconnect(call.params["id"])

    async def _restart(self, call: _Call, via: str) -> Reply:
        """Reconnect and regenerate-qr: disconnect (a no-op if not held), then create here."""
        session_id = call.params["id"]
        self._disconnect(session_id)
        return self._start(
            session_id, call.field("workspace_id"), call.field("account_id"), call.t, via
        )

    async def reconnect(self, call: _Call) -> Reply:
        if not self._key_in_body(call):
            return _UNAUTHORIZED
        return await self._restart(call, "reconnect")

    async def regenerate_qr(self, call: _Call) -> Reply:
        if not self._key_in_body(call):
            return _UNAUTHORIZED
        status, payload = await self._restart(call, "regenerate-qr")
        if status != 200:
            return status, payload
        # The create result has no qr_code, so only expires_in is left.
        return 200, {"qr_code": UNDEFINED, "expires_in": 300}

    # ---- messages -------------------------------------------------------------------------

    async def _hang(self) -> None:
        await asyncio.get_running_loop().create_future()

    async def _library_send(
        self, call: _Call, session: _Session, recipient: Any, text: str | None
    ) -> dict[str, Any]:
        """The WhatsApp library's sendMessage: ``text`` None for media."""
        if self.die_on_send:
            self._crash("die_on_send")
            await self._hang()
        if text is not None and HANG_MARKER in text:
            # Handed to the library, which never answers: the route timeout will end it.
            self._mark_received(call.flight)
            await self._hang()
        if self.send_delay > 0:
            # Not cancelled when the client goes away: like the real instance, a slow send
            # still goes out after its caller gave up.
            await asyncio.sleep(self.send_delay)
        if self.sessions.get(_session_key(session.session_id)) is not session:
            raise _SendError("Protocol error (Runtime.callFunctionOn): Session closed.")
        if text is not None and FAIL_MARKER in text:
            raise _SendError("fake send failure")
        chat_id = f"{_js_string(recipient)}@c.us"
        message_id = f"true_{chat_id}_{secrets.token_hex(10).upper()}"
        now = time.time()
        event = {
            "event": "sent",
            "instance": self.name,
            "session_id": session.session_id,
            "message_id": message_id,
            "recipient": chat_id,
            # What was sent (cut to 500 characters), for ordering checks; None for media.
            "text": None if text is None else text[:_SENT_TEXT_LIMIT],
            "request_id": call.request_id,
            "idempotency_key": call.headers.get("idempotency-key"),
            "t": now,
        }
        self.sent.append(event)
        self._write(event)
        return {"success": True, "message_id": message_id, "timestamp": int(now)}

    async def _send_message(
        self, call: _Call, session_id: Any, recipient: Any, message: Any, kind: Any
    ) -> dict[str, Any]:
        """The session manager's sendMessage: the session checks, then the library call."""
        session = self._held(session_id, time.time())
        if session is None:
            raise _SendError(SESSION_NOT_FOUND)
        if not session.connected:
            raise _SendError(NOT_CONNECTED_SHORT)
        if kind == "text":
            text = message if isinstance(message, str) else json.dumps(_js(message))
            return await self._library_send(call, session, recipient, text)
        if kind == "media" and isinstance(message, dict) and _truthy(message.get("mediaUrl")):
            return await self._library_send(call, session, recipient, None)
        # Any other type sends nothing and still reports a success.
        return {"success": True, "message_id": UNDEFINED, "timestamp": UNDEFINED}

    async def _send_reply(
        self, call: _Call, session_id: Any, recipient: Any, message: Any, kind: Any
    ) -> Reply:
        try:
            return 200, await self._send_message(call, session_id, recipient, message, kind)
        except _SendError as exc:
            if str(exc) == SESSION_NOT_FOUND:
                return 404, {"error": SESSION_NOT_FOUND}
            if str(exc) == NOT_CONNECTED_SHORT:
                return 400, {"error": NOT_CONNECTED}
            return 500, {"error": str(exc)}

    async def send(self, call: _Call) -> Reply:
        if not self._key_in_body(call):
            return _UNAUTHORIZED
        session_id, phone = call.field("session_id"), call.field("recipient_phone")
        message = call.field("message")
        if not (_truthy(session_id) and _truthy(phone) and _truthy(message)):
            return 400, {
                "error": "Missing required fields",
                "required": ["session_id", "recipient_phone", "message"],
            }
        if not isinstance(phone, str):
            return 500, {"error": _type_error("recipient_phone", phone)}
        if not _PHONE.fullmatch(_WHITESPACE.sub("", phone)):
            return 400, {"error": "Invalid phone number format"}
        if not isinstance(message, str | dict | list):
            return 400, {"error": "Message must be string or object"}
        kind = call.field("type") if _truthy(call.field("type")) else "text"
        return await self._send_reply(call, session_id, phone, message, kind)

    async def send_media(self, call: _Call) -> Reply:
        if not self._key_in_body(call):
            return _UNAUTHORIZED
        session_id, phone = call.field("session_id"), call.field("recipient_phone")
        media_url = call.field("media_url")
        if not (_truthy(session_id) and _truthy(phone) and _truthy(media_url)):
            return 400, {
                "error": "Missing required fields",
                "required": ["session_id", "recipient_phone", "media_url"],
            }
        caption, filename = call.field("caption"), call.field("filename")
        media = {
            "mediaUrl": media_url,
            "caption": caption if _truthy(caption) else "",
            "filename": filename if _truthy(filename) else "media",
        }
        # The real library downloads media_url first; nothing is fetched here.
        return await self._send_reply(call, session_id, phone, media, "media")

    async def bulk_send(self, call: _Call) -> Reply:
        if not self._key_in_body(call):
            return _UNAUTHORIZED
        session_id, recipients = call.field("session_id"), call.field("recipients")
        message = call.field("message")
        if not _truthy(session_id) or not isinstance(recipients, list) or not recipients:
            return 400, {
                "error": "Missing required fields",
                "required": ["session_id", "recipients (array)"],
            }
        if not _truthy(message):
            return 400, {"error": "Message content is required"}
        invalid: list[Any] = []
        for recipient in recipients:
            if not isinstance(recipient, str):
                return 500, {"error": _type_error("phone", recipient)}
            if not _PHONE.fullmatch(_WHITESPACE.sub("", recipient)):
                invalid.append(recipient)
        if invalid:
            return 400, {
                "error": "Invalid phone number format for some recipients",
                "invalid_recipients": invalid,
            }
        kind = call.field("type") if _truthy(call.field("type")) else "text"
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        # One at a time; after each success (the last one too) a pause. A missing session is
        # a failure per recipient, so the answer is still a 200.
        for recipient in recipients:
            try:
                sent = await self._send_message(call, session_id, recipient, message, kind)
            except _SendError as exc:
                failure = {"recipient": recipient, "success": False, "error": str(exc)}
                errors.append(failure)
                results.append(dict(failure))
                continue
            results.append(
                {
                    "recipient": recipient,
                    "success": True,
                    "message_id": sent["message_id"],
                    "timestamp": sent["timestamp"],
                }
            )
            if self.bulk_interval > 0:
                await asyncio.sleep(self.bulk_interval)
        successful = sum(1 for r in results if r["success"])
        return 200, {
            "success": True,
            "total": len(results),
            "successful": successful,
            "failed": len(results) - successful,
            "results": results,
            "errors": errors,
        }

    async def message_status(self, call: _Call) -> Reply:
        if not self._key_in_query(call):
            return _UNAUTHORIZED
        message_id = call.query.get("message_id", UNDEFINED)
        if not _truthy(message_id):
            return 400, {"error": "Missing required field: message_id"}
        session = self._held(call.params["id"], call.t)
        if session is None:
            return 404, {"error": SESSION_NOT_FOUND}
        if not session.connected:
            return 400, {"error": NOT_CONNECTED_SHORT}
        # Nothing is looked up: any message id gets the session's state.
        return 200, {
            "success": True,
            "session_id": call.params["id"],
            "message_id": message_id,
            "session_status": session.field("status"),
            "connected_at": session.field("connectedAt"),
            "last_activity": session.field("lastActivity"),
            "note": "Exact message status tracking depends on message_ack events",
        }

    async def validate(self, call: _Call) -> Reply:
        if not self._key_in_query(call):
            return _UNAUTHORIZED
        session = self._held(call.params["id"], call.t)
        if session is None:
            return 404, {"success": False, "error": SESSION_NOT_FOUND, "can_send": False}
        status = session.field("status")
        last = session.field("lastActivity")
        can_send = status == "connected"
        is_healthy: Any = last
        if _truthy(last):
            since = _parse_iso(last)
            is_healthy = since is not None and call.t - since < _HEALTHY_WINDOW
        recommendations: list[str] = []
        if not can_send:
            if status == "qr_scanning":
                recommendations.append("Session is waiting for QR code scan")
            elif status == "disconnected":
                recommendations.append("Session is disconnected, please reconnect")
            else:
                recommendations.append(f"Session is {_js_string(status)}, cannot send messages")
        if not _truthy(is_healthy) and can_send:
            recommendations.append("Session has been inactive for a while, consider reconnecting")
        if can_send and _truthy(is_healthy):
            recommendations.append("Session is ready to send messages")
        return 200, {
            "success": True,
            "session_id": call.params["id"],
            "status": status,
            "can_send": can_send,
            "is_healthy": is_healthy,
            "last_activity": last,
            "phone_number": session.field("phoneNumber"),
            "recommendations": recommendations,
        }

    # ---- cleanup and remoteauth (no key; their Laravel and Redis are not simulated) ---------

    async def cleanup_run(self, call: _Call) -> Reply:
        return 200, {
            "success": True,
            "message": "Cleanup cycle completed",
            "results": {"checked": 0, "cleaned": 0, "failed": 0, "skipped": 0, "errors": []},
            "timestamp": _iso(call.t),
        }

    async def cleanup_session(self, call: _Call) -> Reply:
        # The real one asks Laravel for the account first; without one it fails like this.
        return 500, {
            "success": False,
            "error": "Cleanup failed",
            "sessionId": call.params["id"],
            "timestamp": _iso(call.t),
        }

    async def cleanup_stats(self, call: _Call) -> Reply:
        return 200, {"success": True, "stats": {}, "timestamp": _iso(call.t)}

    async def remoteauth_health(self, call: _Call) -> Reply:
        return 200, {
            "status": "healthy",
            "authStrategy": "localauth",
            "timestamp": _iso(call.t),
            "sessions": {"active": len(self.sessions), "storageType": "localauth"},
        }

    async def remoteauth_redis(self, call: _Call) -> Reply:
        return 200, {
            "status": "disabled",
            "message": "RemoteAuth not enabled. Current auth strategy: localauth",
        }

    async def remoteauth_sessions(self, call: _Call) -> Reply:
        return 200, {
            "storageType": "localauth",
            "active": len(self.sessions),
            "timestamp": _iso(call.t),
            "localAuth": {"sessions": 0, "path": "./sessions"},
        }

    async def remoteauth_migration(self, call: _Call) -> Reply:
        return 500, {
            "status": "error",
            "error": "Redis is not available",
            "sessionId": call.params["id"],
        }

    # ---- the start-up restore ---------------------------------------------------------------

    def start_background(self) -> None:
        if self.laravel_url:
            task = asyncio.create_task(self.restore_accounts())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _fetch_active(self, client: httpx.AsyncClient, url: str) -> Any:
        """``GET .../accounts/active``: its ``sessions``, or [] after logging why not."""
        headers = {"X-API-Key": self.laravel_api_key, "Content-Type": "application/json"}
        delay = 1.0
        for attempt in range(1, 4):
            try:
                response = await client.get(url, headers=headers)
                response.raise_for_status()
            except httpx.HTTPError as exc:
                if _refused(exc) and attempt < 3:
                    # Laravel may still be booting: only a refused connection is tried again.
                    await asyncio.sleep(delay)
                    delay *= 2
                    continue
                self._restore_failed(f"{type(exc).__name__}: {exc}", attempt)
                return []
            try:
                document = response.json()
            except ValueError:
                return []
            sessions = document.get("sessions") if isinstance(document, dict) else None
            return sessions if _truthy(sessions) else []
        return []

    def _restore_failed(self, error: str, attempts: int) -> None:
        error = self._redact(error)
        self._record("restore_failed", error=error, attempts=attempts)
        with contextlib.suppress(OSError, ValueError):
            print(
                f"simulator {self.name}: failed to fetch active sessions: {error}", file=sys.stderr
            )

    async def restore_accounts(self) -> None:
        """Start every active account Laravel lists that is not held here, whoever owns it."""
        assert self.laravel_url is not None
        url = f"{self.laravel_url}/api/whatsapp/accounts/active"
        restored: list[Any] = []
        skipped: list[Any] = []
        failed: list[Any] = []
        reports: list[Awaitable[None]] = []
        async with httpx.AsyncClient(timeout=15.0, trust_env=False) as client:
            accounts = await self._fetch_active(client, url)
            if not isinstance(accounts, list):
                self._restore_failed("sessions is not iterable", 1)
                accounts = []
            for account in accounts:
                if not isinstance(account, dict):
                    failed.append(account)
                    continue
                session_id = account.get("session_id", UNDEFINED)
                name = None if session_id is UNDEFINED else session_id
                if _session_key(session_id) in self.sessions:
                    skipped.append(name)
                    continue
                # The account's id lands where the options belong: no account id, no priority.
                workspace_id = account.get("workspace_id", UNDEFINED)
                status, payload = self._start(
                    session_id, workspace_id, UNDEFINED, time.time(), "restore"
                )
                if status == 200:
                    restored.append(name)
                else:
                    failed.append(name)
                    reports.append(
                        self._mark_disconnected(client, session_id, workspace_id, payload)
                    )
            self._record(
                "restore_done",
                url=url,
                total=len(accounts),
                restored=restored,
                skipped=skipped,
                failed=failed,
            )
            # Reported after the summary; the client stays open until the reports are done.
            await asyncio.gather(*reports)

    async def _mark_disconnected(
        self, client: httpx.AsyncClient, session_id: Any, workspace_id: Any, payload: Any
    ) -> None:
        await asyncio.sleep(0.1)
        reason = payload.get("error") if isinstance(payload, dict) else None
        with contextlib.suppress(httpx.HTTPError):
            await client.post(
                f"{self.laravel_url}/api/whatsapp/sessions/{_js_string(session_id)}/mark-disconnected",
                json=_js(
                    {
                        "workspace_id": workspace_id,
                        "reason": reason or "Failed to restore on startup",
                    }
                ),
                headers={"X-API-Key": self.laravel_api_key},
                timeout=5.0,
            )

    # ---- /_sim test controls --------------------------------------------------------------

    async def _control(self, request: Request, segs: list[str]) -> Response:
        method = request.method
        raw = await request.body()
        body: Any = {}
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                return _json_response(400, {"error": "invalid JSON"})
        if not isinstance(body, dict):
            body = {}
        route = [s.lower() for s in segs[:1]]
        now = time.time()
        if route == ["sessions"] and len(segs) == 1:
            if method == "GET":
                sessions = [
                    {"session_id": s.session_id, "status": s.field("status")}
                    for s in self._all(now)
                ]
                return _json_response(
                    200,
                    {
                        "sessions": sessions,
                        "starting": self._starting_now(now),
                        "max_starting": self.max_starting,
                    },
                )
            if method == "POST":
                return self._sim_put_session(body, now)
        if route == ["sessions"] and len(segs) == 2 and method == "DELETE":
            dropped = self.sessions.pop(unquote(segs[1]), None)
            self._end(dropped)
            return _json_response(200, {"success": True, "removed": dropped is not None})
        scan = len(segs) == 3 and segs[2].lower() == "scan"
        if route == ["sessions"] and scan and method == "POST":
            return self._sim_scan(unquote(segs[1]), now)
        if route == ["log"] and len(segs) == 1:
            if method == "GET":
                return _json_response(200, {"requests": list(self.requests)})
            if method == "DELETE":
                self.requests.clear()
                self.sent.clear()
                self.events.clear()
                return _json_response(200, {"success": True})
        if route == ["sent"] and len(segs) == 1 and method == "GET":
            return _json_response(200, {"messages": list(self.sent)})
        if route == ["events"] and len(segs) == 1 and method == "GET":
            return _json_response(200, {"events": list(self.events)})
        if route == ["faults"] and len(segs) == 1 and method in ("GET", "POST"):
            if method == "POST":
                error = self._set_faults(body)
                if error is not None:
                    return _json_response(400, {"error": error})
            return _json_response(200, self._faults())
        path = request.scope["path"]
        return _json_response(404, {"error": ENDPOINT_NOT_FOUND, "path": path, "method": method})

    def _sim_put_session(self, body: dict[str, Any], now: float) -> Response:
        sid = body.get("session_id")
        status = body.get("status", "connected")
        if not isinstance(sid, str) or not sid:
            return _json_response(400, {"error": "session_id is required"})
        if status not in STATUSES:
            return _json_response(400, {"error": f"status must be one of {', '.join(STATUSES)}"})
        session = self.sessions.get(sid)
        if session is None:
            workspace_id = body.get("workspace_id", _workspace_from_id(sid))
            session = _Session(sid, _new_meta(workspace_id, UNDEFINED, now))
            self.sessions[sid] = session
        else:
            self._advance(session, now)
            if "workspace_id" in body:
                session.meta["workspaceId"] = body["workspace_id"]
        if isinstance(body.get("phone_number"), str):
            session.phone = body["phone_number"]
            if session.connected:
                session.meta["phoneNumber"] = session.phone
        if status == "connected":
            if not session.connected:
                # Every start-up step still due happens now (a start in progress ends here).
                via, started_at = session.via, session.started_at
                session.start(now, 0.0, None)
                session.via, session.started_at = via, started_at
                self._advance(session, now)
            self._save_login(session)
        else:
            session.stop_starting()
            self._end(session)
            session.meta["status"] = status
        return _json_response(200, {"success": True, "session_id": sid, "status": status})

    def _sim_scan(self, sid: str, now: float) -> Response:
        """The QR code of a start waiting for one is scanned: it goes on to connect."""
        session = self.sessions.get(sid)
        if session is None:
            return _json_response(404, {"error": SESSION_NOT_FOUND})
        self._advance(session, now)
        if not session.scan(now):
            return _json_response(
                409,
                {
                    "error": "Session is not waiting for a QR scan",
                    "session_id": sid,
                    "status": session.field("status"),
                },
            )
        self._record("qr_scanned", session_id=sid)
        self._expect(session)
        return _json_response(
            200, {"success": True, "session_id": sid, "status": session.field("status")}
        )

    _NUMBERS = ("send_delay", "connect_delay", "bulk_interval", "timeout_scale")

    def _set_faults(self, body: dict[str, Any]) -> str | None:
        for name in ("die_on_send", "unhealthy"):
            if name in body and not isinstance(body[name], bool):
                return f"{name} must be a boolean"
        for name in self._NUMBERS:
            value = body.get(name)
            if name in body and (
                isinstance(value, bool) or not isinstance(value, int | float) or value < 0
            ):
                return f"{name} must be a non-negative number"
        if body.get("timeout_scale") == 0:
            return "timeout_scale must be positive"
        if "die_on_send" in body:
            self.die_on_send = body["die_on_send"]
        if "unhealthy" in body:
            self.unhealthy = body["unhealthy"]
        for name in self._NUMBERS:
            if name in body:
                setattr(self, name, float(body[name]))
        return None

    def _faults(self) -> dict[str, Any]:
        return {
            "die_on_send": self.die_on_send,
            "unhealthy": self.unhealthy,
            "send_delay": self.send_delay,
            "connect_delay": self.connect_delay,
            "bulk_interval": self.bulk_interval,
            "timeout_scale": self.timeout_scale,
        }


class _Endpoint:
    def __init__(self, sim: _Simulator) -> None:
        self.sim = sim

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.sim.handle(Request(scope, receive))
        await response(scope, receive, send)


def create_app(config: SimulatorConfig) -> Starlette:
    """One simulated instance as an ASGI app; its state lives as long as the app."""
    sim = _Simulator(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Like the real one, the restore runs while the instance already answers requests.
        sim.start_background()
        try:
            yield
        finally:
            sim.close()

    # Handed to Route as a plain ASGI app so that every method reaches the simulator, which
    # answers wrong methods with Express's "Endpoint not found" rather than Starlette's 405.
    app = Starlette(routes=[Route("/{path:path}", _Endpoint(sim))], lifespan=lifespan)
    app.state.simulator = sim
    return app


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        # Listening before the "listening" line is printed means a client that reads it can
        # connect at once, even before uvicorn takes the socket over.
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def serve(config: SimulatorConfig, host: str = "127.0.0.1", port: int = 3001) -> None:
    """Serve one instance until interrupted (SIGINT/SIGTERM stop it gracefully).

    An empty ``config.name`` becomes ``sim-<port>``, with the port actually bound.
    """
    import uvicorn

    sock = _bind(host, port)
    actual_port = sock.getsockname()[1]
    if not config.name:
        config = replace(config, name=f"sim-{actual_port}")
    app = create_app(config)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=actual_port,
            server_header=False,
            date_header=True,
            log_level="warning",
            access_log=False,
        )
    )
    url_host = f"[{host}]" if ":" in host else host
    line = {
        "event": "listening",
        "instance": config.name,
        "url": f"http://{url_host}:{actual_port}",
    }
    with contextlib.suppress(OSError, ValueError):
        print(json.dumps(line), flush=True)
    server.run(sockets=[sock])


def _non_negative(value: str) -> float:
    number = float(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return number


def _positive(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return number


def _initial_sessions(listed: str, path: str | None) -> tuple[str, ...]:
    ids = [s.strip() for s in listed.split(",")]
    if path:
        with open(path, encoding="utf-8") as handle:
            ids += [line.strip() for line in handle]
    return tuple(i for i in ids if i)


def main(argv: list[str] | None = None, prog: str = "python -m proxy.simulator") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="A simulated WhatsApp gateway instance (no WhatsApp needed).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--name", default=None, help="instance name (default: sim-<port>)")
    parser.add_argument("--api-key", default=SimulatorConfig.api_key)
    parser.add_argument(
        "--connect-delay", type=_non_negative, default=SimulatorConfig.connect_delay
    )
    parser.add_argument("--log", default=None, help="JSON-lines event log to append to")
    parser.add_argument("--sessions", default="", help="comma list of sessions present at start")
    parser.add_argument(
        "--sessions-file", default=None, help="file with one session id per line (for many)"
    )
    parser.add_argument("--send-delay", type=_non_negative, default=SimulatorConfig.send_delay)
    parser.add_argument(
        "--bulk-interval",
        type=_non_negative,
        default=SimulatorConfig.bulk_interval,
        help="seconds between the messages of a bulk send (default: 1, as for real)",
    )
    parser.add_argument(
        "--timeout-scale",
        type=_positive,
        default=SimulatorConfig.timeout_scale,
        help="multiplies the route timeouts (60 s sessions, 45 s sends, 5 s health, 30 s other)",
    )
    parser.add_argument(
        "--laravel-url",
        default=None,
        help="at start, start every account GET {URL}/api/whatsapp/accounts/active lists",
    )
    parser.add_argument(
        "--laravel-api-key", default=None, help="X-API-Key for Laravel (default: --api-key)"
    )
    parser.add_argument(
        "--auth-dir",
        default=None,
        help="directory of saved logins, one file per session, shared by the instances given"
        " it; a start without one waits for POST /_sim/sessions/{id}/scan (default: every start"
        " connects)",
    )
    args = parser.parse_args(argv)
    config = SimulatorConfig(
        name=args.name or "",
        api_key=args.api_key,
        connect_delay=args.connect_delay,
        log_path=args.log,
        sessions=_initial_sessions(args.sessions, args.sessions_file),
        send_delay=args.send_delay,
        bulk_interval=args.bulk_interval,
        timeout_scale=args.timeout_scale,
        laravel_url=args.laravel_url,
        laravel_api_key=args.laravel_api_key,
        auth_dir=args.auth_dir,
    )
    try:
        serve(config, host=args.host, port=args.port)
    except OSError as exc:
        print(f"simulator: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
