"""Starting a session on an instance of the proxy's choosing, and waiting until it is connected.

Restores (``restore.py``) and moves (``drain.py``) end in the same steps: pick the least-loaded
healthy instance with a free start slot, send the gateway's own create call (its real body:
``session_id``, ``workspace_id``, ``account_id`` = the row's id, ``api_key``), then ask that
instance every ``RESTORE_POLL_INTERVAL`` until the session is ``connected``. At most
``RESTORE_CONCURRENCY`` of these starts run on one instance at a time: a whatsapp-web.js start
is a browser launch, and a reconnect storm of a hundred at once would take the instance down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import quote, urlsplit

from . import metrics
from .client import Timeouts, UpstreamClient
from .config import Settings
from .discovery import Discovery
from .errors import NoHealthyInstance, ProxyError, UpstreamUnreachable
from .instances import Instance, InstanceSet
from .owners import CONNECTED
from .store import CreateFields

log = logging.getLogger("session_proxy.starts")


class StartFailed(Exception):
    """The session did not reach ``connected`` on the instance(s) it was started on."""

    def __init__(self, detail: str, instance: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.instance = instance


def create_body(fields: CreateFields, api_key: str) -> bytes:
    body: dict[str, object] = {"session_id": fields.session_id}
    if fields.workspace_id is not None:
        body["workspace_id"] = fields.workspace_id
    if fields.account_id is not None:
        body["account_id"] = fields.account_id
    body["api_key"] = api_key
    return json.dumps(body).encode()


class Starter:
    def __init__(
        self,
        settings: Settings,
        instances: InstanceSet,
        discovery: Discovery,
        client: UpstreamClient,
    ) -> None:
        self._instances = instances
        self._discovery = discovery
        self._client = client
        self._limit = settings.restore_concurrency
        self._attempts = settings.restore_attempts
        self._connect_timeout = settings.restore_connect_timeout
        self._poll = settings.restore_poll_interval
        self._api_key = settings.api_key
        self._create_method, _, self._create_path = settings.create_route.partition(" ")
        _, _, self._delete_path = settings.delete_route.partition(" ")
        self._timeouts = Timeouts(settings.connect_timeout, settings.timeout_for(self._create_path))
        self._busy: dict[str, int] = {}  # instance url -> starts running there now
        self.most: dict[str, int] = {}  # instance url -> the most that ever ran there at once
        self._freed = asyncio.Event()

    def busy(self, url: str) -> int:
        return self._busy.get(url, 0)

    # --- slots -----------------------------------------------------------------------------------

    @asynccontextmanager
    async def slot(self, tried: set[str], only: Instance | None = None) -> AsyncIterator[Instance]:
        """A start slot on the least-loaded available instance not in ``tried`` (or on ``only``);
        waits while every such instance runs ``RESTORE_CONCURRENCY`` starts already."""
        instance = await self._take(tried, only)
        try:
            yield instance
        finally:
            self._busy[instance.url] -= 1
            metrics.STARTS_RUNNING.labels(instance.url).set(self._busy[instance.url])
            self._freed.set()

    async def _take(self, tried: set[str], only: Instance | None) -> Instance:
        while True:
            candidates = [
                i
                for i in self._instances.available()
                if i.url not in tried and (only is None or i is only)
            ]
            if not candidates:
                raise NoHealthyInstance("no healthy instance is left to start the session on")
            free = [i for i in candidates if self._busy.get(i.url, 0) < self._limit]
            if free:
                instance = min(free, key=lambda i: (i.sessions + self.busy(i.url), i.url))
                busy = self._busy[instance.url] = self._busy.get(instance.url, 0) + 1
                self.most[instance.url] = max(self.most.get(instance.url, 0), busy)
                metrics.STARTS_RUNNING.labels(instance.url).set(busy)
                return instance
            self._freed.clear()
            with contextlib.suppress(TimeoutError):
                # Also woken now and then: an instance may have come back meanwhile.
                await asyncio.wait_for(self._freed.wait(), 0.5)

    # --- the steps -------------------------------------------------------------------------------

    async def start_somewhere(self, fields: CreateFields, exclude: set[str]) -> Instance:
        """Start the session on one instance, then another if it does not connect there, up to
        ``RESTORE_ATTEMPTS`` instances; returns where it is connected."""
        tried = set(exclude)
        failures: list[str] = []
        for _ in range(self._attempts):
            try:
                async with self.slot(tried) as instance:
                    tried.add(instance.url)
                    try:
                        await self.start_on(instance, fields)
                        return instance
                    except StartFailed as error:
                        failures.append(f"{instance.url}: {error.detail}")
                        # No half-started copy may stay behind to log in later beside the next.
                        await self.stop_on(instance, fields.session_id)
            except NoHealthyInstance as error:
                failures.append(error.detail)
                break
        raise StartFailed("; ".join(failures) or "no instance to start it on")

    async def start_on(self, instance: Instance, fields: CreateFields) -> None:
        """Create the session there and wait until it is connected; raise ``StartFailed``."""
        started = time.monotonic()
        body = create_body(fields, self._api_key)
        try:
            status, answer = await self._send(
                instance, self._create_method, self._create_path, body
            )
        except ProxyError as error:
            metrics.STARTS.labels("failed").inc()
            raise StartFailed(f"the create call failed: {error.detail}", instance.url) from error
        if not 200 <= status < 300:
            metrics.STARTS.labels("failed").inc()
            raise StartFailed(f"the create call answered {status}: {answer[:200]!r}", instance.url)
        instance.sessions += 1
        created = time.monotonic()
        deadline = started + self._connect_timeout
        last = "qr_scanning"
        while True:
            # One list call per instance and poll, shared by every start running there.
            statuses = await self._discovery.statuses_on(instance, self._poll, created)
            if isinstance(statuses, UpstreamUnreachable):
                metrics.STARTS.labels("failed").inc()
                raise StartFailed(f"the instance went down: {statuses.detail}", instance.url)
            got: str | None
            if isinstance(statuses, ProxyError):
                got = f"unknown ({statuses.detail})"
            else:
                got = statuses.get(fields.session_id)
            if got == CONNECTED:
                metrics.STARTS.labels("connected").inc()
                metrics.START_SECONDS.observe(time.monotonic() - started)
                return
            if got is None:
                metrics.STARTS.labels("failed").inc()
                raise StartFailed("the instance dropped the session while it started", instance.url)
            last = got
            if time.monotonic() >= deadline:
                metrics.STARTS.labels("timed_out").inc()
                raise StartFailed(
                    f"not connected within {self._connect_timeout:g} s (last status: {last}); "
                    "without shared session state a moved session waits for a new QR scan",
                    instance.url,
                )
            await asyncio.sleep(self._poll)

    async def stop_on(self, instance: Instance, session_id: str) -> bool:
        """Disconnect the session there, but only while it holds it: the gateway's DELETE of a
        session it does not hold deletes that session's files."""
        try:
            if await self._discovery.probe(instance, session_id) is None:
                return True
            path = self._delete_path.format(id=quote(session_id, safe=""))
            body = json.dumps({"api_key": self._api_key}).encode()
            status, _ = await self._send(instance, "DELETE", path, body)
        except ProxyError as error:
            log.warning(
                "could not disconnect the session",
                extra={"session_id": session_id, "instance": instance.url, "error": error.detail},
            )
            return False
        if 200 <= status < 300:
            instance.sessions = max(0, instance.sessions - 1)
            return True
        return False

    async def _send(
        self, instance: Instance, method: str, path: str, body: bytes
    ) -> tuple[int, bytes]:
        response = await self._client.send(
            method,
            instance.url,
            path,
            [
                (b"host", urlsplit(instance.url).netloc.encode()),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
            body,
            self._timeouts,
        )
        try:
            return response.status, await response.read()
        finally:
            await response.close()
