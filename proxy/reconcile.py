"""Reconcile: the fleet's actual sessions against the database rows, in O(instances) calls.

One list call per instance, one read of the active rows, one batched write of every move: the
seed's 5-minute health check, done in a constant number of statements however many sessions
there are. With several replicas, a Postgres advisory lock lets exactly one of them do it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import metrics
from .config import Settings
from .discovery import Discovery, Inventory
from .healing import DuplicateSettler
from .instances import Instance, InstanceSet
from .owners import choose_owner
from .store import Lock, LockLost, Store, StoreUnavailable

log = logging.getLogger("session_proxy.reconcile")

CLASSES = ("verified", "moved", "unreachable", "duplicated", "unknown")


LIST_LIMIT = 1000  # rows listed per class in a report; the counts are exact


@dataclass
class Report:
    """One pass's outcome. ``counts`` are exact; each class lists at most its first
    ``LIST_LIMIT`` rows (a report of a million verified ids cost 1.2 s to build, 23 MB of JSON,
    and stayed in every replica's memory until the next pass)."""

    started_at: str
    dry_run: bool
    skipped: str | None = None  # why nothing was done (another replica leads, database down)
    seconds: float = 0.0
    instances: dict[str, int] = field(default_factory=dict)  # url -> sessions it reported
    unreachable_instances: dict[str, str] = field(default_factory=dict)  # url -> error
    verified: list[str] = field(default_factory=list)
    moved: list[dict[str, Any]] = field(default_factory=list)
    unreachable: list[dict[str, Any]] = field(default_factory=list)
    duplicated: list[dict[str, Any]] = field(default_factory=list)
    unknown: list[dict[str, Any]] = field(default_factory=list)
    disconnected: list[dict[str, Any]] = field(default_factory=list)  # extra copies settled
    rows_written: int = 0
    sql_statements: int = 0
    inventory_calls: int = 0
    # Exact sizes of the classes, when more was found than the lists keep.
    totals: dict[str, int] = field(default_factory=dict)
    list_limit: int = LIST_LIMIT
    timings: dict[str, float] = field(default_factory=dict)  # seconds of the pass's parts

    def add(self, name: str, row: Any) -> None:
        """Count a row of class ``name`` and list it while the list has room."""
        self.totals[name] = self.totals.get(name, 0) + 1
        listed: list[Any] = getattr(self, name)
        if len(listed) < self.list_limit:
            listed.append(row)

    def counts(self) -> dict[str, int]:
        return {name: self.totals.get(name, len(getattr(self, name))) for name in CLASSES}

    def as_dict(self) -> dict[str, Any]:
        # Built by hand: dataclasses.asdict deep-copies every row.
        return {
            "started_at": self.started_at,
            "dry_run": self.dry_run,
            "skipped": self.skipped,
            "seconds": self.seconds,
            "instances": dict(self.instances),
            "unreachable_instances": dict(self.unreachable_instances),
            "verified": list(self.verified),
            "moved": list(self.moved),
            "unreachable": list(self.unreachable),
            "duplicated": list(self.duplicated),
            "unknown": list(self.unknown),
            "disconnected": list(self.disconnected),
            "rows_written": self.rows_written,
            "sql_statements": self.sql_statements,
            "inventory_calls": self.inventory_calls,
            "counts": self.counts(),
            "disconnected_count": self.totals.get("disconnected", len(self.disconnected)),
            "listed_per_class": self.list_limit,
            "lists_capped": self.capped(),
            "timings": dict(self.timings),
        }

    def capped(self) -> bool:
        return any(
            self.totals.get(name, 0) > len(getattr(self, name))
            for name in (*CLASSES, "disconnected")
        )

    def as_text(self, limit: int = 20) -> str:
        if self.skipped:
            return f"reconcile skipped: {self.skipped}"
        lines = [
            f"reconcile {'(dry run) ' if self.dry_run else ''}at {self.started_at}, "
            f"{self.seconds:.3f} s, {self.inventory_calls} list calls, "
            f"{self.sql_statements} SQL statements, {self.rows_written} rows written",
            "",
            f"{'instance':<40} {'sessions':>9}",
        ]
        for url, count in sorted(self.instances.items()):
            lines.append(f"{url:<40} {count:>9}")
        for url, error in sorted(self.unreachable_instances.items()):
            lines.append(f"{url:<40} {'UNREACHABLE':>9}  {error[:60]}")
        lines += ["", f"{'class':<12} {'sessions':>9}"]
        for name, count in self.counts().items():
            lines.append(f"{name:<12} {count:>9}")
        for title, name in (
            ("moved", "moved"),
            ("unreachable", "unreachable"),
            ("duplicated", "duplicated"),
            ("unknown", "unknown"),
            ("extra copies settled", "disconnected"),
        ):
            rows: list[Any] = getattr(self, name)
            if rows:
                total = self.totals.get(name, len(rows))
                lines += ["", f"{title} (first {min(limit, len(rows))} of {total}):"]
                lines += [f"  {row}" for row in rows[:limit]]
        if self.capped():
            lines += [
                "",
                f"counts are exact; the JSON report lists at most {self.list_limit} rows a class",
            ]
        return "\n".join(lines)


def _status(entry: dict[str, Any]) -> str:
    return str(entry.get("status") or "unknown")


class Reconciler:
    def __init__(
        self,
        settings: Settings,
        instances: InstanceSet,
        discovery: Discovery,
        store: Store | None,
        settler: DuplicateSettler | None = None,
        on_lost: Callable[[list[tuple[str, str | None]]], None] | None = None,
    ) -> None:
        self._settings = settings
        self._instances = instances
        self._discovery = discovery
        self._store = store
        self._settler = settler  # set: extra copies of a session are disconnected
        self._on_lost = on_lost  # told the active rows no instance holds (RESTORE=on)
        self.runs = 0
        self.skips = 0
        self.last_report: Report | None = None
        self.last_completed: Report | None = None
        self.last_success: float | None = None

    async def run_once(self, dry_run: bool = False) -> Report:
        report = Report(datetime.now(UTC).isoformat(timespec="seconds"), dry_run)
        store = self._store
        if store is None:
            report.skipped = "no database configured"
            return report
        started = time.monotonic()
        before = store.queries.reconcile
        try:
            async with store.lead() as lock:
                if lock is None:
                    report.skipped = "another replica is reconciling"
                else:
                    await lock.guard(self._pass(store, report, lock))
        except LockLost as exc:
            # Whatever the pass had not written yet stays unwritten: another replica may be
            # reconciling now, and only the holder of the lock writes.
            # ("database" in the reason: POST /_proxy/reconcile answers 503, the CLI exits 1.)
            report.skipped = f"lost the reconcile lock with its database connection: {exc}"
        except StoreUnavailable as exc:
            report.skipped = f"database unreachable: {exc}"
        report.seconds = round(time.monotonic() - started, 4)
        report.sql_statements = store.queries.reconcile - before
        self.last_report = report
        if report.skipped:
            self.skips += 1
            metrics.RECONCILE_RUNS.labels("skipped").inc()
            log.warning("reconcile skipped", extra={"reason": report.skipped})
        else:
            self.runs += 1
            self.last_success = time.time()
            self.last_completed = report
            metrics.RECONCILE_RUNS.labels("done").inc()
            metrics.RECONCILE_LAST_SUCCESS.set(self.last_success)
            for name, count in report.counts().items():
                metrics.RECONCILE_SESSIONS.labels(name).set(count)
            log.info(
                "reconcile finished",
                extra={
                    **report.counts(),
                    "dry_run": dry_run,
                    "seconds": report.seconds,
                    "rows_written": report.rows_written,
                    "unreachable_instances": len(report.unreachable_instances),
                },
            )
        return report

    async def _pass(self, store: Store, report: Report, lock: Lock) -> None:
        started = time.monotonic()
        # The lists and the row read at once: the instances and Postgres work meanwhile. (Not
        # the rows after the lists: a session started after its instance's list was taken
        # would then be in a row and on no list, "lost", and restored elsewhere.)
        reading = asyncio.ensure_future(self._read_rows(store, lock, started, report))
        try:
            inventory = await self._discovery.inventory()
        except BaseException:
            reading.cancel()
            with contextlib.suppress(BaseException):
                await reading
            raise
        report.timings["inventory"] = round(inventory.seconds, 4)
        rows = await reading
        classified = time.monotonic()
        # At a million sessions this is seconds of Python: in a thread, so the event loop that
        # serves this replica's requests gets the interpreter every switch interval (5 ms)
        # instead of waiting for the whole pass (6.3 s measured at 1,000,000 on the loop).
        moves, extras, unreachable, resolved = await asyncio.to_thread(
            self._classify, inventory, rows, report
        )
        report.timings["classify"] = round(time.monotonic() - classified, 4)
        if report.dry_run:
            return
        if self._on_lost is not None and unreachable:
            # Only where nobody can hold it unseen: the row's instance answered its list (and
            # lacks it), or is down or unknown. One that is up but did not answer may hold it.
            lost = [
                (session_id, stored)
                for session_id, stored in unreachable
                if (was_on := resolved[stored]) is None
                or not was_on.healthy
                or was_on.url in inventory.sessions
            ]
            self._on_lost(lost)
        if moves:
            writing = time.monotonic()
            report.rows_written = await store.write_owners(moves, purpose="reconcile", lock=lock)
            report.timings["write"] = round(time.monotonic() - writing, 4)
        if extras:
            # A replica may have learned the other copy by rediscovery: every one forgets it
            # and reads the row again (the moved ones were notified by the write itself).
            await store.notify([sid for sid in extras if sid not in moves], lock=lock)
        if self._settler is not None:
            for session_id, (owner, others) in extras.items():
                for settled in await self._settler.settle(session_id, owner, others):
                    report.add(
                        "disconnected",
                        {
                            "session_id": settled.session_id,
                            "instance": settled.instance,
                            "outcome": settled.outcome,
                        },
                    )

    def _classify(
        self, inventory: Inventory, rows: list[tuple[str, str | None]], report: Report
    ) -> tuple[
        dict[str, str],
        dict[str, tuple[Instance, list[Instance]]],
        list[tuple[str, str | None]],
        dict[str | None, Instance | None],
    ]:
        """Each row against the lists: moves to write, duplicates, rows nobody holds (the
        report is filled in as a side effect). Runs in a worker thread: it only reads the
        instances' state and touches nothing else the event loop uses."""
        report.inventory_calls = len(inventory.sessions) + len(inventory.failed)
        report.unreachable_instances = dict(inventory.failed)
        # The first holder's URL per session, and (url, status) pairs only for sessions on
        # several instances: these loops run once per session, and at a million of them every
        # allocation shows. A single holder's status never matters: choose_owner of one
        # candidate is that candidate.
        first: dict[str, str] = {}
        more: dict[str, list[tuple[str, str]]] = {}
        for url, sessions in inventory.sessions.items():
            report.instances[url] = len(sessions)
            for entry in sessions:
                if not isinstance(entry, dict):
                    continue
                session_id = entry.get("session_id")
                if not isinstance(session_id, str):
                    continue
                seen = first.setdefault(session_id, url)
                if seen is not url and seen != url:
                    more.setdefault(session_id, []).append((url, _status(entry)))
        if more:
            # The first holders' statuses, from their own lists (duplicates only, so rare).
            wanted: dict[str, set[str]] = {}
            for session_id in more:
                wanted.setdefault(first[session_id], set()).add(session_id)
            for url, missing in wanted.items():
                for entry in inventory.sessions[url]:
                    if isinstance(entry, dict) and (sid := entry.get("session_id")) in missing:
                        missing.discard(sid)
                        more[sid].insert(0, (url, _status(entry)))
        by_url = {instance.url: instance for instance in self._instances.all}
        # Every spelling first, so a move writes the form the table already uses for its target.
        resolved = {stored: self._instances.resolve(stored) for stored in {r[1] for r in rows}}
        stored_url = {stored: (i.url if i is not None else None) for stored, i in resolved.items()}
        in_database = {row[0] for row in rows}
        moves: dict[str, str] = {}
        extras: dict[str, tuple[Instance, list[Instance]]] = {}
        unreachable: list[tuple[str, str | None]] = []
        verified = report.verified
        limit = report.list_limit
        for session_id, stored in rows:
            held_at = first.get(session_id)
            if held_at is None:
                unreachable.append((session_id, stored))
                continue
            if held_at == stored_url[stored] and session_id not in more:
                # One holder, and it is the row's owner: what choose_owner would say.
                if len(verified) < limit:
                    verified.append(session_id)
                continue
            held = [
                (instance, status)
                for url, status in more.get(session_id) or ((held_at, ""),)
                if (instance := by_url.get(url)) is not None
            ]
            stored_instance = resolved[stored]
            if not held:
                unreachable.append((session_id, stored))
                continue
            # The same rule routing uses, so the row written here is the copy every replica
            # picks: the row's owner if it holds the session connected, else a connected copy.
            if len(held) == 1:
                owner = held[0][0]  # what choose_owner says of one candidate
            else:
                owner = choose_owner([p for p in held if p[0].healthy] or held, stored_instance)
            if len(held) > 1:
                report.add(
                    "duplicated",
                    {
                        "session_id": session_id,
                        "instances": [i.url for i, _ in held],
                        "owner": owner.url,
                    },
                )
                extras[session_id] = (owner, [i for i, _ in held if i is not owner])
            if owner is stored_instance:
                if len(verified) < limit:
                    verified.append(session_id)
                continue
            moves[session_id] = owner.alias
            report.add("moved", {"session_id": session_id, "from": stored, "to": owner.alias})
        report.totals["verified"] = len(rows) - len(moves) - len(unreachable)
        for session_id, stored in unreachable:
            report.add("unreachable", {"session_id": session_id, "stored": stored})
        for session_id in first.keys() - in_database:
            report.add(
                "unknown",
                {
                    "session_id": session_id,
                    "instances": [
                        url for url, _ in more.get(session_id) or ((first[session_id], ""),)
                    ],
                },
            )
        return moves, extras, unreachable, resolved

    @staticmethod
    async def _read_rows(
        store: Store, lock: Lock, started: float, report: Report
    ) -> list[tuple[str, str | None]]:
        rows = await store.active_rows(lock)
        report.timings["read_rows"] = round(time.monotonic() - started, 4)
        return rows

    def _healthy(self, url: str) -> bool:
        instance = self._instances.get(url)
        return instance is not None and instance.healthy

    async def run(self) -> None:
        """Every RECONCILE_INTERVAL (with 10% jitter, so replicas do not line up)."""
        interval = self._settings.reconcile_interval
        while True:
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))
            # A failing pass is a bug: the task supervisor logs, counts and restarts the loop.
            await self.run_once()

    def status(self) -> dict[str, Any]:
        report = self.last_report
        return {
            "runs": self.runs,
            "skips": self.skips,
            "last_success": self.last_success,
            "last_skipped": report.skipped if report else None,
            "last_counts": self.last_completed.counts() if self.last_completed else None,
        }
