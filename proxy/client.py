"""The one HTTP client the proxy uses to talk to instances, and the boundary where transport
failures become ``errors.*``.

The transport is called directly rather than through ``httpx.AsyncClient``: a client keeps a
cookie jar (a ``Set-Cookie`` from one instance would leak into requests for other sessions),
reads proxy settings from the environment and follows its own redirect policy. None of that
belongs in a reverse proxy. Tests pass an ``httpx.MockTransport``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from .errors import (
    ProxyError,
    UpstreamAmbiguous,
    UpstreamBadResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
)

Headers = Sequence[tuple[bytes, bytes]]

# Node's http server closes idle keep-alive connections after 5 s; reusing one just as it closes
# turns a send into an ambiguous failure, so pooled connections are dropped before that.
KEEPALIVE_EXPIRY = 4.0


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float
    read: float

    def as_extension(self) -> dict[str, float]:
        return {
            "connect": self.connect,
            "read": self.read,
            "write": self.read,
            "pool": self.connect,
        }


def default_transport(max_connections: int = 512) -> httpx.AsyncBaseTransport:
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=KEEPALIVE_EXPIRY,
    )
    return httpx.AsyncHTTPTransport(limits=limits, retries=0, trust_env=False)


class UpstreamClient:
    def __init__(self, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.transport = transport or default_transport()

    async def send(
        self,
        method: str,
        url: str,
        headers: Headers,
        content: bytes | AsyncIterable[bytes],
        timeouts: Timeouts,
    ) -> httpx.Response:
        """One attempt. The response's body is not read: the caller streams or buffers it."""
        request = httpx.Request(
            method,
            url,
            headers=list(headers),
            content=content,
            extensions={"timeout": timeouts.as_extension()},
        )
        try:
            return await self.transport.handle_async_request(request)
        except httpx.HTTPError as exc:
            raise map_transport_error(exc) from exc

    async def get_json(
        self, url: str, timeouts: Timeouts, headers: Headers = ()
    ) -> tuple[int, Any]:
        """A small GET the proxy makes for itself (health, status, inventory)."""
        response = await self.send("GET", url, headers, b"", timeouts)
        try:
            body = await read_raw(response)
        finally:
            await response.aclose()
        try:
            return response.status_code, json.loads(body) if body else None
        except ValueError:
            return response.status_code, None

    async def aclose(self) -> None:
        await self.transport.aclose()


async def read_raw(response: httpx.Response) -> bytes:
    """The body exactly as sent (still compressed if it was), mapping failures like ``send``."""
    try:
        return b"".join([chunk async for chunk in response.aiter_raw()])
    except httpx.HTTPError as exc:
        raise map_transport_error(exc) from exc


def map_transport_error(exc: Exception) -> ProxyError:
    """Sort a transport failure by whether the request may have reached the instance."""
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return UpstreamUnreachable(detail)
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(detail)
    if isinstance(exc, httpx.RemoteProtocolError) and "disconnected" not in str(exc).lower():
        return UpstreamBadResponse(detail)
    return UpstreamAmbiguous(detail)
