"""The routing table: session id -> owning instance URL.

In process by default; on Redis through aiocache (``CACHE_URL=redis://...``) when replicas should
share one table. The in-process table is a dict whose entries carry their expiry time and are
dropped when read after it (plus a sweep now and then), not aiocache's memory backend: measured
on 100,000 sessions, that backend costs ~5 us a lookup and a timer per key (54 MiB), this one
~0.3 us and no timers. A Redis that fails or is slow never fails a request: the operation is
answered from the in-process table (with a log line and a metric), and Redis is left alone for a
moment before it is tried again, so an outage costs one timeout, not one per request.

Two things make it safe under load. Concurrent misses for one session share one lookup (single
flight), so a burst for a session nobody knows yet costs the fleet one round of probes. Unknown
sessions are remembered for a short time (negative entries), so a flood of random ids costs
nothing after the first.

With Redis, single flight spans replicas: the replica that looks a session up first holds a short
lease (``session-proxy-lookup:<id>``, SET NX PX); the others poll the table key for what it
writes, and look the session up themselves only when the lease runs out or Redis fails. Owners
are written through to the in-process table as well (and copied there on a shared hit), so a
Redis outage does not make every replica learn every session again from the fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import urlsplit

from . import metrics
from .config import ConfigError

log = logging.getLogger("session_proxy.table")

# Stored for a session known to be on no instance; any real value is an instance URL.
NEGATIVE: Final = "-"
# Counted on every request: tallied without prometheus-client's lock, added at each scrape.
_HIT = metrics.counter(metrics.TABLE_LOOKUPS.labels("hit"))
_MISS = metrics.counter(metrics.TABLE_LOOKUPS.labels("miss"))
_NEGATIVE = metrics.counter(metrics.TABLE_LOOKUPS.labels("negative"))


SHARED_TIMEOUT = 0.25  # seconds a shared-table call may take before the local one answers
SHARED_RETRY_AFTER = 2.0  # seconds the shared table is left alone after a failure
NAMESPACE = "session-proxy"  # table keys: session-proxy:<session id>
LEASE_NAMESPACE = "session-proxy-lookup"  # lookup leases, outside the table's key space
LEASE_SECONDS = 2.0  # a lookup lease's life: longer than a probe round usually takes
LEASE_POLL = 0.02  # seconds between looks at the table key while another replica looks up
# Compare-and-delete: a lease that ran out and was taken by another replica is not ours to end.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end"


def make_cache(url: str) -> Any:
    """The aiocache backend for ``CACHE_URL`` (``memory://`` or ``redis://host:port/db``)."""
    parts = urlsplit(url)
    if parts.scheme == "memory":
        return None
    try:
        from aiocache import RedisCache
        from aiocache.serializers import StringSerializer
    except ImportError as exc:  # aiocache imports its Redis backend only when redis is there
        raise ConfigError(
            f"SESSION_PROXY_CACHE_URL={parts.scheme}://...: the Redis table needs the 'redis' "
            f"package, which is missing ({exc}); reinstall session-proxy"
        ) from None

    db = int(parts.path.strip("/") or 0)
    return RedisCache(
        serializer=StringSerializer(),
        endpoint=parts.hostname or "127.0.0.1",
        port=parts.port or 6379,
        db=db,
        password=parts.password,
        namespace=NAMESPACE,
        timeout=SHARED_TIMEOUT,
        ssl=parts.scheme == "rediss",
    )


SWEEP_EVERY = 30.0  # seconds between sweeps of expired in-process entries


class LocalTable:
    """An in-process table with per-entry expiry, with the calls the shared one has."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[str, float]] = {}
        self._next_sweep = time.monotonic() + SWEEP_EVERY

    async def get(self, key: str) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] < time.monotonic():
            self._entries.pop(key, None)
            return None
        return entry[0]

    async def set(self, key: str, value: str, ttl: float) -> None:
        now = time.monotonic()
        self._entries[key] = (value, now + ttl)
        if now >= self._next_sweep:
            # Ids asked for once (a flood of random ones) would otherwise stay for ever.
            self._next_sweep = now + SWEEP_EVERY
            for stale in [k for k, (_, expires) in self._entries.items() if expires < now]:
                del self._entries[stale]

    def remember(self, key: str, value: str, ttl: float) -> None:
        """Keep a copy of what the shared table says, rewriting only what differs."""
        entry = self._entries.get(key)
        if entry is None or entry[0] != value:
            self._entries[key] = (value, time.monotonic() + ttl)

    async def delete(self, key: str) -> int:
        return 1 if self._entries.pop(key, None) is not None else 0

    async def clear(self) -> None:
        self._entries.clear()

    def pairs(self) -> list[tuple[str, str]]:
        now = time.monotonic()
        return [(k, v) for k, (v, expires) in self._entries.items() if expires >= now]

    def __len__(self) -> int:
        return len(self._entries)

    async def close(self) -> None:
        self._entries.clear()


class RoutingTable:
    def __init__(
        self, cache: Any | None = None, ttl: float = 3600.0, negative_ttl: float = 5.0
    ) -> None:
        self.local = LocalTable()
        self.shared: Any = cache
        # What a failing shared table raises; anything else is a bug and is not hidden as "Redis
        # down".
        self._shared_errors: tuple[type[BaseException], ...] = (OSError, TimeoutError)
        if cache is not None:
            from redis.exceptions import RedisError

            self._shared_errors += (RedisError,)
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self._inflight: dict[str, asyncio.Future[str | None]] = {}
        self._shared_down_until = 0.0
        self.hits = 0
        self.misses = 0
        self.lookups = 0  # lookups this process ran itself
        self.shared_answers = 0  # lookups answered by another replica's, through the lease

    @property
    def cache(self) -> Any:
        """Where operations go now: the shared table, or the local one while it is failing."""
        if self.shared is not None and time.monotonic() >= self._shared_down_until:
            return self.shared
        return self.local

    async def _call(self, operation: str, *args: Any, **kwargs: Any) -> Any:
        cache = self.cache
        if cache is self.local:
            return await getattr(cache, operation)(*args, **kwargs)
        try:
            return await getattr(cache, operation)(*args, **kwargs)
        except self._shared_errors as exc:  # the shared table failed: answer locally
            self._shared_failed(exc)
            return await getattr(self.local, operation)(*args, **kwargs)

    def _shared_failed(self, exc: BaseException) -> None:
        if time.monotonic() >= self._shared_down_until:
            log.warning(
                "shared routing table failed; using the local table",
                extra={"error": f"{type(exc).__name__}: {exc}", "retry_in": SHARED_RETRY_AFTER},
            )
        self._shared_down_until = time.monotonic() + SHARED_RETRY_AFTER
        metrics.CACHE_FALLBACKS.inc()

    @property
    def shared_up(self) -> bool | None:
        if self.shared is None:
            return None
        return time.monotonic() >= self._shared_down_until

    async def get(self, session_id: str) -> str | None:
        """The owner's URL, ``NEGATIVE`` for a remembered unknown, or None when not in the table."""
        if self.shared is None:
            value = await self.local.get(session_id)
        else:
            value = await self._call("get", session_id)
            if value is not None and value != NEGATIVE and self.cache is self.shared:
                # Known here too, should Redis go away (one dict write when it changed).
                self.local.remember(session_id, value, self.ttl)
        if value is None:
            self.misses += 1
            _MISS.inc()
        elif value == NEGATIVE:
            _NEGATIVE.inc()
        else:
            self.hits += 1
            _HIT.inc()
        return value

    async def put(self, session_id: str, url: str) -> None:
        await self._call("set", session_id, url, ttl=self.ttl)
        if self.shared is not None:
            # Written through: after a Redis outage the replica still knows its owners. (Only
            # owners: a stale one costs one 404 and a rediscovery, and forget clears both.)
            await self.local.set(session_id, url, ttl=self.ttl)

    async def put_negative(self, session_id: str) -> None:
        if self.negative_ttl > 0:
            await self._call("set", session_id, NEGATIVE, ttl=self.negative_ttl)

    async def forget(self, session_id: str) -> bool:
        forgotten = bool(await self._call("delete", session_id))
        if self.shared is not None:
            # Whatever the local table learned while the shared one was down is stale too.
            forgotten = bool(await self.local.delete(session_id)) or forgotten
        return forgotten

    async def clear(self) -> None:
        await self._call("clear")
        if self.shared is not None:
            await self.local.clear()

    async def items(self) -> list[tuple[str, str]]:
        """Every positive entry, for the admin API and the CLI."""
        cache = self.cache
        pairs = self.local.pairs() if cache is self.local else await self._shared_items()
        return sorted((k, v) for k, v in pairs if isinstance(v, str) and v != NEGATIVE)

    async def _shared_items(self) -> list[tuple[str, Any]]:
        client = self.shared.client
        prefix = f"{self.shared.namespace}:" if self.shared.namespace else ""
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        if not keys:
            return []
        values = await client.mget(*keys)
        return [
            (
                k.decode()[len(prefix) :] if isinstance(k, bytes) else str(k)[len(prefix) :],
                v.decode() if isinstance(v, bytes) else v,
            )
            for k, v in zip(keys, values, strict=True)
        ]

    async def single_flight(
        self, session_id: str, lookup: Callable[[], Awaitable[str | None]]
    ) -> str | None:
        """Run ``lookup`` once for all concurrent callers asking about ``session_id``: in this
        process, and with Redis across every replica sharing it (``_across_replicas``)."""
        pending = self._inflight.get(session_id)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not pending.cancelled() or (task is not None and task.cancelling()):
                    raise
                # The caller that owned the lookup was cancelled, not us: look it up ourselves.
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._inflight[session_id] = future
        try:
            result = await self._across_replicas(session_id, lookup)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            # Mark retrieved: if nobody else was waiting, asyncio must not warn about it.
            future.exception()
            raise
        else:
            future.set_result(result)
            return result
        finally:
            if self._inflight.get(session_id) is future:
                del self._inflight[session_id]

    async def _across_replicas(
        self, session_id: str, lookup: Callable[[], Awaitable[str | None]]
    ) -> str | None:
        """With a shared table that is up: take the session's lookup lease and run ``lookup``,
        or, while another replica holds it, wait for what that one writes to the table. Redis
        failing, or the lease running out without an answer, means looking it up here."""
        deadline = time.monotonic() + LEASE_SECONDS
        token = secrets.token_hex(8)
        while self.cache is self.shared and time.monotonic() < deadline:
            try:
                leased = await self._lease(session_id, token)
            except self._shared_errors as exc:
                self._shared_failed(exc)
                break
            if leased:
                try:
                    return await self._run(lookup)
                finally:
                    await self._release(session_id, token)
            answered, value = await self._await_holder(session_id, deadline)
            if answered:
                self.shared_answers += 1
                return value
            # The lease ended without an answer (the holder's lookup failed, or found nothing
            # it could remember): take it ourselves, or wait for whoever took it first.
        return await self._run(lookup)

    async def _run(self, lookup: Callable[[], Awaitable[str | None]]) -> str | None:
        self.lookups += 1
        return await lookup()

    async def _lease(self, session_id: str, token: str) -> bool:
        try:
            await self.shared.add(session_id, token, ttl=LEASE_SECONDS, namespace=LEASE_NAMESPACE)
        except ValueError:  # aiocache's word for "SET NX found the key": another replica has it
            return False
        return True

    async def _release(self, session_id: str, token: str) -> None:
        key = f"{LEASE_NAMESPACE}:{session_id}"
        with contextlib.suppress(Exception):  # it runs out by itself within LEASE_SECONDS
            await asyncio.shield(self.shared.raw("eval", _RELEASE, 1, key, token))

    async def _await_holder(self, session_id: str, deadline: float) -> tuple[bool, str | None]:
        """Poll the table key while another replica holds the lease: (True, its owner, or None
        for a remembered unknown) once the holder wrote it; (False, None) once the lease is
        gone without an answer, has run out, or Redis failed."""
        keys = [f"{NAMESPACE}:{session_id}", f"{LEASE_NAMESPACE}:{session_id}"]
        while time.monotonic() < deadline:
            await asyncio.sleep(LEASE_POLL)
            try:
                value, lease = await self.shared.multi_get(keys, namespace="")
            except self._shared_errors as exc:
                self._shared_failed(exc)
                return False, None
            if value is not None:
                if value == NEGATIVE:
                    return True, None
                self.local.remember(session_id, value, self.ttl)
                return True, value
            if lease is None:
                return False, None
        return False, None

    async def close(self) -> None:
        await self.local.close()
        if self.shared is not None:
            with contextlib.suppress(Exception):
                await self.shared.close()
