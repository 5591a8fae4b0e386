"""Moving sessions off an instance before it stops (drain) and between instances (rebalance).

Per session, break before make (a WhatsApp login must not run in two places at once): hold its
new requests, let the ones in flight finish, disconnect it on the source, start it on the target
(``starts.py``: the create call, then wait for ``connected``), switch the routing table and the
database, release the held requests to the target in arrival order. A session that comes up on no
target is started on its source again. ``DRAIN_CONCURRENCY`` sessions move at a time.

A draining or drained instance takes no new sessions (placement skips it; sessions it still holds
are served). It takes them again when it is undrained, or when it comes back after having been
down (a drained pod that restarted is a new instance). The state is this replica's: with several
replicas, drain through one and the others learn the moves from the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import metrics
from .attempts import Attempts
from .config import Settings
from .errors import ProxyError
from .instances import Instance, InstanceSet
from .owners import CONNECTED
from .restore import Restorer
from .starts import Starter, StartFailed
from .store import CreateFields, Store, StoreUnavailable

log = logging.getLogger("session_proxy.drain")

ACTIVE, DRAINING, DRAINED = "active", "draining", "drained"
_ROUNDS = 3  # list the source again after a round: sessions placed meanwhile by other replicas


@dataclass
class DrainState:
    state: str = ACTIVE
    moved: int = 0
    remaining: int = 0
    failed: int = 0
    started_at: float | None = None
    seconds: float | None = None
    errors: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=50))

    def count(self, move: Move, moved: bool, why: str) -> None:
        """One move of this drain ended."""
        self.remaining = max(0, self.remaining - 1)
        if moved:
            self.moved += 1
        else:
            self.failed += 1
            self.errors.append({"session_id": move.session_id, "error": why})

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "moved": self.moved,
            "remaining": self.remaining,
            "failed": self.failed,
            "started_at": self.started_at,
            "seconds": self.seconds,
            "errors": list(self.errors),
        }


@dataclass
class Move:
    session_id: str
    source: Instance
    target: Instance | None = None  # None: wherever the least-loaded start slot is

    def as_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "from": self.source.url,
            "to": self.target.url if self.target else None,
        }


class Drainer:
    def __init__(
        self,
        settings: Settings,
        instances: InstanceSet,
        attempts: Attempts,
        starter: Starter,
        restorer: Restorer,
        store: Store | None,
    ) -> None:
        self._settings = settings
        self._instances = instances
        self._attempts = attempts
        self._starter = starter
        self._restorer = restorer
        self._store = store
        self.states: dict[str, DrainState] = {}
        self._jobs: set[asyncio.Task[None]] = set()
        self.last_rebalance: dict[str, Any] | None = None

    def starts_running(self, instance: Instance) -> int:
        return self._starter.busy(instance.url)

    def state_of(self, instance: Instance) -> DrainState:
        return self.states.get(instance.url) or DrainState()

    # --- drain -----------------------------------------------------------------------------------

    def drain(self, instance: Instance) -> DrainState:
        """Start moving every session off ``instance`` (in the background); returns its state."""
        state = self.states.get(instance.url)
        if state is not None and state.state == DRAINING:
            return state
        state = self.states[instance.url] = DrainState(DRAINING, started_at=time.time())
        instance.cordoned = True
        metrics.INSTANCE_DRAINING.labels(instance.url).set(1)
        log.warning("draining instance", extra={"instance": instance.url})
        self._spawn(self._drain(instance, state))
        return state

    def undrain(self, instance: Instance) -> None:
        """Take new sessions there again (a drain in progress stops after its current moves)."""
        instance.cordoned = False
        metrics.INSTANCE_DRAINING.labels(instance.url).set(0)
        state = self.states.pop(instance.url, None)
        if state is not None:
            state.state = ACTIVE
            log.info("instance takes new sessions again", extra={"instance": instance.url})

    def instance_back(self, instance: Instance) -> None:
        """Health saw ``instance`` come back after being down: a drained one is new now."""
        state = self.states.get(instance.url)
        if state is not None and state.state == DRAINED:
            self.undrain(instance)

    async def _drain(self, instance: Instance, state: DrainState) -> None:
        started = time.monotonic()
        try:
            for _ in range(_ROUNDS):
                if state.state != DRAINING:
                    return  # undrained meanwhile
                try:
                    held = await self._sessions_on(instance)
                except ProxyError as error:
                    state.errors.append({"error": f"cannot list its sessions: {error.detail}"})
                    break
                if not held:
                    break
                state.remaining = len(held)
                fields = await self._fields([sid for sid, _ in held], dict(held))
                await self._run_moves(
                    [Move(sid, instance) for sid, _ in held],
                    fields,
                    state.count,
                    lambda: state.state == DRAINING,
                )
            state.remaining = len(await self._sessions_on(instance))
        except ProxyError as error:
            state.errors.append({"error": f"cannot list its sessions: {error.detail}"})
        finally:
            state.seconds = round(time.monotonic() - started, 3)
            if state.state == DRAINING:
                state.state = DRAINED
            log.warning(
                "instance drained",
                extra={
                    "instance": instance.url,
                    "moved": state.moved,
                    "failed": state.failed,
                    "remaining": state.remaining,
                    "seconds": state.seconds,
                },
            )

    async def _sessions_on(self, instance: Instance) -> list[tuple[str, Any]]:
        """(session id, workspace id) of every session the instance holds now."""
        entries = await self._attempts.discovery.sessions_on(instance)
        return [(e["session_id"], e.get("workspace_id")) for e in entries]

    async def _fields(
        self, session_ids: list[str], workspaces: dict[str, Any]
    ) -> dict[str, CreateFields]:
        """The database row's create fields, else the create the proxy saw, else the list's."""
        found: dict[str, CreateFields] = {}
        if self._store is not None:
            try:
                found = await self._store.create_fields(session_ids)
            except StoreUnavailable:
                found = {}
        fields = {}
        for sid in session_ids:
            known = found.get(sid) or self._restorer.fields_for(sid)
            if known.workspace_id is None and workspaces.get(sid) is not None:
                known = CreateFields(sid, known.account_id, workspaces[sid])
            fields[sid] = known
        return fields

    async def _run_moves(
        self,
        moves: list[Move],
        fields: dict[str, CreateFields],
        done: Callable[[Move, bool, str], None],
        going_on: Callable[[], bool] = lambda: True,
    ) -> None:
        """``DRAIN_CONCURRENCY`` moves at a time; ``done(move, moved, why)`` after each, no new
        one once ``going_on()`` is false (an undrain)."""
        limit = asyncio.Semaphore(self._settings.drain_concurrency)

        async def one(move: Move) -> None:
            async with limit:
                if going_on():
                    done(move, *await self.move(move, fields[move.session_id]))

        await asyncio.gather(*(one(move) for move in moves))

    # --- one move --------------------------------------------------------------------------------

    async def move(self, move: Move, fields: CreateFields) -> tuple[bool, str]:
        """Move one session, break before make; (moved, why not)."""
        session_id, source = move.session_id, move.source
        attempts = self._attempts
        if session_id in attempts.starting:
            return False, "the proxy is starting it already (a restore or another move)"
        attempts.starting.add(session_id)
        attempts.holds.pause(session_id)
        landed: Instance | None = None
        started = time.monotonic()
        try:
            if not await self._quiet(session_id):
                landed = source
                return self._failed(move, "its requests in flight did not finish in time")
            if not await self._starter.stop_on(source, session_id):
                landed = source
                return self._failed(move, f"{source.url} did not disconnect it")
            try:
                landed = await self._make(move, fields)
            except StartFailed as error:
                landed = await self._back_on_source(move, fields)
                return self._failed(move, error.detail)
            await attempts.now_on(session_id, landed)
            if self._store is not None:
                # Now, not batched: other replicas read the row on their next miss. (Queued by
                # now_on as well: written when the database is back.)
                with contextlib.suppress(StoreUnavailable):
                    await self._store.write_owners({session_id: landed.alias}, purpose="write")
            metrics.MOVES.labels("moved").inc()
            log.info(
                "session moved",
                extra={
                    "session_id": session_id,
                    "from": source.url,
                    "to": landed.url,
                    "seconds": round(time.monotonic() - started, 3),
                },
            )
            return True, ""
        finally:
            attempts.holds.release(session_id, landed)
            attempts.starting.discard(session_id)

    async def _quiet(self, session_id: str) -> bool:
        """Wait until no request for the session is being forwarded (new ones are held)."""
        deadline = time.monotonic() + self._settings.drain_in_flight_wait
        while self._attempts.busy.get(session_id, 0) > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def _make(self, move: Move, fields: CreateFields) -> Instance:
        if move.target is not None and move.target.available:
            async with self._starter.slot(set(), only=move.target) as target:
                try:
                    await self._starter.start_on(target, fields)
                    return target
                except StartFailed:
                    await self._starter.stop_on(target, move.session_id)
        exclude = {move.source.url} | ({move.target.url} if move.target else set())
        return await self._starter.start_somewhere(fields, exclude)

    async def _back_on_source(self, move: Move, fields: CreateFields) -> Instance | None:
        try:
            await self._starter.start_on(move.source, fields)
        except StartFailed as error:
            log.error(
                "moved session is running nowhere: it started neither on a target nor back on "
                "its source",
                extra={
                    "session_id": move.session_id,
                    "source": move.source.url,
                    "why": error.detail,
                },
            )
            return None  # its held requests wait for it to turn up somewhere, as any hold
        await self._attempts.now_on(move.session_id, move.source)
        return move.source

    def _failed(self, move: Move, why: str) -> tuple[bool, str]:
        metrics.MOVES.labels("failed").inc()
        log.warning(
            "session not moved",
            extra={"session_id": move.session_id, "from": move.source.url, "why": why},
        )
        return False, why

    # --- rebalance -------------------------------------------------------------------------------

    async def plan_rebalance(self) -> tuple[list[Move], dict[str, int]]:
        """Moves from the most to the least loaded available instance, until every one is within
        ``REBALANCE_TOLERANCE`` of the mean (a fleet that divides evenly ends even)."""
        targets = [i for i in self._instances.available()]
        if len(targets) < 2:
            return [], {i.url: i.sessions for i in targets}
        connected: dict[str, list[str]] = {}
        inventory = await self._attempts.discovery.inventory()
        for instance in targets:
            entries = inventory.sessions.get(instance.url)
            if entries is None:
                raise ProxyError(f"{instance.url} did not answer its session list")
            connected[instance.url] = [
                e["session_id"]
                for e in entries
                if isinstance(e, dict)
                and isinstance(e.get("session_id"), str)
                and e.get("status") == CONNECTED
            ]
        counts = {url: len(ids) for url, ids in connected.items()}
        before = dict(counts)
        mean = sum(counts.values()) / len(counts)
        tolerance = max(0.5, self._settings.rebalance_tolerance * mean)
        by_url = {i.url: i for i in targets}
        moves: list[Move] = []
        while True:
            most = max(counts, key=lambda u: (counts[u], u))
            least = min(counts, key=lambda u: (counts[u], u))
            if counts[most] - mean <= tolerance and mean - counts[least] <= tolerance:
                break
            if counts[most] - counts[least] <= 1 or not connected[most]:
                break
            moves.append(Move(connected[most].pop(), by_url[most], by_url[least]))
            counts[most] -= 1
            counts[least] += 1
        return moves, before

    async def rebalance(self, dry_run: bool) -> dict[str, Any]:
        moves, before = await self.plan_rebalance()
        after = dict(before)
        for move in moves:
            after[move.source.url] -= 1
            assert move.target is not None
            after[move.target.url] += 1
        plan = {
            "dry_run": dry_run,
            "moves": [m.as_dict() for m in moves],
            "before": before,
            "after": after,
            "mean": round(sum(before.values()) / len(before), 3) if before else 0,
            "tolerance": self._settings.rebalance_tolerance,
            "started_at": time.time(),
        }
        if not dry_run and moves:
            self.last_rebalance = {**plan, "moved": 0, "failed": 0, "done": False}
            self._spawn(self._rebalance(moves, self.last_rebalance))
        return plan

    async def _rebalance(self, moves: list[Move], record: dict[str, Any]) -> None:
        fields = await self._fields([m.session_id for m in moves], {})

        def count(_move: Move, moved: bool, _why: str) -> None:
            record["moved" if moved else "failed"] += 1

        started = time.monotonic()
        await self._run_moves(moves, fields, count)
        record["done"] = True
        record["seconds"] = round(time.monotonic() - started, 3)
        log.info(
            "rebalance finished",
            extra={
                "moved": record["moved"],
                "failed": record["failed"],
                "seconds": record["seconds"],
            },
        )

    # --- jobs ------------------------------------------------------------------------------------

    def _spawn(self, job: Any) -> None:
        task = asyncio.create_task(job)
        self._jobs.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._jobs.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("drain job failed", exc_info=task.exception())

    async def close(self) -> None:
        for task in list(self._jobs):
            task.cancel()
        await asyncio.gather(*self._jobs, return_exceptions=True)
