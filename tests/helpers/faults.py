"""A TCP hop that injects network faults between a client and one upstream.

The machine has neither netem nor toxiproxy, so this stands in for both: put a ``FaultyHop`` in
front of a simulator (give the proxy ``hop.url`` instead of the simulator's) and switch modes to
make that instance hang, lose responses, reset connections or vanish from the network.

The hop runs its own event loop in a daemon thread, so sync tests, async tests (whose loop it never
touches) and subprocesses can all use it. It frames HTTP/1.1 requests (Content-Length and chunked
bodies) on the client side so that faults land on request boundaries of keep-alive connections;
an Upgrade/CONNECT request or anything it cannot parse switches that connection to raw forwarding,
in which every chunk the client sends counts as one request.

Modes take effect for new connections and, at the next request boundary, for existing ones
(``refuse`` also resets existing connections at once, as a dead host would):

``pass``                  forward both ways.
``latency``               ``seconds=``: deliver every chunk, both ways, that much later.
``stall``                 read and drop what the client sends, never answer, never close.
``reset_after_request``   forward one whole request, wait until the upstream starts answering (or
                          ``response_timeout=`` seconds, default 5; 0 does not wait), then RST the
                          client without a byte of the response.
``close_after_request``   the same, but close the client cleanly (FIN) instead of a reset.
``reset_before_request``  RST the client without forwarding anything.
``blackhole``             accept but never read, write or close.
``refuse``                stop listening, so connects are refused; any other mode listens again.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Self, get_args

Mode = Literal[
    "pass",
    "latency",
    "stall",
    "reset_after_request",
    "reset_before_request",
    "blackhole",
    "refuse",
    "close_after_request",
]
MODES: Final[frozenset[str]] = frozenset(get_args(Mode))
_AFTER_REQUEST: Final = frozenset({"reset_after_request", "close_after_request"})
_ALLOWED_PARAMS: Final[dict[str, frozenset[str]]] = {
    "latency": frozenset({"seconds"}),
    "reset_after_request": frozenset({"response_timeout"}),
    "close_after_request": frozenset({"response_timeout"}),
}
_REQUIRED_PARAMS: Final[dict[str, frozenset[str]]] = {"latency": frozenset({"seconds"})}
_DEFAULT_RESPONSE_TIMEOUT: Final = 5.0

HOST: Final = "127.0.0.1"
_CHUNK: Final = 64 * 1024
_MAX_HEAD: Final = 64 * 1024
_CALL_TIMEOUT: Final = 10.0


# --- HTTP/1.1 request framing --------------------------------------------------------------------


class _RequestFramer:
    """Tracks where requests end in a client byte stream; it only counts, never rewrites."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._state = "head"
        self._remaining = 0
        self.raw = False

    @property
    def idle(self) -> bool:
        """True when the next byte from the client starts a new request."""
        return self.raw or (self._state == "head" and not self._buf)

    def feed(self, data: bytes) -> int:
        """Consume ``data``; return how many requests it completed."""
        if self.raw:
            return 1
        self._buf += data
        done = 0
        while True:
            if self._state == "head":
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buf) > _MAX_HEAD:
                        return done + self._go_raw()
                    return done
                head = bytes(self._buf[:end])
                del self._buf[: end + 4]
                if self._start_body(head):
                    done += 1
                if self.raw:
                    return done
            elif self._state in ("body", "chunk_data"):
                take = min(self._remaining, len(self._buf))
                del self._buf[:take]
                self._remaining -= take
                if self._remaining:
                    return done
                if self._state == "body":
                    self._state = "head"
                    done += 1
                else:
                    self._state = "chunk_size"
            elif self._state == "chunk_size":
                end = self._buf.find(b"\r\n")
                if end < 0:
                    return done + self._go_raw() if len(self._buf) > _MAX_HEAD else done
                line = bytes(self._buf[:end])
                del self._buf[: end + 2]
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    return done + self._go_raw()
                if size:
                    self._state, self._remaining = "chunk_data", size + 2
                else:
                    self._state = "trailers"
            else:  # trailers: an empty line, or trailer fields ending in one
                if self._buf.startswith(b"\r\n"):
                    del self._buf[:2]
                else:
                    end = self._buf.find(b"\r\n\r\n")
                    if end < 0:
                        return done
                    del self._buf[: end + 4]
                self._state = "head"
                done += 1

    def _start_body(self, head: bytes) -> bool:
        """Set up for the body that follows ``head``; True if the request has none."""
        lines = head.lstrip(b"\r\n").split(b"\r\n")
        method = lines[0].split(b" ", 1)[0].upper()
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        if method == b"CONNECT" or b"upgrade" in headers.get(b"connection", b""):
            # What follows is not HTTP/1.1 any more; the upgrade request itself is complete.
            self.raw = True
            return True
        if b"chunked" in headers.get(b"transfer-encoding", b""):
            self._state = "chunk_size"
            return False
        try:
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            self._go_raw()
            return True
        if length > 0:
            self._state, self._remaining = "body", length
            return False
        return True

    def _go_raw(self) -> int:
        self.raw = True
        self._buf.clear()
        return 1


# --- one proxied connection ----------------------------------------------------------------------


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST rather than a FIN, as a crashed or firewalled peer would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _pause_reading(writer: asyncio.StreamWriter) -> None:
    # Stops pulling bytes off the socket, so the kernel buffers them and the sender sees a
    # receiver that has stopped reading.
    transport = writer.transport
    if isinstance(transport, asyncio.ReadTransport):
        transport.pause_reading()


async def _discard(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(OSError):
        while await reader.read(_CHUNK):
            pass


@dataclass
class _Item:
    at: float
    data: bytes = b""
    requests: int = 0
    eof: bool = False
    done: asyncio.Future[None] | None = None


class _Outbox:
    """Delivers one direction's chunks in order, each at its own time, so latency does not
    also throttle throughput."""

    def __init__(self, hop: FaultyHop, conn: _Conn, writer: asyncio.StreamWriter) -> None:
        self._hop = hop
        self._conn = conn
        self._writer = writer
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()

    def send(self, data: bytes, delay: float, requests: int = 0) -> None:
        self._queue.put_nowait(_Item(self._loop.time() + delay, data, requests))

    def close(self, delay: float = 0.0) -> None:
        self._queue.put_nowait(_Item(self._loop.time() + delay, eof=True))

    async def flush(self) -> None:
        """Wait until everything queued so far has been handed to the kernel."""
        done: asyncio.Future[None] = self._loop.create_future()
        self._queue.put_nowait(_Item(0.0, done=done))
        await done

    async def run(self) -> None:
        while True:
            item = await self._queue.get()
            wait = item.at - self._loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # on purpose: the injected latency
            if item.eof:
                if self._writer.can_write_eof():
                    self._writer.write_eof()
                await self._writer.drain()
                self._conn.half_closed()
                return
            if item.data:
                self._writer.write(item.data)
                await self._writer.drain()
            self._hop.requests_forwarded += item.requests
            if item.done is not None and not item.done.done():
                item.done.set_result(None)


@dataclass(eq=False)
class _Conn:
    client_r: asyncio.StreamReader
    client_w: asyncio.StreamWriter
    up_r: asyncio.StreamReader | None = None
    up_w: asyncio.StreamWriter | None = None
    # normal | stalled | blackholed | doomed (a reset/close is coming; drop upstream bytes)
    state: str = "normal"
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    how: str = "close"
    upstream_spoke: asyncio.Event = field(default_factory=asyncio.Event)
    eofs: int = 0

    def finish(self, how: str) -> None:
        if not self.finished.is_set():
            self.how = how
            self.finished.set()

    def half_closed(self) -> None:
        self.eofs += 1
        if self.eofs == 2:
            self.finish("close")

    def abort(self) -> None:
        for writer in (self.client_w, self.up_w):
            if writer is not None:
                writer.transport.abort()


# --- the hop -------------------------------------------------------------------------------------


class FaultyHop:
    """Listens on 127.0.0.1 and forwards to ``target_host:target_port``, injecting faults."""

    def __init__(
        self, target_port: int, target_host: str = HOST, *, listen_port: int | None = None
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = listen_port or 0
        self.connections = 0
        self.requests_forwarded = 0
        self.faults_injected = 0
        self.errors: list[BaseException] = []
        self._mode: Mode = "pass"
        self._params: dict[str, float] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    # --- public API (any thread but the hop's own) ---

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("FaultyHop already started")
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._thread_main,
            args=(ready, failure),
            name=f"FaultyHop->{self.target_port}",
            daemon=True,
        )
        self._thread.start()
        if not ready.wait(_CALL_TIMEOUT):
            self.stop()
            raise RuntimeError("FaultyHop did not start listening in time")
        if failure:
            self._thread.join(_CALL_TIMEOUT)
            self._thread = None
            raise failure[0]
        return self

    def set_mode(self, mode: Mode, **params: float) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(MODES)}")
        allowed = _ALLOWED_PARAMS.get(mode, frozenset())
        if unknown := set(params) - allowed:
            raise TypeError(f"mode {mode!r} takes no parameter(s) {sorted(unknown)}")
        if missing := _REQUIRED_PARAMS.get(mode, frozenset()) - set(params):
            raise TypeError(f"mode {mode!r} needs parameter(s) {sorted(missing)}")
        for name, value in params.items():
            if not value >= 0:
                raise ValueError(f"{name}={value!r} must be a non-negative number")
        values = {name: float(value) for name, value in params.items()}
        if self._loop is None or not self.running:
            self._mode, self._params = mode, values
            return
        if threading.current_thread() is self._thread:
            raise RuntimeError("set_mode would deadlock when called on the hop's own thread")
        future = asyncio.run_coroutine_threadsafe(self._apply(mode, values), self._loop)
        future.result(_CALL_TIMEOUT)

    def stop(self) -> None:
        """Close the listener and every connection, and join the thread; safe to call twice."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        if loop is not None and stopping is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop closed on its own already
                loop.call_soon_threadsafe(stopping.set)
        thread.join(_CALL_TIMEOUT)
        if thread.is_alive():
            raise RuntimeError("FaultyHop thread did not stop")
        self._thread = None

    def __enter__(self) -> Self:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"FaultyHop({self.url} -> {self.target_host}:{self.target_port}, {self._mode})"

    # --- the hop's thread ---

    def _thread_main(self, ready: threading.Event, failure: list[BaseException]) -> None:
        asyncio.run(self._main(ready, failure))

    async def _main(self, ready: threading.Event, failure: list[BaseException]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        try:
            # Listen even for an initial "refuse": the caller needs to know the port.
            await self._listen()
            if self._mode == "refuse":
                await self._apply("refuse", self._params)
        except BaseException as exc:
            failure.append(exc)
            ready.set()
            return
        ready.set()
        try:
            await self._stopping.wait()
        finally:
            await self._shutdown()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._on_client, HOST, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _apply(self, mode: Mode, params: dict[str, float]) -> None:
        self._mode, self._params = mode, params
        if mode == "refuse":
            if self._server is not None:
                self._server.close()
                self._server = None
            for conn in list(self._conns):
                conn.finish("reset")
        elif self._server is None:
            await self._listen()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self._conns):
            conn.abort()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        # Aborted transports close their sockets on the next loop iterations.
        for _ in range(3):
            await asyncio.sleep(0)

    def _latency(self) -> float:
        return self._params.get("seconds", 0.0) if self._mode == "latency" else 0.0

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        conn = _Conn(reader, writer)
        self._conns.add(conn)
        try:
            await self._serve(conn)
        except asyncio.CancelledError:
            conn.abort()
            raise
        except OSError:
            # The client went away first; that is its right, not a fault of the hop.
            conn.abort()
        except Exception as exc:
            self.errors.append(exc)
            conn.abort()
        finally:
            self._conns.discard(conn)
            self._handlers.discard(task)

    async def _serve(self, conn: _Conn) -> None:
        mode = self._mode
        if mode in ("reset_before_request", "refuse"):
            self.faults_injected += 1
            _reset(conn.client_w)
            return
        if mode == "blackhole":
            self.faults_injected += 1
            conn.state = "blackholed"
            _pause_reading(conn.client_w)
            await conn.finished.wait()
            _reset(conn.client_w)
            return
        if mode == "stall":
            self.faults_injected += 1
            conn.state = "stalled"
            drain = asyncio.create_task(_discard(conn.client_r))
            try:
                await conn.finished.wait()
            finally:
                drain.cancel()
                await asyncio.gather(drain, return_exceptions=True)
            _reset(conn.client_w)
            return
        try:
            conn.up_r, conn.up_w = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            # The closest a hop can get to passing on "connection refused".
            _reset(conn.client_w)
            return
        to_upstream = _Outbox(self, conn, conn.up_w)
        to_client = _Outbox(self, conn, conn.client_w)
        tasks = [
            asyncio.create_task(self._guard(conn, to_upstream.run())),
            asyncio.create_task(self._guard(conn, to_client.run())),
            asyncio.create_task(self._guard(conn, self._client_to_upstream(conn, to_upstream))),
            asyncio.create_task(self._guard(conn, self._upstream_to_client(conn, to_client))),
        ]
        try:
            await conn.finished.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if conn.how == "reset":
            _reset(conn.client_w)
            conn.up_w.transport.abort()
        else:
            conn.client_w.close()
            conn.up_w.close()

    async def _guard(self, conn: _Conn, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except OSError:
            # A reset (or any socket error) on one side becomes a reset on the other.
            conn.finish("reset")
        except Exception as exc:
            self.errors.append(exc)
            conn.finish("reset")

    async def _client_to_upstream(self, conn: _Conn, out: _Outbox) -> None:
        framer = _RequestFramer()
        kind: str = "pass"
        response_timeout = _DEFAULT_RESPONSE_TIMEOUT
        while True:
            data = await conn.client_r.read(_CHUNK)
            if not data:
                if conn.state == "normal":
                    out.close(self._latency())
                return
            if conn.state == "stalled":
                continue
            if framer.idle:
                kind = self._mode
                if kind == "stall":
                    self.faults_injected += 1
                    conn.state = "stalled"
                    continue
                if kind == "blackhole":
                    self.faults_injected += 1
                    conn.state = "blackholed"
                    _pause_reading(conn.client_w)
                    return
                if kind in ("reset_before_request", "refuse"):
                    self.faults_injected += 1
                    conn.finish("reset")
                    return
                if kind in _AFTER_REQUEST:
                    conn.state = "doomed"
                    conn.upstream_spoke.clear()
                    response_timeout = self._params.get(
                        "response_timeout", _DEFAULT_RESPONSE_TIMEOUT
                    )
            completed = framer.feed(data)
            out.send(data, self._latency(), requests=completed)
            if kind in _AFTER_REQUEST and completed:
                await out.flush()
                # Waiting for the first response byte proves the upstream handled the request,
                # so a test can assert on its side effects as soon as the client has failed.
                if response_timeout > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(conn.upstream_spoke.wait(), response_timeout)
                self.faults_injected += 1
                conn.finish("reset" if kind == "reset_after_request" else "close")
                return

    async def _upstream_to_client(self, conn: _Conn, out: _Outbox) -> None:
        assert conn.up_r is not None
        while True:
            data = await conn.up_r.read(_CHUNK)
            conn.upstream_spoke.set()
            if not data:
                if conn.state == "normal":
                    out.close(self._latency())
                return
            # A stalled, blackholed or doomed connection must never see a byte of the answer.
            if conn.state == "normal":
                out.send(data, self._latency())
