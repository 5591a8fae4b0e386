"""PostgreSQL for tests: private databases on the shared server, and whole clusters of our own.

``TempDatabase`` gives a test its own database on the admin server (``admin_url()``), so tests
never see each other's rows and need no cleanup beyond one ``DROP DATABASE``.

``ThrowawayPostgres`` is a real cluster owned by one test, for outage tests: stopping it can never
take the shared server (and every other test using it) down. ``initdb`` costs a few seconds, so
one template data directory is initialised per test session and copied for each cluster, which
brings a start down to about a second.

Everything here only talks to 127.0.0.1. The sync helpers run their coroutine on a fresh thread
with its own event loop, so they work the same from plain tests, fixtures and async tests.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Coroutine, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

HOST = "127.0.0.1"
DEFAULT_ADMIN_URL = f"postgresql://postgres@{HOST}:5432/postgres"
CONNECT_TIMEOUT = 10.0
_START_TIMEOUT = 60
_PORT_RETRIES = 3
_SETUP_HINT = (
    "start one with `source scripts/deps-postgres.sh && ensure_postgres` (./dev test does this) "
    "or point SESSION_PROXY_TEST_DATABASE_URL at a server with trust auth"
)

T = TypeVar("T")
StopMode = Literal["smart", "fast", "immediate"]


def admin_url() -> str:
    """The server tests create their databases on; scripts/deps-postgres.sh exports it."""
    return os.environ.get("SESSION_PROXY_TEST_DATABASE_URL", DEFAULT_ADMIN_URL)


def with_database(url: str, database: str) -> str:
    """``url`` with its database replaced, keeping user, host, port and query options."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code, even inside a running event loop.

    A fresh thread always gets its own loop: ``asyncio.run`` on the calling thread would fail
    inside async tests and, elsewhere, reset the thread's current loop under pytest-asyncio.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="pg-helper", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


async def connect(url: str) -> Any:
    """An asyncpg connection; the caller closes it."""
    return await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)


async def _execute(url: str, sql: str, args: Sequence[object]) -> str:
    conn = await connect(url)
    try:
        status: str = await conn.execute(sql, *args)
        return status
    finally:
        await conn.close()


async def _fetch(url: str, sql: str, args: Sequence[object]) -> list[Any]:
    conn = await connect(url)
    try:
        rows: list[Any] = await conn.fetch(sql, *args)
        return rows
    finally:
        await conn.close()


def execute(url: str, sql: str, *args: object) -> str:
    """Run one statement on a short-lived connection; returns the command status."""
    return run_sync(_execute(url, sql, args))


def fetch(url: str, sql: str, *args: object) -> list[Any]:
    """Run one query on a short-lived connection; returns its ``asyncpg.Record`` rows."""
    return run_sync(_fetch(url, sql, args))


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# --- a private database on the shared server -----------------------------------------------------


class TempDatabase:
    """A uniquely named database (``sp_test_<hex>``) on the admin server.

    ``with TempDatabase() as db:`` creates and drops it; ``create()``/``drop()`` do it by hand.
    """

    def __init__(self, admin: str | None = None) -> None:
        self.admin_url = admin if admin is not None else admin_url()
        self.name = f"sp_test_{uuid.uuid4().hex[:16]}"
        self.url = with_database(self.admin_url, self.name)
        self.created = False

    def __repr__(self) -> str:
        return f"TempDatabase({self.url!r})"

    def create(self) -> Self:
        try:
            execute(self.admin_url, f"CREATE DATABASE {_quote_ident(self.name)}")
        except OSError as exc:
            raise RuntimeError(
                f"no PostgreSQL answers at {self.admin_url} ({exc!r}); {_SETUP_HINT}"
            ) from exc
        self.created = True
        return self

    def drop(self) -> None:
        """Drop the database, disconnecting whatever still uses it (a proxy's pool, a leak)."""
        if not self.created:
            return
        run_sync(self._drop())
        self.created = False

    async def _drop(self) -> None:
        conn = await connect(self.admin_url)
        try:
            # Terminating first covers servers older than 13; FORCE closes the window in which
            # a pool reconnects between the terminate and the drop.
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()",
                self.name,
            )
            force = " WITH (FORCE)" if conn.get_server_version().major >= 13 else ""
            await conn.execute(f"DROP DATABASE IF EXISTS {_quote_ident(self.name)}{force}")
        finally:
            await conn.close()

    def execute(self, sql: str, *args: object) -> str:
        return execute(self.url, sql, *args)

    def fetch(self, sql: str, *args: object) -> list[Any]:
        return fetch(self.url, sql, *args)

    async def connect(self) -> Any:
        """An asyncpg connection to this database, for async tests; the caller closes it."""
        return await connect(self.url)

    def __enter__(self) -> Self:
        return self.create()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.drop()


# --- a cluster of our own ------------------------------------------------------------------------


def pg_bin() -> Path:
    """Where initdb and pg_ctl live: ``SESSION_PROXY_TEST_PGBIN``, else the newest install."""
    configured = os.environ.get("SESSION_PROXY_TEST_PGBIN")
    if configured:
        return Path(configured)
    # Sorted by major as a number: "9.6" must not beat "15". A client-only major has no initdb.
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    if not found:
        raise RuntimeError(f"no initdb under /usr/lib/postgresql; {_SETUP_HINT}")

    def major(bin_dir: Path) -> tuple[int, ...]:
        return tuple(int(p) for p in bin_dir.parent.name.split(".") if p.isdigit())

    return max(found, key=major)


def _as_postgres(argv: list[str]) -> list[str]:
    # initdb and pg_ctl refuse to run as root; as any other user they run as that user.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


def _chown_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


def _run_pg(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[bytes]:
    # Output goes to a file, not a pipe: the postmaster pg_ctl starts must never inherit a pipe
    # that this process waits to see closed. cwd=/tmp because the postgres user may not be
    # allowed into the caller's directory.
    with tempfile.TemporaryFile() as out:
        proc = subprocess.run(
            _as_postgres(argv), stdout=out, stderr=subprocess.STDOUT, cwd="/tmp", check=False
        )
        out.seek(0)
        output = out.read()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, output, None)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({proc.returncode}):\n{output.decode(errors='replace')}"
        )
    return result


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


_template_lock = threading.Lock()
_template: Path | None = None
_live_lock = threading.Lock()
_live: set[ThrowawayPostgres] = set()


def _template_dir(bin_dir: Path) -> Path:
    """One initialised, never started data directory per test session, copied for each cluster."""
    global _template
    with _template_lock:
        if _template is None:
            path = Path(tempfile.mkdtemp(prefix="sp-pgtemplate.", dir="/tmp"))
            _chown_postgres(path)
            try:
                _run_pg(
                    [
                        str(bin_dir / "initdb"),
                        "-D",
                        str(path),
                        "-A",
                        "trust",
                        "-U",
                        "postgres",
                        "-E",
                        "UTF8",
                        "--no-sync",
                    ]
                )
            except BaseException:
                shutil.rmtree(path, ignore_errors=True)
                raise
            _template = path
        return _template


class ThrowawayPostgres:
    """A real PostgreSQL cluster owned by one test, safe to stop, crash and restart.

    ``ThrowawayPostgres.start()`` brings one up on a free port; ``stop()``/``start_again()``
    take it down and back on the same port with the same data; ``destroy()`` removes it. Any
    cluster still alive when the interpreter exits is destroyed then.
    """

    def __init__(self, data_dir: Path, port: int, bin_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = port
        self.bin_dir = bin_dir
        self.url = f"postgresql://postgres@{HOST}:{port}/postgres"
        self.log_path = data_dir / "server.log"
        self._destroyed = False

    def __repr__(self) -> str:
        return f"ThrowawayPostgres(port={self.port}, data_dir={str(self.data_dir)!r})"

    @classmethod
    def start(cls, port: int | None = None) -> Self:
        bin_dir = pg_bin()
        template = _template_dir(bin_dir)
        data_dir = Path(tempfile.mkdtemp(prefix="sp-pg.", dir="/tmp"))
        try:
            subprocess.run(["cp", "-a", f"{template}/.", str(data_dir)], check=True)
            _chown_postgres(data_dir)
        except BaseException:
            shutil.rmtree(data_dir, ignore_errors=True)
            raise
        # A free port can be taken between the probe and the bind; only a port we chose may
        # be swapped for another.
        attempts = 1 if port is not None else _PORT_RETRIES
        for attempt in range(attempts):
            cluster = cls(data_dir, port if port is not None else free_port(), bin_dir)
            with _live_lock:
                _live.add(cluster)
            try:
                cluster.start_again()
                return cluster
            except RuntimeError:
                with _live_lock:
                    _live.discard(cluster)
                if attempt == attempts - 1:
                    shutil.rmtree(data_dir, ignore_errors=True)
                    raise
        raise AssertionError("unreachable")

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return _run_pg([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args], check)

    @property
    def running(self) -> bool:
        # pg_ctl asks the postmaster's pid file, so a server killed behind our back reads as down.
        return not self._destroyed and self._pg_ctl("status", check=False).returncode == 0

    def start_again(self) -> None:
        """Start the server (again) on the same port with the same data; waits until it accepts."""
        if self._destroyed:
            raise RuntimeError(f"{self!r} was destroyed")
        # fsync=off is safe for a crash test: a killed postmaster loses nothing the kernel already
        # has. synchronous_commit stays on, or a crash could lose rows a test saw committed.
        options = f"-p {self.port} -k /tmp -c listen_addresses={HOST} -c fsync=off"
        result = self._pg_ctl(
            "-l",
            str(self.log_path),
            "-w",
            "-t",
            str(_START_TIMEOUT),
            "-o",
            options,
            "start",
            check=False,
        )
        if result.returncode != 0:
            log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            raise RuntimeError(
                f"pg_ctl start on port {self.port} failed ({result.returncode}):\n"
                f"{result.stdout.decode(errors='replace')}\n{log[-4000:]}"
            )

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server and wait until it is gone. ``immediate`` is a crash: no checkpoint."""
        if self.running:
            self._pg_ctl("-m", mode, "-w", "-t", str(_START_TIMEOUT), "stop")

    def destroy(self) -> None:
        if self._destroyed:
            return
        with contextlib.suppress(RuntimeError, OSError):
            self.stop("immediate")
        self._destroyed = True
        shutil.rmtree(self.data_dir, ignore_errors=True)
        with _live_lock:
            _live.discard(self)

    def execute(self, sql: str, *args: object) -> str:
        return execute(self.url, sql, *args)

    def fetch(self, sql: str, *args: object) -> list[Any]:
        return fetch(self.url, sql, *args)

    async def connect(self) -> Any:
        return await connect(self.url)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()


@atexit.register
def _cleanup() -> None:
    # A test that crashed or forgot destroy() must not leave a postmaster holding a port and a
    # data directory in /tmp for the next run.
    with _live_lock:
        clusters = list(_live)
    for cluster in clusters:
        cluster.destroy()
    if _template is not None:
        shutil.rmtree(_template, ignore_errors=True)
