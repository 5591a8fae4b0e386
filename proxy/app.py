"""The wiring: every part built from ``Settings``, their lifespan, and the hot-path ASGI entry.

The proxied path is plain ASGI (no per-request framework objects): it is the hot path of every
message. The proxy's own endpoints (``/healthz``, ``/readyz``, ``/metrics``, ``/_proxy/``) are
``endpoints.py``'s small Starlette app.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, MutableMapping
from typing import Any

import httpx
from starlette.applications import Starlette

from . import metrics, tracing
from .attempts import Attempted, Attempts, OutgoingRequest, StreamedBody
from .client import Timeouts, create_client
from .config import Settings
from .discovery import LIST_PATH, Discovery
from .dns import DnsWatcher, Resolver
from .drain import Drainer
from .endpoints import Endpoints, is_own
from .errors import (
    BodyTooLarge,
    ClientTooSlow,
    HeadersTooLarge,
    InternalError,
    NoHealthyInstance,
    Overloaded,
    ProxyError,
    all_codes,
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
from .health import HealthChecker
from .idempotency import Claim, Idempotency, Replay, digest_of
from .instances import Instance, InstanceSet
from .observe import new_request_id
from .pacing import Pacer
from .reconcile import Reconciler
from .restore import Restorer
from .sessions import Kind, Role, SessionRouter, Target
from .starts import Starter
from .store import Store, StoreUnavailable
from .table import RoutingTable, make_cache
from .tasks import Supervisor

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

access_log = logging.getLogger("session_proxy.access")
log = logging.getLogger("session_proxy.app")

# What the gateway answers a DELETE for a session it does not hold (see the contract).
ALREADY_DISCONNECTED = (
    b'{"success":true,"message":"Session already disconnected or not found in memory",'
    b'"alreadyDisconnected":true}'
)
_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
# An Idempotency-Key matters where a repeat would act twice (Stripe's rule: not GET, PUT, DELETE).
_KEYED_METHODS = frozenset({"POST", "PATCH"})
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
        self.health = HealthChecker(settings, self.instances, self.client)
        self.table = RoutingTable(
            make_cache(settings.cache_url), settings.cache_ttl, settings.negative_ttl
        )
        self.discovery = Discovery(settings, self.instances, self.client)
        self.store = Store(settings, self._invalidate) if settings.database_url else None
        self.attempts = Attempts(
            settings,
            self.instances,
            self.health,
            self.table,
            self.discovery,
            self.client,
            self.store,
        )
        settler = (
            DuplicateSettler(settings, self.discovery, self.client)
            if settings.settle_duplicates
            else None
        )
        self.starter = Starter(settings, self.instances, self.discovery, self.client)
        self.restorer = Restorer(settings, self.attempts, self.starter, self.store)
        self.drainer = Drainer(
            settings, self.instances, self.attempts, self.starter, self.restorer, self.store
        )
        self.health.on_eject.append(self.restorer.instance_lost)
        self.attempts.on_owner = self.restorer.owner_seen
        self.attempts.on_owner_gone = self.restorer.owner_gone
        self.health.on_back.append(self.drainer.instance_back)
        self.reconciler = Reconciler(
            settings,
            self.instances,
            self.discovery,
            self.store,
            settler,
            self.restorer.sessions_lost,
        )
        self.sessions = SessionRouter(settings)
        self.pacing = Pacer(settings)
        self.idempotency = Idempotency(settings, self.store)
        self.dns = (
            DnsWatcher(settings, self.instances, self.health, resolver)
            if settings.instances_dns
            else None
        )
        metrics.known_codes(all_codes())  # (idempotency.py's own code is a subclass too)
        self.in_flight = 0
        self._per_client: dict[str, int] = {}
        self._timeouts = _RouteTimeouts(settings)
        self._log_requests = access_log.isEnabledFor(logging.INFO)
        self.tasks = Supervisor()
        self.endpoints = Endpoints(
            settings,
            self.instances,
            self.table,
            self.store,
            self.reconciler,
            self.attempts,
            self.drainer,
            self.restorer,
            self.tasks,
            self._lifespan,
        )

    # --- ASGI ------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not is_own(scope["path"]):
            if tracing.TRACER is None:
                await self.proxy(scope, receive, send)
            else:
                with tracing.request_span(scope["method"], scope["path"], scope["headers"]):
                    await self.proxy(scope, receive, send)
        else:
            await self.endpoints(scope, receive, send)

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        if tracing.TRACER is None and tracing.configure():
            log.info("tracing on: spans exported as the OTEL_* variables say")
        if self.dns is not None:
            await self.dns.refresh()
            self.tasks.start("dns", self.dns.run)
        await self.health.check_all()
        self.tasks.start("health-checks", self.health.run)
        if self.restorer.enabled:
            self.tasks.start("restore", self.restorer.run)
        if self.store is not None:
            await self.store.start_background(self.tasks)
            with contextlib.suppress(StoreUnavailable):
                for stored in await self.store.stored_forms():
                    self.instances.resolve(stored)
            if self.settings.reconcile_interval > 0:
                self.tasks.start("reconcile", self.reconciler.run)
            self.tasks.start("idempotency-sweep", self.idempotency.sweep_forever)
        # Everything made so far (modules, settings, the app) lives as long as the process: out
        # of the collector's sight, a full collection scans only what requests made since. One
        # of those over the whole heap took 66 ms in the middle of a paced benchmark round.
        gc.freeze()

    async def stop(self) -> None:
        self.endpoints.shutting_down = True
        await self.tasks.close()
        await self.drainer.close()
        await self.pacing.close()
        await self.idempotency.close()
        await self.attempts.holds.close()
        if self.store is not None:
            await self.store.close()
        await self.client.aclose()
        await self.table.close()
        if tracing.TRACER is not None:
            await asyncio.to_thread(tracing.shutdown)  # the batch exporter sends what it holds

    async def _invalidate(self, session_id: str | None) -> None:
        """The database says a row changed (or we may have missed changes): forget it."""
        if session_id is None:
            await self.table.clear()
        else:
            await self.table.forget(session_id)

    # --- readiness -------------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """What ``/readyz`` answers: (ready, detail)."""
        return self.endpoints.readiness()

    def begin_shutdown(self) -> None:
        """SIGTERM: stop being ready at once, so load balancers stop sending new requests."""
        if not self.endpoints.shutting_down:
            self.endpoints.shutting_down = True
            log.info("shutting down: not ready", extra={"in_flight": self.in_flight})

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
        failed_instance: str | None = None
        outcome = "proxied"
        claim: Claim | None = None
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
            key = seen.idempotency_key
            if key is not None and method in _KEYED_METHODS and isinstance(body, bytes):
                # (A body too large to buffer streams once and is not deduplicated.)
                digest = digest_of(method, request.target, body)
                begun = await self.idempotency.begin(session_id, key, digest)
                if isinstance(begun, Replay):
                    status, outcome = begun.status, "idempotent_replay"
                    await _send_replay(send, begun, request_id)
                    return
                claim = begun
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
                if session_id is not None and self.pacing.enabled:
                    await self.pacing.wait(method, scope["path"], session_id, body)
                answer = await self._dispatch(target, session_id, request)
            response = answer.response
            try:
                content = answer.body if answer.body is not None else await buffered_body(response)
            except ProxyError as error:
                # Nothing went to the client yet: it gets a clean error, the instance a mark.
                self.health.record_failure(answer.instance, error.detail)
                error.attempts = answer.attempts
                error.instance = answer.instance.url
                if not (request.safe_to_repeat and request.can_resend):
                    raise
                # The answer broke off before its body (an instance killed mid-answer): a
                # request safe to repeat is asked again, once, as a reset before it would be.
                metrics.REPLAYS.labels(error.code).inc()
                answer = await self._dispatch(target, session_id, request)
                response = answer.response
                content = answer.body if answer.body is not None else await buffered_body(response)
            headers = response_headers(
                response, answer.instance.url, request_id.encode("latin-1"), answer.attempts
            )
            status = response.status
            if claim is not None:
                # Kept before it is relayed: a repeat gets it even if this client goes away.
                await self.idempotency.finish(claim, status, headers, content)
                claim = None
            responding = True
            await relay(send, response, headers, content)
        except ProxyError as error:
            status, code, attempts, outcome = error.status, error.code, error.attempts, "error"
            failed_instance = error.instance
            metrics.ERRORS.labels(code).inc()
            if claim is not None:
                if error.maybe_sent:
                    await self.idempotency.ambiguous(claim, error, error_body(error, request_id))
                else:
                    await self.idempotency.release(claim)  # never carried out
                claim = None
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
            if claim is not None:
                # Whether it reached an instance is unknown: repeats must not send it again.
                await self.idempotency.ambiguous(claim, failure, error_body(failure, request_id))
                claim = None
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
            if tracing.TRACER is not None:
                tracing.describe_request(
                    session_id,
                    status,
                    outcome,
                    answer.instance.url if answer else failed_instance,
                    answer.attempts if answer else attempts,
                    code,
                )
            if self._log_requests:
                access_log.info(
                    "request",
                    extra={
                        "request_id": request_id,
                        "method": method,
                        "path": scope["path"],
                        "session_id": session_id,
                        "status": status,
                        "instance": answer.instance.url if answer else failed_instance,
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
            return await self.attempts.to_any(request, self.attempts.pick_any)
        if target.kind is Kind.CREATE or target.role is Role.STARTS:
            answer = await self.attempts.start(session_id, request)
            created = target.kind is Kind.CREATE and 200 <= answer.response.status < 300
            if created and isinstance(request.body, bytes):
                self.restorer.remember(session_id, request.body)
            return answer
        return await self.attempts.to_session(session_id, request, target.role)

    async def _delete(self, session_id: str, request: OutgoingRequest) -> Attempted | None:
        answer, copies = await self.attempts.to_every_holder(session_id, request)
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

        return OutgoingRequest(method, target, body, headers_for, self._timeouts.of(path))

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
                message = await _receive_within(receive, self.settings.client_body_timeout)
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
        rid = request_id.encode("latin-1")

        def headers_for(instance: Instance) -> list[tuple[bytes, bytes]]:
            return request_headers(scope, instance.host_header, rid, None)

        listing = await self.discovery.fleet_list(
            "?" + query.decode("latin-1") if query else "",
            self._timeouts.of(LIST_PATH),
            headers_for,
        )
        if listing.refused is not None:
            # Every instance refused the key: the client's to fix, said as the instances say it.
            status = listing.refused.status
            await _send_json_bytes(send, status, listing.refused.body or b"{}", request_id)
            return status
        if not listing.answered:
            error = NoHealthyInstance("no instance answered the session list")
            extra = {"failed_instances": listing.failed}
            await self._send_error(send, error, request_id, 0, extra=extra)
            return error.status
        await self.attempts.settle_copies(listing.copies)
        await _send_json_bytes(send, 200, json.dumps(listing.as_dict()).encode(), request_id)
        return 200

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
        if error.instance is not None:
            # Which instance failed (a dead one, say): the operator's first question.
            headers.append((b"x-proxy-instance", error.instance.encode("latin-1")))
        if error.retry_after is not None:
            headers.append((b"retry-after", str(error.retry_after).encode()))
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _receive_within(receive: Receive, seconds: float) -> Message:
    """``receive()``, or TimeoutError after ``seconds``. What the server already holds (a body
    that came in the packets of its headers: nearly every request) is taken without arming a
    timer (``asyncio.timeout`` costs ~4 us, a sixth of the app's own work on a POST)."""
    steps = receive().__await__()
    try:
        waiting = steps.send(None)
    except StopIteration as done:
        message: Message = done.value
        return message
    async with asyncio.timeout(seconds):
        return await _go_on(steps, waiting)


async def _go_on(steps: Generator[Any, None, Message], waiting: Any) -> Message:
    """Run an awaitable that has suspended once (on ``waiting``) to its end, as a task would:
    each future it waits for is awaited here, so a cancellation (the timeout) reaches it where
    it waits and it cleans up as if it had been awaited directly."""
    while True:
        try:
            if waiting is None:
                await asyncio.sleep(0)  # a bare yield: one turn of the loop
            else:
                waiting._asyncio_future_blocking = False  # taken, as a task takes it
                await waiting
        except BaseException as exc:
            try:
                waiting = steps.throw(exc)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            continue
        try:
            waiting = steps.send(None)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


async def _rest_of_body(
    receive: Receive, size: int, maximum: int, idle_timeout: float
) -> AsyncIterator[bytes]:
    while True:
        try:
            message = await _receive_within(receive, idle_timeout)
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


async def _send_replay(send: Send, replay: Replay, request_id: str) -> None:
    headers = [(n, v) for n, v in replay.headers if n not in (b"content-length", b"x-request-id")]
    headers.append((b"content-length", str(len(replay.body)).encode()))
    headers.append((b"x-request-id", request_id.encode("latin-1")))
    await send({"type": "http.response.start", "status": replay.status, "headers": headers})
    await send({"type": "http.response.body", "body": replay.body})


async def _send_json_bytes(send: Send, status: int, body: bytes, request_id: str) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode("latin-1")),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _RouteTimeouts:
    """``Settings.timeout_for`` as ``Timeouts``: one object per distinct route timeout, made
    once, not a new one per request."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._made: dict[float, Timeouts] = {}

    def of(self, path: str) -> Timeouts:
        seconds = self._settings.timeout_for(path)
        timeouts = self._made.get(seconds)
        if timeouts is None:
            timeouts = self._made[seconds] = Timeouts(self._settings.connect_timeout, seconds)
        return timeouts


class _Seen:
    """What the proxy needs from the request's headers, found in one pass."""

    __slots__ = ("chunked", "content_length", "header_bytes", "idempotency_key", "request_id")

    def __init__(self) -> None:
        self.header_bytes = 0
        self.request_id: str | None = None
        self.content_length: str | None = None
        self.chunked = False
        self.idempotency_key: str | None = None


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
            seen.idempotency_key = value.decode("latin-1")
    seen.header_bytes = size
    return seen


def create_app(
    settings: Settings,
    transport: httpx.AsyncBaseTransport | None = None,
    resolver: Resolver | None = None,
) -> ProxyApp:
    return ProxyApp(settings, transport=transport, resolver=resolver)
