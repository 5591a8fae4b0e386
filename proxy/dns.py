"""DNS discovery of instances: ``INSTANCES_DNS`` (a Kubernetes headless Service, ``host:port``)
resolved on an interval; new addresses join the instance set (unhealthy until their first check
passes), vanished ones are drained, reappearing ones are taken back.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

from .config import Settings
from .health import HealthChecker
from .instances import Instance, InstanceSet

# The logger these lines have always had (they were in instances.py): log filters keep working.
log = logging.getLogger("session_proxy.instances")

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
