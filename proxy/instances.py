"""The instance set: who may receive traffic, under which names, and whether they are healthy.

Only members of this set are ever contacted, whatever a database row or a client says. Health is
tracked actively (``GET /health`` on an interval) and passively (consecutive connection failures
on real traffic); an ejected instance is skipped by placement and rediscovery until it passes a
check again after a back-off that doubles with every ejection in a row.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from . import metrics
from .client import Timeouts, UpstreamClient
from .config import Settings, normalise_url
from .errors import NoHealthyInstance, ProxyError

log = logging.getLogger("session_proxy.instances")

LOOPBACK_NAMES = ("127.0.0.1", "localhost")


@dataclass(eq=False)
class Instance:
    url: str  # normalised scheme://host:port, the only address ever contacted
    aliases: tuple[str, ...] = ()  # the strings a database may hold for it, preferred first
    healthy: bool = True
    sessions: int = 0  # as reported by its last /health, plus placements since
    consecutive_failures: int = 0
    ejections_in_a_row: int = 0
    ejected_until: float = 0.0
    last_error: str | None = None
    last_check_at: float = 0.0
    draining: bool = False  # gone from DNS: no new sessions, known ones still served
    draining_since: float = 0.0
    dynamic: bool = False  # came from DNS (static members are never drained)
    stored_form: str | None = None  # how the database spells this instance, once seen there
    host_header: bytes = field(init=False, default=b"")
    upstream_seconds: Any = field(init=False, default=None)  # this instance's histogram child

    def __post_init__(self) -> None:
        self.host_header = urlsplit(self.url).netloc.encode("latin-1")
        self.upstream_seconds = metrics.UPSTREAM_SECONDS.labels(self.url)

    @property
    def alias(self) -> str:
        """The form to write to the database: the one the application already uses."""
        return self.stored_form or (self.aliases[0] if self.aliases else self.url)

    @property
    def available(self) -> bool:
        return self.healthy and not self.draining

    def snapshot(self, now: float | None = None) -> dict[str, object]:
        now = time.monotonic() if now is None else now
        return {
            "url": self.url,
            "aliases": list(self.aliases),
            "healthy": self.healthy,
            "draining": self.draining,
            "sessions": self.sessions,
            "consecutive_failures": self.consecutive_failures,
            "ejected": not self.healthy,
            "ejections_in_a_row": self.ejections_in_a_row,
            "ejected_for_seconds": max(0.0, round(self.ejected_until - now, 3)),
            "last_error": self.last_error,
            "last_check_seconds_ago": (
                round(now - self.last_check_at, 3) if self.last_check_at else None
            ),
        }


def _loopback_aliases(url: str) -> list[str]:
    parts = urlsplit(url)
    if parts.hostname not in LOOPBACK_NAMES:
        return []
    return [f"{parts.scheme}://{name}:{parts.port}" for name in LOOPBACK_NAMES]


def alias_key(value: str) -> str | None:
    """A database string in comparable form, or None when it is not an http(s) URL at all."""
    try:
        return normalise_url("alias", value)
    except ValueError:
        return None


class InstanceSet:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._configured_aliases = settings.instance_aliases
        self._by_url: dict[str, Instance] = {}
        self._by_alias: dict[str, Instance] = {}
        self._rotation = itertools.count()
        self.replace(settings.instances)

    # --- membership ------------------------------------------------------------------------------

    def replace(self, urls: Iterable[str]) -> tuple[list[str], list[str]]:
        """Make the set exactly ``urls``; existing members keep their health state."""
        wanted = list(dict.fromkeys(urls))
        added = [u for u in wanted if u not in self._by_url]
        removed = [u for u in self._by_url if u not in wanted]
        self._by_url = {u: self._by_url.get(u) or Instance(u) for u in wanted}
        for url in added:
            metrics.INSTANCE_HEALTHY.labels(url).set(1)
        for url in removed:
            metrics.INSTANCE_HEALTHY.remove(url)
        self._reindex()
        return added, removed

    def sync_dynamic(self, urls: Iterable[str]) -> tuple[list[Instance], list[Instance]]:
        """DNS answered ``urls``: add the new ones (unhealthy until their first check passes),
        drain the ones that vanished, take back drained ones that reappear."""
        wanted = list(dict.fromkeys(urls))
        added: list[Instance] = []
        drained: list[Instance] = []
        for url in wanted:
            instance = self._by_url.get(url)
            if instance is None:
                instance = Instance(url, healthy=False, dynamic=True)
                self._by_url[url] = instance
                metrics.INSTANCE_HEALTHY.labels(url).set(0)
                added.append(instance)
            elif instance.draining:
                instance.draining = False
                added.append(instance)
        for instance in self._by_url.values():
            if instance.dynamic and not instance.draining and instance.url not in wanted:
                instance.draining = True
                instance.draining_since = time.monotonic()
                drained.append(instance)
        if added or drained:
            self._reindex()
        return added, drained

    def remove(self, instance: Instance) -> None:
        """A drained instance is gone for good: requests for its sessions look again."""
        if self._by_url.pop(instance.url, None) is not None:
            metrics.INSTANCE_HEALTHY.remove(instance.url)
            self._reindex()
            log.info("drained instance removed", extra={"instance": instance.url})

    def _reindex(self) -> None:
        by_alias: dict[str, Instance] = {}
        for instance in self._by_url.values():
            configured = [a for a, target in self._configured_aliases if target == instance.url]
            names = [*configured, instance.url, *_loopback_aliases(instance.url)]
            keys = list(dict.fromkeys(k for k in (alias_key(n) for n in names) if k))
            instance.aliases = tuple(dict.fromkeys([*configured, *keys]))
            for key in keys:
                by_alias.setdefault(key, instance)
        self._by_alias = by_alias

    def __len__(self) -> int:
        return len(self._by_url)

    @property
    def all(self) -> list[Instance]:
        return list(self._by_url.values())

    def get(self, url: str) -> Instance | None:
        return self._by_url.get(url)

    def resolve(self, stored: str | None) -> Instance | None:
        """The member a stored string (URL or alias) names, or None: never a non-member.

        The first spelling seen for a member is remembered, so write-backs use the same form."""
        if not stored:
            return None
        instance = self._by_url.get(stored)
        if instance is None:
            key = alias_key(stored)
            instance = self._by_alias.get(key) if key else None
        if instance is not None and instance.stored_form is None:
            instance.stored_form = stored
        return instance

    # --- selection -------------------------------------------------------------------------------

    def available(self) -> list[Instance]:
        return [i for i in self._by_url.values() if i.available]

    def next_available(self) -> Instance:
        """Round robin over healthy instances, for requests that name no session."""
        candidates = self.available()
        if not candidates:
            raise NoHealthyInstance()
        return candidates[next(self._rotation) % len(candidates)]

    def least_loaded(self) -> Instance:
        """Where a new session goes: the healthy instance holding the fewest sessions."""
        candidates = self.available()
        if not candidates:
            raise NoHealthyInstance()
        start = next(self._rotation) % len(candidates)
        rotated = candidates[start:] + candidates[:start]  # ties go round, not to the first
        return min(rotated, key=lambda i: i.sessions)

    # --- health ----------------------------------------------------------------------------------

    def record_success(self, instance: Instance) -> None:
        instance.consecutive_failures = 0

    def record_failure(self, instance: Instance, error: str) -> None:
        """A connection-level failure on real traffic; enough in a row ejects the instance."""
        instance.last_error = error
        instance.consecutive_failures += 1
        if (
            instance.healthy
            and instance.consecutive_failures >= self._settings.eject_after_failures
        ):
            self._eject(instance, error)

    def eject(self, instance: Instance, reason: str) -> None:
        """Eject at once: used when a connection is refused (nothing listens there)."""
        instance.last_error = reason
        if instance.healthy:
            self._eject(instance, reason)

    def _eject(self, instance: Instance, reason: str) -> None:
        s = self._settings
        backoff = min(s.eject_max_seconds, s.eject_base_seconds * 2**instance.ejections_in_a_row)
        instance.healthy = False
        metrics.INSTANCE_HEALTHY.labels(instance.url).set(0)
        metrics.EJECTIONS.labels(instance.url).inc()
        instance.ejections_in_a_row += 1
        instance.ejected_until = time.monotonic() + backoff
        log.warning(
            "instance ejected",
            extra={"instance": instance.url, "reason": reason, "backoff_seconds": backoff},
        )

    def apply_check(self, instance: Instance, ok: bool, sessions: int | None, error: str) -> None:
        """The result of one active check."""
        now = time.monotonic()
        instance.last_check_at = now
        if sessions is not None:
            instance.sessions = sessions
        if not ok:
            instance.last_error = error
            if instance.healthy:
                self._eject(instance, error)
            return
        instance.consecutive_failures = 0
        if not instance.healthy and now >= instance.ejected_until:
            instance.healthy = True
            metrics.INSTANCE_HEALTHY.labels(instance.url).set(1)
            log.info("instance restored", extra={"instance": instance.url})
        elif instance.healthy and now >= instance.ejected_until + self._settings.eject_max_seconds:
            instance.ejections_in_a_row = 0  # stable long enough: the next ejection starts short


class HealthChecker:
    """Active checks of every instance on an interval, all at once."""

    def __init__(self, settings: Settings, instances: InstanceSet, client: UpstreamClient) -> None:
        self._settings = settings
        self._instances = instances
        self._client = client
        self._timeouts = Timeouts(settings.health_timeout, settings.health_timeout)

    async def check(self, instance: Instance) -> None:
        try:
            status, body = await self._client.get_json(instance.url, "/health", self._timeouts)
        except ProxyError as exc:
            if instance.draining:
                self._instances.remove(instance)  # drained and now gone
                return
            self._instances.apply_check(instance, False, None, exc.detail)
            return
        if instance.draining and (
            time.monotonic() - instance.draining_since > self._settings.drain_timeout
        ):
            self._instances.remove(instance)
            return
        sessions = None
        if isinstance(body, dict) and isinstance(body.get("sessions"), dict):
            total = body["sessions"].get("total")
            sessions = total if isinstance(total, int) else None
        healthy = status == 200
        self._instances.apply_check(instance, healthy, sessions, f"/health answered {status}")

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(i) for i in self._instances.all))

    async def run(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self._settings.health_interval)


Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve_system(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for ``host`` (a headless Service: all pods)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class DnsWatcher:
    """Keeps the DNS-discovered part of the instance set equal to what ``INSTANCES_DNS``
    resolves to, re-resolving every ``INSTANCES_DNS_INTERVAL`` seconds."""

    def __init__(
        self,
        settings: Settings,
        instances: InstanceSet,
        health: HealthChecker,
        resolver: Resolver | None = None,
    ) -> None:
        host, _, port = settings.instances_dns.rpartition(":")
        self._host = host.strip("[]")
        self._port = int(port)
        self._interval = settings.instances_dns_interval
        self._instances = instances
        self._health = health
        self._resolver = resolver or resolve_system

    async def refresh(self) -> tuple[list[Instance], list[Instance]]:
        try:
            addresses = await self._resolver(self._host, self._port)
        except OSError as exc:
            # A resolver hiccup must not empty the fleet: keep what we have.
            log.warning(
                "instance DNS lookup failed; keeping the current set",
                extra={"dns_name": self._host, "error": str(exc)},
            )
            return [], []
        urls = [
            f"http://[{a}]:{self._port}" if ":" in a else f"http://{a}:{self._port}"
            for a in addresses
        ]
        added, drained = self._instances.sync_dynamic(urls)
        for instance in added:
            log.info(
                "instance discovered", extra={"instance": instance.url, "dns_name": self._host}
            )
        for instance in drained:
            log.info("instance draining", extra={"instance": instance.url, "dns_name": self._host})
        await asyncio.gather(*(self._health.check(i) for i in added))
        return added, drained

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.refresh()
