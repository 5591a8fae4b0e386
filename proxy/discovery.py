"""Who holds session X: every available instance is asked at once; and what each instance holds
(inventories, snapshots and the merged fleet-wide list, all from one fan-out: ``ask_lists``).

A probe is the instance's own status route with the proxy's own api key. When several instances
hold the session (a restart starts every active account), every replica must pick the same copy:
``owners.choose_owner`` decides from all the answers. The preferred owner (the database's) answering
``connected`` ends the round at once; any other connected answer waits ``DUPLICATE_GRACE`` for the
rest, so a second copy is seen without a slow instance holding every lookup for long.

Probing is bounded. Per-session probes draw from a token bucket (``REDISCOVERY_RATE`` per second);
once it is empty, lookups are answered from a fleet snapshot instead: one list call per instance,
shared by every lookup waiting at that moment and taken at most once per ``SNAPSHOT_INTERVAL``.
A flood of random ids therefore costs the fleet a fixed number of calls per second, however many
requests it holds, and a crash that moves a thousand sessions costs one round of list calls.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from . import metrics
from .client import Headers, Timeouts, UpstreamClient
from .config import Settings
from .errors import ProxyError
from .instances import Instance, InstanceSet
from .owners import CONNECTED, choose_owner

STATUS_PATH = "/api/sessions/{id}/status"
LIST_PATH = "/api/sessions"
DUPLICATE_GRACE = 0.2  # seconds to wait for other holders once one answered connected


@dataclass
class Located:
    instance: Instance | None
    status: str | None = None
    complete: bool = True  # every asked instance answered; a miss can be remembered
    asked: int = 0
    holders: list[tuple[Instance, str]] = field(default_factory=list)  # every copy seen
    probed: bool = False  # answered by probes just now (a confirmation), not by a snapshot


class TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@dataclass
class Snapshot:
    """Every session the fleet holds, from one round of list calls that started at ``taken_at``."""

    taken_at: float
    holders: dict[str, list[tuple[str, str]]]  # session id -> [(instance url, status)]
    failed: int


@dataclass
class ListAnswer:
    """One instance's answer to a session-list call, or the error that took its place."""

    instance: Instance
    status: int = 0  # 0: no answer at all
    body: bytes | None = None
    error: ProxyError | None = None

    @property
    def document(self) -> dict[str, Any] | None:
        """The answer as a JSON object, when it is a 200 with one."""
        if self.status != 200 or not self.body:
            return None
        try:
            document = json.loads(self.body)
        except ValueError:
            return None
        return document if isinstance(document, dict) else None


@dataclass
class FleetList:
    """The fleet-wide session list, merged from every available instance's answer."""

    members: int  # every instance in the set, asked or not
    failed: list[dict[str, Any]]  # instance, status, error: the ones whose list is missing
    sessions: list[dict[str, Any]] = field(default_factory=list)  # each with its "instance"
    answered: int = 0  # instances whose list was read
    copies: dict[str, list[tuple[Instance, str]]] = field(default_factory=dict)  # id -> holders
    # Nobody answered and every instance refused the key (401 or 403): the first refusal.
    refused: ListAnswer | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "success": True,
            "sessions": self.sessions,
            "total": len(self.sessions),
            "instances": self.members,
            "failed_instances": self.failed,
        }


@dataclass
class Inventory:
    """One list call per instance: what each holds, and which could not be asked."""

    sessions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # not with on_list
    listed: dict[str, int] = field(default_factory=dict)  # url -> sessions its list had
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


class Discovery:
    def __init__(self, settings: Settings, instances: InstanceSet, client: UpstreamClient) -> None:
        self._instances = instances
        self._client = client
        self._timeouts = Timeouts(settings.connect_timeout, settings.discovery_timeout)
        # A list of thousands of sessions is not a status probe (LIST_TIMEOUT).
        self._list_timeouts = Timeouts(settings.connect_timeout, settings.list_timeout)
        self._key_query = "?api_key=" + quote(settings.api_key, safe="") if settings.api_key else ""
        self._bucket = TokenBucket(settings.rediscovery_rate, max(1.0, settings.rediscovery_rate))
        self._snapshot_interval = settings.snapshot_interval
        self._snapshot: Snapshot | None = None
        self._snapshot_task: asyncio.Task[Snapshot] | None = None
        self.probes = 0  # status requests sent to the fleet, for tests and metrics
        self.snapshots = 0  # rounds of list calls taken instead of probes
        self._statuses: dict[str, tuple[float, asyncio.Task[dict[str, str] | ProxyError]]] = {}

    async def probe(self, instance: Instance, session_id: str) -> str | None:
        """The session's status on this instance, or None when it does not hold it."""
        return (await self._probe(instance, session_id))[1]

    async def _probe(self, instance: Instance, session_id: str) -> tuple[Instance, str | None]:
        self.probes += 1
        metrics.PROBES.inc()
        target = STATUS_PATH.format(id=session_id) + self._key_query
        status, body = await self._client.get_json(instance.url, target, self._timeouts)
        if status == 200 and isinstance(body, dict):
            return instance, str(body.get("status") or "unknown")
        if status == 404:
            return instance, None
        raise ProxyError(f"status probe answered {status}")

    async def locate(
        self,
        session_id: str,
        exclude: Instance | None = None,
        not_before: float | None = None,
        preferred: Instance | None = None,
        every_holder: bool = False,
    ) -> Located:
        """Find the holder among healthy instances, then, as a last resort, among ejected ones
        (a session held only by an instance that just came back must not be "not found").

        ``not_before``: a snapshot used instead of probes must be this new (a rediscovery after
        a failure needs a view of the fleet taken after that failure). ``preferred``: the
        database's owner, chosen when it holds the session connected. ``every_holder``: wait for
        every answer (a DELETE must reach every copy), not just long enough to choose."""
        healthy = [i for i in self._instances.all if i.healthy and i is not exclude]
        if not every_holder:
            healthy = [i for i in healthy if not i.draining]
        ejected = [
            i for i in self._instances.all if not i.healthy and not i.draining and i is not exclude
        ]
        if not self._bucket.take():
            return await self._from_snapshot(
                session_id, exclude, not_before, len(healthy), preferred
            )
        located = await self._probe_all(healthy, session_id, preferred, every_holder)
        if located.instance is None and ejected:
            last_resort = await self._probe_all(ejected, session_id, preferred, every_holder)
            # An ejected instance that cannot answer is known to be down: it does not make the
            # answer incomplete.
            located.instance, located.status = last_resort.instance, last_resort.status
            located.holders = last_resort.holders
        located.asked = len(healthy)
        return located

    async def _probe_all(
        self,
        candidates: list[Instance],
        session_id: str,
        preferred: Instance | None,
        every_holder: bool,
    ) -> Located:
        located = Located(None, asked=len(candidates), probed=True)
        if not candidates:
            return located
        loop = asyncio.get_running_loop()
        pending = {asyncio.create_task(self._probe(i, session_id)) for i in candidates}
        grace_ends: float | None = None
        settled = False
        try:
            while pending and not settled:
                timeout = None if grace_ends is None else max(0.0, grace_ends - loop.time())
                done, pending = await asyncio.wait(
                    pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    break  # the grace is over: the copies seen so far decide
                for task in done:
                    try:
                        instance, status = task.result()
                    except ProxyError:
                        located.complete = False
                        continue
                    if status is None:
                        continue
                    located.holders.append((instance, status))
                    if status == CONNECTED and not every_holder:
                        # The database's owner holding it connected is the answer already.
                        settled = settled or instance is preferred
                        if grace_ends is None:
                            grace_ends = loop.time() + DUPLICATE_GRACE
        finally:
            for task in pending:
                task.cancel()
        if located.holders:
            located.instance = choose_owner(located.holders, preferred)
            located.status = next(s for i, s in located.holders if i is located.instance)
        return located

    async def _from_snapshot(
        self,
        session_id: str,
        exclude: Instance | None,
        not_before: float | None,
        asked: int,
        preferred: Instance | None = None,
    ) -> Located:
        snapshot = await self.snapshot(not_before)
        found: list[tuple[Instance, str]] = []
        for url, status in snapshot.holders.get(session_id, []):
            instance = self._instances.get(url)
            if instance is not None and not instance.draining and instance is not exclude:
                found.append((instance, status))
        # A healthy holder first; an ejected one only as a last resort.
        healthy = [pair for pair in found if pair[0].healthy]
        candidates = healthy or found
        if candidates:
            owner = choose_owner(candidates, preferred)
            status = next(s for i, s in candidates if i is owner)
            return Located(owner, status, True, asked, holders=found)
        return Located(None, complete=snapshot.failed == 0, asked=asked)

    async def snapshot(self, not_before: float | None = None) -> Snapshot:
        """A fleet snapshot no older than ``SNAPSHOT_INTERVAL`` (and started after ``not_before``);
        concurrent callers share one round of list calls, and rounds are at least an interval
        apart."""
        now = time.monotonic()
        oldest = now - self._snapshot_interval
        if not_before is not None:
            oldest = max(oldest, not_before)
        current = self._snapshot
        if current is not None and current.taken_at >= oldest:
            return current
        task = self._snapshot_task
        if task is None or task.done():
            earliest = current.taken_at + self._snapshot_interval if current else now
            task = asyncio.create_task(self._take_snapshot(max(0.0, earliest - now)))
            self._snapshot_task = task
        snapshot = await asyncio.shield(task)
        if snapshot.taken_at < oldest:  # a round that started before we asked: take the next
            return await self.snapshot(not_before)
        return snapshot

    async def _take_snapshot(self, delay: float) -> Snapshot:
        if delay:
            await asyncio.sleep(delay)
        taken_at = time.monotonic()
        inventory = await self.inventory()
        self.snapshots += 1
        metrics.SNAPSHOTS.inc()
        holders: dict[str, list[tuple[str, str]]] = {}
        for url, sessions in inventory.sessions.items():
            for entry in sessions:
                if isinstance(entry, dict) and isinstance(entry.get("session_id"), str):
                    status = str(entry.get("status") or "unknown")
                    holders.setdefault(entry["session_id"], []).append((url, status))
        # Ejected instances that cannot answer are known to be down: not a gap in the view.
        failed = [u for u in inventory.failed if (i := self._instances.get(u)) and i.healthy]
        self._snapshot = Snapshot(taken_at, holders, len(failed))
        return self._snapshot

    async def inventory(
        self, on_list: Callable[[str, list[dict[str, Any]]], None] | None = None
    ) -> Inventory:
        """Every non-draining instance's session list, asked with the proxy's own key.
        ``on_list`` is given each list as soon as it is parsed (URL, entries), and then keeps
        what it needs of it: ``sessions`` stays empty (a million parsed entries are ~0.7 GB)."""
        started = time.monotonic()
        inventory = Inventory()
        asked = [i for i in self._instances.all if not i.draining]

        async def one(instance: Instance) -> None:
            # Each list parsed as soon as it is read, while the others are still coming: at
            # 100 lists of 10,000 sessions the parse is a second of CPU that would otherwise
            # start only after the slowest instance answered.
            answer = (await self.ask_lists([instance], self._key_query, self._list_timeouts))[0]
            url = instance.url
            document = answer.document
            if answer.error is not None:
                inventory.failed[url] = answer.error.detail
            elif document is None:
                inventory.failed[url] = f"list answered {answer.status}"
            else:
                sessions = document.get("sessions")
                listed = sessions if isinstance(sessions, list) else []
                inventory.listed[url] = len(listed)
                if on_list is None:
                    inventory.sessions[url] = listed
                else:
                    on_list(url, listed)

        await asyncio.gather(*(one(i) for i in asked))
        # In the instance set's order, as before, whatever order the answers came in.
        inventory.sessions = {
            i.url: inventory.sessions[i.url] for i in asked if i.url in inventory.sessions
        }
        inventory.listed = {
            i.url: inventory.listed[i.url] for i in asked if i.url in inventory.listed
        }
        inventory.seconds = time.monotonic() - started
        return inventory

    async def sessions_on(self, instance: Instance) -> list[dict[str, Any]]:
        """The sessions one instance holds now (its list, asked with the proxy's own key)."""
        answer = (await self.ask_lists([instance], self._key_query, self._list_timeouts))[0]
        if answer.error is not None:
            raise answer.error
        document = answer.document
        if document is None:
            raise ProxyError(f"{instance.url}'s session list answered {answer.status}")
        sessions = document.get("sessions")
        return [
            entry
            for entry in (sessions if isinstance(sessions, list) else [])
            if isinstance(entry, dict) and isinstance(entry.get("session_id"), str)
        ]

    async def statuses_on(
        self, instance: Instance, every: float, not_before: float = 0.0
    ) -> dict[str, str] | ProxyError:
        """session id -> status on ``instance``, from one list call shared by every caller
        within half of ``every`` (the callers' poll interval): however many sessions are
        awaited there, the instance gets one call per poll. ``not_before``: a call started
        earlier does not count (a start must not read a list from before its create). The error
        when the instance cannot answer."""
        now = time.monotonic()
        cached = self._statuses.get(instance.url)
        if cached is None or cached[0] < max(now - every / 2, not_before):
            task = asyncio.create_task(self._statuses_of(instance))
            cached = self._statuses[instance.url] = (now, task)
        return await asyncio.shield(cached[1])

    async def _statuses_of(self, instance: Instance) -> dict[str, str] | ProxyError:
        try:
            entries = await self.sessions_on(instance)
        except ProxyError as error:
            return error
        return {e["session_id"]: str(e.get("status") or "unknown") for e in entries}

    async def fleet_list(
        self, query: str, timeouts: Timeouts, headers_for: Callable[[Instance], Headers]
    ) -> FleetList:
        """The fleet-wide list a client asked for (``GET /api/sessions``): every available
        instance asked with the client's own query and headers, the answers merged."""
        everyone = self._instances.all
        answers = await self.ask_lists(
            [i for i in everyone if i.available], query, timeouts, headers_for
        )
        listing = FleetList(
            members=len(everyone),
            failed=[
                {"instance": i.url, "status": None, "error": "ejected by health checks"}
                for i in everyone
                if not i.available
            ],
        )
        for answer in answers:
            instance = answer.instance
            document = answer.document
            entries = document.get("sessions") if document is not None else None
            if not isinstance(entries, list):
                problem = f"{answer.error.code}: {answer.error.detail}" if answer.error else ""
                listing.failed.append(
                    {
                        "instance": instance.url,
                        "status": answer.status or None,
                        "error": problem or body_text(answer.body),
                    }
                )
                continue
            listing.answered += 1
            for entry in entries:
                if isinstance(entry, dict):
                    listing.sessions.append({**entry, "instance": instance.url})
                    sid = entry.get("session_id")
                    if isinstance(sid, str):
                        holders = listing.copies.setdefault(sid, [])
                        holders.append((instance, str(entry.get("status"))))
        if not listing.answered:
            statuses = {a.status for a in answers}
            if len(statuses) == 1 and next(iter(statuses)) in (401, 403):
                listing.refused = answers[0]
        return listing

    async def ask_lists(
        self,
        instances: list[Instance],
        query: str,
        timeouts: Timeouts,
        headers_for: Callable[[Instance], Headers] | None = None,
    ) -> list[ListAnswer]:
        """``GET /api/sessions`` + ``query`` on every one of ``instances`` at once: the one
        fan-out behind inventories, snapshots and the fleet-wide list."""

        async def ask(instance: Instance) -> ListAnswer:
            headers = headers_for(instance) if headers_for else [(b"host", instance.host_header)]
            try:
                response = await self._client.send(
                    "GET", instance.url, LIST_PATH + query, headers, b"", timeouts
                )
                try:
                    body = await response.read()
                finally:
                    await response.close()
            except ProxyError as error:
                return ListAnswer(instance, error=error)
            return ListAnswer(instance, response.status, body)

        return list(await asyncio.gather(*(ask(i) for i in instances)))


def body_text(body: bytes | None) -> str:
    return (body or b"").decode("utf-8", "replace")[:200]
