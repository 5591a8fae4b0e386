"""Running the app under uvicorn, and stopping it without dropping traffic.

SIGTERM (or SIGINT) starts a drain: ``/readyz`` answers 503 at once while requests are still
served for ``SHUTDOWN_DRAIN`` seconds (load balancers and Kubernetes endpoints notice and stop
sending); then the listener closes, in-flight requests get ``SHUTDOWN_GRACE`` seconds to finish,
background tasks stop, pools close, and the process exits 0. A second SIGINT forces the exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
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


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for the request head, and the proxy's own
    answer to requests it cannot read.

    uvicorn bounds idle keep-alive connections but not a request whose headers trickle in a
    byte at a time (slowloris): such a connection is closed after ``header_timeout`` seconds.

    A request the parser refuses (smuggling shapes: Content-Length with Transfer-Encoding, two
    Content-Lengths, obsolete line folding, bare CR or LF; or an HTTP/0.9 request line) gets a
    ``400 bad-request`` in the proxy's JSON shape and the connection is closed; uvicorn's own
    answer would be ``text/plain``. Answers to requests pipelined before it are sent first."""

    header_timeout = 10.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        # The request line being read, until it is known to name a version; None: not checked.
        self._line: bytes | None = b""
        self._begun = False
        self._completed = False
        self._refusal: bytes | None = None
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._header_timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.header_timeout, self._headers_too_slow
        )

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return  # what follows a refused request is not read
        line = self._line
        if line is not None:
            head = line + data
            verdict = _request_line_verdict(head)
            if verdict is False:
                self._refuse("the request line names no HTTP version (HTTP/0.9 is not served)")
                return
            self._line = head if verdict is None and len(head) < _REQUEST_LINE_CHECKED else None
        # As uvicorn's own, with the proxy's answer to what the parser refuses.
        self._unset_keepalive_if_required()
        self._completed = False
        try:
            self.parser.feed_data(data)
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
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            # Otherwise the request was served as plain HTTP: Upgrade is hop-by-hop, and the
            # proxy relays no WebSocket (uvicorn's own path would log two warnings for it).
        if self._completed and not self._begun:
            self._line = b""  # the next bytes begin a new request

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun = True
        if getattr(self, "_header_timer", None) is None:
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        version = self.parser.get_http_version()
        if version not in _HTTP_VERSIONS:
            raise BadRequest(f"HTTP/{version} is not served; only HTTP/1.0 and HTTP/1.1")
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is None or cycle.scope is not self.scope:
            return  # upgraded: not an HTTP request cycle
        transport = self.transport

        def abort() -> None:
            # The app could not finish an answer already started: the client must see it
            # break off; uvicorn is told the connection is gone, so it logs nothing more.
            cycle.disconnected = True
            transport.close()

        self.scope["extensions"] = {ABORT_EXTENSION: {"abort": abort}}

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._begun = False
        self._completed = True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._refusal is not None and not self.pipeline and self.cycle.response_complete:
            self._send_refusal()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        log.info("closing a connection whose request head did not arrive in time")
        self.transport.close()

    def _refuse(self, detail: str) -> None:
        """Answer ``400 bad-request`` and close, once the answers before it have gone."""
        self._cancel_header_timer()
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
        self.flow.pause_reading()
        # A response to an earlier request still going out is finished first (see
        # on_response_complete); one that closes the connection takes the refusal with it.
        if self.cycle is None or self.cycle.response_complete:
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
