"""The instance set: who may receive traffic, under which names, and in which state.

Only members of this set are ever contacted, whatever a database row or a client says. Each
member carries its state (healthy or ejected and until when, draining, sessions held); the health
checks that change it are ``health.py``'s, DNS membership ``dns.py``'s. An ejected or draining
instance is skipped by placement.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from . import metrics
from .config import Settings, normalise_url
from .errors import NoHealthyInstance

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
    cordoned: bool = False  # drained by an operator (``drain.py``): no new sessions
    draining_since: float = 0.0
    dynamic: bool = False  # came from DNS (static members are never drained)
    stored_form: str | None = None  # how the database spells this instance, once seen there
    host_header: bytes = field(init=False, default=b"")
    upstream_seconds: Any = field(init=False, default=None)  # this instance's histogram child

    def __post_init__(self) -> None:
        self.host_header = urlsplit(self.url).netloc.encode("latin-1")
        # Observed on every request: through metrics.histogram, resolved once here.
        self.upstream_seconds = metrics.histogram(metrics.UPSTREAM_SECONDS.labels(self.url))

    @property
    def alias(self) -> str:
        """The form to write to the database: the one the application already uses."""
        return self.stored_form or (self.aliases[0] if self.aliases else self.url)

    @property
    def available(self) -> bool:
        return self.healthy and not self.draining and not self.cordoned

    def snapshot(self, now: float | None = None) -> dict[str, object]:
        now = time.monotonic() if now is None else now
        return {
            "url": self.url,
            "aliases": list(self.aliases),
            "healthy": self.healthy,
            "draining": self.draining,
            "cordoned": self.cordoned,
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

    def least_loaded(self, tried: Iterable[str] = ()) -> Instance:
        """Where a new session goes: the healthy instance holding the fewest sessions, among
        those not ``tried`` yet."""
        skip = set(tried)
        candidates = [i for i in self.available() if i.url not in skip]
        if not candidates:
            raise NoHealthyInstance("every healthy instance was tried" if skip else None)
        start = next(self._rotation) % len(candidates)
        rotated = candidates[start:] + candidates[:start]  # ties go round, not to the first
        return min(rotated, key=lambda i: i.sessions)
