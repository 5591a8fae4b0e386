"""Restoring the sessions of a dead instance on healthy ones (``RESTORE=on``).

Without it, a crash heals only when something else starts the session again (the instance's own
start-up restore, Laravel re-creating it); the proxy holds requests meanwhile. With it, the proxy
does the work: when health ejects an instance (at once, not at the next reconcile), and after
every reconcile pass for the active rows no instance holds, each lost session is started on the
least-loaded healthy instance with the gateway's own create call (``starts.py``), at most
``RESTORE_CONCURRENCY`` starts per instance at a time. Its held requests are released the moment
it is connected; one that fails to connect is tried on another instance, then reported.

Only for instances that share session state (RemoteAuth, a shared volume): elsewhere a session
started on another instance waits for a new QR scan, and is reported failed.

Exactly one replica restores a session: with a database, the worker holds the advisory lock
``restore`` while it has work (and stops the moment that lock's connection closes), and every
session is looked up in the fleet just before it is started, so a session that came back
meanwhile (the instance restarted, another replica got there first) is left alone. Without a
database the sessions are the ones this proxy knows were there (its routing table, the creates
it placed): a single replica's view.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from . import metrics, tracing
from .attempts import Attempts
from .config import Settings
from .errors import ProxyError
from .instances import Instance
from .owners import CONNECTED
from .starts import Starter, StartFailed
from .store import CreateFields, LockLost, Store, StoreUnavailable

log = logging.getLogger("session_proxy.restore")

_KNOWN_LIMIT = 100_000  # remembered creates without a database (about 100 bytes each)
_LEADER_RETRY = 1.0  # seconds between tries for the lock while another replica restores
_FAILED_PAUSE = 30.0  # seconds a session that failed to restore is not tried again


def workspace_from_id(session_id: str) -> int | None:
    """The gateway's own ids are ``webjs_{workspace}_{time}_{random}``."""
    parts = session_id.split("_")
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None


def fields_from_create(session_id: str, body: bytes) -> CreateFields:
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        return CreateFields(session_id, None, workspace_from_id(session_id))
    return CreateFields(session_id, document.get("account_id"), document.get("workspace_id"))


@dataclass
class _Lost:
    session_id: str
    lost_on: str | None  # the instance it was on, when known
    fields: CreateFields | None = None


class Restorer:
    def __init__(
        self, settings: Settings, attempts: Attempts, starter: Starter, store: Store | None
    ) -> None:
        self._settings = settings
        self._attempts = attempts
        self._starter = starter
        self._store = store
        self._lost_instances: list[Instance] = []
        self._queue: OrderedDict[str, _Lost] = OrderedDict()
        self._wake = asyncio.Event()
        self._known: OrderedDict[str, CreateFields] = OrderedDict()
        self._where: OrderedDict[str, str] = OrderedDict()  # no database: session -> instance
        self._failed_until: dict[str, float] = {}  # a session that failed: not before then
        self.counts = {"started": 0, "succeeded": 0, "failed": 0, "already_running": 0}
        self.recent: deque[dict[str, Any]] = deque(maxlen=200)
        self.leading = False

    @property
    def enabled(self) -> bool:
        return self._settings.restore

    # --- what the proxy learns -------------------------------------------------------------------

    def remember(self, session_id: str, body: bytes) -> None:
        """A create the proxy forwarded: what to send if the session must be started again."""
        if not self.enabled or self._store is not None:
            return  # with a database, the row is the source
        self._known[session_id] = fields_from_create(session_id, body)
        self._known.move_to_end(session_id)
        while len(self._known) > _KNOWN_LIMIT:
            self._known.popitem(last=False)

    def owner_seen(self, session_id: str, instance: Instance) -> None:
        """Without a database: where the proxy last found the session (placed, rediscovered)."""
        if not self.enabled:
            return
        self._where[session_id] = instance.url
        self._where.move_to_end(session_id)
        while len(self._where) > _KNOWN_LIMIT:
            self._where.popitem(last=False)

    def owner_gone(self, session_id: str, instance: str | None) -> None:
        """A request found the session's owner dead and nobody else holding it."""
        self.sessions_lost([(session_id, instance)])

    def fields_for(self, session_id: str) -> CreateFields:
        return self._known.get(session_id) or CreateFields(
            session_id, None, workspace_from_id(session_id)
        )

    def instance_lost(self, instance: Instance) -> None:
        """Health ejected ``instance``: its sessions are restored elsewhere (if RESTORE=on)."""
        if self.enabled and instance not in self._lost_instances:
            self._lost_instances.append(instance)
            self._wake.set()

    def sessions_lost(self, lost: list[tuple[str, str | None]]) -> None:
        """Active rows no instance holds (a reconcile pass): (session id, stored owner)."""
        if not self.enabled:
            return
        for session_id, stored in lost:
            self._queue.setdefault(session_id, _Lost(session_id, stored))
        if lost:
            self._wake.set()

    # --- the worker ------------------------------------------------------------------------------

    async def run(self) -> None:
        """The supervised loop: wait for lost instances or sessions, restore them."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._collect()
            if not self._queue:
                continue
            if self._store is None:
                await self._restore_queued()
                continue
            try:
                async with self._store.lead("restore") as lock:
                    self.leading = lock is not None
                    if lock is not None:
                        # Stopped the moment the lock's connection closes: another replica
                        # may hold the lock then, and two restoring at once start copies.
                        await lock.guard(self._restore_queued())
            except LockLost as error:
                log.warning(
                    "restore stopped: the restore lock was lost with its database connection",
                    extra={"error": str(error), "waiting": len(self._queue)},
                )
            except StoreUnavailable as error:
                log.warning("restore waits for the database", extra={"error": str(error)})
            finally:
                self.leading = False
            if self._queue:
                # Another replica restores (or the database is down): ask again soon; every
                # session is looked up before it is started, so nothing starts twice.
                await asyncio.sleep(_LEADER_RETRY)
                self._wake.set()

    async def _collect(self) -> None:
        """The sessions of the instances lost since the last look."""
        lost, self._lost_instances = self._lost_instances, []
        for instance in lost:
            sessions = await self._sessions_of(instance)
            log.warning(
                "instance lost: restoring its sessions on healthy instances",
                extra={"instance": instance.url, "sessions": len(sessions)},
            )
            for item in sessions:
                self._queue.setdefault(item.session_id, item)

    async def _sessions_of(self, instance: Instance) -> list[_Lost]:
        if self._store is not None:
            forms = list({instance.url, instance.alias, *instance.aliases})
            try:
                rows = await self._store.rows_on(forms)
            except StoreUnavailable as error:
                log.warning(
                    "cannot read the lost instance's sessions; the next reconcile restores them",
                    extra={"instance": instance.url, "error": str(error)},
                )
                return []
            return [_Lost(f.session_id, instance.url, f) for f in rows]
        on_it = {sid for sid, url in self._where.items() if url == instance.url}
        on_it.update(sid for sid, url in await self._attempts.table.items() if url == instance.url)
        return [_Lost(sid, instance.url, self.fields_for(sid)) for sid in sorted(on_it)]

    async def _restore_queued(self) -> None:
        # Bounded in all as well as per instance: the start slots decide who goes next.
        limit = asyncio.Semaphore(
            self._settings.restore_concurrency * max(1, len(self._attempts.instances))
        )

        async def one(item: _Lost) -> None:
            async with limit:
                await self._restore(item)

        while self._queue:
            batch = list(self._queue.values())
            self._queue.clear()
            try:
                await self._fill_fields(batch)
                await asyncio.gather(*(one(item) for item in batch))
            except BaseException:
                # Cut short (the lock lost): the batch waits for the next turn. Each session
                # is looked up again before it is started, so the finished ones are not redone.
                for item in batch:
                    self._queue.setdefault(item.session_id, item)
                raise

    async def _fill_fields(self, batch: list[_Lost]) -> None:
        missing = [item for item in batch if item.fields is None]
        if not missing:
            return
        found: dict[str, CreateFields] = {}
        if self._store is not None:
            try:
                found = await self._store.create_fields([i.session_id for i in missing])
            except StoreUnavailable:
                found = {}
        for item in missing:
            item.fields = found.get(item.session_id) or self.fields_for(item.session_id)

    async def _restore(self, item: _Lost) -> None:
        session_id = item.session_id
        attempts = self._attempts
        if session_id in attempts.starting:
            return  # being moved or restored already
        now = time.monotonic()
        if self._failed_until.get(session_id, 0.0) > now:
            return  # it just failed everywhere it was tried: not again at once
        self._failed_until.pop(session_id, None)
        attempts.starting.add(session_id)
        started = time.monotonic()
        with tracing.span("restore", session_id=session_id, lost_on=item.lost_on):
            await self._restore_traced(item, started)

    async def _restore_traced(self, item: _Lost, started: float) -> None:
        session_id = item.session_id
        attempts = self._attempts
        try:
            back = await self._running_somewhere(session_id)
            if back is not None:
                self._count("already_running", session_id, item, back.url)
                return
            self._count("started", session_id, item, None)
            assert item.fields is not None
            exclude = {item.lost_on} if item.lost_on else set()
            try:
                instance = await self._starter.start_somewhere(item.fields, exclude)
            except StartFailed as error:
                self._failed_until[session_id] = time.monotonic() + _FAILED_PAUSE
                if len(self._failed_until) > _KNOWN_LIMIT:
                    self._failed_until = {
                        k: t for k, t in self._failed_until.items() if t > time.monotonic()
                    }
                self._count("failed", session_id, item, None, error.detail)
                log.error(
                    "session could not be restored",
                    extra={"session_id": session_id, "lost_on": item.lost_on, "why": error.detail},
                )
                return
            await attempts.now_on(session_id, instance)
            seconds = round(time.monotonic() - started, 3)
            self._count("succeeded", session_id, item, instance.url, seconds=seconds)
            log.info(
                "session restored",
                extra={
                    "session_id": session_id,
                    "lost_on": item.lost_on,
                    "instance": instance.url,
                    "seconds": seconds,
                },
            )
        finally:
            attempts.starting.discard(session_id)

    async def _running_somewhere(self, session_id: str) -> Instance | None:
        """A holder found now (connected or still starting), or None when nobody has it."""
        try:
            located = await self._attempts.discovery.locate(session_id, not_before=time.monotonic())
        except ProxyError:
            return None
        if located.instance is None:
            return None
        if located.status == CONNECTED:
            await self._attempts.now_on(session_id, located.instance)
        return located.instance

    def _count(
        self,
        result: str,
        session_id: str,
        item: _Lost,
        instance: str | None,
        why: str | None = None,
        seconds: float | None = None,
    ) -> None:
        self.counts[result] += 1
        metrics.RESTORES.labels(result).inc()
        if result != "started":
            self.recent.append(
                {
                    "session_id": session_id,
                    "result": result,
                    "lost_on": item.lost_on,
                    "instance": instance,
                    "why": why,
                    "seconds": seconds,
                    "at": time.time(),
                }
            )

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "leading": self.leading,  # this replica holds the restore lock now
            "queued": len(self._queue),
            "restoring": len(self._attempts.starting),
            "counts": dict(self.counts),
            "most_starts_at_once": dict(self._starter.most),
            "recent": list(self.recent)[-50:],
        }
