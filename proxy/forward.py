"""One attempt: the request as the instance should see it, and its answer streamed back as is.

Headers follow RFC 9110 section 7.6.1: hop-by-hop fields (and any the client's ``Connection``
names) stop here; ``X-Forwarded-*`` and a request id are added. The response's status, headers
and bytes are passed through untouched (a gzip body stays gzip), except for the hop-by-hop
fields and the proxy's own ``X-Request-Id``.

``X-Proxy-*`` headers are the proxy's own, both ways: a client's are removed before the request
is forwarded (an instance must not take a client's word for what the proxy decided) and an
instance's before the answer goes out (a client must not read an instance's header as the
proxy's ``X-Proxy-Error``).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .client import UpstreamResponse
from .errors import ProxyError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Replaced by the proxy on the way in: host is the instance's, length is recomputed. Expect is
# answered by the proxy's own server (the body is read before the instance is asked). The
# X-Forwarded-* fields are set from what this proxy saw, not from what the client claims.
_REPLACED_IN = frozenset(
    {
        b"host",
        b"content-length",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-request-id",
        b"expect",
    }
)
_REPLACED_OUT = frozenset({b"x-request-id"})
_DROPPED_IN = HOP_BY_HOP | _REPLACED_IN
_DROPPED_OUT = HOP_BY_HOP | _REPLACED_OUT
_OWN_PREFIX = b"x-proxy-"

# The scope extension through which the server lets the app break off an answer it has started
# (see server.GuardedHttpTools): the client sees the connection close, nobody logs a traceback.
ABORT_EXTENSION = "session_proxy.abort"

# Responses up to this size are read whole and sent in one message: cheaper than a stream.
BUFFER_RESPONSE_LIMIT = 256 * 1024
SESSION_NOT_FOUND = "Session not found"
# What a send to a session still starting answers (400, "... Please check session status.").
NOT_CONNECTED = "Session not connected"


# What nearly every Connection header says: it names no other field, so no pass is needed.
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",")]


def request_headers(
    scope: Scope,
    host: bytes,
    request_id: bytes,
    content_length: int | None,
) -> list[tuple[bytes, bytes]]:
    """The headers to send to the instance for this client request (one pass over them)."""
    incoming: list[tuple[bytes, bytes]] = scope["headers"]
    out = [(b"host", host)]
    forwarded_for: list[bytes] = []
    client_host = b""
    named: list[bytes] = []
    for name, value in incoming:
        if name in _DROPPED_IN:
            if name == b"x-forwarded-for":
                forwarded_for.append(value)
            elif name == b"host":
                client_host = value
            elif name == b"connection" and value not in _PLAIN_CONNECTION:
                named += _tokens(value)
            continue
        if name.startswith(_OWN_PREFIX):
            continue
        out.append((name, value))
    if named:
        # Fields the client's Connection header names are hop-by-hop too (RFC 9110 7.6.1).
        extra = frozenset(named) - _DROPPED_IN
        if extra:
            out = [header for header in out if header[0] not in extra]
    client = scope.get("client")
    peer = client[0].encode("latin-1") if client else b"unknown"
    # Every X-Forwarded-For line the client sent, in order, then the peer this proxy saw.
    forwarded_for.append(peer)
    out.append((b"x-forwarded-for", b", ".join(forwarded_for)))
    out.append((b"x-forwarded-proto", scope.get("scheme", "http").encode("latin-1")))
    if client_host:
        out.append((b"x-forwarded-host", client_host))
    out.append((b"x-request-id", request_id))
    if content_length is not None:
        out.append((b"content-length", str(content_length).encode("latin-1")))
    return out


def response_headers(
    response: UpstreamResponse, instance_url: str, request_id: bytes, attempts: int
) -> list[tuple[bytes, bytes]]:
    """The instance's headers as the client gets them (one pass over them)."""
    out: list[tuple[bytes, bytes]] = []
    named: list[bytes] = []
    for raw_name, value in response.headers:
        name = raw_name.lower()
        if name in _DROPPED_OUT:
            if name == b"connection" and value not in _PLAIN_CONNECTION:
                named += _tokens(value)
            continue
        if name.startswith(_OWN_PREFIX):
            continue
        out.append((name, value))
    if named:
        extra = frozenset(named) - _DROPPED_OUT
        if extra:
            out = [header for header in out if header[0] not in extra]
    out.append((b"x-request-id", request_id))
    out.append((b"x-proxy-instance", instance_url.encode("latin-1")))
    if attempts > 1:
        out.append((b"x-proxy-attempts", str(attempts).encode("latin-1")))
    return out


def is_session_not_found(status: int, body: bytes) -> bool:
    """The instance's own "session not found", not an unknown route's 404 (the body decides)."""
    if status != 404 or SESSION_NOT_FOUND.encode() not in body:
        return False
    try:
        document = json.loads(body)
    except ValueError:
        return False
    return isinstance(document, dict) and document.get("error") == SESSION_NOT_FOUND


def is_not_connected(status: int, body: bytes) -> bool:
    """The instance holds the session but it is still starting: a send it refused."""
    if status != 400 or NOT_CONNECTED.encode() not in body:
        return False
    try:
        document = json.loads(body)
    except ValueError:
        return False
    error = document.get("error") if isinstance(document, dict) else None
    return isinstance(error, str) and error.startswith(NOT_CONNECTED)


async def buffered_body(response: UpstreamResponse, any_framing: bool = False) -> bytes | None:
    """The whole body when it is small and its length is declared; None means stream it.

    ``any_framing``: a chunked or close-delimited body is read too, up to the limit (for answers
    that must be inspected, such as a 404); past it, None, and ``chunks()`` still has it all."""
    length = response.content_length
    if length is None:
        return await response.read_upto(BUFFER_RESPONSE_LIMIT) if any_framing else None
    if length > BUFFER_RESPONSE_LIMIT:
        return None
    return await response.read()


async def relay(
    send: Send,
    response: UpstreamResponse,
    headers: list[tuple[bytes, bytes]],
    body: bytes | None,
) -> None:
    """Send the instance's answer to the client; ``body`` is None when it is to be streamed."""
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    if body is not None:
        await send({"type": "http.response.body", "body": body})
        return
    # A failure from here on raises: the status line is gone, the client must see a broken body.
    async for chunk in response.chunks():
        if chunk:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def abort_started_answer(scope: Scope) -> bool:
    """Break off an answer whose status line has gone out; False if the server cannot."""
    extension = scope.get("extensions", {}).get(ABORT_EXTENSION)
    if extension is None:
        return False
    extension["abort"]()
    return True


def error_body(error: ProxyError, request_id: str) -> bytes:
    return json.dumps(
        {"error": error.detail, "code": error.code, "request_id": request_id},
        separators=(",", ":"),
    ).encode()
