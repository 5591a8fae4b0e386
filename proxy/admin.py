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
from .drain import Drainer
from .errors import ProxyError
from .instances import Instance, InstanceSet
from .reconcile import Reconciler
from .restore import Restorer
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
    api_key: str,
    table: RoutingTable,
    instances: InstanceSet,
    reconciler: Reconciler,
    attempts: Attempts,
    drainer: Drainer,
    restorer: Restorer,
) -> list[Route]:
    """The admin routes, none of which checks the token itself: ``AdminGuard`` is the one check,
    so they must only ever be served behind it (``endpoints.py`` mounts them there)."""
    if not token:
        return []
    settings_api_key = api_key

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

    def described(instance: Instance) -> dict[str, object]:
        state = drainer.state_of(instance)
        return {
            **instance.snapshot(),
            "state": state.state,
            "drain": state.as_dict(),
            "starts_running": drainer.starts_running(instance),
        }

    async def instance_list(request: Request) -> Response:
        return JSONResponse({"instances": [described(i) for i in instances.all]})

    async def named_instance(request: Request) -> Instance | Response:
        """The instance the JSON body names (``{"instance": "<url or alias>"}``)."""
        try:
            body = await request.json()
        except ValueError:
            body = None
        name = body.get("instance") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            return _error(400, "bad-request", 'the body must be {"instance": "<url or alias>"}')
        instance = instances.get(name) or instances.resolve(name)
        if instance is None:
            return _error(404, "unknown-instance", "no instance of the set has that url or alias")
        return instance

    async def drain(request: Request) -> Response:
        if not settings_api_key:
            return _error(409, "no-api-key", "moving sessions needs SESSION_PROXY_API_KEY")
        instance = await named_instance(request)
        if isinstance(instance, Response):
            return instance
        drainer.drain(instance)
        return JSONResponse(described(instance), status_code=202)

    async def undrain(request: Request) -> Response:
        instance = await named_instance(request)
        if isinstance(instance, Response):
            return instance
        drainer.undrain(instance)
        return JSONResponse(described(instance))

    async def rebalance(request: Request) -> Response:
        dry_run = request.query_params.get("dry_run", "0").lower() in ("1", "true", "yes")
        if not dry_run and not settings_api_key:
            return _error(409, "no-api-key", "moving sessions needs SESSION_PROXY_API_KEY")
        try:
            plan = await drainer.rebalance(dry_run)
        except ProxyError as error:
            return _error(503, "inventory-failed", error.detail)
        return JSONResponse(plan, status_code=200 if dry_run or not plan["moves"] else 202)

    async def rebalance_status(request: Request) -> Response:
        return JSONResponse({"last": drainer.last_rebalance})

    async def restores(request: Request) -> Response:
        return JSONResponse(restorer.status())

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
        Route("/_proxy/instances/drain", drain, methods=["POST"]),
        Route("/_proxy/instances/undrain", undrain, methods=["POST"]),
        Route("/_proxy/rebalance", rebalance, methods=["POST"]),
        Route("/_proxy/rebalance", rebalance_status, methods=["GET"]),
        Route("/_proxy/restores", restores, methods=["GET"]),
        Route("/_proxy/reconcile", reconcile, methods=["POST"]),
        Route("/_proxy/stats", stats, methods=["GET"]),
    ]


def _error(status: int, code: str, detail: str) -> Response:
    """The proxy's own error shape (``forward.error_body``), with its ``X-Proxy-Error``."""
    return JSONResponse(
        {"error": detail, "code": code}, status_code=status, headers={"x-proxy-error": code}
    )


def _open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None
