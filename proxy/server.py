"""Running the app under uvicorn, with the settings a proxy needs (no extra headers, httptools)."""

from __future__ import annotations

import logging
import os

import uvicorn

from .app import create_app
from .config import Settings, load_settings
from .observe import configure_logging

log = logging.getLogger("session_proxy.server")


def app_factory() -> object:
    """Entry point for worker processes: settings come from the environment the CLI prepared."""
    settings = load_settings(os.environ)
    configure_logging(settings.log_format, settings.log_level)
    return create_app(settings)


def uvicorn_options(settings: Settings) -> dict[str, object]:
    return dict(
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        # The peer address must be the real one: X-Forwarded-For is appended to, not trusted.
        proxy_headers=False,
        # The instance's own Server and Date headers pass through; uvicorn must not add its own.
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=settings.shutdown_grace,
        log_config=None,
    )


def serve(settings: Settings) -> int:
    configure_logging(settings.log_format, settings.log_level)
    if not settings.instances and not settings.instances_dns:
        log.warning("no instances configured: every proxied request will answer 503")
    log.info(
        "session-proxy listening",
        extra={"host": settings.host, "port": settings.port, "instances": len(settings.instances)},
    )
    if settings.workers > 1:
        uvicorn.run("proxy.server:app_factory", factory=True, **uvicorn_options(settings))  # type: ignore[arg-type]
    else:
        uvicorn.run(create_app(settings), **uvicorn_options(settings))  # type: ignore[arg-type]
    return 0
