"""The ASGI application: the proxy's own endpoints, and every other request proxied.

The proxied path is plain ASGI (no per-request framework objects): it is the hot path of every
message. Starlette serves the proxy's own small endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import metrics
from .admin import AdminGuard, admin_routes
from .client import Timeouts, create_client
from .config import Settings
from .discovery import LIST_PATH, Discovery
from .errors import (
    BodyTooLarge,
    ClientTooSlow,
    HeadersTooLarge,
    InternalError,
    NoHealthyInstance,
    Overloaded,
    ProxyError,
)
from .forward import (
    abort_started_answer,
    buffered_body,
    error_body,
    relay,
    request_headers,
    response_headers,
)
from .healing import DuplicateSettler
from .instances import DnsWatcher, HealthChecker, Instance, InstanceSet, Resolver
from .observe import new_request_id, redact
from .owners import choose_owner
from .reconcile import Reconciler
from .replay import Attempted, OutgoingRequest, Router, StreamedBody
from .sessions import Kind, Role, SessionRouter, Target
from .store import Store, StoreUnavailable
from .table import RoutingTable, make_cache
from .tasks import Supervisor

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

access_log = logging.getLogger("session_proxy.access")
log = logging.getLogger("session_proxy.app")

OWN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# What the gateway answers a DELETE for a session it does not hold (see the contract).
ALREADY_DISCONNECTED = (
    b'{"success":true,"message":"Session already disconnected or not found in memory",'
    b'"alreadyDisconnected":true}'
)
_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
# A JSON body larger than this is scanned for its session id in a thread, not parsed inline.
_BODY_PARSED_INLINE = 64 * 1024


class ClientDisconnected(Exception):
    pass


class ProxyApp:
    def __init__(
        self,
        settings: Settings,
        transport: httpx.AsyncBaseTransport | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.settings = settings
        self.client = create_client(settings.upstream_client, transport)
        self.instances = InstanceSet(settings)
        self.table = RoutingTable(
            make_cache(settings.cache_url), settings.cache_ttl, settings.negative_ttl
        )
        self.discovery = Discovery(settings, self.instances, self.client)
        self.store = Store(settings, self._invalidate) if settings.database_url else None
        self.router = Router(
            settings, self.instances, self.table, self.discovery, self.client, self.store
        )
        settler = (
            DuplicateSettler(settings, self.discovery, self.client)
            if settings.settle_duplicates
            else None
        )
        self.reconciler = Reconciler(settings, self.instances, self.discovery, self.store, settler)
        self.sessions = SessionRouter(settings)
        self.health = HealthChecker(settings, self.instances, self.client)
        self.dns = (
            DnsWatcher(settings, self.instances, self.health, resolver)
            if settings.instances_dns
            else None
        )
        self.started_at = time.time()
        self.shutting_down = False
        self.in_flight = 0
        self._per_client: dict[str, int] = {}
        self._log_requests = access_log.isEnabledFor(logging.INFO)
        self.tasks = Supervisor()
        own = Starlette(
            routes=[
                Route("/healthz", self._healthz),
                Route("/readyz", self._readyz),
                Route("/metrics", self._metrics),
                *admin_routes(
                    settings.admin_token, self.table, self.instances, self.reconciler, self.router
                ),
            ],
            lifespan=self._lifespan,
            exception_handlers={HTTPException: _own_error, Exception: _own_error},
        )
        # No trailing-slash redirects: their Location is built from the client's Host header.
        own.router.redirect_slashes = False
        self._own = AdminGuard(settings.admin_token, own)

    # --- ASGI ------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not (
            scope["path"] in OWN_PATHS or scope["path"].startswith("/_proxy/")
        ):
            await self.proxy(scope, receive, send)
        else:
            await self._own(scope, receive, send)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        if self.dns is not None:
            await self.dns.refresh()
            self.tasks.start("dns", self.dns.run)
        await self.health.check_all()
        self.tasks.start("health-checks", self.health.run)
        if self.store is not None:
            await self.store.start_background(self.tasks)
            with contextlib.suppress(StoreUnavailable):
                for stored in await self.store.stored_forms():
                    self.instances.resolve(stored)
            if self.settings.reconcile_interval > 0:
                self.tasks.start("reconcile", self.reconciler.run)

    async def stop(self) -> None:
        self.shutting_down = True
        await self.tasks.close()
        if self.store is not None:
            await self.store.close()
        await self.client.aclose()
        await self.table.close()

    async def _invalidate(self, session_id: str | None) -> None:
        """The database says a row changed (or we may have missed changes): forget it."""
        if session_id is None:
            await self.table.clear()
        else:
            await self.table.forget(session_id)

    # --- the proxy's own endpoints ---------------------------------------------------------------

    async def _healthz(self, _request: Request) -> Response:
        return JSONResponse({"status": "alive", "uptime": round(time.time() - self.started_at, 3)})

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        healthy = len(self.instances.available())
        ready = not self.shutting_down and len(self.instances) > 0 and healthy > 0
        detail: dict[str, Any] = {
            "ready": ready,
            "instances": len(self.instances),
            "healthy_instances": healthy,
            "shutting_down": self.shutting_down,
            "instance_states": [i.snapshot() for i in self.instances.all],
            # A crashed loop is restarted; until then it shows here (readiness is not withheld:
            # routing still works without, say, the reconcile loop).
            "background_tasks": self.tasks.status(),
        }
        if self.table.shared is not None:
            detail["shared_table"] = {"up": self.table.shared_up}
        if self.store is not None:
            # Routing goes on without the database: it is reported, not required.
            detail["database"] = {
                "up": self.store.up,
                "listening": self.store.listening,
                "writeback_pending": self.store.pending,
                "queries": self.store.queries.as_dict(),
                "last_error": redact(self.store.last_error or "") or None,
            }
            detail["reconcile"] = self.reconciler.status()
        return ready, detail

    async def _metrics(self, _request: Request) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    def begin_shutdown(self) -> None:
        """SIGTERM: stop being ready at once, so load balancers stop sending new requests."""
        if not self.shutting_down:
            self.shutting_down = True
            log.info("shutting down: not ready", extra={"in_flight": self.in_flight})

    async def _readyz(self, _request: Request) -> Response:
        ready, detail = self.readiness()
        return JSONResponse(detail, status_code=200 if ready else 503)

    # --- proxying --------------------------------------------------------------------------------

    async def proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        seen = _scan_headers(scope["headers"])
        request_id = seen.request_id or new_request_id()
        method: str = scope["method"]
        raw_path = scope.get("raw_path")
        path = raw_path.decode("latin-1") if raw_path else scope["path"]
        client = scope.get("client")
        peer = client[0] if client else ""
        session_id: str | None = None
        answer: Attempted | None = None
        responding = False
        status = 500
        code = ""
        attempts = 0
        outcome = "proxied"
        self.in_flight += 1
        self._per_client[peer] = self._per_client.get(peer, 0) + 1
        try:
            self._admit(seen, peer)
            target = self.sessions.classify(method, path)
            session_id = target.session_id
            body = await self._read_body(seen, receive, buffer_all=target.kind is not Kind.PATH)
            if target.kind in (Kind.BODY, Kind.CREATE):
                assert isinstance(body, bytes)
                if len(body) > _BODY_PARSED_INLINE:
                    session_id = await asyncio.to_thread(
                        self.sessions.session_from_body, body, _BODY_PARSED_INLINE
                    )
                else:
                    session_id = self.sessions.session_from_body(body, _BODY_PARSED_INLINE)
            if target.kind is Kind.LIST:
                status = await self._list(scope, send, request_id)
                return
            request = self._outgoing(scope, seen, method, path, body, request_id)
            if target.role is Role.DELETES:
                assert session_id is not None
                answer = await self._delete(session_id, request)
                if answer is None:
                    # Nobody holds it: the gateway's own answer, without touching any instance
                    # (one that does not hold a session still deletes its files).
                    status = 200
                    outcome = "answered_by_proxy"
                    await _send_json_bytes(send, 200, ALREADY_DISCONNECTED, request_id)
                    return
            else:
                answer = await self._dispatch(target, session_id, request)
            response = answer.response
            try:
                content = answer.body if answer.body is not None else await buffered_body(response)
            except ProxyError as error:
                # Nothing went to the client yet: it gets a clean error, the instance a mark.
                self.instances.record_failure(answer.instance, error.detail)
                error.attempts = answer.attempts
                raise
            headers = response_headers(
                response, answer.instance.url, request_id.encode("latin-1"), answer.attempts
            )
            status = response.status
            responding = True
            await relay(send, response, headers, content)
        except ProxyError as error:
            status, code, attempts, outcome = error.status, error.code, error.attempts, "error"
            metrics.ERRORS.labels(code).inc()
            if not responding:
                await self._send_error(send, error, request_id, error.attempts)
            elif abort_started_answer(scope):
                # The answer had started: the client sees it break off, not a second one. An
                # instance failing mid-body is expected: one line, not a traceback.
                log.warning(
                    "the instance failed while its answer was relayed; the connection was closed",
                    extra={
                        "request_id": request_id,
                        "instance": answer.instance.url if answer else None,
                        "error_code": code,
                        "detail": error.detail,
                    },
                )
            else:
                raise  # a server without the abort extension breaks the connection itself
        except ClientDisconnected:
            status, code, outcome = 499, "client-closed", "client_closed"
        except Exception:
            if responding:
                raise
            # A failure of the proxy itself still gets an answer in the proxy's shape.
            failure = InternalError()
            status, code, outcome = failure.status, failure.code, "error"
            metrics.ERRORS.labels(code).inc()
            log.exception("failed to handle a request", extra={"request_id": request_id})
            await self._send_error(send, failure, request_id, 0)
        finally:
            self.in_flight -= 1
            left = self._per_client[peer] - 1
            if left:
                self._per_client[peer] = left
            else:
                del self._per_client[peer]
            elapsed = time.perf_counter() - started
            metrics.count_request(outcome, status, elapsed)
            if self._log_requests:
                access_log.info(
                    "request",
                    extra={
                        "request_id": request_id,
                        "method": method,
                        "path": scope["path"],
                        "session_id": session_id,
                        "status": status,
                        "instance": answer.instance.url if answer else None,
                        "attempts": answer.attempts if answer else attempts,
                        "outcome": outcome,
                        "error_code": code or None,
                        "ms": round(elapsed * 1000, 3),
                    },
                )

    def _admit(self, seen: _Seen, peer: str) -> None:
        """Refuse what is too big or too much before any work is done for it."""
        s = self.settings
        if seen.header_bytes > s.max_header_bytes:
            raise HeadersTooLarge(
                f"the request headers are {seen.header_bytes} bytes; the limit is "
                f"{s.max_header_bytes}"
            )
        if self.in_flight > s.max_in_flight:
            raise Overloaded("too many requests in flight", retry_after=1)
        if self._per_client[peer] > s.max_in_flight_per_client:
            raise Overloaded("too many requests in flight from this client", retry_after=1)

    async def _dispatch(
        self, target: Target, session_id: str | None, request: OutgoingRequest
    ) -> Attempted:
        if session_id is None:
            return await self.router.to_any(request, self.router.pick_any)
        if target.kind is Kind.CREATE or target.role is Role.STARTS:
            return await self.router.start(session_id, request)
        return await self.router.to_session(session_id, request, target.role)

    async def _delete(self, session_id: str, request: OutgoingRequest) -> Attempted | None:
        answer, copies = await self.router.to_every_holder(session_id, request)
        if copies > 1:
            log.info(
                "session deleted on every instance holding it",
                extra={"session_id": session_id, "copies": copies},
            )
        return answer

    def _outgoing(
        self,
        scope: Scope,
        seen: _Seen,
        method: str,
        path: str,
        body: bytes | StreamedBody,
        request_id: str,
    ) -> OutgoingRequest:
        query: bytes = scope["query_string"]
        target = f"{path}?{query.decode('latin-1')}" if query else path
        if isinstance(body, bytes):
            length: int | None = len(body) if body or method in _METHODS_WITH_BODY else None
        else:
            declared = seen.content_length
            length = int(declared) if declared and declared.isdigit() else None
        rid = request_id.encode("latin-1")

        def headers_for(instance: Instance) -> list[tuple[bytes, bytes]]:
            return request_headers(scope, instance.host_header, rid, length)

        return OutgoingRequest(
            method=method,
            target=target,
            body=body,
            headers_for=headers_for,
            timeouts=Timeouts(self.settings.connect_timeout, self.settings.timeout_for(path)),
            idempotency_key=seen.idempotency_key,
        )

    async def _read_body(
        self, seen: _Seen, receive: Receive, buffer_all: bool
    ) -> bytes | StreamedBody:
        """Buffer the body (so it can be replayed), or stream what exceeds the replay buffer."""
        declared = seen.content_length
        if declared is None and not seen.chunked:
            return b""
        maximum = self.settings.max_body_size
        if declared is not None and declared.isdigit() and int(declared) > maximum:
            raise BodyTooLarge(f"the body is {declared} bytes; the limit is {maximum}")
        limit = maximum if buffer_all else self.settings.replay_body_limit
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                async with asyncio.timeout(self.settings.client_body_timeout):
                    message = await receive()
            except TimeoutError:
                raise ClientTooSlow(
                    f"no body bytes for {self.settings.client_body_timeout:g} s"
                ) from None
            if message["type"] == "http.disconnect":
                raise ClientDisconnected()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > maximum:
                raise BodyTooLarge(f"the body exceeds the limit of {maximum} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
            if size > limit:
                rest = _rest_of_body(receive, size, maximum, self.settings.client_body_timeout)
                return StreamedBody(b"".join(chunks), rest)

    async def _list(self, scope: Scope, send: Send, request_id: str) -> int:
        """The fleet-wide session list: every instance asked with the client's own query."""
        query: bytes = scope["query_string"]
        suffix = "?" + query.decode("latin-1") if query else ""
        timeouts = Timeouts(self.settings.connect_timeout, self.settings.timeout_for(LIST_PATH))
        rid = request_id.encode("latin-1")

        async def ask(instance: Instance) -> tuple[Instance, int, bytes | None, str]:
            headers = request_headers(scope, instance.host_header, rid, None)
            try:
                response = await self.client.send(
                    "GET", instance.url, LIST_PATH + suffix, headers, b"", timeouts
                )
                body = await response.read()
            except ProxyError as error:
                return instance, 0, None, f"{error.code}: {error.detail}"
            return instance, response.status, body, ""

        everyone = self.instances.all
        answers = await asyncio.gather(*(ask(i) for i in everyone if i.available))
        sessions: list[Any] = []
        failed: list[dict[str, Any]] = [
            {"instance": i.url, "status": None, "error": "ejected by health checks"}
            for i in everyone
            if not i.available
        ]
        succeeded = 0
        copies: dict[str, list[tuple[Instance, str]]] = {}
        for instance, status, body, problem in answers:
            document = _json_object(body) if status == 200 else None
            if document is None or not isinstance(document.get("sessions"), list):
                failed.append(
                    {
                        "instance": instance.url,
                        "status": status or None,
                        "error": problem or body_text(body),
                    }
                )
                continue
            succeeded += 1
            for entry in document["sessions"]:
                if isinstance(entry, dict):
                    sessions.append({**entry, "instance": instance.url})
                    sid = entry.get("session_id")
                    if isinstance(sid, str):
                        copies.setdefault(sid, []).append((instance, str(entry.get("status"))))
        if succeeded == 0:
            statuses = {a[1] for a in answers}
            if len(statuses) == 1 and next(iter(statuses)) in (401, 403):
                # Every instance refused the key: the client's to fix, said as the instances say it.
                status = next(iter(statuses))
                first_body = answers[0][2] or b"{}"
                await _send_json_bytes(send, status, first_body, request_id)
                return status
            error = NoHealthyInstance("no instance answered the session list")
            await self._send_error(send, error, request_id, 0, extra={"failed_instances": failed})
            return error.status
        await self._settle_copies(copies)
        merged = {
            "success": True,
            "sessions": sessions,
            "total": len(sessions),
            "instances": len(everyone),
            "failed_instances": failed,
        }
        await _send_json_bytes(send, 200, json.dumps(merged).encode(), request_id)
        return 200

    async def _settle_copies(self, copies: dict[str, list[tuple[Instance, str]]]) -> None:
        """Sessions the list shows on several instances: every replica must route to one copy.
        Without a database the rule alone decides; with one, the row breaks the tie, so the
        entry is forgotten and the next request reads it."""
        for session_id, holders in copies.items():
            if len(holders) < 2:
                continue
            if self.store is None:
                await self.table.put(session_id, choose_owner(holders).url)
            else:
                await self.table.forget(session_id)
            self.router.confirmations.forget(session_id)

    async def _send_error(
        self,
        send: Send,
        error: ProxyError,
        request_id: str,
        attempts: int,
        extra: dict[str, Any] | None = None,
    ) -> None:
        body = error_body(error, request_id)
        if extra:
            body = json.dumps({**json.loads(body), **extra}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-proxy-error", error.code.encode()),
            (b"x-request-id", request_id.encode("latin-1")),
        ]
        if attempts:
            headers.append((b"x-proxy-attempts", str(attempts).encode()))
        if error.retry_after is not None:
            headers.append((b"retry-after", str(error.retry_after).encode()))
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _rest_of_body(
    receive: Receive, size: int, maximum: int, idle_timeout: float
) -> AsyncIterator[bytes]:
    while True:
        try:
            async with asyncio.timeout(idle_timeout):
                message = await receive()
        except TimeoutError:
            raise ClientTooSlow(f"no body bytes for {idle_timeout:g} s") from None
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > maximum:
            raise BodyTooLarge(f"the body exceeds the limit of {maximum} bytes")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _send_json_bytes(send: Send, status: int, body: bytes, request_id: str) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode("latin-1")),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Seen:
    """What the proxy needs from the request's headers, found in one pass."""

    __slots__ = ("chunked", "content_length", "header_bytes", "idempotency_key", "request_id")

    def __init__(self) -> None:
        self.header_bytes = 0
        self.request_id: str | None = None
        self.content_length: str | None = None
        self.chunked = False
        self.idempotency_key = False


def _scan_headers(headers: list[tuple[bytes, bytes]]) -> _Seen:
    seen = _Seen()
    size = 0
    for name, value in headers:
        size += len(name) + len(value) + 4
        if name == b"content-length":
            seen.content_length = value.decode("latin-1")
        elif name == b"x-request-id":
            seen.request_id = value.decode("latin-1")
        elif name == b"transfer-encoding":
            seen.chunked = True
        elif name == b"idempotency-key":
            seen.idempotency_key = True
    seen.header_bytes = size
    return seen


def _json_object(body: bytes | None) -> dict[str, Any] | None:
    try:
        document = json.loads(body) if body else None
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def body_text(body: bytes | None) -> str:
    return (body or b"").decode("utf-8", "replace")[:200]


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


def create_app(
    settings: Settings,
    transport: httpx.AsyncBaseTransport | None = None,
    resolver: Resolver | None = None,
) -> ProxyApp:
    return ProxyApp(settings, transport=transport, resolver=resolver)
