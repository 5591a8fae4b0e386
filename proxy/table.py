"""The routing table: session id -> owning instance URL, on aiocache.

Two things make it safe under load. Concurrent misses for one session share one lookup (single
flight), so a burst for a session nobody knows yet costs the fleet one round of probes. Unknown
sessions are remembered for a short time (negative entries), so a flood of random ids costs
nothing after the first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiocache import SimpleMemoryCache

from . import metrics

# Stored for a session known to be on no instance; any real value is an instance URL.
NEGATIVE: Final = "-"
_HIT = metrics.TABLE_LOOKUPS.labels("hit")
_MISS = metrics.TABLE_LOOKUPS.labels("miss")
_NEGATIVE = metrics.TABLE_LOOKUPS.labels("negative")


class RoutingTable:
    def __init__(self, cache: Any | None = None, ttl: float = 3600.0, negative_ttl: float = 5.0):
        # timeout=None: aiocache otherwise wraps every call in asyncio.wait_for, which costs more
        # than the lookup itself for the in-memory backend.
        self.cache = cache if cache is not None else SimpleMemoryCache(timeout=None)
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self._inflight: dict[str, asyncio.Future[str | None]] = {}
        self.hits = 0
        self.misses = 0

    async def get(self, session_id: str) -> str | None:
        """The owner's URL, ``NEGATIVE`` for a remembered unknown, or None when not in the table."""
        value = await self.cache.get(session_id)
        if value is None:
            self.misses += 1
            _MISS.inc()
        elif value == NEGATIVE:
            _NEGATIVE.inc()
        else:
            self.hits += 1
            _HIT.inc()
        return value  # type: ignore[no-any-return]

    async def put(self, session_id: str, url: str) -> None:
        await self.cache.set(session_id, url, ttl=self.ttl)

    async def put_negative(self, session_id: str) -> None:
        if self.negative_ttl > 0:
            await self.cache.set(session_id, NEGATIVE, ttl=self.negative_ttl)

    async def forget(self, session_id: str) -> bool:
        return bool(await self.cache.delete(session_id))

    async def clear(self) -> None:
        await self.cache.clear()

    async def items(self) -> list[tuple[str, str]]:
        """Every positive entry, for the admin API and the CLI (in-memory backend)."""
        store: dict[str, Any] = getattr(self.cache, "_cache", {})
        return sorted((k, v) for k, v in store.items() if isinstance(v, str) and v != NEGATIVE)

    async def single_flight(
        self, session_id: str, lookup: Callable[[], Awaitable[str | None]]
    ) -> str | None:
        """Run ``lookup`` once for all concurrent callers asking about ``session_id``."""
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
            result = await lookup()
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

    async def close(self) -> None:
        await self.cache.close()
