"""Exactly once: a request with an ``Idempotency-Key`` is carried out at most once per key.

Stripe's semantics, adapted to a proxy. Keys are scoped per session (the same key on two
sessions is two keys). The first request claims the key and is forwarded; its outcome is stored
with a digest of the request (method, path, query, body):

- a repeat after it completed gets the stored answer without anything being forwarded, marked
  ``X-Proxy-Idempotent-Replay: true``;
- a repeat while the first is in flight waits for its outcome (``IDEMPOTENCY_WAIT``) and gets
  the same answer;
- a repeat with another body or route gets ``422 idempotency-key-mismatch``;
- a first attempt that ended ambiguous (sent, then no answer: the instance may have sent the
  message) is stored as such, so every repeat gets the same ``502 upstream-ambiguous`` and
  nothing is sent again: the application checks, then resends under a new key;
- a first attempt that never reached an instance (refused, no healthy instance, session not
  found, held too long, rate-limited) stores nothing: a repeat is a new first attempt.

The store: Postgres when a database is configured (the table ``session-proxy migrate``
creates, expired rows swept), else Redis when the routing table is on Redis, else memory; for
``IDEMPOTENCY_TTL``. While the configured store cannot be reached, keys are kept in memory (this
replica deduplicates alone until it is back). A first request's claim is a lease: a proxy that
died while forwarding leaves a claim that, once the lease ran out, answers as ambiguous.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from . import metrics
from .config import Settings
from .errors import IdempotencyMismatch, ProxyError
from .store import Store, StoreUnavailable

log = logging.getLogger("session_proxy.idempotency")

IN_FLIGHT, DONE, AMBIGUOUS = "in_flight", "done", "ambiguous"
_POLL = 0.05  # seconds between looks at a key another replica is still forwarding
_MEMORY_LIMIT = 100_000  # keys kept in memory (the oldest go first)
# Outside the routing table's "session-proxy:*" keys, which its listing scans.
_REDIS_PREFIX = "session-proxy-idempotency:"
# Answer headers a repeat gets again (the rest describe the first exchange, or are recomputed).
_KEPT_HEADERS = frozenset(
    {b"content-type", b"x-proxy-instance", b"x-proxy-attempts", b"x-proxy-error", b"retry-after"}
)


class IdempotencyInFlight(ProxyError):
    status, code = 409, "idempotency-key-in-flight"
    message = "a request with this Idempotency-Key is still being carried out; retry later"


class BackendDown(Exception):
    pass


@dataclass
class Record:
    digest: str
    state: str
    token: str
    status: int = 0
    headers: list[list[str]] = field(default_factory=list)
    body: bytes = b""
    body_omitted: bool = False
    lease_until: float = 0.0  # epoch seconds: an in-flight claim older than this is ambiguous

    def to_json(self) -> str:
        return json.dumps(
            {
                "digest": self.digest,
                "state": self.state,
                "token": self.token,
                "status": self.status,
                "headers": self.headers,
                "body": base64.b64encode(self.body).decode(),
                "body_omitted": self.body_omitted,
                "lease_until": self.lease_until,
            }
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Record:
        d = json.loads(text)
        return cls(
            d["digest"],
            d["state"],
            d["token"],
            int(d["status"]),
            [list(h) for h in d["headers"]],
            base64.b64decode(d["body"]),
            bool(d["body_omitted"]),
            float(d["lease_until"]),
        )


class Backend(Protocol):
    async def claim(self, key: str, record: Record, ttl: float) -> Record | None: ...
    async def finish(self, key: str, record: Record, ttl: float) -> None: ...
    async def release(self, key: str, token: str) -> None: ...
    async def close(self) -> None: ...


class MemoryBackend:
    def __init__(self) -> None:
        self._records: OrderedDict[str, tuple[Record, float]] = OrderedDict()

    async def claim(self, key: str, record: Record, ttl: float) -> Record | None:
        now = time.monotonic()
        held = self._records.get(key)
        if held is not None and held[1] > now:
            return held[0]
        self._records[key] = (record, now + ttl)
        self._records.move_to_end(key)
        while len(self._records) > _MEMORY_LIMIT:
            self._records.popitem(last=False)
        return None

    async def finish(self, key: str, record: Record, ttl: float) -> None:
        held = self._records.get(key)
        if held is not None and held[0].token == record.token:
            self._records[key] = (record, time.monotonic() + ttl)

    async def release(self, key: str, token: str) -> None:
        held = self._records.get(key)
        if held is not None and held[0].token == token and held[0].state == IN_FLIGHT:
            del self._records[key]

    async def close(self) -> None:
        pass


_FINISH = """
local current = redis.call('GET', KEYS[1])
if current and cjson.decode(current)['token'] == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 0
"""
_RELEASE = """
local current = redis.call('GET', KEYS[1])
if current then
  local record = cjson.decode(current)
  if record['token'] == ARGV[1] and record['state'] == 'in_flight' then
    redis.call('DEL', KEYS[1])
  end
end
return 0
"""


class RedisBackend:
    def __init__(self, url: str) -> None:
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError)
        parts = urlsplit(url)
        self._redis: Any = aioredis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._prefix = _REDIS_PREFIX + (parts.path.strip("/") or "0") + ":"

    async def _call(self, *args: Any) -> Any:
        try:
            return await self._redis.execute_command(*args)
        except self._errors as error:
            raise BackendDown(str(error)) from error

    async def claim(self, key: str, record: Record, ttl: float) -> Record | None:
        name = self._prefix + key
        if await self._call("SET", name, record.to_json(), "NX", "PX", int(ttl * 1000)):
            return None
        current = await self._call("GET", name)
        if current is None:  # expired just now: try once more
            if await self._call("SET", name, record.to_json(), "NX", "PX", int(ttl * 1000)):
                return None
            current = await self._call("GET", name)
        return Record.from_json(current) if current is not None else None

    async def finish(self, key: str, record: Record, ttl: float) -> None:
        await self._call(
            "EVAL", _FINISH, 1, self._prefix + key, record.token, record.to_json(), int(ttl * 1000)
        )

    async def release(self, key: str, token: str) -> None:
        await self._call("EVAL", _RELEASE, 1, self._prefix + key, token)

    async def close(self) -> None:
        with contextlib.suppress(*self._errors):
            await self._redis.aclose()


class PostgresBackend:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def claim(self, key: str, record: Record, ttl: float) -> Record | None:
        try:
            row = await self._store.idempotency_claim(
                key, record.digest, record.token, record.lease_until - time.time(), ttl
            )
        except StoreUnavailable as error:
            raise BackendDown(str(error)) from error
        if row is None:
            return None
        headers = row["headers"]
        return Record(
            row["digest"],
            row["state"],
            row["token"],
            row["status"],
            json.loads(headers) if isinstance(headers, str) else list(headers),
            bytes(row["body"]),
            row["body_omitted"],
            float(row["lease_until"]),
        )

    async def finish(self, key: str, record: Record, ttl: float) -> None:
        try:
            await self._store.idempotency_finish(
                key,
                record.token,
                record.state,
                record.status,
                json.dumps(record.headers),
                record.body,
                record.body_omitted,
                ttl,
            )
        except StoreUnavailable as error:
            raise BackendDown(str(error)) from error

    async def release(self, key: str, token: str) -> None:
        try:
            await self._store.idempotency_release(key, token)
        except StoreUnavailable as error:
            raise BackendDown(str(error)) from error

    async def close(self) -> None:
        pass


@dataclass
class Claim:
    """This request is the first for its key: forward it, then ``finish`` or ``release``."""

    key: str
    record: Record
    backend: Backend


@dataclass
class Replay:
    """The stored answer for a repeat."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def digest_of(method: str, target: str, body: bytes) -> str:
    h = hashlib.sha256(method.encode() + b" " + target.encode("latin-1") + b"\n")
    h.update(body)
    return h.hexdigest()


class Idempotency:
    def __init__(self, settings: Settings, store: Store | None) -> None:
        self._ttl = settings.idempotency_ttl
        self._wait = settings.idempotency_wait
        self._max_body = settings.idempotency_max_body
        # A claim outlives the longest a first request can take: held, paced, every attempt.
        longest_route = max((rt.seconds for rt in settings.route_timeouts), default=65.0)
        self._lease = (
            longest_route
            + settings.replay_deadline
            + settings.hold_timeout
            + settings.send_max_wait
            + 10.0
        )
        self._memory = MemoryBackend()
        self._backend: Backend
        if store is not None:
            self._backend, self.kind = PostgresBackend(store), "postgres"
        elif urlsplit(settings.cache_url).scheme in ("redis", "rediss"):
            self._backend, self.kind = RedisBackend(settings.cache_url), "redis"
        else:
            self._backend, self.kind = self._memory, "memory"
        self._store = store
        self._down = False

    async def begin(self, session_id: str | None, key: str, digest: str) -> Claim | Replay:
        """Claim the key for this request, or answer it as the first one was answered."""
        scoped = hashlib.sha256(f"{session_id or ''}\0{key}".encode()).hexdigest()
        record = Record(digest, IN_FLIGHT, uuid.uuid4().hex, lease_until=time.time() + self._lease)
        deadline = time.monotonic() + self._wait
        waited = False
        while True:
            backend = self._usable()
            try:
                existing = await backend.claim(scoped, record, self._ttl)
            except BackendDown as error:
                self._went_down(error)
                backend = self._memory
                existing = await backend.claim(scoped, record, self._ttl)
            if existing is None:
                metrics.IDEMPOTENCY.labels("first").inc()
                return Claim(scoped, record, backend)
            if existing.digest != digest:
                metrics.IDEMPOTENCY.labels("mismatch").inc()
                raise IdempotencyMismatch()
            if existing.state != IN_FLIGHT:
                metrics.IDEMPOTENCY.labels("waited" if waited else "replayed").inc()
                return self._replay(existing)
            if existing.lease_until < time.time():
                # The proxy forwarding the first died meanwhile: it may have been carried out.
                metrics.IDEMPOTENCY.labels("replayed").inc()
                return self._replay(_lost_lease(existing))
            if time.monotonic() >= deadline:
                raise IdempotencyInFlight(retry_after=1)
            waited = True
            await asyncio.sleep(_POLL)

    def _usable(self) -> Backend:
        if self._down and self._store is not None and self._store.up:
            self._down = False
            log.info("idempotency store reachable again", extra={"store": self.kind})
        return self._memory if self._down else self._backend

    def _went_down(self, error: BackendDown) -> None:
        if not self._down:
            self._down = True
            log.warning(
                "idempotency store unreachable: keys are kept in this replica's memory meanwhile",
                extra={"store": self.kind, "error": str(error)},
            )
        metrics.IDEMPOTENCY.labels("store_down").inc()

    def _replay(self, stored: Record) -> Replay:
        headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in stored.headers]
        headers.append((b"x-proxy-idempotent-replay", b"true"))
        if stored.body_omitted:
            headers.append((b"x-proxy-idempotent-body", b"omitted"))
        return Replay(stored.status, headers, stored.body)

    async def finish(
        self, claim: Claim, status: int, headers: list[tuple[bytes, bytes]], body: bytes | None
    ) -> None:
        """The first request was answered: keep the answer for every repeat."""
        kept = [
            [n.decode("latin-1"), v.decode("latin-1")] for n, v in headers if n in _KEPT_HEADERS
        ]
        omitted = body is None or len(body) > self._max_body
        record = Record(
            claim.record.digest,
            DONE,
            claim.record.token,
            status,
            kept,
            b"" if omitted or body is None else body,
            omitted,
        )
        await self._store_final(claim, record)

    async def ambiguous(self, claim: Claim, error: ProxyError, body: bytes) -> None:
        """The first request may or may not have been carried out: so will every repeat say."""
        headers = [["content-type", "application/json"], ["x-proxy-error", error.code]]
        if error.instance is not None:
            headers.append(["x-proxy-instance", error.instance])
        record = Record(
            claim.record.digest, AMBIGUOUS, claim.record.token, error.status, headers, body
        )
        metrics.IDEMPOTENCY.labels("stored_ambiguous").inc()
        await self._store_final(claim, record)

    async def release(self, claim: Claim) -> None:
        """Nothing was carried out: a repeat is a first attempt again."""
        metrics.IDEMPOTENCY.labels("released").inc()
        try:
            await claim.backend.release(claim.key, claim.record.token)
        except BackendDown as error:
            self._went_down(error)

    async def _store_final(self, claim: Claim, record: Record) -> None:
        try:
            await claim.backend.finish(claim.key, record, self._ttl)
        except BackendDown as error:
            # Kept here at least: this replica still answers repeats from it.
            self._went_down(error)
            await self._memory.claim(claim.key, record, self._ttl)
            await self._memory.finish(claim.key, record, self._ttl)

    async def sweep_forever(self) -> None:
        """Postgres: delete expired keys every minute (supervised)."""
        store = self._store
        assert store is not None
        while True:
            await asyncio.sleep(60.0)
            # In batches of 10,000 rows (no long statement), up to a million a minute.
            with contextlib.suppress(StoreUnavailable):
                for _ in range(100):
                    if await store.idempotency_sweep() < 10_000:
                        break
                    await asyncio.sleep(0.1)

    async def close(self) -> None:
        await self._backend.close()


def _lost_lease(stored: Record) -> Record:
    body = json.dumps(
        {
            "error": "the proxy carrying out the first request with this Idempotency-Key stopped "
            "before it finished; it may or may not have been carried out",
            "code": "upstream-ambiguous",
        }
    ).encode()
    return Record(
        stored.digest,
        AMBIGUOUS,
        stored.token,
        502,
        [["content-type", "application/json"], ["x-proxy-error", "upstream-ambiguous"]],
        body,
    )
