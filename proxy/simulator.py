"""A fake gateway instance that answers like one Node.js ``whatsapp-service`` process.

Faithful to ``reference/upstream-contract.md`` where the proxy depends on it: the routes, the
status codes, the exact error bodies ("Session not found" vs "Endpoint not found"), the api_key
rules (body for non-GET, query for GET, headers ignored), Express's HTML page for malformed JSON,
and a crash that closes the connection with no response. On top of that, ``/_sim/...`` lets
tests move sessions, inject faults and read back what the instance saw and sent.

Run one with ``python -m proxy.simulator --port 3001``; ``--port 0`` picks a free port and prints
it on stdout as a JSON line (``{"event": "listening", "url": ...}``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import socket
import sys
import time
import uuid
import weakref
import zlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import parse_qsl, unquote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

__all__ = ["SimulatorConfig", "create_app", "main", "serve"]

SESSION_NOT_FOUND = "Session not found"
ENDPOINT_NOT_FOUND = "Endpoint not found"
NOT_CONNECTED = "Session not connected. Please check session status."
INVALID_API_KEY = "Invalid API key"
STATUSES = ("qr_scanning", "authenticated", "connected", "disconnected", "error")

# The in-memory copies are for tests; bound them so a long demo cannot grow without limit.
_MEMORY_EVENTS = 100_000

# Every route below these prefixes sits behind the api_key middleware, so even an unknown path
# there answers 401 before 404, as Express does with `app.use('/api', auth)`.
_PROTECTED = frozenset({"api", "cleanup", "sessions", "remoteauth"})
_SEND_ROUTES = frozenset({"send", "send-media", "bulk-send"})
_GET_LIKE = frozenset({"GET", "HEAD"})
_API_KEY_QUERY = re.compile(r"(^|&)(api_key=)[^&]*")

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


Reply = tuple[int, Any]


class _MalformedJSON(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _iso(t: float) -> str:
    """A timestamp the way JavaScript's ``Date.prototype.toISOString`` writes it."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _json_response(status: int, payload: Any) -> Response:
    # Compact and non-ASCII kept as is, like JSON.stringify.
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return Response(body, status_code=status, headers=_JSON_HEADERS)


def _malformed_json_response(message: str) -> Response:
    """The page Express's default error handler renders for a body-parser SyntaxError."""
    stack = (
        "<br> &nbsp; &nbsp;at JSON.parse (&lt;anonymous&gt;)"
        "<br> &nbsp; &nbsp;at parse (/app/node_modules/body-parser/lib/types/json.js:92:19)"
    )
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        "<title>Error</title>\n</head>\n<body>\n"
        f"<pre>SyntaxError: {escape(message, quote=False)}{stack}</pre>\n</body>\n</html>\n"
    )
    return Response(page.encode(), status_code=400, headers=_HTML_HEADERS)


def _reject_constant(name: str) -> Any:
    raise _MalformedJSON(f"Unexpected token '{name[0]}', is not valid JSON")


def _parse_json_body(raw: bytes) -> Any:
    """Parse like ``express.json()`` (strict mode), raising with V8's wording on failure."""
    if not raw:
        return {}
    # body-parser decodes with replacement characters rather than failing on bad UTF-8.
    text = raw.decode("utf-8", errors="replace")
    snippet = text if len(text) <= 40 else text[:40] + "..."
    stripped = text.lstrip(" \t\n\r")
    if not stripped:
        raise _MalformedJSON("Unexpected end of JSON input")
    # Strict mode accepts only objects and arrays at the top level.
    if stripped[0] not in "{[":
        raise _MalformedJSON(f"Unexpected token '{stripped[0]}', \"{snippet}\" is not valid JSON")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        if exc.pos >= len(text):
            raise _MalformedJSON("Unexpected end of JSON input") from None
        token = text[exc.pos]
        raise _MalformedJSON(
            f"Unexpected token '{token}', \"{snippet}\" is not valid JSON"
        ) from None


def _parse_body(content_type: str, raw: bytes) -> Any:
    """What ``req.body`` would be: parsed only for the content types Express is set up for."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json":
        return _parse_json_body(raw)
    if media == "application/x-www-form-urlencoded":
        return dict(parse_qsl(raw.decode("utf-8", errors="replace"), keep_blank_values=True))
    return {}


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
    elif first == "cleanup" and n == 2 and second not in ("stats", "run"):
        return unquote(segs[1]) or None
    elif first == "remoteauth" and second == "migration" and n >= 3:
        return unquote(segs[2]) or None
    return None


def _workspace_from_id(session_id: str) -> int | None:
    # Real ids look like webjs_{workspace}_{unixtime}_{random8}.
    parts = session_id.split("_")
    if len(parts) >= 2 and parts[1].isdigit():
        return int(parts[1])
    return None


def _fake_phone(session_id: str) -> str:
    return "628" + str(zlib.crc32(session_id.encode()) % 10**9).zfill(9)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class _Session:
    __slots__ = (
        "account_id",
        "connect_at",
        "forced",
        "last_activity",
        "metadata",
        "phone",
        "priority",
        "session_id",
        "workspace_id",
    )

    def __init__(self, session_id: str, connect_at: float, workspace_id: Any = None) -> None:
        self.session_id = session_id
        self.workspace_id = workspace_id
        self.account_id: Any = None
        self.priority: Any = None
        # Until connect_at the session is scanning its QR code; computed lazily on every read
        # so no timer task exists per session. `forced` pins a status set through /_sim.
        self.connect_at = connect_at
        self.forced: str | None = None
        self.phone: str | None = None
        self.metadata: dict[str, Any] = {}
        self.last_activity = connect_at

    def status(self, now: float) -> str:
        if self.forced is not None:
            return self.forced
        return "connected" if now >= self.connect_at else "qr_scanning"

    def phone_number(self, now: float) -> str | None:
        if self.phone is None and self.status(now) == "connected":
            self.phone = _fake_phone(self.session_id)
        return self.phone

    def connected_at(self, now: float) -> str | None:
        return _iso(self.connect_at) if self.status(now) == "connected" else None

    def status_body(self, now: float) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "status": self.status(now),
            "phone_number": self.phone_number(now),
            "workspace_id": self.workspace_id,
            "connected_at": self.connected_at(now),
            "last_activity": _iso(self.last_activity),
        }


class _Call:
    """One request as the handlers see it, after body parsing and authentication."""

    __slots__ = ("body", "headers", "params", "query", "request_id", "t")

    def __init__(
        self,
        params: dict[str, str],
        query: dict[str, str],
        body: Any,
        headers: dict[str, str],
        t: float,
    ) -> None:
        self.params = params
        self.query = query
        self.body: dict[str, Any] = body if isinstance(body, dict) else {}
        self.headers = headers
        self.request_id = headers.get("x-request-id")
        self.t = t


Handler = Callable[[_Call], Awaitable[Reply]]


class _Simulator:
    def __init__(self, config: SimulatorConfig) -> None:
        self.name = config.name
        self.api_key = config.api_key
        self.connect_delay = config.connect_delay
        self.send_delay = config.send_delay
        self.die_on_send = False
        self.unhealthy = False
        self.started = time.time()
        self.sessions: dict[str, _Session] = {}
        for sid in config.sessions:
            self.sessions[sid] = _Session(sid, self.started, _workspace_from_id(sid))
        self.requests: deque[dict[str, Any]] = deque(maxlen=_MEMORY_EVENTS)
        self.sent: deque[dict[str, Any]] = deque(maxlen=_MEMORY_EVENTS)
        self.messages: dict[str, str] = {}  # message_id -> session_id, for message status
        self.request_count = 0
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
            ("GET", ("health", "ready"), self.health_ready),
            ("GET", ("health", "live"), self.health_live),
            ("GET", ("health", "detailed"), self.health_detailed),
            ("GET", ("health", "metrics"), self.health_metrics),
            ("POST", ("api", "sessions"), self.create_session),
            ("GET", ("api", "sessions"), self.list_sessions),
            ("GET", ("api", "sessions", ":id", "status"), self.session_status),
            ("GET", ("api", "sessions", ":id", "metadata"), self.get_metadata),
            ("PUT", ("api", "sessions", ":id", "metadata"), self.put_metadata),
            ("POST", ("api", "sessions", ":id", "restore"), self.restore),
            ("POST", ("api", "sessions", ":id", "reconnect"), self.reconnect),
            ("POST", ("api", "sessions", ":id", "regenerate-qr"), self.regenerate_qr),
            ("DELETE", ("api", "sessions", ":id"), self.delete_session),
            ("POST", ("api", "messages", "send"), self.send),
            ("POST", ("api", "messages", "send-media"), self.send_media),
            ("POST", ("api", "messages", "bulk-send"), self.bulk_send),
            ("GET", ("api", "messages", ":id", "status"), self.message_status),
            ("GET", ("api", "messages", ":id", "validate"), self.validate),
            ("GET", ("api", "internal", "sessions", ":id", "last-activity"), self.last_activity),
            ("GET", ("cleanup", "stats"), self.cleanup_stats),
            ("POST", ("cleanup", "run"), self.cleanup_run),
            ("POST", ("cleanup", ":id"), self.cleanup_session),
            ("DELETE", ("cleanup", ":id"), self.cleanup_session),
            ("GET", ("remoteauth", "status"), self.remoteauth_status),
            ("POST", ("remoteauth", "migration", ":id"), self.remoteauth_migration),
        ]

    def close(self) -> None:
        if self._close_fd is not None:
            self._close_fd()
        self._fd = None

    # ---- event log ------------------------------------------------------------------------

    def _write(self, event: dict[str, Any]) -> None:
        if self._fd is not None:
            line = json.dumps(event, separators=(",", ":"), ensure_ascii=False) + "\n"
            os.write(self._fd, line.encode())

    def _redact(self, value: str) -> str:
        return value.replace(self.api_key, "***") if self.api_key else value

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
        segs = raw_path.decode("latin-1").split("/")[1:]
        # Express's non-strict routing: one trailing slash is ignored.
        if segs and segs[-1] == "":
            segs.pop()
        if segs and segs[0].lower() == "_sim":
            return await self._control(request, segs[1:])
        self.request_count += 1

        raw_body = await request.body()
        headers = self._log_headers(request)
        status: int
        response: Response
        body: Any = {}
        malformed: str | None = None
        try:
            body = _parse_body(request.headers.get("content-type", ""), raw_body)
        except _MalformedJSON as exc:
            malformed = exc.message
        # `/sessions/{id}/...` is served by the same handlers as `/api/sessions/{id}/...`.
        if len(segs) >= 2 and segs[0].lower() == "sessions":
            segs = ["api", *segs]
        session_id = _session_from_path(segs)
        if session_id is None and isinstance(body, dict):
            candidate = body.get("session_id")
            session_id = candidate if isinstance(candidate, str) else None
        method = "GET" if request.method == "HEAD" else request.method
        query = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))

        if malformed is not None:
            status, response = 400, _malformed_json_response(malformed)
        elif segs and segs[0].lower() in _PROTECTED and not self._authorized(method, query, body):
            status, response = 401, _json_response(401, {"error": INVALID_API_KEY})
        else:
            handler, params = self._match(method, segs)
            if handler is None:
                payload = {
                    "error": ENDPOINT_NOT_FOUND,
                    "path": scope["path"],
                    "method": request.method,
                }
                status, response = 404, _json_response(404, payload)
            else:
                if (
                    self.die_on_send
                    and method == "POST"
                    and len(segs) == 3
                    and segs[1].lower() == "messages"
                    and segs[2].lower() in _SEND_ROUTES
                ):
                    self._maybe_die(request, session_id, headers, t)
                status, payload = await handler(_Call(params, query, body, headers, t))
                response = _json_response(status, payload)

        event = self._base_event("request", request, session_id, headers, t)
        event["status"] = status
        self.requests.append(event)
        self._write(event)
        return response

    def _authorized(self, method: str, query: dict[str, str], body: Any) -> bool:
        if method in _GET_LIKE:
            key: Any = query.get("api_key")
        else:
            key = body.get("api_key") if isinstance(body, dict) else None
        return isinstance(key, str) and key == self.api_key

    def _maybe_die(
        self,
        request: Request,
        session_id: str | None,
        headers: dict[str, str],
        t: float,
    ) -> None:
        """Crash the way the real instance does when a send hits its route timeout.

        Only a send that would go out (known, connected session) triggers it, because that is
        the only kind that runs long enough for the timeout to fire; the fault stays armed
        through rejected sends.
        """
        session = self.sessions.get(session_id) if session_id is not None else None
        if session is None or session.status(time.time()) != "connected":
            return
        event = self._base_event("received", request, session_id, headers, t)
        event["idempotency_key"] = request.headers.get("idempotency-key")
        self._write(event)
        os._exit(1)

    # ---- open routes ----------------------------------------------------------------------

    def _counts(self, now: float) -> dict[str, int]:
        total = len(self.sessions)
        connected = sum(1 for s in self.sessions.values() if s.status(now) == "connected")
        return {"total": total, "connected": connected, "disconnected": total - connected}

    async def root(self, call: _Call) -> Reply:
        return 200, {
            "service": "WhatsApp Web.js Service",
            "status": "running",
            "version": "1.0.0",
            "instance": self.name,
            "simulated": True,
            "timestamp": _iso(call.t),
        }

    async def info(self, call: _Call) -> Reply:
        return 200, {
            "name": "whatsapp-service",
            "version": "1.0.0",
            "instance": self.name,
            "pid": os.getpid(),
            "uptime": round(call.t - self.started, 3),
            "sessions": len(self.sessions),
            "simulated": True,
        }

    def _health_body(self, now: float) -> dict[str, Any]:
        return {
            "status": "unhealthy" if self.unhealthy else "healthy",
            "uptime": round(now - self.started, 3),
            "sessions": self._counts(now),
            "memory": {"rss": _rss_bytes()},
            "timestamp": _iso(now),
            "instance": self.name,
        }

    async def health(self, call: _Call) -> Reply:
        return (503 if self.unhealthy else 200), self._health_body(call.t)

    async def health_ready(self, call: _Call) -> Reply:
        if self.unhealthy:
            return 503, {"status": "not ready", "timestamp": _iso(call.t)}
        return 200, {"status": "ready", "timestamp": _iso(call.t), "instance": self.name}

    async def health_live(self, call: _Call) -> Reply:
        return 200, {"status": "alive", "timestamp": _iso(call.t), "instance": self.name}

    async def health_detailed(self, call: _Call) -> Reply:
        body = self._health_body(call.t)
        body["process"] = {"pid": os.getpid(), "runtime": f"python {sys.version.split()[0]}"}
        body["session_details"] = [
            {"session_id": s.session_id, "status": s.status(call.t)} for s in self.sessions.values()
        ]
        return (503 if self.unhealthy else 200), body

    async def health_metrics(self, call: _Call) -> Reply:
        return 200, {
            "uptime": round(call.t - self.started, 3),
            "sessions": self._counts(call.t),
            "requests_total": self.request_count,
            "messages_sent": len(self.messages),
            "memory": {"rss": _rss_bytes()},
            "timestamp": _iso(call.t),
            "instance": self.name,
        }

    # ---- sessions -------------------------------------------------------------------------

    async def create_session(self, call: _Call) -> Reply:
        sid = call.body.get("session_id")
        if not isinstance(sid, str) or not sid:
            return 400, {"error": "session_id is required"}
        session = self.sessions.get(sid)
        if session is not None:
            # The real instance answers an existing session with its state rather than failing.
            return 200, {
                "success": True,
                "session_id": sid,
                "status": session.status(call.t),
                "qr_code": None,
                "message": "Session already exists",
            }
        session = _Session(sid, call.t + self.connect_delay, call.body.get("workspace_id"))
        session.account_id = call.body.get("account_id")
        session.priority = call.body.get("priority")
        session.last_activity = call.t
        self.sessions[sid] = session
        return 200, {
            "success": True,
            "session_id": sid,
            "status": session.status(call.t),
            "qr_code": None,
        }

    async def list_sessions(self, call: _Call) -> Reply:
        now = call.t
        sessions = [
            {
                "session_id": s.session_id,
                "workspace_id": s.workspace_id,
                "status": s.status(now),
                "phone_number": s.phone_number(now),
                "connected_at": s.connected_at(now),
            }
            for s in self.sessions.values()
        ]
        return 200, {"success": True, "sessions": sessions, "total": len(sessions)}

    def _lookup(self, call: _Call) -> _Session | None:
        return self.sessions.get(call.params["id"])

    async def session_status(self, call: _Call) -> Reply:
        session = self._lookup(call)
        if session is None:
            return 404, {"error": SESSION_NOT_FOUND}
        return 200, session.status_body(call.t)

    async def get_metadata(self, call: _Call) -> Reply:
        session = self._lookup(call)
        if session is None:
            return 404, {"error": SESSION_NOT_FOUND}
        return 200, {
            "success": True,
            "session_id": session.session_id,
            "metadata": session.metadata,
        }

    async def put_metadata(self, call: _Call) -> Reply:
        session = self._lookup(call)
        if session is None:
            return 404, {"error": SESSION_NOT_FOUND}
        metadata = call.body.get("metadata")
        if not isinstance(metadata, dict):
            return 400, {"error": "metadata must be an object"}
        session.metadata = metadata
        return 200, {"success": True, "session_id": session.session_id, "metadata": metadata}

    async def restore(self, call: _Call) -> Reply:
        session = self._lookup(call)
        if session is None:
            return 404, {"error": SESSION_NOT_FOUND}
        return 200, {
            "success": True,
            "session_id": session.session_id,
            "status": session.status(call.t),
            "message": "Session restored",
        }

    async def reconnect(self, call: _Call) -> Reply:
        session = self._lookup(call)
        if session is None:
            return 404, {"error": SESSION_NOT_FOUND}
        if session.status(call.t) != "connected":
            # A reconnect goes through the same handshake as a create.
            session.forced = None
            session.connect_at = call.t + self.connect_delay
        return 200, {
            "success": True,
            "session_id": session.session_id,
            "status": session.status(call.t),
            "message": "Reconnection initiated",
        }

    async def regenerate_qr(self, call: _Call) -> Reply:
        session = self._lookup(call)
        if session is None:
            return 404, {"error": SESSION_NOT_FOUND}
        return 200, {
            "success": True,
            "session_id": session.session_id,
            "status": session.status(call.t),
            "qr_code": f"2@sim-{uuid.uuid4().hex}",
        }

    async def delete_session(self, call: _Call) -> Reply:
        if self.sessions.pop(call.params["id"], None) is None:
            return 200, {"success": True, "alreadyDisconnected": True}
        return 200, {"success": True}

    async def last_activity(self, call: _Call) -> Reply:
        session = self._lookup(call)
        if session is None:
            return 404, {"error": SESSION_NOT_FOUND}
        return 200, {
            "success": True,
            "session_id": session.session_id,
            "last_activity": _iso(session.last_activity),
        }

    # ---- messages -------------------------------------------------------------------------

    def _sendable(self, call: _Call) -> tuple[_Session | None, Reply | None]:
        sid = call.body.get("session_id")
        session = self.sessions.get(sid) if isinstance(sid, str) else None
        if session is None:
            return None, (404, {"error": SESSION_NOT_FOUND})
        if session.status(call.t) != "connected":
            return None, (400, {"error": NOT_CONNECTED})
        return session, None

    def _deliver(self, call: _Call, session_id: str, recipient: str) -> str:
        digits = "".join(ch for ch in recipient if ch.isdigit()) or "0"
        message_id = f"true_{digits}@c.us_3EB0{uuid.uuid4().hex[:16].upper()}"
        now = time.time()
        event = {
            "event": "sent",
            "instance": self.name,
            "session_id": session_id,
            "message_id": message_id,
            "request_id": call.request_id,
            "idempotency_key": call.headers.get("idempotency-key"),
            "t": now,
        }
        self.sent.append(event)
        self._write(event)
        self.messages[message_id] = session_id
        session = self.sessions.get(session_id)
        if session is not None:
            session.last_activity = now
        return message_id

    async def _delay(self) -> None:
        # Not cancelled when the client goes away: like the real instance, a slow send still
        # goes out after its caller gave up.
        if self.send_delay > 0:
            await asyncio.sleep(self.send_delay)

    async def _send_one(self, call: _Call, needs_message: bool) -> Reply:
        body = call.body
        recipient = body.get("phone_number") or body.get("to")
        if (
            not body.get("session_id")
            or not isinstance(recipient, str)
            or (needs_message and body.get("message") in (None, ""))
        ):
            return 400, {"error": "Missing required fields: session_id, phone_number, message"}
        session, error = self._sendable(call)
        if error is not None or session is None:
            return error or (404, {"error": SESSION_NOT_FOUND})
        await self._delay()
        if session.session_id not in self.sessions:
            return 500, {"success": False, "error": "Failed to send message: session closed"}
        message_id = self._deliver(call, session.session_id, recipient)
        return 200, {"success": True, "message_id": message_id, "timestamp": int(time.time())}

    async def send(self, call: _Call) -> Reply:
        return await self._send_one(call, needs_message=True)

    async def send_media(self, call: _Call) -> Reply:
        return await self._send_one(call, needs_message=False)

    async def bulk_send(self, call: _Call) -> Reply:
        items = call.body.get("recipients") or call.body.get("messages")
        if not call.body.get("session_id") or not isinstance(items, list):
            return 400, {"error": "session_id and recipients (or messages) are required"}
        session, error = self._sendable(call)
        if error is not None or session is None:
            return error or (404, {"error": SESSION_NOT_FOUND})
        # The real one waits a second between messages; one delay keeps tests fast.
        await self._delay()
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for item in items:
            recipient = item if isinstance(item, str) else None
            if isinstance(item, dict):
                candidate = item.get("phone_number") or item.get("to")
                recipient = candidate if isinstance(candidate, str) else None
            if not recipient or session.session_id not in self.sessions:
                errors.append({"recipient": item, "error": "Invalid recipient"})
                results.append({"recipient": item, "success": False})
                continue
            message_id = self._deliver(call, session.session_id, recipient)
            results.append({"recipient": recipient, "success": True, "message_id": message_id})
        successful = sum(1 for r in results if r["success"])
        return 200, {
            "success": True,
            "total": len(items),
            "successful": successful,
            "failed": len(items) - successful,
            "results": results,
            "errors": errors,
        }

    async def message_status(self, call: _Call) -> Reply:
        session = self._lookup(call)
        if session is None:
            return 404, {"error": SESSION_NOT_FOUND}
        message_id = call.query.get("message_id")
        if not message_id:
            return 400, {"error": "message_id is required"}
        if self.messages.get(message_id) != session.session_id:
            return 404, {"error": "Message not found"}
        return 200, {
            "success": True,
            "session_id": session.session_id,
            "message_id": message_id,
            "status": "delivered",
        }

    async def validate(self, call: _Call) -> Reply:
        session = self._lookup(call)
        if session is None:
            return 404, {"error": SESSION_NOT_FOUND}
        phone = call.query.get("phone_number") or call.query.get("phone") or ""
        digits = "".join(ch for ch in phone if ch.isdigit())
        return 200, {
            "success": True,
            "session_id": session.session_id,
            "phone_number": phone,
            "valid": bool(digits),
            "registered": bool(digits),
        }

    # ---- cleanup and remoteauth -----------------------------------------------------------

    async def cleanup_stats(self, call: _Call) -> Reply:
        return 200, {
            "success": True,
            "stats": {"active_sessions": len(self.sessions), "stale_sessions": 0},
        }

    async def cleanup_run(self, call: _Call) -> Reply:
        return 200, {"success": True, "cleaned": 0}

    async def cleanup_session(self, call: _Call) -> Reply:
        sid = call.params["id"]
        # Cleanup removes leftovers of dead sessions and leaves a live one alone.
        return 200, {"success": True, "session_id": sid, "cleaned": sid not in self.sessions}

    async def remoteauth_status(self, call: _Call) -> Reply:
        return 200, {"success": True, "enabled": False}

    async def remoteauth_migration(self, call: _Call) -> Reply:
        session = self._lookup(call)
        if session is None:
            return 404, {"error": SESSION_NOT_FOUND}
        return 200, {"success": True, "session_id": session.session_id, "migrated": False}

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
                    {"session_id": s.session_id, "status": s.status(now)}
                    for s in self.sessions.values()
                ]
                return _json_response(200, {"sessions": sessions})
            if method == "POST":
                return self._sim_put_session(body, now)
        if route == ["sessions"] and len(segs) == 2 and method == "DELETE":
            removed = self.sessions.pop(unquote(segs[1]), None) is not None
            return _json_response(200, {"success": True, "removed": removed})
        if route == ["log"] and len(segs) == 1:
            if method == "GET":
                return _json_response(200, {"requests": list(self.requests)})
            if method == "DELETE":
                self.requests.clear()
                self.sent.clear()
                return _json_response(200, {"success": True})
        if route == ["sent"] and len(segs) == 1 and method == "GET":
            return _json_response(200, {"messages": list(self.sent)})
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
            session = _Session(sid, now, body.get("workspace_id", _workspace_from_id(sid)))
            self.sessions[sid] = session
        elif "workspace_id" in body:
            session.workspace_id = body["workspace_id"]
        if isinstance(body.get("phone_number"), str):
            session.phone = body["phone_number"]
        if status == "connected":
            if session.status(now) != "connected":
                session.connect_at = now
            session.forced = None
        else:
            session.forced = status
        return _json_response(200, {"success": True, "session_id": sid, "status": status})

    def _set_faults(self, body: dict[str, Any]) -> str | None:
        for name in ("die_on_send", "unhealthy"):
            if name in body and not isinstance(body[name], bool):
                return f"{name} must be a boolean"
        for name in ("send_delay", "connect_delay"):
            value = body.get(name)
            if name in body and (
                isinstance(value, bool) or not isinstance(value, int | float) or value < 0
            ):
                return f"{name} must be a non-negative number"
        if "die_on_send" in body:
            self.die_on_send = body["die_on_send"]
        if "unhealthy" in body:
            self.unhealthy = body["unhealthy"]
        if "send_delay" in body:
            self.send_delay = float(body["send_delay"])
        if "connect_delay" in body:
            self.connect_delay = float(body["connect_delay"])
        return None

    def _faults(self) -> dict[str, Any]:
        return {
            "die_on_send": self.die_on_send,
            "unhealthy": self.unhealthy,
            "send_delay": self.send_delay,
            "connect_delay": self.connect_delay,
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


def _initial_sessions(listed: str, path: str | None) -> tuple[str, ...]:
    ids = [s.strip() for s in listed.split(",")]
    if path:
        with open(path, encoding="utf-8") as handle:
            ids += [line.strip() for line in handle]
    return tuple(i for i in ids if i)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m proxy.simulator",
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
    args = parser.parse_args(argv)
    config = SimulatorConfig(
        name=args.name or "",
        api_key=args.api_key,
        connect_delay=args.connect_delay,
        log_path=args.log,
        sessions=_initial_sessions(args.sessions, args.sessions_file),
        send_delay=args.send_delay,
    )
    try:
        serve(config, host=args.host, port=args.port)
    except OSError as exc:
        print(f"simulator: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
