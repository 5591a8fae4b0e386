"""Running the app under uvicorn, with the proxy's own HTTP/1.1 protocol, and stopping it without
dropping traffic.

uvicorn runs the listener, the lifespan, the workers and the graceful stop; the protocol on each
connection is ``GuardedHttpTools`` (httptools' llhttp parser, the ASGI interface to the app),
cheaper per request than uvicorn's own and answering what it cannot read in the proxy's JSON.

SIGTERM (or SIGINT) starts a drain: ``/readyz`` answers 503 at once while requests are still
served for ``SHUTDOWN_DRAIN`` seconds (load balancers and Kubernetes endpoints notice and stop
sending); then the listener closes, in-flight requests get ``SHUTDOWN_GRACE`` seconds to finish,
background tasks stop, pools close, and the process exits 0. A second SIGINT forces the exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import tempfile
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from types import FrameType
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import STATUS_LINE
from uvicorn.protocols.utils import get_local_addr, get_remote_addr, is_ssl
from uvicorn.server import ServerState
from uvicorn.supervisors import Multiprocess

from . import metrics
from .app import ProxyApp, create_app
from .config import Settings, load_settings
from .errors import BadRequest
from .forward import ABORT_EXTENSION, error_body
from .observe import configure_logging, new_request_id

log = logging.getLogger("session_proxy.server")


def app_factory() -> ProxyApp:
    """Entry point for worker processes: settings come from the environment the CLI prepared."""
    settings = load_settings(os.environ)
    configure_logging(settings.log_format, settings.log_level)
    GuardedHttpTools.header_timeout = settings.client_header_timeout
    app = create_app(settings)
    _drain_on_signals(app, settings.shutdown_drain)
    return app


def _drain_on_signals(app: ProxyApp, drain: float) -> None:
    """In a worker, uvicorn's own server has already taken SIGTERM/SIGINT; put the drain in
    front of its handler: unready at once, then uvicorn's graceful stop after ``drain``."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        uvicorn_handler = signal.getsignal(sig)
        if not callable(uvicorn_handler):
            continue

        def handler(
            signum: int, frame: FrameType | None, then: Callable[..., Any] = uvicorn_handler
        ) -> None:
            app.begin_shutdown()
            threading.Timer(drain, then, (signum, frame)).start()

        signal.signal(sig, handler)


access_log = logging.getLogger("session_proxy.access")


# The versions answered; HTTP/0.9 (a request line without one) and anything else are refused.
_HTTP_VERSIONS = frozenset({"1.0", "1.1"})
# A request line longer than this is left to the parser and the header limits.
_REQUEST_LINE_CHECKED = 16 * 1024
_LINE_ENDS = b"\r\n"


def _request_line_verdict(head: bytes) -> bool | None:
    """True if the first request line names an HTTP version, False if it ended without one
    (HTTP/0.9), None while it has not ended yet."""
    head = head.lstrip(_LINE_ENDS)  # empty lines before a request are allowed (RFC 9112 2.2)
    end = head.find(b"\n")
    if end < 0:
        return None
    return b" HTTP/" in head[:end]


# What a response header name may not hold (RFC 9110 token), and what no header line may
# hold besides its own CRLF (tab is allowed in values).
_BAD_NAME = re.compile(b'[\x00-\x20\x7f()<>@,;:\\[\\]={}\t\\\\"]')
_BAD_BYTE = re.compile(b"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Names already checked: a proxy sends the same few dozen, so each is checked once.
_CHECKED_NAMES: set[bytes] = set()
_CHECKED_NAMES_LIMIT = 4096
# How the framing headers of a response are recognised.
_LENGTH, _ENCODING, _CONNECTION = 1, 2, 3
_FRAMING = {b"content-length": _LENGTH, b"transfer-encoding": _ENCODING, b"connection": _CONNECTION}
_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH")}
# A request body buffered past this, and not yet received by the app, pauses reading.
_BODY_HIGH_WATER = 64 * 1024
# Up to this size the head and a complete body go out as one bytes object (one send); past it
# the copy costs more than the second system call it saves.
_COALESCE_LIMIT = 64 * 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_DISCONNECT: dict[str, Any] = {"type": "http.disconnect"}

# What the connection's one deadline is for.
_NO_DEADLINE, _HEAD_DEADLINE, _IDLE_DEADLINE = 0, 1, 2

server_log = logging.getLogger("uvicorn.error")


class _Cycle:
    """One request and its response, as the app sees it through ``receive`` and ``send``."""

    __slots__ = (
        "body",
        "buffered",
        "chunked",
        "delivered",
        "disconnected",
        "head_request",
        "keep_alive",
        "more_body",
        "pending_head",
        "proto",
        "remaining",
        "response_complete",
        "response_started",
        "scope",
        "task",
        "transport",
        "waiter",
        "waiting_for_100_continue",
    )

    def __init__(
        self, proto: GuardedHttpTools, scope: dict[str, Any], keep_alive: bool, expect: bool
    ) -> None:
        self.proto = proto
        self.transport = proto.transport
        self.scope: dict[str, Any] | None = scope  # until the app has it
        self.keep_alive = keep_alive
        self.head_request = scope["method"] == "HEAD"
        self.waiting_for_100_continue = expect
        self.body: list[bytes] = []
        self.buffered = 0  # bytes in ``body``
        self.more_body = True
        self.delivered = False  # the body's last message has been received by the app
        self.waiter: asyncio.Future[None] | None = None
        self.disconnected = False
        self.response_started = False
        self.response_complete = False
        # The status line and headers, held until the first body message so that both go
        # out in one write.
        self.pending_head: bytes | None = None
        self.chunked = False
        self.remaining = 0  # body bytes still owed under Content-Length
        self.task: asyncio.Task[None] | None = None

    # --- from the parser ---

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # --- the app's side ---

    async def run(self, app: Any) -> None:
        # The scope holds this cycle (its abort extension): kept here too, the pair would be
        # a reference cycle per request, left for the garbage collector, whose gen-0 passes
        # then ran every 15 requests and paused the loop for 0.2-0.7 ms each.
        scope, self.scope = self.scope, None
        try:
            result = await app(scope, self.receive, self.send)
        except BaseException as exc:
            server_log.error("Exception in ASGI application\n", exc_info=exc)
            if not self.response_started:
                await self._send_500()
            else:
                self._close()
        else:
            if result is not None:
                server_log.error("ASGI callable should return None, but returned '%s'.", result)
                self._close()
            elif not self.response_started and not self.disconnected:
                server_log.error("ASGI callable returned without starting response.")
                await self._send_500()
            elif not self.response_complete and not self.disconnected:
                server_log.error("ASGI callable returned without completing response.")
                self._close()
        finally:
            if self.task is not None:
                self.proto.tasks.discard(self.task)
                self.task = None

    async def _send_500(self) -> None:
        await self.send(
            {
                "type": "http.response.start",
                "status": 500,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", b"21"),
                    (b"connection", b"close"),
                ],
            }
        )
        await self.send({"type": "http.response.body", "body": b"Internal Server Error"})

    def _close(self) -> None:
        """End the connection; a status line already made still goes out first, so that the
        client sees an answer break off, not none."""
        head = self.pending_head
        if head is not None:
            self.pending_head = None
            if not self.transport.is_closing():
                self.transport.write(head)
        self.transport.close()

    def abort(self) -> None:
        # The app could not finish an answer already started: the client must see it break
        # off; the cycle counts as disconnected, so nothing more is written or logged.
        self.disconnected = True
        self._close()

    async def receive(self) -> dict[str, Any]:
        if self.waiting_for_100_continue and not self.transport.is_closing():
            self.transport.write(_CONTINUE)
            self.waiting_for_100_continue = False
        if not self.disconnected and not self.response_complete:
            self.proto.resume_reading()
            if not self.body and (self.more_body or self.delivered):
                # Nothing to give: the next body bytes, or (after the last) the disconnect.
                waiter = self.waiter = self.proto.loop.create_future()
                await waiter
        if self.disconnected or self.response_complete:
            return _DISCONNECT
        body = self.body
        self.body = []
        self.buffered = 0
        self.delivered = not self.more_body
        return {
            "type": "http.request",
            "body": body[0] if len(body) == 1 else b"".join(body),
            "more_body": self.more_body,
        }

    async def send(self, message: dict[str, Any]) -> None:
        proto = self.proto
        if proto.write_paused and not self.disconnected:
            await proto.drain()
        if self.disconnected:
            return
        kind = message["type"]
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError(
                    f"Expected ASGI message 'http.response.start', but got '{kind}'."
                )
            self.response_started = True
            self.waiting_for_100_continue = False
            self.pending_head = self._head(message["status"], message.get("headers", ()))
            return
        if self.response_complete:
            raise RuntimeError(
                f"Unexpected ASGI message '{kind}' sent, after response already completed."
            )
        if kind != "http.response.body":
            raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{kind}'.")
        body: bytes = message.get("body", b"")
        more_body: bool = message.get("more_body", False)
        if self.head_request:
            out = b""
            self.remaining = 0
        elif self.chunked:
            out = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
            if not more_body:
                out += b"0\r\n\r\n"
        else:
            if len(body) > self.remaining:
                raise RuntimeError("Response content longer than Content-Length")
            self.remaining -= len(body)
            out = body
        transport = self.transport
        head = self.pending_head
        if head is not None:
            self.pending_head = None
            if len(out) <= _COALESCE_LIMIT:
                transport.write(head + out)
            else:
                transport.write(head)
                transport.write(out)
        elif out:
            transport.write(out)
        if not more_body:
            if self.remaining != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.wake()
            if not self.keep_alive:
                transport.close()
            proto.response_complete(self)

    def _head(self, status: int, headers: Any) -> bytes:
        """The status line and headers, as uvicorn frames them: Content-Length if given, else
        chunked (not for HEAD, 204 and 304); ``connection: close`` when the connection ends."""
        parts = [STATUS_LINE[status]]
        default = self.proto.server_state.default_headers  # uvicorn renews it each tick
        if default:
            headers = [*default, *headers]
        lines = 2  # the status line and the blank line
        length: int | None = None
        chunked = False
        close_sent = False
        checked = _CHECKED_NAMES
        for name, value in headers:
            name = name.lower()
            if name not in checked:
                if _BAD_NAME.search(name):
                    raise RuntimeError("Invalid HTTP header name.")
                if len(checked) < _CHECKED_NAMES_LIMIT:
                    checked.add(name)
            framing = _FRAMING.get(name)
            if framing is not None:
                if framing == _LENGTH:
                    if length is None and not chunked:
                        length = int(value.decode())
                elif framing == _ENCODING:
                    if value.lower() == b"chunked":
                        length = None
                        chunked = True
                elif b"close" in [token.strip() for token in value.lower().split(b",")]:
                    self.keep_alive = False
                    close_sent = True
            parts += (name, b": ", value, b"\r\n")
            lines += 1
        if not self.keep_alive and not close_sent:
            parts.append(b"connection: close\r\n")
            lines += 1
        if length is None and not chunked and not self.head_request and status not in (204, 304):
            chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
            lines += 1
        parts.append(b"\r\n")
        head = b"".join(parts)
        # One pass over the whole head instead of a search per value: a CR or LF inside a
        # value would add a line, any other control byte is found by the one search.
        if head.count(b"\n") != lines or head.count(b"\r") != lines or _BAD_BYTE.search(head):
            raise RuntimeError("Invalid HTTP header value.")
        self.chunked = chunked
        self.remaining = length or 0
        return head


class GuardedHttpTools(asyncio.Protocol):
    """The proxy's HTTP/1.1 server protocol, on httptools, in place of uvicorn's: uvicorn still
    runs the listener, lifespan, workers and the graceful stop, and calls ``shutdown()`` here.

    Per request it does less than uvicorn's: one write per response when the body is complete
    (status line, headers and body together), a plain scope, no header regex per header, and no
    timer per request: one per connection, moved by a number, not re-armed.

    The request head has a deadline (``header_timeout``, from the first byte of a head, or from
    the connection's start): a request whose headers trickle in a byte at a time (slowloris) is
    closed. An idle keep-alive connection is closed after uvicorn's ``timeout_keep_alive``.

    A request the parser refuses (smuggling shapes: Content-Length with Transfer-Encoding, two
    Content-Lengths, obsolete line folding, bare CR or LF; or an HTTP/0.9 request line) gets a
    ``400 bad-request`` in the proxy's JSON shape and the connection is closed; uvicorn's own
    answer would be ``text/plain``. Answers to requests pipelined before it are sent first.

    Upgrade requests are served as plain HTTP: Upgrade is hop-by-hop, and the proxy relays no
    WebSocket."""

    header_timeout = 10.0

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self.root_path: str = config.root_path
        self.asgi_version = config.asgi_version
        self.limit_concurrency = config.limit_concurrency
        self.keep_alive_timeout = float(config.timeout_keep_alive)
        self.app_state = app_state
        self.server_state = server_state
        # uvicorn's set of its own protocols; this one has what its graceful stop calls.
        self.connections: set[Any] = server_state.connections
        self.tasks = server_state.tasks
        self.parser = httptools.HttpRequestParser(self)
        # As uvicorn's: the answer to the first of a pipelined pair is sent even if the
        # request said ``Connection: close`` and more bytes followed.
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.server: tuple[str, int | None] | None = None
        self.client: tuple[str, int] | None = None
        self.scheme = "http"
        self.read_paused = False
        self.write_paused = False
        self._writable: asyncio.Future[None] | None = None
        # The cycle of the request parsed last, the one being answered (an earlier one when
        # requests are pipelined), and those parsed while one was answered.
        self.cycle: _Cycle | None = None
        self.answering: _Cycle | None = None
        self.pipeline: deque[tuple[_Cycle, Any]] = deque()
        # The request being parsed.
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._expect = False
        self._in_message = False  # begun and not complete
        self._in_head = False  # begun, headers not complete
        self._begins = 0  # requests begun in the bytes being fed
        # The request line read so far, until it is known to name a version; None: unchecked.
        self._line: bytes | None = b""
        self._refusal: bytes | None = None
        # The connection's one deadline, and the one timer behind it: moving the deadline later
        # costs an assignment; the timer, when it fires early, re-arms for what is left.
        self._deadline_kind = _NO_DEADLINE
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.connections.add(self)
        self.transport = transport
        self.server = get_local_addr(transport)
        self.client = get_remote_addr(transport)
        self.scheme = "https" if is_ssl(transport) else "http"
        self._set_deadline(_HEAD_DEADLINE, self.loop.time() + self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self._deadline_kind = _NO_DEADLINE
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for cycle in (self.answering, self.cycle):
            if cycle is not None:
                if not cycle.response_complete:
                    cycle.disconnected = True
                cycle.wake()
        for queued, _app in self.pipeline:
            queued.disconnected = True
        self.write_paused = False
        self._wake_writers()
        if exc is None:
            self.transport.close()

    def eof_received(self) -> None:
        pass

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_writers()

    def _wake_writers(self) -> None:
        waiter = self._writable
        if waiter is not None:
            self._writable = None
            if not waiter.done():
                waiter.set_result(None)

    async def drain(self) -> None:
        if self._writable is None:
            self._writable = self.loop.create_future()
        await asyncio.shield(self._writable)

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return  # what follows a refused request is not read
        was_in_head = self._in_head
        at_boundary = not self._in_message
        self._begins = 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # served as plain HTTP (see the class's text)
        except httptools.HttpParserError as error:
            # A callback's own refusal (or failure) is carried as the error's context.
            cause = (
                error.__context__ if isinstance(error, httptools.HttpParserCallbackError) else None
            )
            detail = (
                str(cause) if isinstance(cause, BadRequest) else f"{BadRequest.message}: {error}"
            )
            self._refuse(detail)
            return
        if self._in_head:
            # A head still incomplete: refuse an HTTP/0.9 request line now, not after the
            # header timeout (a complete one is refused by its version, on_headers_complete).
            begins = self._begins
            if begins == 0:
                line = self._line
                head = None if line is None else line + data
            else:
                # Checked when the request began at the start of these bytes; one pipelined
                # behind another in the same bytes is left to the version check and deadline.
                head = data if begins == 1 and at_boundary else None
            if head is not None:
                verdict = _request_line_verdict(head)
                if verdict is False:
                    self._refuse("the request line names no HTTP version (HTTP/0.9 is not served)")
                    return
                self._line = head if verdict is None and len(head) < _REQUEST_LINE_CHECKED else None
            else:
                self._line = None
            if self._deadline_kind != _HEAD_DEADLINE:
                self._set_deadline(_HEAD_DEADLINE, self.loop.time() + self.header_timeout)
        elif was_in_head or self._begins:
            self._deadline_kind = _NO_DEADLINE  # a head is complete: its request is served now
        elif (
            not self._in_message
            and (self.cycle is None or self.cycle.response_complete)
            and not self.pipeline
        ):
            # No request under way (empty lines; the rest of a body answered early): still, or
            # again, idle; a new connection keeps its head deadline.
            if self._deadline_kind != _HEAD_DEADLINE:
                self._set_deadline(_IDLE_DEADLINE, self.loop.time() + self.keep_alive_timeout)
        elif self._deadline_kind == _IDLE_DEADLINE:
            self._deadline_kind = _NO_DEADLINE  # body bytes of a request still being answered

    # --- httptools callbacks ---

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._expect = False
        self._in_message = True
        self._in_head = True
        self._begins += 1

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self._expect = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self.parser
        version = parser.get_http_version()
        if version not in _HTTP_VERSIONS:
            raise BadRequest(f"HTTP/{version} is not served; only HTTP/1.0 and HTTP/1.1")
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("ascii")
        url = self._url
        if url[:1] == b"/" and b"#" not in url:
            raw_path, _, query = url.partition(b"?")
        else:
            parsed = httptools.parse_url(url)
            raw_path, query = parsed.path, parsed.query or b""
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        root_path = self.root_path
        if root_path:
            path = root_path + path
            raw_path = root_path.encode("ascii") + raw_path
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": version,
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "root_path": root_path,
            "headers": self._headers,
            "method": method,
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
        }
        if self.app_state:
            scope["state"] = self.app_state.copy()
        cycle = _Cycle(self, scope, version != "1.0" and parser.should_keep_alive(), self._expect)
        scope["extensions"] = {ABORT_EXTENSION: {"abort": cycle.abort}}
        app = self.app
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            server_log.warning("Exceeded concurrency limit.")
            app = service_unavailable
        previous = self.cycle
        self.cycle = cycle
        if previous is None or previous.response_complete:
            self._start(cycle, app)
        else:
            # Pipelined: answered in order, after the one being answered.
            self.pause_reading()
            self.pipeline.append((cycle, app))

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return
        cycle.body.append(body)
        cycle.buffered += len(body)
        if cycle.buffered > _BODY_HIGH_WATER:
            self.pause_reading()
        cycle.wake()

    def on_message_complete(self) -> None:
        self._in_message = False
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return
        cycle.more_body = False
        cycle.wake()

    # --- the app ---

    def _start(self, cycle: _Cycle, app: Any) -> None:
        self.answering = cycle
        task = self.loop.create_task(cycle.run(app))
        cycle.task = task
        self.tasks.add(task)

    def response_complete(self, cycle: _Cycle) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.resume_reading()
        if self.pipeline:
            self._start(*self.pipeline.popleft())
        elif self._refusal is not None:
            self._send_refusal()
        elif not self._in_message:
            self._set_deadline(_IDLE_DEADLINE, self.loop.time() + self.keep_alive_timeout)

    def shutdown(self) -> None:
        """uvicorn's graceful stop: close when idle, else once the answer being made is sent."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            self.transport.close()
        else:
            cycle.keep_alive = False

    # --- the one deadline ---

    def _set_deadline(self, kind: int, when: float) -> None:
        self._deadline_kind = kind
        self._deadline = when
        timer = self._timer
        if timer is None or self._timer_at > when:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(when, self._deadline_reached)
            self._timer_at = when

    def _deadline_reached(self) -> None:
        self._timer = None
        kind = self._deadline_kind
        if kind == _NO_DEADLINE:
            return
        if self.loop.time() < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._deadline_reached)
            self._timer_at = self._deadline
            return
        self._deadline_kind = _NO_DEADLINE
        if self.transport.is_closing():
            return
        if kind == _HEAD_DEADLINE:
            log.info("closing a connection whose request head did not arrive in time")
        self.transport.close()

    # --- refusals ---

    def _refuse(self, detail: str) -> None:
        """Answer ``400 bad-request`` and close, once the answers before it have gone."""
        self._deadline_kind = _NO_DEADLINE
        self._line = None
        request_id = new_request_id()
        error = BadRequest(detail[:200])
        body = error_body(error, request_id)
        self._refusal = b"".join(
            (
                b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body),
                b"x-proxy-error: bad-request\r\nx-request-id: ",
                request_id.encode("ascii"),
                b"\r\nconnection: close\r\n\r\n",
                body,
            )
        )
        metrics.ERRORS.labels(error.code).inc()
        metrics.count_request("error", error.status, 0.0)
        access_log.info(
            "request refused by the HTTP parser",
            extra={
                "request_id": request_id,
                "status": error.status,
                "outcome": "error",
                "error_code": error.code,
                "detail": error.detail,
            },
        )
        self.pause_reading()
        # A response to an earlier request still going out is finished first (see
        # response_complete); one that closes the connection takes the refusal with it.
        if not self.pipeline and (self.cycle is None or self.cycle.response_complete):
            self._send_refusal()

    def _send_refusal(self) -> None:
        if self._refusal is not None and not self.transport.is_closing():
            self.transport.write(self._refusal)
            self.transport.close()


class ProxyServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: float, app: ProxyApp | None = None) -> None:
        super().__init__(config)
        self._drain = drain
        self._app = app
        self._drain_until: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded as a captured signal: uvicorn would re-raise it after a clean shutdown
        # and the process would end "killed by SIGTERM" instead of exiting 0.
        if self._drain_until is not None:
            if sig == signal.SIGINT:
                self.force_exit = True
            return
        if self._app is not None:
            self._app.begin_shutdown()
        self._drain_until = time.monotonic() + self._drain
        log.info("signal received: draining", extra={"signal": sig, "drain_seconds": self._drain})

    async def on_tick(self, counter: int) -> bool:
        if self._drain_until is not None and time.monotonic() >= self._drain_until:
            self.should_exit = True
        return await super().on_tick(counter)


def uvicorn_config(settings: Settings, app: ProxyApp | str) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        factory=isinstance(app, str),
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        http=GuardedHttpTools,
        # No WebSocket: an Upgrade request is answered as plain HTTP, by the proxy or the
        # instance, instead of uvicorn's text/plain 403 from a WebSocket nobody serves.
        ws="none",
        lifespan="on",
        access_log=False,
        # The peer address must be the real one: X-Forwarded-For is appended to, not trusted.
        proxy_headers=False,
        # The instance's own Server and Date headers pass through; uvicorn must not add its own.
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=round(settings.shutdown_grace),
        log_config=None,
    )


def serve(settings: Settings) -> int:
    configure_logging(settings.log_format, settings.log_level)
    GuardedHttpTools.header_timeout = settings.client_header_timeout
    if not settings.instances and not settings.instances_dns:
        log.warning("no instances configured: every proxied request will answer 503")
    log.info(
        "session-proxy listening",
        extra={
            "host": settings.host,
            "port": settings.port,
            "instances": len(settings.instances),
            "workers": settings.workers,
        },
    )
    if settings.workers == 1:
        app = create_app(settings)
        ProxyServer(uvicorn_config(settings, app), settings.shutdown_drain, app).run()
        return 0
    # Several workers: metrics are kept per process in files and merged on /metrics.
    with tempfile.TemporaryDirectory(prefix="session-proxy-metrics-") as metrics_dir:
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", metrics_dir)
        config = uvicorn_config(settings, "proxy.server:app_factory")
        Multiprocess(config, sockets=[config.bind_socket()]).run()
    return 0
