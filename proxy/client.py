"""The HTTP client the proxy uses to talk to instances, and the boundary where transport
failures become ``errors.*``.

Two implementations behind one small interface (``UpstreamClient``, ``UpstreamResponse``):

- ``FastClient`` (the default): HTTP/1.1 over asyncio protocols with llhttp (``httptools``)
  parsing responses and a keep-alive pool per instance. It does only what a reverse proxy needs:
  no cookies, no redirects, no proxy settings from the environment, no decoding of compressed
  bodies, no header normalisation. Chosen by measurement (``bench/proxy_bench.py``): a generic
  client (httpx, aiohttp) spends most of the proxy's CPU building objects it does not need.
- ``HttpxClient``: the same interface over any ``httpx`` transport, so unit tests can pass an
  ``httpx.MockTransport``, and so the two can be compared (``UPSTREAM_CLIENT=httpx``).

Errors are sorted by what a replay decision needs to know: did the request possibly reach the
instance (``UpstreamAmbiguous``, ``UpstreamTimeout``, ``UpstreamBadResponse``) or certainly not
(``UpstreamUnreachable``)?
"""

from __future__ import annotations

import asyncio
import collections
import json
import socket
import time
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools
import httpx

from .errors import (
    ProxyError,
    UpstreamAmbiguous,
    UpstreamBadResponse,
    UpstreamTimeout,
    UpstreamUnreachable,
)

Headers = Sequence[tuple[bytes, bytes]]
Body = bytes | AsyncIterable[bytes]

# Node's http server closes idle keep-alive connections after 5 s; reusing one just as it closes
# turns a send into an ambiguous failure, so pooled connections are dropped before that.
KEEPALIVE_EXPIRY = 4.0
MAX_IDLE_PER_INSTANCE = 256
MAX_RESPONSE_HEAD = 64 * 1024  # status line and headers; more is garbage, not a response
HIGH_WATER = 1024 * 1024  # buffered response bytes before reading from the socket pauses


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float
    read: float


class UpstreamResponse:
    """An answer whose body is still to be read: ``read`` it whole, or iterate ``chunks``."""

    status: int
    headers: list[tuple[bytes, bytes]]  # as received; names in any case

    @property
    def content_length(self) -> int | None:
        for name, value in self.headers:
            if name.lower() == b"content-length":
                return int(value) if value.isdigit() else None
        return None

    async def read(self) -> bytes:
        raise NotImplementedError

    def chunks(self) -> AsyncIterator[bytes]:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class UpstreamClient:
    async def send(
        self,
        method: str,
        base: str,
        target: str,
        headers: Headers,
        body: Body,
        timeouts: Timeouts,
    ) -> UpstreamResponse:
        """One attempt to ``base`` (an instance URL) for ``target`` (raw path and query)."""
        raise NotImplementedError

    async def get_json(
        self, base: str, target: str, timeouts: Timeouts, headers: Headers = ()
    ) -> tuple[int, Any]:
        """A small GET the proxy makes for itself (health, status, inventory)."""
        host = urlsplit(base).netloc.encode()
        response = await self.send("GET", base, target, [(b"host", host), *headers], b"", timeouts)
        try:
            body = await response.read()
        finally:
            await response.close()
        try:
            return response.status, json.loads(body) if body else None
        except ValueError:
            return response.status, None

    async def aclose(self) -> None:
        return None


def create_client(kind: str, transport: httpx.AsyncBaseTransport | None = None) -> UpstreamClient:
    if transport is not None or kind == "httpx":
        return HttpxClient(transport)
    return FastClient()


# --- the fast client -----------------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One keep-alive connection; parses one response at a time."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.reset()

    def reset(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        self.status = 0
        self.informational = False
        self.until_eof = False
        self.head_size = 0
        self.head_done: asyncio.Future[None] | None = None
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.received_any = False
        self.error: ProxyError | None = None
        self.wakeup: asyncio.Future[None] | None = None
        self.paused = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamBadResponse("the instance switched protocols"))
        except (httptools.HttpParserError, ValueError) as exc:
            self._fail(UpstreamBadResponse(f"the instance answered with invalid HTTP: {exc}"))

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.can_write.set()
        if self.complete:
            return
        headers_done = self.head_done is not None and self.head_done.done()
        if headers_done and self.until_eof and exc is None:
            self.complete = True  # a close-delimited body ends here, complete
            self._wake()
            return
        if self.head_done is not None and not self.head_done.done():
            detail = "the instance closed the connection without answering"
            if exc is not None:
                detail += f" ({type(exc).__name__}: {exc})"
            self._fail(UpstreamAmbiguous(detail))
        else:
            self._fail(UpstreamAmbiguous("the instance's response broke off"))

    def eof_received(self) -> bool:
        return False

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        if self.head_size > MAX_RESPONSE_HEAD:
            raise ValueError("response headers larger than 64 KiB")
        self.headers.append((name, value))

    def on_status(self, status: bytes) -> None:
        self.head_size += len(status)

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self.informational = True
            self.headers = []
            self.head_size = 0
            return
        # Asked now: once the message is complete, llhttp has already reset what it knew.
        self.keep_alive = self.parser.should_keep_alive()
        self.status = status
        names = {name.lower() for name, _ in self.headers}
        # Neither a length nor chunks: the body ends when the instance closes the connection.
        self.until_eof = (
            b"content-length" not in names
            and b"transfer-encoding" not in names
            and status not in (204, 304)
        )
        if self.head_done is not None and not self.head_done.done():
            self.head_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        self.complete = True
        self._wake()

    # helpers
    def _wake(self) -> None:
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    def _fail(self, error: ProxyError) -> None:
        if self.error is None:
            self.error = error
        if self.head_done is not None and not self.head_done.done():
            self.head_done.set_exception(error)
        self._wake()
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class FastResponse(UpstreamResponse):
    def __init__(self, conn: _Connection, read_timeout: float, head_only: bool) -> None:
        self._conn = conn
        self._read_timeout = read_timeout
        self._released = False
        self.status = conn.status
        self.headers = conn.headers
        self._keep_alive = conn.keep_alive and not head_only
        if head_only:
            conn.complete = True

    async def _more(self) -> None:
        """Wait until more body arrives or the message completes, within the read timeout."""
        conn = self._conn
        loop = asyncio.get_running_loop()
        conn.wakeup = loop.create_future()
        timer = loop.call_later(self._read_timeout, _expire, conn.wakeup)
        try:
            await conn.wakeup
        finally:
            timer.cancel()
            conn.wakeup = None

    async def chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        try:
            while True:
                while conn.body:
                    chunk = conn.body.popleft()
                    conn.buffered -= len(chunk)
                    if conn.paused and conn.buffered < HIGH_WATER // 2 and conn.transport:
                        conn.paused = False
                        conn.transport.resume_reading()
                    yield chunk
                if conn.complete:
                    return
                if conn.error is not None:
                    raise conn.error
                try:
                    await self._more()
                except TimeoutError:
                    conn.abort()
                    raise UpstreamTimeout("the instance stopped sending its response") from None
        finally:
            await self.close()

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def close(self) -> None:
        if self._released:
            return
        self._released = True
        conn = self._conn
        if conn.complete and self._keep_alive and not conn.closed and not conn.error:
            conn.pool.release(conn)
        elif conn.complete:
            conn.close()
        else:
            conn.abort()  # mid-body: the rest must not be read as the next response


def _peer_closed(transport: Any) -> bool:
    """Has the instance closed this idle connection (or sent something unasked)?

    Its FIN may sit in the kernel before the event loop has seen it: a SIGKILLed instance's
    connections look alive to the pool until then, and a request written on one would fail
    *after* it was sent, which for a send means "ambiguous" instead of "replay elsewhere". One
    non-blocking peek settles it before the request is written."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    try:
        fd = sock.fileno()
    except OSError:
        return True
    if fd < 0:
        return True
    probe = socket.socket(fileno=fd)
    try:
        probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False  # nothing to read: open and quiet, as an idle connection should be
    except OSError:
        return True
    finally:
        probe.detach()  # the transport owns the descriptor
    return True  # end of stream, or bytes nobody asked for: not reusable


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


class _Pool:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.idle: collections.deque[_Connection] = collections.deque()

    async def acquire(self, connect_timeout: float) -> _Connection:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()  # the most recently used: least likely to have expired
            if (
                not conn.closed
                and now - conn.idle_since < KEEPALIVE_EXPIRY
                and not _peer_closed(conn.transport)
            ):
                conn.reset()
                return conn
            conn.close()
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self), self.host, self.port),
                connect_timeout,
            )
        except TimeoutError:
            raise UpstreamUnreachable(
                f"connecting to {self.host}:{self.port} timed out after {connect_timeout:g} s"
            ) from None
        except OSError as exc:
            raise UpstreamUnreachable(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        return conn

    def release(self, conn: _Connection) -> None:
        if len(self.idle) >= MAX_IDLE_PER_INSTANCE:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        conn.wakeup = None
        self.idle.append(conn)

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


class FastClient(UpstreamClient):
    def __init__(self) -> None:
        self._pools: dict[str, _Pool] = {}

    def _pool(self, base: str) -> _Pool:
        pool = self._pools.get(base)
        if pool is None:
            parts = urlsplit(base)
            if parts.scheme != "http":
                raise UpstreamUnreachable(f"{base}: only http:// instances are supported")
            pool = _Pool(parts.hostname or "127.0.0.1", parts.port or 80)
            self._pools[base] = pool
        return pool

    async def send(
        self,
        method: str,
        base: str,
        target: str,
        headers: Headers,
        body: Body,
        timeouts: Timeouts,
    ) -> UpstreamResponse:
        conn = await self._pool(base).acquire(timeouts.connect)
        transport = conn.transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        conn.head_done = loop.create_future()
        head = [method.encode("latin-1"), b" ", target.encode("latin-1"), b" HTTP/1.1\r\n"]
        for name, value in headers:
            head += (name, b": ", value, b"\r\n")
        streamed = not isinstance(body, bytes)
        if streamed and not any(name == b"content-length" for name, _ in headers):
            head.append(b"transfer-encoding: chunked\r\n")
        head.append(b"\r\n")
        if isinstance(body, bytes):
            head.append(body)
            transport.write(b"".join(head))
        else:
            transport.write(b"".join(head))
            await _write_stream(
                conn, transport, body, chunked=b"transfer-encoding: chunked\r\n" in head
            )
        timer = loop.call_later(timeouts.read, _expire, conn.head_done)
        try:
            await conn.head_done
        except TimeoutError:
            conn.abort()
            raise UpstreamTimeout(
                f"no answer within {timeouts.read:g} s; the request may have been carried out"
            ) from None
        except ProxyError:
            conn.abort()
            raise
        except BaseException:
            conn.abort()  # cancelled: the connection is in an unknown state
            raise
        finally:
            timer.cancel()
        return FastResponse(conn, timeouts.read, head_only=method == "HEAD")

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()


async def _write_stream(
    conn: _Connection, transport: asyncio.Transport, body: AsyncIterable[bytes], chunked: bool
) -> None:
    try:
        async for chunk in body:
            await conn.can_write.wait()  # the instance reads slowly: do not buffer it all here
            if conn.closed:
                raise UpstreamAmbiguous(
                    "the instance closed the connection while the body was sent"
                )
            if chunked:
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                transport.write(chunk)
        if chunked:
            transport.write(b"0\r\n\r\n")
    except ProxyError:
        conn.abort()
        raise
    except BaseException:
        conn.abort()
        raise


# --- the httpx seam ------------------------------------------------------------------------------


class HttpxResponse(UpstreamResponse):
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers = list(response.headers.raw)

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._response.is_stream_consumed:  # a transport that answered with bytes in hand
            yield self._response.content
            return
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            raise map_httpx_error(exc) from exc
        finally:
            await self._response.aclose()

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def close(self) -> None:
        await self._response.aclose()


class HttpxClient(UpstreamClient):
    """The transport is called directly, not through ``httpx.AsyncClient``: a client keeps a
    cookie jar (a ``Set-Cookie`` from one instance would leak into requests for other
    sessions), reads proxy settings from the environment and follows redirects."""

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.transport = transport or httpx.AsyncHTTPTransport(
            limits=httpx.Limits(
                max_connections=512,
                max_keepalive_connections=512,
                keepalive_expiry=KEEPALIVE_EXPIRY,
            ),
            retries=0,
            trust_env=False,
        )

    async def send(
        self,
        method: str,
        base: str,
        target: str,
        headers: Headers,
        body: Body,
        timeouts: Timeouts,
    ) -> UpstreamResponse:
        timeout = {
            "connect": timeouts.connect,
            "read": timeouts.read,
            "write": timeouts.read,
            "pool": timeouts.connect,
        }
        request = httpx.Request(
            method,
            base + target,
            headers=list(headers),
            content=body,
            extensions={"timeout": timeout},
        )
        try:
            return HttpxResponse(await self.transport.handle_async_request(request))
        except httpx.HTTPError as exc:
            raise map_httpx_error(exc) from exc

    async def aclose(self) -> None:
        await self.transport.aclose()


def map_httpx_error(exc: Exception) -> ProxyError:
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return UpstreamUnreachable(detail)
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(detail)
    if isinstance(exc, httpx.RemoteProtocolError) and "disconnected" not in str(exc).lower():
        return UpstreamBadResponse(detail)
    return UpstreamAmbiguous(detail)
