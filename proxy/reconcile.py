"""Reconcile: the fleet's actual sessions against the database rows, in O(instances) calls.

One list call per instance, one read of the active rows, one batched write of every move: the
seed's 5-minute health check, done in a constant number of statements however many sessions
there are. With several replicas, a Postgres advisory lock lets exactly one of them do it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import metrics
from .config import Settings
from .discovery import Discovery
from .healing import DuplicateSettler
from .instances import Instance, InstanceSet
from .owners import choose_owner
from .store import Store, StoreUnavailable

log = logging.getLogger("session_proxy.reconcile")

CLASSES = ("verified", "moved", "unreachable", "duplicated", "unknown")


@dataclass
class Report:
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

    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in CLASSES}

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "counts": self.counts()}

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
        for title, rows in (
            ("moved", self.moved),
            ("unreachable", self.unreachable),
            ("duplicated", self.duplicated),
            ("unknown", self.unknown),
            ("extra copies settled", self.disconnected),
        ):
            if rows:
                lines += ["", f"{title} (first {min(limit, len(rows))} of {len(rows)}):"]
                lines += [f"  {row}" for row in rows[:limit]]
        return "\n".join(lines)


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
            async with store.leader() as leading:
                if not leading:
                    report.skipped = "another replica is reconciling"
                else:
                    await self._pass(store, report)
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

    async def _pass(self, store: Store, report: Report) -> None:
        inventory = await self._discovery.inventory()
        report.inventory_calls = len(inventory.sessions) + len(inventory.failed)
        report.unreachable_instances = dict(inventory.failed)
        holders: dict[str, list[tuple[str, str]]] = {}
        for url, sessions in inventory.sessions.items():
            report.instances[url] = len(sessions)
            for entry in sessions:
                if isinstance(entry, dict) and isinstance(entry.get("session_id"), str):
                    status = str(entry.get("status") or "unknown")
                    holders.setdefault(entry["session_id"], []).append((url, status))
        rows = await store.active_rows()
        # Every spelling first, so a move writes the form the table already uses for its target.
        resolved = {stored: self._instances.resolve(stored) for stored in {r[1] for r in rows}}
        in_database = set()
        moves: dict[str, str] = {}
        extras: dict[str, tuple[Instance, list[Instance]]] = {}
        for session_id, stored in rows:
            in_database.add(session_id)
            held = [
                (instance, status)
                for url, status in holders.get(session_id, [])
                if (instance := self._instances.get(url)) is not None
            ]
            stored_instance = resolved[stored]
            if not held:
                report.unreachable.append({"session_id": session_id, "stored": stored})
                continue
            # The same rule routing uses, so the row written here is the copy every replica
            # picks: the row's owner if it holds the session connected, else a connected copy.
            owner = choose_owner([p for p in held if p[0].healthy] or held, stored_instance)
            if len(held) > 1:
                report.duplicated.append(
                    {
                        "session_id": session_id,
                        "instances": [i.url for i, _ in held],
                        "owner": owner.url,
                    }
                )
                extras[session_id] = (owner, [i for i, _ in held if i is not owner])
            if owner is stored_instance:
                report.verified.append(session_id)
                continue
            moves[session_id] = owner.alias
            report.moved.append({"session_id": session_id, "from": stored, "to": owner.alias})
        for session_id, held_urls in holders.items():
            if session_id not in in_database:
                report.unknown.append(
                    {"session_id": session_id, "instances": [url for url, _ in held_urls]}
                )
        if report.dry_run:
            return
        if self._on_lost is not None and report.unreachable:
            # Only where nobody can hold it unseen: the row's instance answered its list (and
            # lacks it), or is down or unknown. One that is up but did not answer may hold it.
            lost = [
                (row["session_id"], row["stored"])
                for row in report.unreachable
                if (was_on := resolved[row["stored"]]) is None
                or not was_on.healthy
                or was_on.url in inventory.sessions
            ]
            self._on_lost(lost)
        if moves:
            report.rows_written = await store.write_owners(moves, purpose="reconcile")
        if extras:
            # A replica may have learned the other copy by rediscovery: every one forgets it
            # and reads the row again (the moved ones were notified by the write itself).
            await store.notify([sid for sid in extras if sid not in moves])
        if self._settler is not None:
            for session_id, (owner, others) in extras.items():
                for settled in await self._settler.settle(session_id, owner, others):
                    report.disconnected.append(
                        {
                            "session_id": settled.session_id,
                            "instance": settled.instance,
                            "outcome": settled.outcome,
                        }
                    )

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
