"""Per-session send pacing (``SEND_RATE``, ``SEND_BURST``): sends over budget wait, in order.

WhatsApp bans numbers that send too fast, and a fleet of application workers has no common idea
of "too fast" for one session. Here every send on a ``SEND_ROUTES`` route (a bulk send counts one
message per entry of its body's ``recipients`` list, at least 1) is paced per session by GCRA,
the generic cell rate algorithm, used as a *reservation*:

- each session has a theoretical arrival time ``tat`` (when its budget is whole again);
  ``interval = 1 / SEND_RATE`` and ``tolerance = (SEND_BURST - 1) * interval``;
- a send arriving at ``now`` gets the slot ``max(now, tat - tolerance)``: its delay is
  ``slot - now``. If that delay is at most ``SEND_MAX_WAIT`` the slot is reserved (``tat``
  becomes ``max(tat, now) + cost * interval``) and the send sleeps until it; otherwise nothing
  is reserved and the client gets ``429 rate-limited`` at once, with ``Retry-After`` the seconds
  beyond the limit (at least 1). A send of cost n (a bulk send) needs one slot to start and
  moves ``tat`` by n intervals: the next send waits n intervals after it;
- at most ``SEND_QUEUE_MAX`` sends of a session wait (on this replica) at a time; one more is
  refused before it reserves anything, ``Retry-After`` one interval (a place frees about then).

**Order.** Sends of one session leave in the order they arrived. Reservations of a session are
made one at a time (a FIFO lock around the reservation alone, not the sleep), so a later arrival
never gets an earlier slot, and each reserved send also waits until the send reserved before it
on this replica has been released (a chain of events).

**Robust spacing.** A slot is a promise about the reservation clock; the send reaches the
instance after a timer that fires late (or, with uvloop's millisecond clock, up to a millisecond
early) and after forwarding, whose time varies by milliseconds under load. Slots strictly
``interval`` apart then land closer than ``interval`` at the instance (measured: 1 s slots as
close as 0.993 s). So each replica also paces what it actually did:

- it runs the same GCRA over the moments its sends were *released* (``released_tat``), and a
  send goes at ``max(reserved slot, released_tat - tolerance)``, re-sleeping when a timer fires
  early;
- and a send's interval counts from the *answer* of the session's previous send (the end of
  its request), not only from its release, but never from later than ``SETTLE`` (5%) of an
  interval after that release: the previous send reached the instance before its answer came
  back, so with ``SEND_BURST=1`` two sends of a session sent by one replica arrive at the
  instance at least ``interval`` apart whatever the timers and the forwarding did, whenever the
  instance answers within 5% of an interval (a fast instance, or a slow rate); a slower answer
  still leaves that 5% of margin for forwarding jitter and the instance's own scheduling (2%,
  20 ms at 60/min, was not enough on a loaded 2-core machine: 0.9996 s once at the instance).

The price, only while a session is backlogged: each send waits up to 5% of an interval (its
predecessor's answer time, capped) plus its timer's lateness beyond its reserved slot, so a
backlogged session sends up to ~5% below its rate, and a send may wait that much longer than
its reservation said.

**Cancellation.** A waiting send whose request task is cancelled (shutdown, or a caller that
watches for its client going away) never leaves: the sends behind it move up in the chain at
once (they still keep their own slots). Its reservation is given back only when no later send
has reserved after it (compare-and-set of ``tat``, locally or in Redis); otherwise its slot stays
spent, as an idle gap. Giving back a slot in the middle of a queue would let the next arrival
take a slot earlier than sends already queued, breaking the order; the gap costs at most one
interval per cancelled send, and never lets a session go faster than its rate. (A client that
just closes its connection does not cancel its request: uvicorn lets the task run, so that send
still goes at its slot. Keep ``SEND_MAX_WAIT`` under the clients' own timeout, Laravel's 30 s
for the default 20 s, so that a waiting send's client is still there to hear the answer.)

**Replicas.** With ``CACHE_URL=redis://...`` the budget (``tat``) is shared by every replica: one
Lua script per send does the whole reservation atomically with Redis's own clock (``TIME``), so
replicas need no synchronised clocks; keys are ``session-proxy-pace:<session id>`` (outside the
routing table's ``session-proxy:*`` keys) and expire once the budget is whole again. Each replica
keeps the order and the robust spacing of its own sends; across replicas sends are ordered by their
reservations in Redis, and two replicas' sends to one session may land closer than an interval to
each other (by their forwarding jitter), while their combined rate stays the rate. If Redis fails or
answers slower than 250 ms, that send is paced by the replica's own copy of the budget (kept up to
date from every Redis answer, so a backlog keeps its place) and is never failed for it; one warning
per outage, Redis is left alone for 2 s after a failure, and an info line when it answers again.
Without Redis each replica (and each ``WORKERS`` process) paces alone.

**Memory.** Per session: a lock, a chain link, a count, two times and its last send; a session
whose budget is whole again and that has nothing waiting is forgotten at the next sweep (every
30 s). In Redis a session's key expires when its budget is whole again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

from . import metrics
from .attempts import StreamedBody
from .config import Settings
from .errors import RateLimited

log = logging.getLogger("session_proxy.pacing")

SHARED_TIMEOUT: Final = 0.25  # seconds a Redis reservation may take before the local one answers
SHARED_RETRY_AFTER: Final = 2.0  # seconds Redis is left alone after a failure
SWEEP_EVERY: Final = 30.0  # seconds between sweeps of idle sessions
SETTLE: Final = 0.05  # of an interval: how long past its release a send's answer is waited for
REDIS_PREFIX: Final = "session-proxy-pace:"
_PARSED_INLINE: Final = 64 * 1024  # larger bodies are parsed for `recipients` off the event loop

_IMMEDIATE = metrics.PACED.labels("immediate")
_WAITED = metrics.PACED.labels("waited")
_REFUSED = metrics.PACED.labels("refused")

# KEYS[1]: the session's key. ARGV: the charge (cost * interval), the tolerance and the longest
# wait, all in microseconds. Returns {reserved (1/0), delay, tat - now, the new tat}: the delay
# until this send's slot and the tat, both in microseconds from Redis's now.
_RESERVE: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
local delay = tat - tonumber(ARGV[2]) - now
if delay < 0 then delay = 0 end
if delay > tonumber(ARGV[3]) then
  return {0, delay, tat - now, ''}
end
local new = string.format('%.0f', tat + tonumber(ARGV[1]))
redis.call('SET', KEYS[1], new, 'PX', math.ceil((tonumber(new) - now) / 1000) + 1000)
return {1, delay, tonumber(new) - now, new}
"""

# Give a reservation back, only if nobody reserved after it. ARGV: the tat it set, its charge.
_REFUND: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local back = tonumber(ARGV[1]) - tonumber(ARGV[2])
if back <= now then
  redis.call('DEL', KEYS[1])
else
  local ttl = math.ceil((back - now) / 1000) + 1000
  redis.call('SET', KEYS[1], string.format('%.0f', back), 'PX', ttl)
end
return 1
"""


def gcra(
    tat: float, now: float, charge: float, tolerance: float, max_wait: float
) -> tuple[bool, float, float]:
    """One reservation: ``(reserved, delay until the slot, the session's tat afterwards)``.

    The same arithmetic as ``_RESERVE``; a refusal leaves ``tat`` as it was."""
    start = max(tat, now)
    delay = max(0.0, start - tolerance - now)
    if delay > max_wait:
        return False, delay, tat
    return True, delay, start + charge


def send_cost(body: bytes | StreamedBody) -> int:
    """Messages a send counts for: a body's ``recipients`` list length (a bulk send), else 1."""
    if not isinstance(body, bytes) or (len(body) > _PARSED_INLINE and b"recipients" not in body):
        return 1  # a streamed body is far too large to be a bulk send: one message
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return 1  # the instance refuses it anyway; it still counts
    recipients = parsed.get("recipients") if isinstance(parsed, dict) else None
    return max(1, len(recipients)) if isinstance(recipients, list) else 1


@dataclass
class _Sent:
    """The session's last send that left this replica."""

    released: float  # monotonic
    charge: float
    answered: float | None = None  # when its request ended (its answer had come back)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def answer(self, _task: object = None) -> None:
        self.answered = time.monotonic()
        self.done.set()


@dataclass
class _Session:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one reservation at a time (FIFO)
    tail: asyncio.Event | None = None  # set when the last reserved send is released or gone
    waiting: int = 0  # sends in this session's queue now (reserving or sleeping)
    tat: float = 0.0  # the budget, local copy (monotonic): alone, or while Redis is down
    released_tat: float = 0.0  # GCRA over the moments sends were released (robust spacing)
    last: _Sent | None = None


@dataclass
class _Reservation:
    slot: float  # monotonic: when this send may go
    tat: float  # the local tat it set (refund check), or 0 when it came from Redis
    token: str  # the tat it set in Redis (refund compare-and-set), or '' when local


class _SharedBudget:
    """The budget in Redis: one script call per send."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        self.errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self._redis: Any = aioredis.from_url(
            url, socket_timeout=SHARED_TIMEOUT, socket_connect_timeout=SHARED_TIMEOUT
        )
        self._reserve: Any = self._redis.register_script(_RESERVE)
        self._refund: Any = self._redis.register_script(_REFUND)

    async def reserve(
        self, session_id: str, charge: int, tolerance: int, max_wait: int
    ) -> tuple[bool, int, int, str]:
        async with asyncio.timeout(SHARED_TIMEOUT):
            reply = await self._reserve(
                keys=[REDIS_PREFIX + session_id], args=[charge, tolerance, max_wait]
            )
        token = reply[3].decode() if isinstance(reply[3], bytes) else str(reply[3])
        return bool(reply[0]), int(reply[1]), int(reply[2]), token

    async def refund(self, session_id: str, token: str, charge: int) -> bool:
        async with asyncio.timeout(SHARED_TIMEOUT):
            return bool(await self._refund(keys=[REDIS_PREFIX + session_id], args=[token, charge]))

    async def close(self) -> None:
        with contextlib.suppress(*self.errors):
            await self._redis.aclose()


def _us(seconds: float) -> int:
    return round(seconds * 1_000_000)


class Pacer:
    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.send_rate > 0
        self._interval = 1.0 / settings.send_rate if self.enabled else 0.0
        self._tolerance = (settings.send_burst - 1) * self._interval
        self._settle = SETTLE * self._interval
        self._routes = frozenset(settings.send_routes)
        self._queue_max = settings.send_queue_max
        self._max_wait = settings.send_max_wait
        self._sessions: dict[str, _Session] = {}
        self._next_sweep = time.monotonic() + SWEEP_EVERY
        self._shared: _SharedBudget | None = None
        self._shared_errors: tuple[type[BaseException], ...] = ()
        self._shared_down_until = 0.0
        self._shared_down = False
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False
        if not self.enabled:
            return
        if settings.cache_url.startswith(("redis://", "rediss://")):
            self._shared = _SharedBudget(settings.cache_url)
            self._shared_errors = self._shared.errors
        elif settings.workers > 1:
            log.warning(
                "SEND_RATE is paced by each worker process alone (no CACHE_URL=redis://): "
                "a session may send up to WORKERS times the rate",
                extra={"workers": settings.workers},
            )

    @property
    def sessions(self) -> int:
        """Sessions with pacing state now (for tests and the curious)."""
        return len(self._sessions)

    async def wait(
        self, method: str, path: str, session_id: str, body: bytes | StreamedBody
    ) -> None:
        """Return when this send may go; raise ``RateLimited`` when it may not wait."""
        if not self.enabled or f"{method} {path}" not in self._routes:
            return
        if isinstance(body, bytes) and len(body) > _PARSED_INLINE:
            cost = await asyncio.to_thread(send_cost, body)
        else:
            cost = send_cost(body)
        started = time.monotonic()
        if started >= self._next_sweep:
            self._sweep(started)
        state = self._sessions.get(session_id)
        if state is None:
            state = self._sessions[session_id] = _Session()
        if state.waiting >= self._queue_max:
            _REFUSED.inc()
            raise RateLimited(
                f"{state.waiting} sends of this session are waiting already "
                f"(SEND_QUEUE_MAX={self._queue_max})",
                retry_after=max(1, math.ceil(self._interval)),
            )
        charge = cost * self._interval
        state.waiting += 1
        metrics.PACE_QUEUED.inc()
        done: asyncio.Event | None = None
        reservation: _Reservation | None = None
        slept = False
        try:
            async with state.lock:
                reservation = await self._reserve(session_id, state, charge)
                previous, done = state.tail, asyncio.Event()
                state.tail = done
            if previous is not None:
                await previous.wait()
            slept = await self._until_free(state, reservation.slot)
            released = time.monotonic()
            state.released_tat = max(state.released_tat, released) + charge
            state.last = sent = _Sent(released, charge)
            task = asyncio.current_task()
            if task is not None:
                task.add_done_callback(sent.answer)  # the request ends: its answer is back
            reservation = None  # used: nothing to give back
        except asyncio.CancelledError:
            if reservation is not None:
                self._give_back(session_id, state, reservation, charge)
            raise
        finally:
            state.waiting -= 1
            metrics.PACE_QUEUED.dec()
            if done is not None:
                done.set()
                if state.tail is done:
                    state.tail = None
        (_WAITED if slept else _IMMEDIATE).inc()
        metrics.PACE_WAIT_SECONDS.observe(released - started)

    async def _until_free(self, state: _Session, slot: float) -> bool:
        """Sleep until the reserved ``slot`` and until this replica's own record of the
        session's sends allows it (see "Robust spacing"); True if it had to wait."""
        slept = False
        go = max(slot, state.released_tat - self._tolerance)
        while True:
            now = time.monotonic()
            if go > now:
                slept = True
                await asyncio.sleep(go - now)  # again if the timer fired early
                continue
            last = state.last
            if last is None:
                return slept
            settled = last.released + self._settle
            if settled + last.charge - self._tolerance <= now:
                return slept  # its answer can no longer matter
            if last.answered is None and now < settled:
                slept = True
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(settled - now):
                        await last.done.wait()
                continue
            answered = settled if last.answered is None else min(last.answered, settled)
            go = max(go, answered + last.charge - self._tolerance)
            if go <= now:
                return slept

    # --- reservations ----------------------------------------------------------------------------

    async def _reserve(self, session_id: str, state: _Session, charge: float) -> _Reservation:
        shared = None if self._closed else self._shared
        if shared is not None and time.monotonic() >= self._shared_down_until:
            call = asyncio.ensure_future(
                shared.reserve(session_id, _us(charge), _us(self._tolerance), _us(self._max_wait))
            )
            try:
                reply = await asyncio.shield(call)
            except asyncio.CancelledError:
                # Cancelled while Redis was asked: give back whatever it reserves.
                call.add_done_callback(self._abandoned(session_id, _us(charge)))
                raise
            except shared.errors as exc:
                self._shared_failed(exc)
            else:
                self._shared_up()
                reserved, delay_us, tat_us, token = reply
                now = time.monotonic()
                if not reserved:
                    raise self._too_long(delay_us / 1e6)
                # The local copy follows the shared budget: if Redis goes away, a backlog keeps
                # its place instead of starting afresh.
                state.tat = max(state.tat, now + tat_us / 1e6)
                return _Reservation(slot=now + delay_us / 1e6, tat=0.0, token=token)
        now = time.monotonic()
        reserved, delay, tat = gcra(state.tat, now, charge, self._tolerance, self._max_wait)
        if not reserved:
            raise self._too_long(delay)
        state.tat = tat
        return _Reservation(slot=now + delay, tat=tat, token="")

    def _too_long(self, delay: float) -> RateLimited:
        _REFUSED.inc()
        return RateLimited(
            f"this send would wait {delay:.1f} s for its session's budget; "
            f"the limit is SEND_MAX_WAIT={self._max_wait:g} s",
            retry_after=max(1, math.ceil(delay - self._max_wait)),
        )

    def _give_back(
        self, session_id: str, state: _Session, reservation: _Reservation, charge: float
    ) -> None:
        """A reserved send that will not leave: return its slot if nobody reserved after it."""
        if not reservation.token:
            if state.tat == reservation.tat:
                state.tat -= charge
            return
        self._spawn(self._refund(session_id, reservation.token, _us(charge)))

    def _abandoned(
        self, session_id: str, charge: int
    ) -> Callable[[asyncio.Future[tuple[bool, int, int, str]]], None]:
        def done(call: asyncio.Future[tuple[bool, int, int, str]]) -> None:
            if call.cancelled() or call.exception() is not None:
                return
            reserved, _, _, token = call.result()
            if reserved:
                self._spawn(self._refund(session_id, token, charge))

        return done

    async def _refund(self, session_id: str, token: str, charge: int) -> None:
        if self._shared is not None:
            with contextlib.suppress(*self._shared_errors):
                await self._shared.refund(session_id, token, charge)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        if self._closed:  # shutting down: the reservation simply stays spent
            coroutine.close()
            return
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- Redis health ----------------------------------------------------------------------------

    def _shared_failed(self, exc: BaseException) -> None:
        self._shared_down_until = time.monotonic() + SHARED_RETRY_AFTER
        if not self._shared_down:
            self._shared_down = True
            log.warning(
                "shared pacing (Redis) failed; sends are paced by this replica alone until it "
                "answers again",
                extra={"error": f"{type(exc).__name__}: {exc}", "retry_in": SHARED_RETRY_AFTER},
            )

    def _shared_up(self) -> None:
        if self._shared_down:
            self._shared_down = False
            log.info("shared pacing (Redis) answers again")

    # --- memory ----------------------------------------------------------------------------------

    def _sweep(self, now: float) -> None:
        """Forget sessions with nothing waiting whose budget is whole again."""
        self._next_sweep = now + SWEEP_EVERY
        idle = [
            sid
            for sid, s in self._sessions.items()
            if not s.waiting and s.tail is None and max(s.tat, s.released_tat + self._settle) <= now
        ]
        for sid in idle:
            del self._sessions[sid]

    async def close(self) -> None:
        self._closed = True
        for task in list(self._background):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, SHARED_TIMEOUT * 2)
        self._sessions.clear()
        if self._shared is not None:
            await self._shared.close()
