"""Postgres, the application's truth about who owns a session: the only asyncpg user.

- ``owner``: one indexed SELECT on a routing-table miss (never on a hit).
- ``record``: every move and placement is queued and written in batches (one statement per
  batch); the queue is bounded and survives a database outage, flushed when it returns.
- ``listen``: a dedicated connection LISTENs for the trigger's NOTIFY (``migrate`` installs it)
  and forgets that session's entry in every replica at once; after any disconnection the whole
  table is dropped, since notifications sent meanwhile are lost.
- ``leader``: a session-level advisory lock, so one replica reconciles (or restores) at a time.
- ``snapshot``: reconcile's repeatable-read view of the active rows on the lock's connection,
  the fleet's lists COPYed into it and only the rows that disagree read back.
- ``create_fields`` / ``rows_on``: what a re-create of a session needs (its row's ``id`` and
  workspace), for restores and moves.
- ``migrate``: runs the statements of ``migrations.py`` (the trigger, a standalone table).

The database going away never takes routing down: lookups are skipped while it is down (the
fleet is asked instead) and write-backs wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg

from . import metrics, tracing
from .config import Settings
from .migrations import (
    BATCH_CHANNEL,
    CHANNEL,
    IDEMPOTENCY_TABLE,
    SELF_NOTIFIED,
    TRIGGER,
    batched_notify_sql,
    migration_sql,
    quote_ident,
    trigger_state,
)
from .tasks import Supervisor

log = logging.getLogger("session_proxy.store")

T = TypeVar("T")

LOCK_NAME = "session-proxy-reconcile"
LOOKUP_TIMEOUT = 1.0
STATEMENT_TIMEOUT = 30.0
FORGET_AT_ONCE = 256  # notified sessions forgotten concurrently (Redis round trips overlap)

Invalidate = Callable[[str | None], Awaitable[None]]  # a session id, or None for "everything"


async def _nothing_to_reset(_conn: Any) -> None:
    pass


def _drop(conn: Any) -> None:
    """Close a connection at once; one the pool already let go of is closed already (asyncpg
    then raises InterfaceError, which must not read as "the database is down")."""
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.terminate()


class StoreUnavailable(Exception):
    """The database cannot answer now; callers fall back to the fleet."""


class LockLost(StoreUnavailable):
    """The connection that held a leader's advisory lock is gone, and the lock with it: another
    replica may lead now. Not a database outage (the store stays up)."""


def _is_lost(conn: Any) -> bool:
    """A connection the server or the network closed; asyncpg detaches the pool's proxy of one,
    and every call on the proxy then raises InterfaceError."""
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:
        return True


@dataclass(frozen=True)
class Lock:
    """A held leader lock and the one connection it lives on. Statements given it run on that
    connection, so they run only while the session holding the lock does: a replica whose lock
    connection died cannot go on writing beside the next leader."""

    role: str
    conn: Any

    async def guard(self, work: Awaitable[T]) -> T:
        """Run ``work`` while the lock lives: when its connection closes, ``work`` is cancelled
        at once and LockLost raised (not at its next statement, which may be seconds of list
        calls away), so a replica never runs a pass beside the next leader's."""
        task = asyncio.ensure_future(work)
        lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def closed(_conn: Any) -> None:
            if not lost.done():
                lost.set_result(None)

        try:
            self.conn.add_termination_listener(closed)
        except asyncpg.InterfaceError:  # already gone: the proxy was detached
            closed(None)
        try:
            either: set[asyncio.Future[Any]] = {task, lost}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if task.done() or not lost.done():
                return await task
            raise LockLost(f"the {self.role} lock's connection closed")
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            lost.cancel()
            with contextlib.suppress(asyncpg.InterfaceError):
                self.conn.remove_termination_listener(closed)


@dataclass
class Columns:
    """What the table has, learned once per connection: optional columns are used if present."""

    migration_count: bool = False
    migrated_at: bool = False
    updated_at: bool = False
    # Every NOT NULL column without a default is one we can fill: rows may be inserted.
    insertable: bool = False
    # What the gateway's create call carries besides the session id (the account is the row id).
    account_id: bool = False
    workspace_id: bool = False


@dataclass(frozen=True)
class CreateFields:
    """What the gateway's create call needs to start a session again."""

    session_id: str
    account_id: Any = None  # the row's id
    workspace_id: Any = None


@dataclass
class QueryCounts:
    lookup: int = 0
    write: int = 0
    reconcile: int = 0
    background: int = 0
    idempotency: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass
class Store:
    settings: Settings
    invalidate: Invalidate | None = None
    up: bool = False
    listening: bool = False
    trigger: str | None = None  # the NOTIFY trigger: migrations.trigger_state, None unread
    queries: QueryCounts = field(default_factory=QueryCounts)
    dropped_writes: int = 0
    last_error: str | None = None

    def __post_init__(self) -> None:
        s = self.settings
        self._table = quote_ident(s.table_name)
        self._sid = quote_ident(s.column_session_id)
        self._url = quote_ident(s.column_instance_url)
        self._status = quote_ident(s.column_status)
        self._deleted = quote_ident(s.column_deleted_at)
        self._pool: asyncpg.Pool | None = None
        self._columns = Columns()
        self._pending: OrderedDict[str, str] = OrderedDict()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._notified: set[str] = set()  # session ids NOTIFY named, not yet forgotten
        self._forgetting: asyncio.Task[None] | None = None

    # --- life cycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the pool without connecting: a database down now must not stop start-up."""
        self._pool = await asyncpg.create_pool(
            self.settings.database_url,
            min_size=0,
            max_size=self.settings.database_pool_size,
            command_timeout=STATEMENT_TIMEOUT,
            max_inactive_connection_lifetime=60.0,
            # asyncpg still rolls back an open transaction; the rest of its reset (advisory
            # unlocks, UNLISTEN, RESET ALL: a round trip per release) undoes nothing this store
            # leaves behind: ``leader`` unlocks, or drops a connection it could not unlock.
            reset=_nothing_to_reset,
        )
        with contextlib.suppress(StoreUnavailable):
            await self.check()

    async def start_background(self, supervisor: Supervisor, listen: bool = True) -> None:
        await self.open()
        supervisor.start("store-writeback", self._flush_forever)
        if listen:
            supervisor.start("store-listen", self._listen_forever)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._pending and self.up:
            with contextlib.suppress(StoreUnavailable):
                await self.flush()
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 5.0)

    def _count(self, purpose: str) -> None:
        setattr(self.queries, purpose, getattr(self.queries, purpose) + 1)
        metrics.DB_QUERIES.labels(purpose).inc()

    def _mark(self, up: bool, error: BaseException | None = None) -> None:
        if error is not None:
            self.last_error = f"{type(error).__name__}: {error}"
        if up != self.up:
            self.up = up
            metrics.DB_UP.set(1 if up else 0)
            if up:
                log.info("database reachable")
            else:
                log.warning("database unreachable", extra={"error": self.last_error})

    @contextlib.asynccontextmanager
    async def _connection(self, wait: float = STATEMENT_TIMEOUT) -> AsyncIterator[Any]:
        if self._pool is None:
            raise StoreUnavailable("the store is not open")
        try:
            with tracing.span("database"):
                async with self._pool.acquire(timeout=wait) as conn:
                    yield conn
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            self._mark(False, exc)
            raise StoreUnavailable(str(exc)) from exc
        except (TimeoutError, asyncpg.QueryCanceledError) as exc:
            self._mark(False, exc)
            raise StoreUnavailable("the database did not answer in time") from exc
        except asyncpg.PostgresError as exc:
            # The server answered: it is up, but the statement is wrong (missing table, ...).
            self.last_error = f"{type(exc).__name__}: {exc}"
            raise StoreUnavailable(self.last_error) from exc

    async def check(self) -> None:
        """Reach the database and learn the table's shape; marks the store up or down."""
        async with self._connection(wait=5.0) as conn:
            self._count("background")
            await self._learn_columns(conn)
        self._mark(True)

    async def _learn_columns(self, conn: Any) -> None:
        schema, _, table = self.settings.table_name.rpartition(".")
        rows = await conn.fetch(
            """SELECT column_name, is_nullable, column_default, is_identity
                 FROM information_schema.columns
                WHERE table_name = $1
                  AND table_schema = COALESCE(NULLIF($2, ''), current_schema())""",
            table,
            schema,
        )
        if not rows:
            raise asyncpg.UndefinedTableError(
                f"table {self.settings.table_name} does not exist "
                "(run `session-proxy migrate --create-table` for a standalone one)"
            )
        names = {r["column_name"] for r in rows}
        fillable = {self.settings.column_session_id, self.settings.column_instance_url}
        required = {
            r["column_name"]
            for r in rows
            if r["is_nullable"] == "NO"
            and r["column_default"] is None
            and r["is_identity"] != "YES"
        }
        self._columns = Columns(
            migration_count="instance_migration_count" in names,
            migrated_at="last_instance_migration_at" in names,
            updated_at="updated_at" in names,
            insertable=required <= fillable,
            account_id=self.settings.column_account_id in names,
            workspace_id=self.settings.column_workspace_id in names,
        )

    # --- lookups ---------------------------------------------------------------------------------

    async def owner(self, session_id: str) -> str | None:
        """The stored owner (as the database spells it) of an active row, or None."""
        pending = self._pending.get(session_id)
        if pending is not None:
            return pending
        if not self.up:
            raise StoreUnavailable("the database is down")
        async with self._connection(wait=LOOKUP_TIMEOUT) as conn:
            self._count("lookup")
            value = await conn.fetchval(
                f"SELECT {self._url} FROM {self._table} "
                f"WHERE {self._sid} = $1 AND {self._deleted} IS NULL",
                session_id,
                timeout=LOOKUP_TIMEOUT,
            )
        return value if isinstance(value, str) and value else None

    async def is_active(self, session_id: str) -> bool:
        """The application expects this session to run: its row is active (``ACTIVE_STATUS``,
        not deleted). A logged-out session's row is not, so its requests are not held."""
        if not self.up:
            raise StoreUnavailable("the database is down")
        async with self._connection(wait=LOOKUP_TIMEOUT) as conn:
            self._count("lookup")
            found = await conn.fetchval(
                f"SELECT 1 FROM {self._table} WHERE {self._sid} = $1 "
                f"AND {self._deleted} IS NULL AND {self._status} = $2",
                session_id,
                self.settings.active_status,
                timeout=LOOKUP_TIMEOUT,
            )
        return found is not None

    # --- write-back ------------------------------------------------------------------------------

    def record(self, session_id: str, stored_form: str) -> None:
        """Queue "session is on this instance"; the newest value for a session wins."""
        self._pending[session_id] = stored_form
        self._pending.move_to_end(session_id)
        while len(self._pending) > self.settings.writeback_queue_limit:
            # Oldest first: reconcile rewrites whatever is lost here.
            self._pending.popitem(last=False)
            self.dropped_writes += 1
        metrics.WRITEBACK_PENDING.set(len(self._pending))
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self) -> int:
        """Write every queued move in one statement; returns the rows changed."""
        if not self._pending:
            return 0
        batch = dict(self._pending)
        changed = await self.write_owners(batch, purpose="write")
        for sid, value in batch.items():
            if self._pending.get(sid) == value:
                del self._pending[sid]
        metrics.WRITEBACK_PENDING.set(len(self._pending))
        return changed

    async def write_owners(
        self, owners: dict[str, str], purpose: str = "write", lock: Lock | None = None
    ) -> int:
        if not owners:
            return 0
        # In session id order: the index and the rows are then visited in order (a pass that
        # moves 100,000 rows writes them ~30% faster), and two replicas writing overlapping
        # batches lock their rows in the same order, so they cannot deadlock.
        sids = sorted(owners)
        urls = [owners[sid] for sid in sids]
        async with self._on(lock) as conn:
            self._count(purpose)
            written = await conn.fetchval(self._write_sql(), sids, urls)
        return int(written)

    def _write_sql(self) -> str:
        c = self._columns
        extra = ""
        if c.migration_count:
            extra += ", instance_migration_count = COALESCE(t.instance_migration_count, 0) + 1"
        if c.migrated_at:
            extra += ", last_instance_migration_at = now()"
        if c.updated_at:
            extra += ", updated_at = now()"
        # The statement notifies the rows it changed in batches, and the trigger stays quiet:
        # ``SELF_NOTIFIED`` is set for the statement's own transaction by a one-time filter,
        # which runs before the first row is written (one statement: no BEGIN, no COMMIT).
        quiet = f"(SELECT set_config('{SELF_NOTIFIED}', 'on', true)) = 'on'"
        if c.insertable:
            # A standalone table: the proxy is the writer of record and may create rows.
            write = (
                f"INSERT INTO {self._table} AS t ({self._sid}, {self._url}) "
                f"SELECT * FROM unnest($1::text[], $2::text[]) WHERE {quiet} "
                f"ON CONFLICT ({self._sid}) DO UPDATE SET {self._url} = EXCLUDED.{self._url}"
                f"{extra} WHERE t.{self._url} IS DISTINCT FROM EXCLUDED.{self._url}"
            )
        else:
            write = (
                f"UPDATE {self._table} AS t SET {self._url} = v.url{extra} "
                "FROM unnest($1::text[], $2::text[]) AS v(sid, url) "
                f"WHERE {quiet} AND t.{self._sid} = v.sid AND t.{self._url} IS DISTINCT FROM v.url"
            )
        return (
            f"WITH written AS ({write} RETURNING t.{self._sid} AS sid) "
            f"SELECT (SELECT count(*) FROM written), {batched_notify_sql('written')}"
        )

    async def _flush_forever(self) -> None:
        backoff = 0.2
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(0.05)  # let a burst of moves collect into one statement
            try:
                if not self.up:
                    await self.check()
                await self.flush()
                backoff = 0.2
            except StoreUnavailable:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    # --- reconcile support -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def snapshot(self, lock: Lock) -> AsyncIterator[Snapshot]:
        """The active rows as one repeatable-read view on the lock's connection, for a pass to
        compare with the fleet's lists inside Postgres (``Snapshot``). The view is taken by the
        block's first statement, as the lists are asked: a session started after its
        instance's list was taken is then in no row of it either (read after the lists, it
        would be in a row and on no list: "lost", and restored elsewhere)."""
        async with self._on(lock) as conn:
            self._count("reconcile")
            # One round trip: the transaction, and the table of the lists it drops at its end.
            await conn.execute(
                "BEGIN ISOLATION LEVEL REPEATABLE READ; "
                f"CREATE TEMPORARY TABLE {LISTED} (sid text, url text) ON COMMIT DROP"
            )
            try:
                yield Snapshot(self, conn)
            except BaseException:
                clean = False
                try:
                    if not _is_lost(conn):
                        await conn.execute("ROLLBACK")
                        clean = True
                except Exception:
                    pass
                finally:
                    # Never back into the pool inside a transaction (a cancelled COPY, say).
                    if not clean:
                        _drop(conn)
                raise
            self._count("reconcile")
            await conn.execute("COMMIT")

    def active_query(self) -> str:
        """The active rows, as (sid, url), with the active status as $1."""
        return (
            f"SELECT {self._sid} AS sid, {self._url} AS url FROM {self._table} "
            f"WHERE {self._status} = $1 AND {self._deleted} IS NULL AND {self._sid} IS NOT NULL"
        )

    async def notify(self, session_ids: list[str], lock: Lock | None = None) -> None:
        """Make every replica forget these sessions, as a row change would (one statement)."""
        if not session_ids:
            return
        async with self._on(lock) as conn:
            self._count("reconcile")
            await conn.execute(
                f"SELECT {batched_notify_sql('(SELECT unnest($1::text[]) AS sid) AS ids')}",
                session_ids,
            )

    async def stored_forms(self) -> list[str]:
        """Every distinct way the table spells an owner, so write-backs can use the same."""
        async with self._connection() as conn:
            self._count("background")
            rows = await conn.fetch(
                f"SELECT DISTINCT {self._url} FROM {self._table} "
                f"WHERE {self._deleted} IS NULL AND {self._url} IS NOT NULL LIMIT 10000"
            )
        return [r[0] for r in rows]

    # --- the idempotency table ------------------------------------------------------------------

    async def idempotency_claim(
        self, key: str, digest: str, token: str, lease: float, ttl: float
    ) -> Any:
        """Claim ``key`` for a first request (a row in_flight), or return the row that holds it:
        None when claimed. An expired row is taken over."""
        async with self._connection(wait=LOOKUP_TIMEOUT) as conn:
            self._count("idempotency")
            claimed = await conn.fetchval(
                f"""INSERT INTO {IDEMPOTENCY_TABLE} AS t
                       (key, digest, state, token, lease_until, expires_at)
                    VALUES ($1, $2, 'in_flight', $3, now() + make_interval(secs => $4),
                            now() + make_interval(secs => $5))
                    ON CONFLICT (key) DO UPDATE SET digest = EXCLUDED.digest,
                       state = 'in_flight', token = EXCLUDED.token, status = 0,
                       headers = '[]', body = '', body_omitted = false,
                       lease_until = EXCLUDED.lease_until, expires_at = EXCLUDED.expires_at
                    WHERE t.expires_at < now()
                    RETURNING 1""",
                key,
                digest,
                token,
                lease,
                ttl,
            )
            if claimed:
                return None
            return await conn.fetchrow(
                f"SELECT digest, state, token, status, headers, body, body_omitted, "
                f"extract(epoch FROM lease_until) AS lease_until FROM {IDEMPOTENCY_TABLE} "
                "WHERE key = $1",
                key,
            )

    async def idempotency_finish(
        self,
        key: str,
        token: str,
        state: str,
        status: int,
        headers: str,
        body: bytes,
        body_omitted: bool,
        ttl: float,
    ) -> None:
        async with self._connection() as conn:
            self._count("idempotency")
            await conn.execute(
                f"UPDATE {IDEMPOTENCY_TABLE} SET state = $3, status = $4, headers = $5::jsonb, "
                "body = $6, body_omitted = $7, expires_at = now() + make_interval(secs => $8) "
                "WHERE key = $1 AND token = $2",
                key,
                token,
                state,
                status,
                headers,
                body,
                body_omitted,
                ttl,
            )

    async def idempotency_release(self, key: str, token: str) -> None:
        async with self._connection() as conn:
            self._count("idempotency")
            await conn.execute(
                f"DELETE FROM {IDEMPOTENCY_TABLE} WHERE key = $1 AND token = $2 "
                "AND state = 'in_flight'",
                key,
                token,
            )

    async def idempotency_sweep(self, limit: int = 10_000) -> int:
        """Delete expired rows, at most ``limit`` per call."""
        async with self._connection() as conn:
            self._count("background")
            status = await conn.execute(
                f"DELETE FROM {IDEMPOTENCY_TABLE} WHERE key IN (SELECT key FROM "
                f"{IDEMPOTENCY_TABLE} WHERE expires_at < now() LIMIT $1)",
                limit,
            )
        return int(status.split()[-1])

    # --- restores and moves ----------------------------------------------------------------------

    def _create_columns(self) -> str:
        s, c = self.settings, self._columns
        account = quote_ident(s.column_account_id) if c.account_id else "NULL"
        workspace = quote_ident(s.column_workspace_id) if c.workspace_id else "NULL"
        return f"{self._sid}, {account}, {workspace}"

    async def create_fields(self, session_ids: list[str]) -> dict[str, CreateFields]:
        """The create-call fields of these sessions' active rows (one statement)."""
        if not session_ids:
            return {}
        async with self._connection() as conn:
            self._count("background")
            rows = await conn.fetch(
                f"SELECT {self._create_columns()} FROM {self._table} "
                f"WHERE {self._sid} = ANY($1::text[]) AND {self._deleted} IS NULL "
                f"AND {self._status} = $2",
                session_ids,
                self.settings.active_status,
            )
        return {r[0]: CreateFields(r[0], r[1], r[2]) for r in rows}

    async def rows_on(self, stored_forms: list[str]) -> list[CreateFields]:
        """Every active row whose owner is spelled one of ``stored_forms``: an instance's
        sessions, as the application believes them to be."""
        async with self._connection() as conn:
            self._count("background")
            rows = await conn.fetch(
                f"SELECT {self._create_columns()} FROM {self._table} "
                f"WHERE {self._url} = ANY($1::text[]) AND {self._deleted} IS NULL "
                f"AND {self._status} = $2 AND {self._sid} IS NOT NULL",
                stored_forms,
                self.settings.active_status,
            )
        return [CreateFields(r[0], r[1], r[2]) for r in rows]

    @contextlib.asynccontextmanager
    async def leader(self, role: str = "reconcile") -> AsyncIterator[bool]:
        """Hold ``role``'s lock for the block; yields False when another replica holds it."""
        async with self.lead(role) as lock:
            yield lock is not None

    @contextlib.asynccontextmanager
    async def lead(self, role: str = "reconcile") -> AsyncIterator[Lock | None]:
        """Hold ``role``'s lock for the block; yields None when another replica holds it. The
        block's own statements go through the yielded ``Lock`` (``active_rows``,
        ``write_owners``, ``notify``): they then fail with ``LockLost`` once the lock is gone."""
        key = self._lock_key if role == "reconcile" else f"{self._lock_key}:{role}"
        async with self._connection() as conn:
            self._count("reconcile")
            got = await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key)
            try:
                # LockLost and StoreUnavailable from the block pass through ``_connection``
                # untouched: a lost lock does not mark the database down.
                yield Lock(role, conn) if got else None
            finally:
                # A closed connection's lock is gone with it, and its pool proxy is detached
                # already: nothing to unlock, nothing to drop.
                if got and not _is_lost(conn):
                    try:
                        self._count("reconcile")
                        await conn.fetchval("SELECT pg_advisory_unlock(hashtext($1))", key)
                    except Exception:
                        # Never back into the pool holding the lock (its reset does not unlock).
                        _drop(conn)
                    except BaseException:  # cancelled meanwhile: the same, then go on
                        _drop(conn)
                        raise

    @contextlib.asynccontextmanager
    async def _on(self, lock: Lock | None) -> AsyncIterator[Any]:
        """A pool connection, or the lock's own one: there, a lost connection is a lost lock
        (``LockLost``), never a write done without it."""
        if lock is None:
            async with self._connection() as conn:
                yield conn
            return
        if _is_lost(lock.conn):
            raise LockLost(f"the {lock.role} lock's connection is gone")
        try:
            yield lock.conn
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            raise LockLost(
                f"the {lock.role} lock's connection was lost: {type(exc).__name__}: {exc}"
            ) from exc
        except (TimeoutError, asyncpg.QueryCanceledError) as exc:
            if _is_lost(lock.conn):
                raise LockLost(f"the {lock.role} lock's connection was lost") from exc
            self._mark(False, exc)
            raise StoreUnavailable("the database did not answer in time") from exc
        except asyncpg.PostgresError as exc:
            if _is_lost(lock.conn):  # e.g. AdminShutdown: pg_terminate_backend of the holder
                raise LockLost(
                    f"the {lock.role} lock's connection was lost: {type(exc).__name__}: {exc}"
                ) from exc
            self.last_error = f"{type(exc).__name__}: {exc}"
            raise StoreUnavailable(self.last_error) from exc

    @property
    def _lock_key(self) -> str:
        return f"{LOCK_NAME}:{self.settings.table_name}"

    # --- LISTEN/NOTIFY ---------------------------------------------------------------------------

    async def _listen_forever(self) -> None:
        backoff = 0.2
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(self.settings.database_url, timeout=5.0)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._on_notify)
                await conn.add_listener(BATCH_CHANNEL, self._on_notify_batch)
                self.listening = True
                # Whatever changed while nobody listened is unknown: start from the database.
                if self.invalidate is not None:
                    await self.invalidate(None)
                if not self.up:
                    with contextlib.suppress(StoreUnavailable):
                        await self.check()
                log.info("listening for ownership changes", extra={"channel": CHANNEL})
                await self._read_trigger(conn)
                backoff = 0.2
                while not lost.is_set():
                    # A dead server is only noticed on traffic: ask it something now and then
                    # (whether the trigger is there: a `migrate` run meanwhile shows at once).
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), 2.0)
                    if not lost.is_set():
                        await self._read_trigger(conn)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # The database or the network: reconnect. Anything else is a bug, and the task
                # supervisor logs it with its traceback and restarts this loop.
                self._mark(False, exc)
            finally:
                if self.listening:
                    log.warning("stopped listening for ownership changes; will reconnect")
                self.listening = False
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.terminate()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _read_trigger(self, conn: Any) -> None:
        self._count("background")
        definition = await conn.fetchval(
            "SELECT pg_get_triggerdef(oid) FROM pg_trigger "
            "WHERE tgrelid = to_regclass($1) AND tgname = $2",
            self._table,
            TRIGGER,
            timeout=2.0,
        )
        state = trigger_state(definition)
        if state == self.trigger:
            return
        metrics.NOTIFY_TRIGGER_CURRENT.set(1 if state == "current" else 0)
        if state == "missing":
            log.warning(
                "the table has no %s trigger: replicas do not hear each other's changes, or "
                "the application's, until CACHE_TTL; run `session-proxy migrate`",
                TRIGGER,
            )
        elif state == "outdated":
            log.warning(
                "the %s trigger is from an earlier version: run `session-proxy migrate` again "
                "(until then the proxy's own writes are notified twice)",
                TRIGGER,
            )
        elif self.trigger is not None:
            log.info("the %s trigger is current", TRIGGER)
        self.trigger = state

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        # Someone else's UPDATE of 100,000 rows makes the trigger send 100,000 notifications
        # to every replica. A task for each (and a list of them) held the loop for ~0.5 s;
        # instead they gather in a set and one task forgets them, FORGET_AT_ONCE at a time.
        if self.invalidate is None or not payload:
            return
        self._notified.add(payload)
        self._forget_soon()

    def _on_notify_batch(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if self.invalidate is None:
            return
        try:
            batch = json.loads(payload)
        except ValueError:
            batch = None
        if not isinstance(batch, list) or not all(isinstance(sid, str) for sid in batch):
            # Changes this replica cannot read are changes it missed: forget everything, as
            # after a reconnect, rather than route by what may be stale.
            log.warning("unreadable notification on %s; forgetting every owner", BATCH_CHANNEL)
            self._keep(asyncio.ensure_future(self.invalidate(None)))
            return
        self._notified.update(batch)
        self._forget_soon()

    def _forget_soon(self) -> None:
        if self._forgetting is None:
            self._forgetting = self._keep(asyncio.ensure_future(self._forget_notified()))

    def _keep(self, task: asyncio.Task[None]) -> asyncio.Task[None]:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _forget_notified(self) -> None:
        assert self.invalidate is not None
        try:
            while self._notified:
                batch = [
                    self._notified.pop() for _ in range(min(FORGET_AT_ONCE, len(self._notified)))
                ]
                results = await asyncio.gather(
                    *(self.invalidate(sid) for sid in batch), return_exceptions=True
                )
                failed = [r for r in results if isinstance(r, BaseException)]
                if failed:
                    log.warning("could not forget %d changed sessions: %r", len(failed), failed[0])
        finally:
            self._forgetting = None

    # --- migrations ------------------------------------------------------------------------------

    async def migrate(self, create_table: bool) -> list[str]:
        """Run ``migrations.migration_sql`` in one transaction: the NOTIFY trigger (and, for
        standalone use, a minimal table). Returns the labels of the steps done."""
        done: list[str] = []
        sql = migration_sql(self.settings, create_table)
        conn = await asyncpg.connect(self.settings.database_url, timeout=10.0)
        try:
            async with conn.transaction():
                for label, statement in sql:
                    await conn.execute(statement)
                    done.append(label)
        finally:
            await conn.close()
        return done


LISTED = "session_proxy_listed"  # the pass's temporary table of (session id, instance URL)

# COPY's text format: these four characters inside a value are written as escapes.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def listed_block(url: str, session_ids: list[str]) -> bytes:
    """One instance's list as lines of COPY text, ``session id TAB url``, built by C-level
    joins (a million ids in ~0.1 s); values with a tab, a newline, a CR or a backslash are
    escaped (found by one scan of all the ids together); ids with a NUL are left out."""
    if any(c in url for c in "\\\t\n\r"):
        url = url.translate(_COPY_ESCAPES)
    together = "".join(session_ids)
    if "\x00" in together:
        # Postgres text cannot hold a NUL, so no row has such an id: one from a lying instance
        # is left out rather than failing the whole COPY (and the pass) for every instance.
        session_ids = [sid for sid in session_ids if "\x00" not in sid]
        together = "".join(session_ids)
    if any(c in together for c in "\\\t\n\r"):
        session_ids = [sid.translate(_COPY_ESCAPES) for sid in session_ids]
    if not session_ids:
        return b""
    tail = f"\t{url}\n"
    return (tail.join(session_ids) + tail).encode()


class Snapshot:
    """The pass's statements inside one repeatable-read transaction on the lock's connection:
    the owners' spellings, the fleet's lists COPYed in, and only the rows that disagree with
    them read back. At a million sessions that is ~1 s of Postgres against ~6 s of Python
    reading every row and comparing it (measured in ``bench/scaleout.py``)."""

    def __init__(self, store: Store, conn: Any) -> None:
        self._store = store
        self._conn = conn

    async def forms(self) -> dict[str | None, int]:
        """Every way the active rows spell an owner (None: no owner), with how many rows do."""
        self._store._count("reconcile")
        records = await self._conn.fetch(
            f"SELECT url, count(*) FROM ({self._store.active_query()}) AS r GROUP BY url",
            self._store.settings.active_status,
        )
        return {r[0]: r[1] for r in records}

    async def load(self, blocks: AsyncIterable[bytes]) -> None:
        """COPY the lists in as they come (``listed_block``): one statement, running while the
        slowest instance is still answering (so bounded by LIST_TIMEOUT, not by the statement
        timeout alone)."""
        self._store._count("reconcile")
        bound = self._store.settings.list_timeout + STATEMENT_TIMEOUT
        await self._conn.copy_to_table(LISTED, source=blocks, format="text", timeout=bound)

    async def disagreements(
        self, canonical: dict[str, str]
    ) -> list[tuple[str | None, str | None, str | None, str | None]]:
        """(row's session id, row's owner, listed session id, listing URL) of every active row
        and every listed session that do not agree: a row whose owner (``canonical``: each
        spelling of an owner -> the URL its lists are filed under) does not list it, a row no
        list has (listed id None), a listed session no row has (row id None)."""
        self._store._count("reconcile")
        records = await self._conn.fetch(
            f"""SELECT r.sid, r.url, l.sid, l.url
                  FROM ({self._store.active_query()}) AS r
                  LEFT JOIN unnest($2::text[], $3::text[]) AS f(stored, canonical)
                         ON f.stored = r.url
                  FULL JOIN {LISTED} AS l ON l.sid = r.sid
                 WHERE r.sid IS NULL OR l.sid IS NULL
                    OR l.url IS DISTINCT FROM f.canonical""",
            self._store.settings.active_status,
            list(canonical),
            list(canonical.values()),
        )
        return [(r[0], r[1], r[2], r[3]) for r in records]
