"""Health: active checks (``GET /health`` on an interval, every instance at once), passive ones
(connection failures on real traffic), and the ejection both lead to.

An ejected instance is skipped by placement and rediscovery until it passes a check again after a
back-off that doubles with every ejection in a row. The state these decisions change lives on
``instances.Instance``; the decisions are made here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from . import metrics
from .client import Timeouts, UpstreamClient
from .config import Settings
from .errors import ProxyError
from .instances import Instance, InstanceSet

# The logger these lines have always had (they were in instances.py): log filters keep working.
log = logging.getLogger("session_proxy.instances")


class HealthChecker:
    """Active checks of every instance on an interval, all at once; passive checks from the
    attempts of real traffic; ejection and its back-off."""

    def __init__(self, settings: Settings, instances: InstanceSet, client: UpstreamClient) -> None:
        self._settings = settings
        self._instances = instances
        self._client = client
        self._timeouts = Timeouts(settings.health_timeout, settings.health_timeout)
        # Told at once when an instance is ejected or comes back (restores, drains).
        self.on_eject: list[Callable[[Instance], None]] = []
        self.on_back: list[Callable[[Instance], None]] = []

    # --- passive: what real traffic shows --------------------------------------------------------

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
        for listener in self.on_eject:
            listener(instance)

    # --- active: GET /health ---------------------------------------------------------------------

    def apply_check(self, instance: Instance, ok: bool, sessions: int | None, error: str) -> None:
        """The result of one active check."""
        now = time.monotonic()
        instance.last_check_at = now
        if sessions is not None:
            instance.sessions = sessions
            metrics.INSTANCE_SESSIONS.labels(instance.url).set(sessions)
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
            for listener in self.on_back:
                listener(instance)
        elif instance.healthy and now >= instance.ejected_until + self._settings.eject_max_seconds:
            instance.ejections_in_a_row = 0  # stable long enough: the next ejection starts short

    async def check(self, instance: Instance) -> None:
        try:
            status, body = await self._client.get_json(instance.url, "/health", self._timeouts)
        except ProxyError as exc:
            if instance.draining:
                self._instances.remove(instance)  # drained and now gone
                return
            self.apply_check(instance, False, None, exc.detail)
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
        self.apply_check(instance, healthy, sessions, f"/health answered {status}")

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(i) for i in self._instances.all))

    async def run(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self._settings.health_interval)
