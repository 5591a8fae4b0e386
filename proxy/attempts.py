"""The attempt loop: where a request goes, what a failed attempt means, whether to try again.

- refused, connect timeout, owner ejected (the request never left): replay, any method;
- the instance's own 404 "Session not found" (it refused the request): rediscover, replay, any
  method;
- reset, empty reply, read timeout or garbage after the request was sent: replay only idempotent
  methods (an ``Idempotency-Key`` makes a POST happen at most once: ``idempotency.py``);
- a streamed body (larger than the replay buffer) once its first byte left: never.

Attempts and the total time are bounded; when the proxy gives up it says which case it was.

Routes the gateway answers with success for a session it does not hold (``Role.ACTS`` and the
rest, see ``sessions.Role``) are not judged by their answer: they go only to an owner confirmed to
hold the session, starting a session nobody holds is a placement, and a DELETE goes to every copy.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass

from . import metrics, tracing
from .client import Timeouts, UpstreamClient, UpstreamResponse
from .config import Settings
from .discovery import Discovery
from .errors import (
    NoHealthyInstance,
    Overloaded,
    OwnerGone,
    OwnerUnconfirmed,
    ProxyError,
    ReplayExhausted,
    SessionNotFound,
    UpstreamUnreachable,
)
from .forward import buffered_body, is_not_connected, is_session_not_found
from .health import HealthChecker
from .hold import Holds
from .instances import Instance, InstanceSet
from .owners import CONNECTED, Confirmations, choose_owner
from .sessions import Role
from .store import Store, StoreUnavailable
from .table import NEGATIVE, RoutingTable

# The logger these lines have always had (this was replay.py): log filters keep working.
log = logging.getLogger("session_proxy.replay")

_CONFIRM_HELD = metrics.OWNER_CONFIRMATIONS.labels("held")
_CONFIRM_NOT_HELD = metrics.OWNER_CONFIRMATIONS.labels("not_held")
_CONFIRM_FAILED = metrics.OWNER_CONFIRMATIONS.labels("failed")

_FULL_LOOK = 0.5  # seconds between whole-fleet looks for a held session expected somewhere

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class StreamedBody:
    """A request body too large to buffer: it can be sent once, and knows whether it started."""

    def __init__(self, prefix: bytes, rest: AsyncIterable[bytes]) -> None:
        self._prefix = prefix
        self._rest = rest
        self.started = False
        self.prefix_size = len(prefix)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.started = True
        if self._prefix:
            yield self._prefix
        async for chunk in self._rest:
            yield chunk


@dataclass(slots=True)
class Attempted:
    """The answer that ends a request: the response (body unread unless ``body``) and its path."""

    response: UpstreamResponse
    body: bytes | None
    instance: Instance
    attempts: int
    not_connected: bool = False  # the instance holds the session, still starting: nothing sent


class NotConnectedYet(Exception):
    """The owner holds the session but it is not connected yet (it refused the send)."""

    def __init__(self, answer: Attempted) -> None:
        super().__init__("session not connected yet")
        self.answer = answer


@dataclass(slots=True)
class OutgoingRequest:
    method: str
    target: str  # raw path plus query string, exactly as the client sent them
    body: bytes | StreamedBody
    headers_for: Callable[[Instance], list[tuple[bytes, bytes]]]
    timeouts: Timeouts

    @property
    def safe_to_repeat(self) -> bool:
        """May this be sent again after the instance may already have acted on it? Only an
        idempotent method: an Idempotency-Key makes a POST happen at most once
        (``idempotency.py``), never twice."""
        return self.method in IDEMPOTENT_METHODS

    @property
    def held_size(self) -> int:
        """What holding this request costs in bytes (a streamed body: its buffered prefix)."""
        return len(self.body) if isinstance(self.body, bytes) else self.body.prefix_size

    @property
    def can_resend(self) -> bool:
        return not isinstance(self.body, StreamedBody) or not self.body.started


class Attempts:
    """The attempt loop for every kind of request, and the owners it needs: found, confirmed,
    rediscovered after a failure, recorded."""

    def __init__(
        self,
        settings: Settings,
        instances: InstanceSet,
        health: HealthChecker,
        table: RoutingTable,
        discovery: Discovery,
        client: UpstreamClient,
        store: Store | None = None,
    ) -> None:
        self.settings = settings
        self.instances = instances
        self.health = health
        self.table = table
        self.discovery = discovery
        self.client = client
        self.store = store
        self.confirmations = Confirmations(settings.confirm_max_age)
        self.holds = Holds(settings, self._connected_holder)
        self._no_row: dict[str, float] = {}  # sessions without an active row, until when
        self.rediscoveries = 0
        self.busy: dict[str, int] = {}  # session id -> requests being forwarded for it now
        self.starting: set[str] = set()  # sessions the proxy itself is starting (restore, move)
        # Told where a session was found (without a database) and when its owner died holding
        # it: what a restore needs to know.
        self.on_owner: Callable[[str, Instance], None] | None = None
        self.on_owner_gone: Callable[[str, str | None], None] | None = None
        self._expected_at: OrderedDict[str, str] = OrderedDict()  # held session -> instance url
        self._next_look: dict[str, float] = {}  # held session -> next whole-fleet look

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

    async def now_on(self, session_id: str, instance: Instance) -> None:
        """The proxy itself started the session there and saw it connected (a restore, a move):
        route to it, write it back, release the requests held for it."""
        await self.table.put(session_id, instance.url)
        self.confirmations.confirm(session_id, instance.url)
        self.record(session_id, instance)
        self.holds.arrived(session_id, instance)

    def record(self, session_id: str, instance: Instance) -> None:
        """Tell the database where the session is (queued, written in batches)."""
        if self.store is not None:
            self.store.record(session_id, instance.alias)
        elif self.on_owner is not None:
            self.on_owner(session_id, instance)  # without a database, the restorer keeps it

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
            with tracing.span("rediscovery", session_id=session_id, reason=error.code):
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
                gone = OwnerGone(
                    f"the instance holding the session ({failed.url}) cannot be reached and no "
                    "other instance holds it"
                )
                gone.instance = failed.url
                raise gone from None
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
            stored = await self._stored_owner(session_id)
            if ask_store and stored is not None:
                await self.table.put(session_id, stored.url)
                return stored.url
            located = await self.discovery.locate(session_id, exclude, not_before, preferred=stored)
            if located.instance is not None:
                await self.table.put(session_id, located.instance.url)
                if located.probed:
                    self.confirmations.confirm(session_id, located.instance.url)
                if located.instance is not stored:
                    self.record(session_id, located.instance)
                return located.instance.url
            if located.asked == 0 and not self.instances.available():
                raise NoHealthyInstance()
            # (Nobody asked because the only healthy instance is the one that just said "Session
            # not found": that is an answer, not a fleet without instances.)
            if located.complete:
                await self.table.put_negative(session_id)
            return None

        url = await self.table.single_flight(session_id, lookup)
        instance = self.instances.get(url) if url else None
        if instance is None:
            raise SessionNotFound()
        return instance

    async def settle_copies(self, copies: dict[str, list[tuple[Instance, str]]]) -> None:
        """Sessions the fleet list shows on several instances: every replica must route to one
        copy. Without a database the rule alone decides; with one, the row breaks the tie, so
        the entry is forgotten and the next request reads it."""
        for session_id, holders in copies.items():
            if len(holders) < 2:
                continue
            if self.store is None:
                await self.table.put(session_id, choose_owner(holders).url)
            else:
                await self.table.forget(session_id)
            self.confirmations.forget(session_id)

    # --- the attempt loop ------------------------------------------------------------------------

    async def to_session(
        self, session_id: str, request: OutgoingRequest, role: Role = Role.REFUSES
    ) -> Attempted:
        """The session's owner answers; a session that should exist but that no live instance
        holds yet, or that is still starting on its owner, is held until it is connected
        (``hold.py``). A start is not held: it is placed."""
        if self.holds.queued(session_id) and role is not Role.STARTS:
            # Others wait for this session (or it is being moved): queue behind them.
            async with self.holds.turn(session_id, request.held_size) as owner:
                try:
                    return await self._counted(session_id, request, role, owner)
                except NotConnectedYet as starting:
                    return starting.answer
        try:
            return await self._counted(session_id, request, role)
        except NotConnectedYet as starting:
            if not await self._may_hold(session_id, request, role, None):
                return starting.answer  # the instance's own 400, as it said it
            await starting.answer.response.close()
            self.expect(session_id, starting.answer.instance.url)
            attempts = starting.answer.attempts
        except (SessionNotFound, OwnerGone) as error:
            if isinstance(error, OwnerGone):
                self.expect(session_id, error.instance)  # a restart restores it there
                if self.on_owner_gone is not None:
                    self.on_owner_gone(session_id, error.instance)
            if not await self._may_hold(session_id, request, role, error):
                raise
            attempts = error.attempts
        # Refused or never reached: nothing was carried out, so it may be sent once more.
        async with self.holds.turn(session_id, request.held_size) as owner:
            try:
                answer = await self._counted(session_id, request, role, owner)
            except NotConnectedYet as starting:
                answer = starting.answer
            answer.attempts += attempts
            return answer

    async def _counted(
        self, session_id: str, request: OutgoingRequest, role: Role, owner: Instance | None = None
    ) -> Attempted:
        """``_to_session``, counted in ``busy``: a move waits until a session has none."""
        busy = self.busy
        busy[session_id] = busy.get(session_id, 0) + 1
        try:
            # An owner handed over by the hold was seen holding it connected just now, even if
            # it is still ejected (an instance restarting behind its back-off): try it first.
            return await self._to_session(session_id, request, role, owner, owner is not None)
        finally:
            left = busy[session_id] - 1
            if left:
                busy[session_id] = left
            else:
                del busy[session_id]

    async def _may_hold(
        self, session_id: str, request: OutgoingRequest, role: Role, error: ProxyError | None
    ) -> bool:
        return (
            role is not Role.STARTS
            and self.settings.hold_timeout > 0  # holding is off: fail at once, as before
            and request.can_resend
            and await self._should_exist(session_id, error)
        )

    async def _should_exist(self, session_id: str, error: ProxyError | None) -> bool:
        if self.holds.expected(session_id) or isinstance(error, OwnerGone):
            return True  # others wait for it already, or its owner died holding it
        if session_id in self.starting:
            return True  # the proxy is starting it (a restore, a move)
        if self.store is None:
            return False
        now = time.monotonic()
        if self._no_row.get(session_id, 0.0) > now:
            return False  # asked a moment ago: a flood of unknown ids costs one query each
        try:
            if await self.store.is_active(session_id):
                return True  # the application expects it to run
        except StoreUnavailable:
            return False
        if len(self._no_row) >= 10_000:
            self._no_row = {k: t for k, t in self._no_row.items() if t > now}
        self._no_row[session_id] = now + self.settings.negative_ttl
        return False

    def expect(self, session_id: str, url: str | None) -> None:
        """Where a held session is most likely to come back: its owner that died (restarting
        restores it there), or where the proxy just placed it."""
        if url is None:
            return
        self._expected_at[session_id] = url
        self._expected_at.move_to_end(session_id)
        while len(self._expected_at) > 10_000:
            self._expected_at.popitem(last=False)

    async def _connected_holder(self, session_id: str) -> Instance | None:
        """For a held session's watcher: an instance holding it ``connected``, asked afresh.

        The instance it is expected back on is asked every poll, through one list call per
        instance shared by every session waiting there (so a thousand held sessions cost that
        instance one call per poll); the whole fleet at most every ``_FULL_LOOK`` seconds."""
        expected = self.instances.get(self._expected_at.get(session_id) or "")
        if expected is not None and not expected.draining:  # ejected too: it is restarting
            statuses = await self.discovery.statuses_on(expected, self.settings.hold_poll_interval)
            if isinstance(statuses, dict) and statuses.get(session_id) == CONNECTED:
                return await self._found(session_id, expected)
            now = time.monotonic()
            if self._next_look.get(session_id, 0.0) > now:
                return None
            self._next_look[session_id] = now + _FULL_LOOK
            if len(self._next_look) > 10_000:
                self._next_look = {k: t for k, t in self._next_look.items() if t > now}
        await self.table.forget(session_id)  # no negative entry may hide its return
        located = await self.discovery.locate(session_id)
        if located.instance is None or located.status != CONNECTED:
            return None
        return await self._found(session_id, located.instance)

    async def _found(self, session_id: str, instance: Instance) -> Instance:
        await self.table.put(session_id, instance.url)
        self.confirmations.confirm(session_id, instance.url)
        self.record(session_id, instance)
        self._expected_at.pop(session_id, None)
        self._next_look.pop(session_id, None)
        return instance

    async def _to_session(
        self,
        session_id: str,
        request: OutgoingRequest,
        role: Role,
        owner: Instance | None = None,
        seen_just_now: bool = False,
    ) -> Attempted:
        if owner is None:
            owner = await self.owner_of(session_id)
        deadline = time.monotonic() + self.settings.replay_deadline
        attempts = 0
        confirm = role is not Role.REFUSES
        try:
            while True:
                if not owner.healthy and not seen_just_now:
                    # Ejected (a draining owner still serves its sessions).
                    owner = await self.rediscover(
                        session_id, owner, UpstreamUnreachable(f"{owner.url} is ejected")
                    )
                seen_just_now = False
                try:
                    if confirm and not self.confirmations.is_fresh(session_id, owner.url):
                        await self._confirm(session_id, owner)
                    attempts += 1
                    answer = await self._attempt(
                        owner, request, attempts, session_aware=True, deadline=deadline
                    )
                    if answer is not None:
                        if not confirm and answer.response.status < 300:
                            # Only a holder answers a refusing route with success.
                            self.confirmations.confirm(session_id, owner.url)
                        if answer.not_connected:
                            raise NotConnectedYet(answer)
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

    async def _confirm(self, session_id: str, owner: Instance) -> None:
        """Ask the owner whether it holds the session; raise as its own answer would."""
        try:
            status = await self.discovery.probe(owner, session_id)
        except UpstreamUnreachable as error:
            _CONFIRM_FAILED.inc()
            self.health.eject(owner, error.detail)
            raise
        except ProxyError as error:
            _CONFIRM_FAILED.inc()
            self.health.record_failure(owner, error.detail)
            # Only the probe was sent, never the request itself: it may be tried again, but
            # nobody may conclude that the owner is gone (a start would then be placed twice).
            raise OwnerUnconfirmed(
                f"{owner.url} did not answer whether it holds the session ({error.detail}); "
                "nothing was sent"
            ) from error
        if status is None:
            _CONFIRM_NOT_HELD.inc()
            log.info(
                "owner does not hold the session; rediscovering before acting",
                extra={"session_id": session_id, "instance": owner.url},
            )
            raise SessionNotFound()
        _CONFIRM_HELD.inc()
        self.confirmations.confirm(session_id, owner.url)

    async def start(self, session_id: str, request: OutgoingRequest) -> Attempted:
        """Create, reconnect, regenerate-qr: to the holder if a live one has the session, else
        placed like a new session (an owner that died must not stop it from starting again)."""
        try:
            return await self.to_session(session_id, request, Role.STARTS)
        except (SessionNotFound, OwnerGone) as error:
            log.info(
                "no live instance holds the session; placing it",
                extra={"session_id": session_id, "reason": error.code},
            )
            answer = await self.place(session_id, request)
            answer.attempts += error.attempts
            return answer

    async def place(self, session_id: str, request: OutgoingRequest) -> Attempted:
        """Start the session on the least-loaded healthy instance and record it as the owner."""
        answer = await self.to_any(request, self.pick_least_loaded)
        if 200 <= answer.response.status < 300:
            self.expect(session_id, answer.instance.url)  # held requests look there first
            answer.instance.sessions += 1
            await self.table.put(session_id, answer.instance.url)
            self.confirmations.confirm(session_id, answer.instance.url)
            self.record(session_id, answer.instance)
        return answer

    async def to_every_holder(
        self, session_id: str, request: OutgoingRequest
    ) -> tuple[Attempted | None, int]:
        """A DELETE: sent to every instance that holds the session, and to no other (the
        gateway deletes the session's files even where it does not hold it). Returns the
        chosen owner's answer (None when nobody holds it) and how many copies were deleted."""
        stored = await self._stored_owner(session_id)
        located = await self.discovery.locate(session_id, preferred=stored, every_holder=True)
        if located.asked == 0:
            raise NoHealthyInstance()
        await self.table.forget(session_id)
        self.confirmations.forget(session_id)
        if not located.holders:
            if not located.complete:
                raise UpstreamUnreachable(
                    "not every instance could be asked whether it holds the session; "
                    "nothing was deleted"
                )
            return None, 0
        owner = located.instance
        assert owner is not None
        others = [instance for instance, _ in located.holders if instance is not owner]
        for instance in others:
            try:
                extra = await self._attempt(instance, request, 1, session_aware=False)
                if extra is not None:
                    await extra.response.read()
                log.info(
                    "deleted a second copy of the session",
                    extra={"session_id": session_id, "instance": instance.url},
                )
            except ProxyError as error:
                log.warning(
                    "could not delete a second copy of the session",
                    extra={"session_id": session_id, "instance": instance.url, "error": error.code},
                )
        answer = await self._attempt(owner, request, 1, session_aware=False)
        assert answer is not None
        return answer, len(located.holders)

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
                    answer = await self._attempt(
                        instance, request, attempts, session_aware=False, deadline=deadline
                    )
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
        self,
        instance: Instance,
        request: OutgoingRequest,
        attempts: int,
        session_aware: bool,
        deadline: float | None = None,
    ) -> Attempted | None:
        """One try; None means the instance said it does not hold the session.

        The first try has the route's own timeouts (longer than the instance's, so the instance
        gives up first); a replay gets what is left of ``deadline`` at most, so a stalling fleet
        cannot hold a request for several route timeouts in a row."""
        timeouts = request.timeouts
        if attempts > 1 and deadline is not None:
            timeouts = timeouts.within(deadline - time.monotonic())
        started = time.perf_counter()
        try:
            if tracing.TRACER is None:
                response = await self.client.send(
                    request.method,
                    instance.url,
                    request.target,
                    request.headers_for(instance),
                    request.body,
                    timeouts,
                )
            else:
                response = await self._traced_send(instance, request, attempts, timeouts)
            instance.upstream_seconds.observe(time.perf_counter() - started)
        except Overloaded:
            raise  # the proxy's own connection cap for that instance: not the instance's fault
        except UpstreamUnreachable as error:
            error.instance = instance.url
            self.health.eject(instance, error.detail)
            raise
        except ProxyError as error:
            error.instance = instance.url
            self.health.record_failure(instance, error.detail)
            raise
        self.health.record_success(instance)
        body = None
        if session_aware and response.status in (400, 404):
            # Read whatever the framing (a chunked "Session not found" too): these are small.
            body = await buffered_body(response, any_framing=True)
            if body is not None and is_session_not_found(response.status, body):
                return None
            if body is not None and is_not_connected(response.status, body):
                return Attempted(response, body, instance, attempts, not_connected=True)
        return Attempted(response, body, instance, attempts)

    async def _traced_send(
        self, instance: Instance, request: OutgoingRequest, attempt: int, timeouts: Timeouts
    ) -> UpstreamResponse:
        """The send under its attempt span; the instance gets that span as its parent."""
        with tracing.attempt_span(instance.url, attempt) as current:
            try:
                response = await self.client.send(
                    request.method,
                    instance.url,
                    request.target,
                    tracing.with_traceparent(request.headers_for(instance)),
                    request.body,
                    timeouts,
                )
            except ProxyError as error:
                tracing.record_error(current, error)
                raise
            current.set_attribute("http.response.status_code", response.status)
            return response

    def _check_replay(
        self, request: OutgoingRequest, error: ProxyError, attempts: int, deadline: float
    ) -> None:
        """Raise when this failure must end the request; return when another try is allowed."""
        never_reached = isinstance(error, UpstreamUnreachable | SessionNotFound | OwnerUnconfirmed)
        if isinstance(error, Overloaded):
            raise error  # 503 with Retry-After: the client should come back, not we retry
        if not request.can_resend:
            raise error
        if not never_reached and not request.safe_to_repeat:
            raise error
        if attempts >= self.settings.max_attempts or time.monotonic() >= deadline:
            exhausted = ReplayExhausted(
                f"gave up after {attempts} attempts; the last failed with {error.code}: "
                f"{error.detail}"
            )
            exhausted.maybe_sent = error.maybe_sent
            raise exhausted
        metrics.REPLAYS.labels(error.code).inc()

    def pick_any(self, tried: set[str]) -> Instance:
        for _ in range(len(self.instances)):
            instance = self.instances.next_available()
            if instance.url not in tried:
                return instance
        raise NoHealthyInstance("every healthy instance was tried")

    def pick_least_loaded(self, tried: set[str]) -> Instance:
        return self.instances.least_loaded(tried)
