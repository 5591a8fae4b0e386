"""Holding requests for a session that should exist but that no live instance holds yet.

When an owner dies, the session comes back seconds later (the instance restarts and restores its
sessions, or another one starts it). Failing every send in that window is what a plain proxy
does; Akka's cluster sharding and Vitess's vtgate buffer instead. Here a request for such a
session waits in that session's queue: one watcher per queue asks the fleet every
``HOLD_POLL_INTERVAL`` whether the session is ``connected`` somewhere, and once it is, the held
requests go there in arrival order, one at a time (each is released when the one before it has
its answer). A held request never left the proxy, so it is never a duplicate.

Bounds: ``HOLD_TIMEOUT`` per request, ``HOLD_MAX_PER_SESSION`` requests per queue and
``HOLD_MAX_BYTES`` of bodies in all; past any of them the client gets ``503 session-restoring``
with ``Retry-After``, and after a timeout the session fails fast for ``HOLD_FAIL_FAST`` seconds
instead of making every later request wait again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from . import metrics, tracing
from .config import Settings
from .errors import ProxyError, SessionRestoring
from .instances import Instance

log = logging.getLogger("session_proxy.hold")

Find = Callable[[str], Awaitable[Instance | None]]  # a connected holder, or None (yet)

_RELEASED = metrics.HOLDS.labels("released")
_EXPIRED = metrics.HOLDS.labels("expired")
_REFUSED = metrics.HOLDS.labels("refused")


@dataclass
class _Queue:
    waiters: deque[asyncio.Future[Instance]] = field(default_factory=deque)
    owner: Instance | None = None
    active: bool = False  # a released request is being forwarded; the next one waits for it
    watcher: asyncio.Task[None] | None = None
    paused: bool = False  # a move holds the session: only ``release`` says where it went


class Holds:
    def __init__(self, settings: Settings, find: Find) -> None:
        self._timeout = settings.hold_timeout
        self._per_session = settings.hold_max_per_session
        self._max_bytes = settings.hold_max_bytes
        self._poll = settings.hold_poll_interval
        self._fail_fast = settings.hold_fail_fast
        self._find = find
        self._queues: dict[str, _Queue] = {}
        self._failing: dict[str, float] = {}  # session -> until when it fails fast
        self._bytes = 0

    def queued(self, session_id: str) -> bool:
        """Requests for this session wait now: a new one must queue behind them, not overtake."""
        return session_id in self._queues

    def expected(self, session_id: str) -> bool:
        """Requests for this session are waiting now, or waited in vain a moment ago (so it is
        expected back, and a new request joins them or fails fast)."""
        return session_id in self._queues or self._failing.get(session_id, 0.0) > time.monotonic()

    @contextlib.asynccontextmanager
    async def turn(self, session_id: str, size: int) -> AsyncIterator[Instance]:
        """Wait until the session is connected somewhere and it is this request's turn; yields
        the instance to send to. Raises ``SessionRestoring`` past a bound."""
        self._refuse_if_over_bounds(session_id, size)
        queue = self._queues.get(session_id)
        if queue is None:
            queue = self._queues[session_id] = _Queue()
            queue.watcher = asyncio.create_task(self._watch(session_id, queue))
        waiter: asyncio.Future[Instance] = asyncio.get_running_loop().create_future()
        queue.waiters.append(waiter)
        self._bytes += size
        metrics.HOLDS_CURRENT.inc()
        started = time.monotonic()
        try:
            try:
                with tracing.span("hold", session_id=session_id):
                    async with asyncio.timeout(self._timeout):
                        owner = await asyncio.shield(waiter)
            except TimeoutError:
                if not (waiter.done() and not waiter.cancelled()):
                    self._expire(session_id)
                owner = waiter.result()  # released just as the time ran out: take the turn
            waited = time.monotonic() - started
            _RELEASED.inc()
            metrics.HOLD_SECONDS.observe(waited)
            log.info(
                "held request released",
                extra={"session_id": session_id, "instance": owner.url, "held_ms": waited * 1000},
            )
            yield owner
        finally:
            self._bytes -= size
            metrics.HOLDS_CURRENT.dec()
            handed_the_turn = waiter.done() and not waiter.cancelled()
            if not waiter.done():
                waiter.cancel()
            with contextlib.suppress(ValueError):
                queue.waiters.remove(waiter)
            if handed_the_turn:  # forwarded, failed or cancelled: the next one goes now
                queue.active = False
                self._next(queue)
            if not queue.waiters and not queue.active and not queue.paused:
                self._close(session_id, queue)

    # --- moves and restores ----------------------------------------------------------------------

    def pause(self, session_id: str) -> None:
        """Hold every new request for this session until ``release`` (a move: break before
        make). A request already released keeps going; the next one waits."""
        queue = self._queues.get(session_id)
        if queue is None:
            queue = self._queues[session_id] = _Queue()
        queue.paused = True
        queue.owner = None
        if queue.watcher is not None:
            queue.watcher.cancel()
            queue.watcher = None

    def release(self, session_id: str, owner: Instance | None) -> None:
        """End a pause: the held requests go to ``owner`` in order; with None, they wait until
        the session is found connected somewhere, as any held request does."""
        queue = self._queues.get(session_id)
        if queue is None or not queue.paused:
            return
        queue.paused = False
        if not queue.waiters and not queue.active:
            self._close(session_id, queue)
        elif owner is not None:
            queue.owner = owner
            self._next(queue)
        else:
            queue.watcher = asyncio.create_task(self._watch(session_id, queue))

    def arrived(self, session_id: str, owner: Instance) -> None:
        """The session is connected on ``owner`` (the proxy started it there): release its
        held requests now rather than at the watcher's next look."""
        queue = self._queues.get(session_id)
        if queue is None or queue.paused or queue.owner is not None:
            return
        queue.owner = owner
        if queue.watcher is not None:
            queue.watcher.cancel()
            queue.watcher = None
        self._next(queue)

    def _expire(self, session_id: str) -> None:
        _EXPIRED.inc()
        self._failing[session_id] = time.monotonic() + self._fail_fast
        log.warning(
            "held request expired: the session did not come back in time",
            extra={"session_id": session_id, "hold_timeout": self._timeout},
        )
        raise SessionRestoring(
            f"the session did not come back on any instance within {self._timeout:g} s",
            retry_after=max(1, round(self._fail_fast)),
        )

    def _refuse_if_over_bounds(self, session_id: str, size: int) -> None:
        now = time.monotonic()
        until = self._failing.get(session_id)
        why = None
        if until is not None and now < until:
            why = "it did not come back in time a moment ago"
        elif until is not None:
            del self._failing[session_id]
        queue = self._queues.get(session_id)
        if why is None and queue is not None and len(queue.waiters) >= self._per_session:
            why = f"{self._per_session} requests for it are waiting already"
        if why is None and self._bytes + size > self._max_bytes:
            why = "the proxy holds as many request bytes as it may"
        if why is not None:
            _REFUSED.inc()
            raise SessionRestoring(
                f"the session is not running on any instance yet, and {why}",
                retry_after=max(1, round(self._fail_fast)),
            )

    def _next(self, queue: _Queue) -> None:
        """Release the next waiter, if the owner is known and nobody is being forwarded."""
        if queue.active or queue.owner is None:
            return
        while queue.waiters:
            waiter = queue.waiters.popleft()
            if not waiter.done():
                waiter.set_result(queue.owner)
                queue.active = True
                return

    async def _watch(self, session_id: str, queue: _Queue) -> None:
        while queue.owner is None:
            try:
                owner = await self._find(session_id)
            except ProxyError:
                owner = None  # the fleet could not be asked this time: ask again
            if owner is not None:
                queue.owner = owner
                self._next(queue)
                return
            await asyncio.sleep(self._poll)

    def _close(self, session_id: str, queue: _Queue) -> None:
        if self._queues.get(session_id) is queue:
            del self._queues[session_id]
        if queue.watcher is not None and not queue.watcher.done():
            queue.watcher.cancel()

    async def close(self) -> None:
        watchers = [q.watcher for q in self._queues.values() if q.watcher is not None]
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        self._queues.clear()
