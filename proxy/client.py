"""The HTTP client the proxy uses to talk to instances, and the boundary where transport
failures become ``errors.*``.

Two implementations behind one small interface (``UpstreamClient``, ``UpstreamResponse``):

- ``FastClient`` (the default): HTTP/1.1 over asyncio protocols with llhttp (``httptools``)
  parsing responses and a keep-alive pool per instance. It does only what a reverse proxy needs:
  no cookies, no redirects, no proxy settings from the environment, no decoding of compressed
  bodies, no header normalisation. Chosen by measurement (``bench/proxy_bench.py``,
  ``bench/RESULTS.md``): behind httpx the proxy spent 7-20x the CPU per request, behind aiohttp
  (set up for a proxy) 1.6-1.9x; a generic client builds objects a proxy does not need.
- ``HttpxClient``: the same interface over any ``httpx`` transport, so unit tests can pass an
  ``httpx.MockTransport``, and so the two can be compared (``UPSTREAM_CLIENT=httpx``).

Errors are sorted by what a replay decision needs to know: did the request possibly reach the
instance (``UpstreamAmbiguous``, ``UpstreamTimeout``, ``UpstreamBadResponse``) or certainly not
(``UpstreamUnreachable``, and ``Overloaded`` when every connection to the instance is busy)?

What the fast client hands up is exactly one answer per request: bytes after it (a second
answer in the same packet, anything on an idle connection) close the connection instead of
being read as part of it or as the next request's; a 204 or 304 comes without a length or a
body; a status outside 100-599, or a 101 nobody asked for, is ``UpstreamBadResponse``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import select
import socket
import time
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools
import httpx

from .errors import (
    ClientTooSlow,
    Overloaded,
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
# An instance that stops answering ties up at most this many sockets (and the proxy's fds);
# requests beyond it wait, at most their connect timeout, for one to come free.
MAX_CONNECTIONS_PER_INSTANCE = 256
MAX_RESPONSE_HEAD = 64 * 1024  # status line and headers; more is garbage, not a response
HIGH_WATER = 1024 * 1024  # buffered response bytes before reading from the socket pauses
_BODILESS = (204, 304)


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float  # also the longest wait for a free connection when the pool is full
    read: float  # for the response head, once the request is written
    write: float | None = None  # the instance accepts no request bytes; None: ``read``
    body_idle: float | None = None  # the longest gap inside either body; None: ``read``

    @property
    def write_limit(self) -> float:
        return self.read if self.write is None else self.write

    @property
    def idle_limit(self) -> float:
        return self.read if self.body_idle is None else self.body_idle

    def within(self, seconds: float) -> Timeouts:
        """The same, none longer than ``seconds`` (what is left of a whole-request deadline)."""
        left = max(seconds, 0.001)
        return Timeouts(
            min(self.connect, left),
            min(self.read, left),
            min(self.write_limit, left),
            min(self.idle_limit, left),
        )


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

    async def read_upto(self, limit: int) -> bytes | None:
        """The whole body when it ends within ``limit`` bytes, whatever its framing (length,
        chunks, close); None when it is longer, and then ``chunks`` still yields all of it."""
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


class _Stop(Exception):
    """Raised in a parser callback to stop llhttp; what went wrong is already recorded."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; parses one response at a time."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.fd = -1
        self.poller: select.poll | None = None  # this connection's descriptor, registered once
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.counted = False  # holds one of the pool's MAX_CONNECTIONS_PER_INSTANCE places
        self.pooled = False  # in ``pool.idle``
        self.idle_since = 0.0
        self.can_write = True
        self.write_wakeup: asyncio.Future[None] | None = None
        self.reset()

    def reset(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        self.status = 0  # of the final answer, once its head is complete
        self.length: int | None = None
        self.informational = False
        self.until_eof = False
        self.head_only = False
        self.head_size = 0
        self.head_received = 0
        # A request is out and its answer is not complete: the only time bytes are expected.
        self.awaiting = False
        self.cut_short = False  # answered before the whole request body was sent
        self.head_done: asyncio.Future[None] | None = None
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.error: ProxyError | None = None
        self.wakeup: asyncio.Future[None] | None = None
        self.paused = False

    def begin(self, head_only: bool) -> asyncio.Future[None]:
        self.head_only = head_only
        self.awaiting = True
        self.head_done = self.pool.loop.create_future()
        return self.head_done

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.fd = sock.fileno()
            self.poller = select.poll()
            self.poller.register(self.fd, select.POLLIN)

    def data_received(self, data: bytes) -> None:
        if not self.awaiting:
            self._unasked()
            return
        if self.status == 0:
            self.head_received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamBadResponse("the instance switched protocols"))
        except httptools.HttpParserError as exc:
            if self.complete:
                self.abort()  # the answer stands; what followed it makes the connection unusable
            else:
                self._fail(UpstreamBadResponse(f"the instance answered with invalid HTTP: {exc}"))
        else:
            # llhttp keeps a header that has not ended yet in memory: bound it per packet too.
            if self.status == 0 and self.head_received > MAX_RESPONSE_HEAD and not self.closed:
                self._fail(UpstreamBadResponse("the response head is larger than 64 KiB"))

    def pause_writing(self) -> None:
        self.can_write = False

    def resume_writing(self) -> None:
        self.can_write = True
        self._wake_writer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed()
        self._wake_writer()
        if self.complete or not self.awaiting:
            return
        if self.status and self.until_eof and exc is None:
            self.awaiting = False
            self.complete = True  # a close-delimited body ends here, complete
            self._wake()
            return
        if not self.status:
            detail = "the instance closed the connection without answering"
            if exc is not None:
                detail += f" ({type(exc).__name__}: {exc})"
            self._fail(UpstreamAmbiguous(detail))
        else:
            self._fail(UpstreamAmbiguous("the instance's response broke off"))

    def eof_received(self) -> bool:
        return False

    # httptools callbacks
    def on_message_begin(self) -> None:
        if not self.awaiting:
            self._unasked()  # a second answer after the one that was asked for
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        if self.head_size > MAX_RESPONSE_HEAD:
            self._fail(UpstreamBadResponse("the response head is larger than 64 KiB"))
            raise _Stop
        if self.status == 0:  # else a chunked body's trailer: not passed on, like ``Trailer``
            self.headers.append((name, value))

    def on_status(self, status: bytes) -> None:
        self.head_size += len(status)

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self.informational = True
            self.headers = []
            self.head_size = 0
            return
        if status == 101 or not 200 <= status <= 599:
            what = "switched protocols unasked (101)" if status == 101 else f"status {status}"
            self._fail(UpstreamBadResponse(f"the instance answered with {what}"))
            raise _Stop
        # Asked now: once the message is complete, llhttp has already reset what it knew.
        keep_alive = parser.should_keep_alive()
        length: int | None = None
        chunked = False
        for name, value in self.headers:
            size = len(name)  # compared first: most names need no lower()
            if size == 14 and name.lower() == b"content-length":
                length = int(value)  # llhttp has checked it: digits, and only one
            elif size == 17 and name.lower() == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    # gzip and the like: passed on without it, the body would be mislabelled.
                    self._fail(
                        UpstreamBadResponse(f"the instance used transfer-encoding {value!r}")
                    )
                    raise _Stop
                chunked = True
        if status in _BODILESS:
            # Never a body (llhttp reads none); a length would make the proxy's server wait
            # for one, or refuse the answer as shorter than it said.
            if length is not None or chunked:
                self.headers = [(n, v) for n, v in self.headers if not _framing(n)]
            length = 0
        elif self.head_only:
            # llhttp does not know the request was HEAD and would read the body the headers
            # announce: the rest of this connection's bytes go to a fresh parser.
            self.parser = httptools.HttpResponseParser(self)
            if length is None and not chunked:
                keep_alive = _persistent(parser.get_http_version(), self.headers)
        self.keep_alive = keep_alive
        self.length = length
        self.status = status
        # Neither a length nor chunks: the body ends when the instance closes the connection.
        self.until_eof = length is None and not chunked and not self.head_only
        if self.head_only:
            self.awaiting = False
            self.complete = True
        if self.head_done is not None and not self.head_done.done():
            self.head_done.set_result(None)
        self._wake_writer()  # an answer while the body is still being sent ends the sending

    def on_body(self, body: bytes) -> None:
        if not self.awaiting:
            self._unasked()  # a body after a HEAD answer
            raise _Stop
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
        if not self.awaiting:
            return  # a HEAD answer, complete since its head
        self.awaiting = False
        self.complete = True
        self._wake()

    # helpers
    def _wake(self) -> None:
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    def _wake_writer(self) -> None:
        if self.write_wakeup is not None and not self.write_wakeup.done():
            self.write_wakeup.set_result(None)

    async def writable(self, seconds: float) -> None:
        """Until the instance takes more of the request, answers, or goes away."""
        loop = asyncio.get_running_loop()
        self.write_wakeup = waiter = loop.create_future()
        timer = loop.call_later(seconds, _expire, waiter)
        try:
            await waiter
        except TimeoutError:
            raise UpstreamTimeout(
                f"the instance took none of the request body for {seconds:g} s"
            ) from None
        finally:
            timer.cancel()
            self.write_wakeup = None

    def _unasked(self) -> None:
        """Bytes nobody asked for. An answer already complete stands; the connection is never
        used again, so they are read neither as part of it nor as the next request's."""
        self.abort()

    def _fail(self, error: ProxyError) -> None:
        if self.error is None:
            self.error = error
        if self.head_done is not None and not self.head_done.done():
            self.head_done.set_exception(error)
        self._wake()
        self._wake_writer()
        self.close()

    def _closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.pooled:
            self.pooled = False
            self.pool.idle.remove(self)
        if self.counted:
            self.counted = False
            self.pool.slot_freed()

    def close(self) -> None:
        self._closed()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self._closed()
        if self.transport is not None:
            self.transport.abort()


def _framing(name: bytes) -> bool:
    return name.lower() in (b"content-length", b"transfer-encoding")


def _persistent(version: str, headers: list[tuple[bytes, bytes]]) -> bool:
    """Keep-alive as the version and ``Connection`` say, for a head with no framing."""
    tokens = {
        token.strip().lower()
        for name, value in headers
        if len(name) == 10 and name.lower() == b"connection"
        for token in value.split(b",")
    }
    if version == "1.1":
        return b"close" not in tokens
    return b"keep-alive" in tokens


class FastResponse(UpstreamResponse):
    def __init__(self, conn: _Connection, idle_timeout: float) -> None:
        self._conn = conn
        self._idle_timeout = idle_timeout
        self._released = False
        self.status = conn.status
        self.headers = conn.headers
        self._length = conn.length
        self._keep_alive = conn.keep_alive

    @property
    def content_length(self) -> int | None:
        return self._length

    async def _more(self) -> None:
        """Wait until more body arrives or the message completes, within the idle timeout."""
        conn = self._conn
        loop = conn.pool.loop
        conn.wakeup = loop.create_future()
        timer = loop.call_later(self._idle_timeout, _expire, conn.wakeup)
        try:
            await conn.wakeup
        except TimeoutError:
            conn.abort()
            raise UpstreamTimeout(
                f"the instance sent no more of its response for {self._idle_timeout:g} s"
            ) from None
        finally:
            timer.cancel()
            conn.wakeup = None

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._released:
            return  # the connection may carry another request's answer by now
        conn = self._conn
        try:
            while True:
                while conn.body:
                    chunk = conn.body.popleft()
                    conn.buffered -= len(chunk)
                    if conn.paused and conn.buffered < HIGH_WATER // 2 and not conn.closed:
                        conn.paused = False
                        assert conn.transport is not None
                        conn.transport.resume_reading()
                    yield chunk
                if conn.complete:
                    return
                if conn.error is not None:
                    raise conn.error
                await self._more()
        finally:
            await self.close()

    async def read(self) -> bytes:
        conn = self._conn
        if conn.complete and not self._released:
            # Already whole (a small answer arrives in the packet of its head): no generator.
            body = b"".join(conn.body)
            conn.body.clear()
            conn.buffered = 0
            if conn.paused and not conn.closed:
                conn.paused = False
                assert conn.transport is not None
                conn.transport.resume_reading()
            await self.close()
            return body
        return b"".join([chunk async for chunk in self.chunks()])

    async def read_upto(self, limit: int) -> bytes | None:
        if self._released:
            return b""
        conn = self._conn
        try:
            while not conn.complete:
                if conn.error is not None:
                    raise conn.error
                if conn.buffered > limit or conn.paused:
                    return None
                await self._more()
        except BaseException:
            await self.close()
            raise
        if conn.buffered > limit:
            return None
        return await self.read()

    async def close(self) -> None:
        if self._released:
            return
        self._released = True
        conn = self._conn
        # Answered before it took the whole request: what is left would go out ahead of the next
        # request, and an instance that reads no more would keep the connection open for it.
        unsent = conn.cut_short or (
            conn.transport is not None and conn.transport.get_write_buffer_size() > 0
        )
        if conn.complete and self._keep_alive and not unsent and not conn.closed and not conn.error:
            conn.pool.release(conn)
        elif conn.complete and not unsent:
            conn.close()
        else:
            conn.abort()  # mid-body: the rest must not be read as the next response


def _peer_closed(conn: _Connection) -> bool:
    """Has the instance closed this idle connection (or sent something unasked)?

    Its FIN may sit in the kernel before the event loop has seen it: a SIGKILLed instance's
    connections look alive to the pool until then, and a request written on one would fail
    *after* it was sent, which for a send means "ambiguous" instead of "replay elsewhere". An
    idle connection must have nothing to read, so one zero-timeout poll settles it before the
    request is written: readable (a FIN, bytes, an error) means not reusable. The same answer
    as a peek through a ``socket`` built around the descriptor, for 0.4 us instead of 3.7 (the
    descriptor stays registered in the connection's own poll object: one system call a reuse).
    Nothing cheaper sees what the loop has not read yet: ``connection_lost`` and
    ``data_received`` already drop an idle connection once the loop has seen its FIN or bytes."""
    transport = conn.transport
    if transport is None or transport.is_closing():
        return True  # closing: the descriptor may already be closed, its number reused
    poller = conn.poller
    if poller is None:
        return False
    return bool(poller.poll(0))


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


class _Pool:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.idle: collections.deque[_Connection] = collections.deque()  # oldest on the left
        self.open = 0  # connecting, busy and idle: at most MAX_CONNECTIONS_PER_INSTANCE
        # Each gets a connection handed over, or None: a place to open one was kept for it.
        self.waiters: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        self.loop = asyncio.get_running_loop()  # made by a send: asked once, not per request
        self.sweeper: asyncio.TimerHandle | None = None
        self.closed = False

    async def acquire(self, connect_timeout: float) -> _Connection:
        now = time.monotonic()
        idle = self.idle
        while idle:
            conn = idle.pop()  # the most recently used: least likely to have expired
            conn.pooled = False
            if now - conn.idle_since < KEEPALIVE_EXPIRY and not _peer_closed(conn):
                return conn
            conn.close()
        deadline = now + connect_timeout
        for _ in range(16):  # each round past the first is a hand-over that had gone bad: rare
            if self.open < MAX_CONNECTIONS_PER_INSTANCE:
                self.open += 1
                return await self._connect(connect_timeout)
            handed = await self._wait(max(deadline - time.monotonic(), 0.0), connect_timeout)
            if handed is None:
                return await self._connect(connect_timeout)
            if not handed.closed and not _peer_closed(handed):
                return handed
            handed.close()  # went bad between its release and now: wait again
        raise Overloaded(f"no usable connection to {self.host}:{self.port}", retry_after=1)

    async def _wait(self, seconds: float, allowed: float) -> _Connection | None:
        loop = self.loop
        waiter: asyncio.Future[_Connection | None] = loop.create_future()
        self.waiters.append(waiter)
        timer = loop.call_later(seconds, _expire, waiter)
        try:
            return await waiter
        except TimeoutError:
            self._forget(waiter)
            raise Overloaded(
                f"all {MAX_CONNECTIONS_PER_INSTANCE} connections to {self.host}:{self.port} "
                f"stayed busy for {allowed:g} s",
                retry_after=1,
            ) from None
        except BaseException:
            if not waiter.done():
                self._forget(waiter)
            elif not waiter.cancelled() and waiter.exception() is None:
                self._give_back(waiter.result())  # handed over, but the task was cancelled
            raise
        finally:
            timer.cancel()

    def _forget(self, waiter: asyncio.Future[_Connection | None]) -> None:
        with contextlib.suppress(ValueError):  # a hand-over may have dropped it already
            self.waiters.remove(waiter)

    def _give_back(self, handed: _Connection | None) -> None:
        if handed is None:
            self.slot_freed()
        else:
            self.release(handed)

    def _hand_over(self, handed: _Connection | None) -> bool:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(handed)
                return True
        return False

    async def _connect(self, seconds: float) -> _Connection:
        """Open a connection in the place the caller holds (given back if none is made)."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(seconds):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self), self.host, self.port
                )
        except TimeoutError:
            self.slot_freed()
            raise UpstreamUnreachable(
                f"connecting to {self.host}:{self.port} timed out after {seconds:g} s"
            ) from None
        except OSError as exc:
            self.slot_freed()
            raise UpstreamUnreachable(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        except BaseException:
            self.slot_freed()
            raise
        if conn.closed:  # closed, or spoke unasked, before the request could be written
            self.slot_freed()
            raise UpstreamUnreachable(f"{self.host}:{self.port} closed a new connection at once")
        conn.counted = True
        return conn

    def slot_freed(self) -> None:
        if not self._hand_over(None):  # else the place passes to a waiter, which connects
            self.open -= 1

    def release(self, conn: _Connection) -> None:
        conn.reset()
        if self._hand_over(conn):
            return
        if self.closed:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        conn.pooled = True
        self.idle.append(conn)
        if self.sweeper is None:
            self.sweeper = self.loop.call_later(KEEPALIVE_EXPIRY, self._sweep)

    def _sweep(self) -> None:
        """Close the expired idle connections. Reuse takes the newest, so after a burst the
        oldest would otherwise stay open as long as traffic keeps the newest busy."""
        self.sweeper = None
        now = time.monotonic()
        idle = self.idle
        while idle and now - idle[0].idle_since >= KEEPALIVE_EXPIRY:
            conn = idle.popleft()
            conn.pooled = False
            conn.close()
        if idle:
            due = idle[0].idle_since + KEEPALIVE_EXPIRY - now
            self.sweeper = self.loop.call_later(due, self._sweep)

    def close(self) -> None:
        self.closed = True
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        while self.idle:
            conn = self.idle.pop()
            conn.pooled = False
            conn.close()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(UpstreamUnreachable("the upstream client was closed"))


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
        head_done = conn.begin(head_only=method == "HEAD")
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
                conn, transport, body, b"transfer-encoding: chunked\r\n" in head, timeouts
            )
        loop = conn.pool.loop
        timer = loop.call_later(timeouts.read, _expire, head_done)
        try:
            await head_done
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
        return FastResponse(conn, timeouts.idle_limit)

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()


async def _write_stream(
    conn: _Connection,
    transport: asyncio.Transport,
    body: AsyncIterable[bytes],
    chunked: bool,
    timeouts: Timeouts,
) -> None:
    """Send the body as it comes; stop early, without error, once the instance has answered
    (its answer is read; the connection is not reused, the instance never got the end)."""
    head_done = conn.head_done
    assert head_done is not None
    idle = timeouts.idle_limit
    pending = aiter(body)
    try:
        while True:
            try:
                async with asyncio.timeout(idle):
                    chunk = await anext(pending)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise ClientTooSlow(
                    f"the request body stopped for {idle:g} s while it was sent on"
                ) from None
            if not (conn.can_write or head_done.done() or conn.closed):
                # The instance reads slowly: wait for it instead of buffering the body here.
                await conn.writable(timeouts.write_limit)
            if head_done.done():
                conn.cut_short = True
                return
            if conn.closed:
                raise UpstreamAmbiguous(
                    "the instance closed the connection while the body was sent"
                )
            if chunked:
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                transport.write(chunk)
        if chunked and not conn.closed:
            transport.write(b"0\r\n\r\n")
    except BaseException:
        conn.abort()
        head_done.cancel()  # nobody will wait for this answer: no "exception never retrieved"
        raise


# --- the httpx seam ------------------------------------------------------------------------------


class HttpxResponse(UpstreamResponse):
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.headers = list(response.headers.raw)
        self._taken: bytes | None = None  # the whole body, when ``read_upto`` took it
        self._prefix: list[bytes] = []  # what ``read_upto`` took before it gave up
        self._rest: AsyncIterator[bytes] | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._taken is not None:
            yield self._taken
            return
        if self._rest is None and self._response.is_stream_consumed:
            yield self._response.content  # a transport that answered with bytes in hand
            return
        try:
            for chunk in self._prefix:
                yield chunk
            self._prefix = []
            async for chunk in self._rest or self._response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            raise map_httpx_error(exc) from exc
        finally:
            await self._response.aclose()

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def read_upto(self, limit: int) -> bytes | None:
        if self._taken is not None:
            return self._taken
        if self._rest is not None:
            return None
        if self._response.is_stream_consumed:
            content = self._response.content
            return content if len(content) <= limit else None
        rest = self._response.aiter_raw()
        parts: list[bytes] = []
        size = 0
        try:
            async for chunk in rest:
                parts.append(chunk)
                size += len(chunk)
                if size > limit:
                    self._prefix, self._rest = parts, rest
                    return None
        except httpx.HTTPError as exc:
            await self._response.aclose()
            raise map_httpx_error(exc) from exc
        await self._response.aclose()
        self._taken = b"".join(parts)
        return self._taken

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
            "write": timeouts.write_limit,
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
