"""The proxy's own endpoints: ``/healthz`` (alive), ``/readyz`` (ready to route), ``/metrics``
(Prometheus), and the admin API under ``/_proxy/`` behind ``admin.AdminGuard``, the one token
check.

A small Starlette app; every other request is the hot path's (``app.py``), which hands here only
what ``is_own`` names. Errors are answered in the proxy's own JSON shape.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from . import metrics
from .admin import ADMIN_PREFIX, AdminGuard, admin_routes
from .attempts import Attempts
from .config import Settings
from .drain import Drainer
from .instances import InstanceSet
from .observe import new_request_id, redact
from .reconcile import Reconciler
from .restore import Restorer
from .store import Store
from .table import RoutingTable
from .tasks import Supervisor

OWN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def is_own(path: str) -> bool:
    """Is this path one of the proxy's own endpoints (never proxied)?"""
    return path in OWN_PATHS or path.startswith(ADMIN_PREFIX)


class Endpoints:
    """The ASGI app of the proxy's own endpoints, and the readiness they report."""

    def __init__(
        self,
        settings: Settings,
        instances: InstanceSet,
        table: RoutingTable,
        store: Store | None,
        reconciler: Reconciler,
        attempts: Attempts,
        drainer: Drainer,
        restorer: Restorer,
        tasks: Supervisor,
        lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]],
    ) -> None:
        self._instances = instances
        self._table = table
        self._store = store
        self._reconciler = reconciler
        self._tasks = tasks
        self._restorer = restorer
        self.started_at = time.time()
        self.shutting_down = False
        own = Starlette(
            routes=[
                Route("/healthz", self._healthz),
                Route("/readyz", self._readyz),
                Route("/metrics", self._metrics),
                *admin_routes(
                    settings.admin_token,
                    settings.api_key,
                    table,
                    instances,
                    reconciler,
                    attempts,
                    drainer,
                    restorer,
                ),
            ],
            lifespan=lifespan,
            exception_handlers={HTTPException: _own_error, Exception: _own_error},
        )
        # No trailing-slash redirects: their Location is built from the client's Host header.
        own.router.redirect_slashes = False
        self._app = AdminGuard(settings.admin_token, own)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        healthy = len(self._instances.available())
        ready = not self.shutting_down and len(self._instances) > 0 and healthy > 0
        detail: dict[str, Any] = {
            "ready": ready,
            "instances": len(self._instances),
            "healthy_instances": healthy,
            "shutting_down": self.shutting_down,
            "instance_states": [i.snapshot() for i in self._instances.all],
            # A crashed loop is restarted; until then it shows here (readiness is not withheld:
            # routing still works without, say, the reconcile loop).
            "background_tasks": self._tasks.status(),
        }
        if self._restorer.enabled:
            detail["restore"] = {k: v for k, v in self._restorer.status().items() if k != "recent"}
        if self._table.shared is not None:
            detail["shared_table"] = {"up": self._table.shared_up}
        store = self._store
        if store is not None:
            # Routing goes on without the database: it is reported, not required.
            detail["database"] = {
                "up": store.up,
                "listening": store.listening,
                "trigger": store.trigger,
                "writeback_pending": store.pending,
                "queries": store.queries.as_dict(),
                "last_error": redact(store.last_error or "") or None,
            }
            detail["reconcile"] = self._reconciler.status()
        return ready, detail

    async def _healthz(self, _request: Request) -> Response:
        return JSONResponse({"status": "alive", "uptime": round(time.time() - self.started_at, 3)})

    async def _readyz(self, _request: Request) -> Response:
        ready, detail = self.readiness()
        return JSONResponse(detail, status_code=200 if ready else 503)

    async def _metrics(self, _request: Request) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)


async def _own_error(request: Request, exc: Exception) -> Response:
    """The proxy's own endpoints answer errors in the same JSON shape as the proxy does."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    code = {404: "unknown-route", 405: "method-not-allowed", 500: "internal-error"}.get(
        status, "proxy-error"
    )
    request_id = request.headers.get("x-request-id") or new_request_id()
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
    return JSONResponse(
        {"error": detail, "code": code, "request_id": request_id},
        status_code=status,
        headers={"x-proxy-error": code, "x-request-id": request_id},
    )
