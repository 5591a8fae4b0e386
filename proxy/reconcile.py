"""Reconcile: the fleet's actual sessions against the database rows, in O(instances) calls.

One list call per instance, one comparison with the active rows inside Postgres (the lists
COPYed in as they arrive, only the disagreeing rows read back), one batched write of every move:
the seed's 5-minute health check, done in a constant number of statements however many sessions
there are. With several replicas, a Postgres advisory lock lets exactly one of them do it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import metrics
from .config import Settings
from .discovery import Discovery, Inventory
from .healing import DuplicateSettler
from .instances import Instance, InstanceSet
from .owners import choose_owner
from .store import Lock, LockLost, Store, StoreUnavailable, listed_block

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


# (row's session id, row's owner, listed session id, listing URL), from Snapshot.disagreements
Disagreement = tuple[str | None, str | None, str | None, str | None]


@dataclass(frozen=True)
class Resolved:
    """One spelling of an owner in the rows: the instance it names (None: none known), and
    how many active rows spell it so."""

    instance: Instance | None
    rows: int


class _Listing:
    """The lists as they arrive: COPY blocks in a queue the snapshot's load reads, the sessions
    found on more than one list (by set operations in C, a few ms a list), and of each list
    only its ids and statuses (its parsed entries are let go: at a million sessions they are
    most of a pass's memory)."""

    def __init__(self) -> None:
        self._blocks: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._seen: set[str] = set()
        self.several: set[str] = set()
        self.lists: dict[str, tuple[list[str], list[Any]]] = {}  # url -> (ids, statuses)

    def add(self, url: str, sessions: list[dict[str, Any]]) -> None:
        kept = [
            (sid, entry.get("status"))
            for entry in sessions
            if isinstance(entry, dict) and isinstance(sid := entry.get("session_id"), str)
        ]
        ids = [sid for sid, _ in kept]
        if "\x00" in "".join(ids):
            # No text column holds a NUL, so no row has such an id: left out of the pass.
            kept = [(sid, status) for sid, status in kept if "\x00" not in sid]
            log.warning(
                "instance listed session ids with a NUL; left out",
                extra={"instance": url, "ids": len(ids) - len(kept)},
            )
            ids = [sid for sid, _ in kept]
        self.lists[url] = (ids, [status for _, status in kept])
        if self._seen:
            self.several.update(self._seen.intersection(ids))
        self._seen.update(ids)
        self._blocks.put_nowait(listed_block(url, ids))

    def in_order(self, urls: Iterable[str]) -> Iterator[tuple[str, list[str], list[Any]]]:
        """(url, ids, statuses) of each list, in the given order of URLs."""
        for url in urls:
            if (kept := self.lists.get(url)) is not None:
                yield url, kept[0], kept[1]

    def end(self) -> None:
        self._blocks.put_nowait(None)

    async def stream(self) -> AsyncIterator[bytes]:
        while (block := await self._blocks.get()) is not None:
            if block:
                yield block


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
        # The lists are COPYed into Postgres as they arrive, and Postgres returns only the rows
        # and listed sessions that disagree (a tenth of a million rows, not all of them): the
        # Python rules below then run on those alone.
        listing = _Listing()
        comparing = asyncio.ensure_future(self._compare(store, lock, listing, report))
        try:
            inventory = await self._discovery.inventory(on_list=listing.add)
        except BaseException:
            comparing.cancel()
            with contextlib.suppress(BaseException):
                await comparing
            raise
        finally:
            listing.end()
        report.timings["inventory"] = round(inventory.seconds, 4)
        resolved, found = await comparing
        classified = time.monotonic()
        # A pass that finds many rows wrong (a fleet restart) is still seconds of Python: in a
        # thread, so the event loop serving this replica's requests gets the interpreter every
        # switch interval (5 ms) instead of waiting for the whole of it.
        moves, extras, unreachable = await asyncio.to_thread(
            self._classify, inventory, listing, resolved, found, report
        )
        report.timings["classify"] = round(time.monotonic() - classified, 4)
        if report.dry_run:
            return
        if self._on_lost is not None and unreachable:
            # Only where nobody can hold it unseen: the row's instance answered its list (and
            # lacks it), or is down or unknown. One that is up but did not answer may hold it.
            lost = [
                (session_id, stored)
                for session_id, stored, was_on in unreachable
                if was_on is None or not was_on.healthy or was_on.url in inventory.listed
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

    async def _compare(
        self, store: Store, lock: Lock, listing: _Listing, report: Report
    ) -> tuple[dict[str | None, Resolved], list[Disagreement]]:
        """The snapshot's side of a pass: the owners' spellings (each resolved to its
        instance), the lists loaded as they come, and the rows and listed sessions that
        disagree."""
        started = time.monotonic()
        async with store.snapshot(lock) as snapshot:
            forms = await snapshot.forms()
            resolved = {
                form: Resolved(self._instances.resolve(form) if form is not None else None, count)
                for form, count in forms.items()
            }
            canonical = {
                form: found.instance.url
                for form, found in resolved.items()
                if form is not None and found.instance is not None
            }
            await snapshot.load(listing.stream())
            report.timings["load"] = round(time.monotonic() - started, 4)
            compared = time.monotonic()
            disagreeing = await snapshot.disagreements(canonical)
            report.timings["compare"] = round(time.monotonic() - compared, 4)
        return resolved, disagreeing

    def _classify(
        self,
        inventory: Inventory,
        listing: _Listing,
        resolved: dict[str | None, Resolved],
        found: list[Disagreement],
        report: Report,
    ) -> tuple[
        dict[str, str],
        dict[str, tuple[Instance, list[Instance]]],
        list[tuple[str, str | None, Instance | None]],
    ]:
        """The rows and listed sessions that disagree, judged: moves to write, duplicates,
        rows nobody holds (the report is filled in as a side effect). Every other active row
        is verified: its owner lists it, and no other instance does. Runs in a worker thread:
        it only reads the instances' state and touches nothing else the event loop uses."""
        report.inventory_calls = len(inventory.listed) + len(inventory.failed)
        report.unreachable_instances = dict(inventory.failed)
        report.instances.update(inventory.listed)
        rows: dict[str, str | None] = {}  # the disagreeing rows: session id -> stored owner
        first: dict[str, str] = {}  # the listed sessions among them -> the URL listing it
        several = listing.several
        for row_sid, stored, listed_sid, listed_at in found:
            if row_sid is not None:
                rows[row_sid] = stored
            if listed_sid is not None and listed_at is not None and listed_sid not in several:
                first.setdefault(listed_sid, listed_at)
        # (url, status) of every holder, for sessions on several lists only (so rare): a
        # single holder's status never matters, as choose_owner of one candidate is that one.
        more: dict[str, list[tuple[str, str]]] = {}
        if several:
            for url, ids, statuses in listing.in_order(inventory.listed):
                for sid, status in zip(ids, statuses, strict=True):
                    if sid in several:
                        holders = more.setdefault(sid, [])
                        if all(held != url for held, _ in holders):
                            holders.append((url, str(status or "unknown")))
            for sid, holders in more.items():
                first[sid] = holders[0][0]
        by_url = {instance.url: instance for instance in self._instances.all}
        moves: dict[str, str] = {}
        extras: dict[str, tuple[Instance, list[Instance]]] = {}
        unreachable: list[tuple[str, str | None, Instance | None]] = []
        verified = report.verified
        limit = report.list_limit
        for session_id, stored in rows.items():
            stored_instance = resolved[stored].instance if stored in resolved else None
            held_at = first.get(session_id)
            if held_at is None:
                unreachable.append((session_id, stored, stored_instance))
                continue
            held = [
                (instance, status)
                for url, status in more.get(session_id) or ((held_at, ""),)
                if (instance := by_url.get(url)) is not None
            ]
            if not held:
                unreachable.append((session_id, stored, stored_instance))
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
        rows_in_all = sum(r.rows for r in resolved.values())
        report.totals["verified"] = rows_in_all - len(moves) - len(unreachable)
        # The listed sessions Postgres did not return are verified ones: list the first.
        for _, ids, _ in listing.in_order(inventory.listed):
            if len(verified) >= limit:
                break
            for sid in ids:
                if len(verified) >= limit:
                    break
                if sid not in first and sid not in rows:
                    verified.append(sid)
        for session_id, stored, _ in unreachable:
            report.add("unreachable", {"session_id": session_id, "stored": stored})
        for session_id in first.keys() - rows.keys():
            report.add(
                "unknown",
                {
                    "session_id": session_id,
                    "instances": [
                        url for url, _ in more.get(session_id) or ((first[session_id], ""),)
                    ],
                },
            )
        return moves, extras, unreachable

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
