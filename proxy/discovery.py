"""Who holds session X: every available instance is asked at once; and what each instance holds.

A probe is the instance's own status route with the proxy's own api key. The first instance that
answers ``connected`` wins at once; otherwise, once all have answered, the first holder does.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from .client import Timeouts, UpstreamClient
from .config import Settings
from .errors import ProxyError
from .instances import Instance, InstanceSet

STATUS_PATH = "/api/sessions/{id}/status"
LIST_PATH = "/api/sessions"


@dataclass
class Located:
    instance: Instance | None
    status: str | None = None
    complete: bool = True  # every asked instance answered; a miss can be remembered
    asked: int = 0


@dataclass
class Inventory:
    """One list call per instance: what each holds, and which could not be asked."""

    sessions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


class Discovery:
    def __init__(self, settings: Settings, instances: InstanceSet, client: UpstreamClient) -> None:
        self._instances = instances
        self._client = client
        self._timeouts = Timeouts(settings.connect_timeout, settings.discovery_timeout)
        self._key_query = "?api_key=" + quote(settings.api_key, safe="") if settings.api_key else ""
        self.probes = 0  # status requests sent to the fleet, for tests and metrics

    async def _probe(self, instance: Instance, session_id: str) -> tuple[Instance, str | None]:
        """The session's status on this instance, or None when it does not hold it."""
        self.probes += 1
        url = instance.url + STATUS_PATH.format(id=session_id) + self._key_query
        status, body = await self._client.get_json(url, self._timeouts)
        if status == 200 and isinstance(body, dict):
            return instance, str(body.get("status") or "unknown")
        if status == 404:
            return instance, None
        raise ProxyError(f"status probe answered {status}")

    async def locate(self, session_id: str, exclude: Instance | None = None) -> Located:
        candidates = [i for i in self._instances.available() if i is not exclude]
        located = Located(None, asked=len(candidates))
        if not candidates:
            located.complete = False
            return located
        tasks = [asyncio.create_task(self._probe(i, session_id)) for i in candidates]
        try:
            for next_done in asyncio.as_completed(tasks):
                try:
                    instance, status = await next_done
                except ProxyError:
                    located.complete = False
                    continue
                if status is None:
                    continue
                if status == "connected":
                    return Located(instance, status, True, len(candidates))
                if located.instance is None:
                    located.instance, located.status = instance, status
            return located
        finally:
            for task in tasks:
                task.cancel()

    async def inventory(self, api_key_query: str | None = None) -> Inventory:
        """Every available instance's session list, fetched in parallel."""
        started = time.monotonic()
        inventory = Inventory()
        query = self._key_query if api_key_query is None else api_key_query

        async def fetch(instance: Instance) -> None:
            try:
                status, body = await self._client.get_json(
                    instance.url + LIST_PATH + query, self._timeouts
                )
            except ProxyError as exc:
                inventory.failed[instance.url] = exc.detail
                return
            if status != 200 or not isinstance(body, dict):
                inventory.failed[instance.url] = f"list answered {status}"
                return
            sessions = body.get("sessions")
            inventory.sessions[instance.url] = sessions if isinstance(sessions, list) else []

        await asyncio.gather(*(fetch(i) for i in self._instances.available()))
        inventory.seconds = time.monotonic() - started
        return inventory
