"""The admin API under ``/_proxy/``: what the proxy knows and why, behind a bearer token.

With no ``ADMIN_TOKEN`` configured the routes do not exist at all (404, like any unknown path).
With one, every request under ``/_proxy/`` is authorised before it is routed (``AdminGuard``):
without the token, an unknown path, a wrong method and a trailing slash all answer the same
401, so nothing about the API can be learnt without it. The token is compared in constant time.
That middleware is the one token check: the routes do not repeat it (a second, different check
could only drift from the first), so they are served only behind it.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .attempts import Attempts
from .instances import InstanceSet
from .reconcile import Reconciler
from .table import RoutingTable

MAX_PAGE = 1000
ADMIN_PREFIX = "/_proxy/"


def _refusal(request_id: str | None) -> Response:
    request_id = request_id or uuid.uuid4().hex
    return JSONResponse(
        {
            "error": "a valid admin bearer token is required",
            "code": "unauthorized",
            "request_id": request_id,
        },
        status_code=401,
        headers={
            "www-authenticate": 'Bearer realm="session-proxy"',
            "x-proxy-error": "unauthorized",
            "x-request-id": request_id,
        },
    )


class AdminGuard:
    """In front of the proxy's own endpoints: ``/_proxy/`` requests need the token first.

    The only token check: the routes behind it do not check again, so an unknown path, a wrong
    method and a real route are refused alike, before Starlette routes anything."""

    def __init__(self, token: str, app: ASGIApp) -> None:
        self._expected = f"Bearer {token}".encode() if token else None
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self._expected is not None
            and scope["type"] == "http"
            and scope["path"].startswith(ADMIN_PREFIX)
        ):
            given: bytes | None = None
            request_id: str | None = None
            for name, value in scope["headers"]:
                if name == b"authorization" and given is None:
                    given = value
                elif name == b"x-request-id" and request_id is None:
                    request_id = value.decode("latin-1")
            if not hmac.compare_digest(given or b"", self._expected):
                await _refusal(request_id)(scope, receive, send)
                return
        await self._app(scope, receive, send)


def admin_routes(
    token: str,
    table: RoutingTable,
    instances: InstanceSet,
    reconciler: Reconciler,
    attempts: Attempts,
) -> list[Route]:
    """The admin routes, none of which checks the token itself: ``AdminGuard`` is the one check,
    so they must only ever be served behind it (``endpoints.py`` mounts them there)."""
    if not token:
        return []

    async def routes(request: Request) -> Response:
        try:
            limit = min(MAX_PAGE, max(1, int(request.query_params.get("limit", "100"))))
        except ValueError:
            limit = 100
        after = request.query_params.get("after", "")
        entries = await table.items()
        page = [(sid, url) for sid, url in entries if sid > after][:limit]
        more = len(page) == limit and page[-1][0] != entries[-1][0]
        return JSONResponse(
            {
                "routes": [{"session_id": sid, "instance": url} for sid, url in page],
                "total": len(entries),
                "next": f"?after={page[-1][0]}&limit={limit}" if more else None,
            }
        )

    async def route(request: Request) -> Response:
        session_id = request.path_params["session_id"]
        if request.method == "DELETE":
            forgotten = await table.forget(session_id)
            return JSONResponse({"session_id": session_id, "forgotten": forgotten})
        known = await table.get(session_id)
        if known is None:
            return JSONResponse(
                {"session_id": session_id, "error": "not in the routing table"}, status_code=404
            )
        return JSONResponse({"session_id": session_id, "instance": known, "negative": known == "-"})

    async def instance_list(request: Request) -> Response:
        return JSONResponse({"instances": [i.snapshot() for i in instances.all]})

    async def reconcile(request: Request) -> Response:
        dry_run = request.query_params.get("dry_run", "0").lower() in ("1", "true", "yes")
        report = await reconciler.run_once(dry_run=dry_run)
        status = 409 if report.skipped and "another replica" in report.skipped else 200
        if report.skipped and "database" in report.skipped:
            status = 503
        return JSONResponse(report.as_dict(), status_code=status)

    async def stats(request: Request) -> Response:
        return JSONResponse(
            {
                "table_hits": table.hits,
                "table_misses": table.misses,
                "rediscoveries": attempts.rediscoveries,
                "probes": attempts.discovery.probes,
                "snapshots": attempts.discovery.snapshots,
                "asyncio_tasks": len(asyncio.all_tasks()),
                "open_fds": _open_fds(),
            }
        )

    return [
        Route("/_proxy/routes", routes, methods=["GET"]),
        Route("/_proxy/routes/{session_id}", route, methods=["GET", "DELETE"]),
        Route("/_proxy/instances", instance_list, methods=["GET"]),
        Route("/_proxy/reconcile", reconcile, methods=["POST"]),
        Route("/_proxy/stats", stats, methods=["GET"]),
    ]


def _open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None
