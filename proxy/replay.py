"""The replay policy: where a request goes, what a failed attempt means, and whether to try again.

- refused, connect timeout, owner ejected (the request never left): replay, any method;
- the instance's own 404 "Session not found" (it refused the request): rediscover, replay, any
  method;
- reset, empty reply, read timeout or garbage after the request was sent: replay only idempotent
  methods or requests carrying an ``Idempotency-Key`` header;
- a streamed body (larger than the replay buffer) once its first byte left: never.

Attempts and the total time are bounded; when the proxy gives up it says which case it was.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass

from . import metrics
from .client import Timeouts, UpstreamClient, UpstreamResponse
from .config import Settings
from .discovery import Discovery
from .errors import (
    NoHealthyInstance,
    ProxyError,
    ReplayExhausted,
    SessionNotFound,
    UpstreamUnreachable,
)
from .forward import buffered_body, is_session_not_found
from .instances import Instance, InstanceSet
from .store import Store, StoreUnavailable
from .table import NEGATIVE, RoutingTable

log = logging.getLogger("session_proxy.replay")

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class StreamedBody:
    """A request body too large to buffer: it can be sent once, and knows whether it started."""

    def __init__(self, prefix: bytes, rest: AsyncIterable[bytes]) -> None:
        self._prefix = prefix
        self._rest = rest
        self.started = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.started = True
        if self._prefix:
            yield self._prefix
        async for chunk in self._rest:
            yield chunk


@dataclass
class Attempted:
    """The answer that ends a request: the response (body unread unless ``body``) and its path."""

    response: UpstreamResponse
    body: bytes | None
    instance: Instance
    attempts: int


@dataclass
class OutgoingRequest:
    method: str
    target: str  # raw path plus query string, exactly as the client sent them
    body: bytes | StreamedBody
    headers_for: Callable[[Instance], list[tuple[bytes, bytes]]]
    timeouts: Timeouts
    idempotency_key: bool = False

    @property
    def safe_to_repeat(self) -> bool:
        """May this be sent again after the instance may already have acted on it?"""
        return self.method in IDEMPOTENT_METHODS or self.idempotency_key

    @property
    def can_resend(self) -> bool:
        return not isinstance(self.body, StreamedBody) or not self.body.started


class Router:
    """Finds owners and runs the attempt loop for every kind of request."""

    def __init__(
        self,
        settings: Settings,
        instances: InstanceSet,
        table: RoutingTable,
        discovery: Discovery,
        client: UpstreamClient,
        store: Store | None = None,
    ) -> None:
        self.settings = settings
        self.instances = instances
        self.table = table
        self.discovery = discovery
        self.client = client
        self.store = store
        self.rediscoveries = 0

    # --- owners ----------------------------------------------------------------------------------

    async def owner_of(self, session_id: str) -> Instance:
        """Routing table first, then the database row, then the fleet; a remembered unknown
        answers at once."""
        known = await self.table.get(session_id)
        if known == NEGATIVE:
            raise SessionNotFound()
        if known is not None:
            instance = self.instances.get(known)
            if instance is not None:
                return instance
        return await self._locate(session_id, exclude=None, ask_store=True)

    def record(self, session_id: str, instance: Instance) -> None:
        """Tell the database where the session is (queued, written in batches)."""
        if self.store is not None:
            self.store.record(session_id, instance.alias)

    async def _stored_owner(self, session_id: str) -> Instance | None:
        """The database row's owner, when it names a healthy member of the instance set."""
        if self.store is None:
            return None
        try:
            stored = await self.store.owner(session_id)
        except StoreUnavailable:
            return None
        if stored is None:
            return None
        instance = self.instances.resolve(stored)
        if instance is None:
            # Never contacted: the row is corrected once the fleet says where the session is.
            log.warning(
                "database row points outside the instance set; rediscovering",
                extra={"session_id": session_id, "stored": stored[:255]},
            )
            return None
        return instance if instance.available else None

    async def rediscover(self, session_id: str, failed: Instance, error: ProxyError) -> Instance:
        """The owner was wrong or gone: forget it and look again at a view of the fleet taken
        after the failure. Only an owner that said "Session not found" is left out: one that
        reset a connection may still hold the session, and its own status answer decides."""
        self.rediscoveries += 1
        try:
            instance = await self._rediscover(session_id, failed, error)
        except SessionNotFound:
            metrics.REDISCOVERIES.labels("not_found").inc()
            raise
        except ProxyError:
            metrics.REDISCOVERIES.labels("error").inc()
            raise
        metrics.REDISCOVERIES.labels("found").inc()
        return instance

    async def _rediscover(self, session_id: str, failed: Instance, error: ProxyError) -> Instance:
        failed_at = time.monotonic()
        exclude = failed if isinstance(error, SessionNotFound) else None
        await self.table.forget(session_id)
        try:
            instance = await self._locate(session_id, exclude, failed_at)
            if exclude is not None and instance is exclude:
                # A lookup that started before this failure answered; ask again without it.
                await self.table.forget(session_id)
                instance = await self._locate(session_id, exclude, failed_at)
        except SessionNotFound:
            if isinstance(error, SessionNotFound):
                raise
            # Nobody else holds it: the truthful answer is what happened to the owner.
            if isinstance(error, UpstreamUnreachable):
                error.detail = (
                    f"the instance holding the session ({failed.url}) cannot be reached and no "
                    "other instance holds it"
                )
            raise error from None
        log.info(
            "session rediscovered",
            extra={
                "session_id": session_id,
                "old_instance": failed.url,
                "new_instance": instance.url,
                "reason": error.code,
            },
        )
        return instance

    async def _locate(
        self,
        session_id: str,
        exclude: Instance | None,
        not_before: float | None = None,
        ask_store: bool = False,
    ) -> Instance:
        async def lookup() -> str | None:
            if ask_store:
                stored = await self._stored_owner(session_id)
                if stored is not None:
                    await self.table.put(session_id, stored.url)
                    return stored.url
            located = await self.discovery.locate(session_id, exclude, not_before)
            if located.instance is not None:
                await self.table.put(session_id, located.instance.url)
                self.record(session_id, located.instance)
                return located.instance.url
            if located.asked == 0:
                raise NoHealthyInstance()
            if located.complete:
                await self.table.put_negative(session_id)
            return None

        url = await self.table.single_flight(session_id, lookup)
        instance = self.instances.get(url) if url else None
        if instance is None:
            raise SessionNotFound()
        return instance

    # --- the attempt loop ------------------------------------------------------------------------

    async def to_session(self, session_id: str, request: OutgoingRequest) -> Attempted:
        owner = await self.owner_of(session_id)
        deadline = time.monotonic() + self.settings.replay_deadline
        attempts = 0
        try:
            while True:
                if not owner.healthy:  # ejected; a draining owner still serves its sessions
                    owner = await self.rediscover(
                        session_id, owner, UpstreamUnreachable(f"{owner.url} is ejected")
                    )
                attempts += 1
                try:
                    answer = await self._attempt(owner, request, attempts, session_aware=True)
                    if answer is not None:
                        return answer
                    # The instance answered "Session not found": it refused the request, so any
                    # method may go to the real owner.
                    raise SessionNotFound()
                except ProxyError as error:
                    self._check_replay(request, error, attempts, deadline)
                    owner = await self.rediscover(session_id, owner, error)
        except ProxyError as error:
            error.attempts = error.attempts or attempts
            raise

    async def to_any(
        self, request: OutgoingRequest, pick: Callable[[set[str]], Instance]
    ) -> Attempted:
        """Requests without an owner: ``pick`` chooses among instances not tried yet."""
        deadline = time.monotonic() + self.settings.replay_deadline
        tried: set[str] = set()
        attempts = 0
        last_error: ProxyError | None = None
        try:
            while True:
                try:
                    instance = pick(tried)
                except NoHealthyInstance:
                    # Every instance was tried: what went wrong with the last one says more.
                    raise last_error or NoHealthyInstance() from None
                tried.add(instance.url)
                attempts += 1
                try:
                    answer = await self._attempt(instance, request, attempts, session_aware=False)
                except ProxyError as error:
                    self._check_replay(request, error, attempts, deadline)
                    last_error = error
                    continue
                assert answer is not None
                return answer
        except ProxyError as error:
            error.attempts = error.attempts or attempts
            raise

    async def _attempt(
        self, instance: Instance, request: OutgoingRequest, attempts: int, session_aware: bool
    ) -> Attempted | None:
        """One try; None means the instance said it does not hold the session."""
        started = time.perf_counter()
        try:
            response = await self.client.send(
                request.method,
                instance.url,
                request.target,
                request.headers_for(instance),
                request.body,
                request.timeouts,
            )
            instance.upstream_seconds.observe(time.perf_counter() - started)
        except UpstreamUnreachable as error:
            self.instances.eject(instance, error.detail)
            raise
        except ProxyError as error:
            self.instances.record_failure(instance, error.detail)
            raise
        self.instances.record_success(instance)
        body = None
        if session_aware and response.status == 404:
            body = await buffered_body(response)
            if body is not None and is_session_not_found(404, body):
                return None
        return Attempted(response, body, instance, attempts)

    def _check_replay(
        self, request: OutgoingRequest, error: ProxyError, attempts: int, deadline: float
    ) -> None:
        """Raise when this failure must end the request; return when another try is allowed."""
        never_reached = isinstance(error, UpstreamUnreachable | SessionNotFound)
        if not request.can_resend:
            raise error
        if not never_reached and not request.safe_to_repeat:
            raise error
        if attempts >= self.settings.max_attempts or time.monotonic() >= deadline:
            raise ReplayExhausted(
                f"gave up after {attempts} attempts; the last failed with {error.code}: "
                f"{error.detail}"
            )
        metrics.REPLAYS.labels(error.code).inc()

    def pick_any(self, tried: set[str]) -> Instance:
        for _ in range(len(self.instances)):
            instance = self.instances.next_available()
            if instance.url not in tried:
                return instance
        raise NoHealthyInstance("every healthy instance was tried")

    def pick_least_loaded(self, tried: set[str]) -> Instance:
        candidates = [i for i in self.instances.available() if i.url not in tried]
        if not candidates:
            raise NoHealthyInstance("every healthy instance was tried")
        return min(candidates, key=lambda i: i.sessions)
