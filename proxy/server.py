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

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from .app import ProxyApp, create_app
from .config import Settings, load_settings
from .observe import configure_logging

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


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for the request head.

    uvicorn bounds idle keep-alive connections but not a request whose headers trickle in a
    byte at a time (slowloris): such a connection is closed after ``header_timeout`` seconds."""

    header_timeout = 10.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._header_timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.header_timeout, self._headers_too_slow
        )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if getattr(self, "_header_timer", None) is None:
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        log.info("closing a connection whose request head did not arrive in time")
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
