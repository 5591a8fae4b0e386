"""One attempt: the request as the instance should see it, and its answer streamed back as is.

Headers follow RFC 9110 section 7.6.1: hop-by-hop fields (and any the client's ``Connection``
names) stop here; ``X-Forwarded-*`` and a request id are added. The response's status, headers
and bytes are passed through untouched (a gzip body stays gzip), except for the hop-by-hop
fields and the proxy's own ``X-Proxy-*`` and ``X-Request-Id``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
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
# answered by the proxy's own server (the body is read before the instance is asked).
_REPLACED_IN = frozenset(
    {b"host", b"content-length", b"x-forwarded-for", b"x-request-id", b"expect"}
)
_REPLACED_OUT = frozenset({b"x-request-id", b"x-proxy-instance", b"x-proxy-attempts"})
_DROPPED_IN = HOP_BY_HOP | _REPLACED_IN
_DROPPED_OUT = HOP_BY_HOP | _REPLACED_OUT

# Responses up to this size are read whole and sent in one message: cheaper than a stream.
BUFFER_RESPONSE_LIMIT = 256 * 1024
SESSION_NOT_FOUND = "Session not found"


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return frozenset(tokens)


def request_headers(
    scope: Scope,
    host: bytes,
    request_id: bytes,
    content_length: int | None,
) -> list[tuple[bytes, bytes]]:
    """The headers to send to the instance for this client request."""
    incoming: list[tuple[bytes, bytes]] = scope["headers"]
    named = _connection_tokens(incoming)
    dropped = _DROPPED_IN | named if named else _DROPPED_IN
    out = [(b"host", host)]
    forwarded_for = b""
    client_host = b""
    for name, value in incoming:
        if name in dropped:
            if name == b"x-forwarded-for":
                forwarded_for = value
            elif name == b"host":
                client_host = value
            continue
        if name in (b"x-forwarded-proto", b"x-forwarded-host"):
            continue  # set from what this proxy saw, not what the client claims
        out.append((name, value))
    client = scope.get("client")
    peer = client[0].encode("latin-1") if client else b"unknown"
    out.append((b"x-forwarded-for", forwarded_for + b", " + peer if forwarded_for else peer))
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
    raw = [(n.lower(), v) for n, v in response.headers]
    named = _connection_tokens(raw)
    dropped = _DROPPED_OUT | named if named else _DROPPED_OUT
    out = [(n, v) for n, v in raw if n not in dropped]
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


async def buffered_body(response: UpstreamResponse) -> bytes | None:
    """The whole body when it is small and its length is declared; None means stream it."""
    length = response.content_length
    if length is None or length > BUFFER_RESPONSE_LIMIT:
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


def error_body(error: ProxyError, request_id: str) -> bytes:
    return json.dumps(
        {"error": error.detail, "code": error.code, "request_id": request_id},
        separators=(",", ":"),
    ).encode()
