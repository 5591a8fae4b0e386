"""Scale-out: R proxy replicas in front of I simulated instances over S sessions in Postgres.

    .venv/bin/python bench/scaleout.py                 # the issue's sizes (8 x 50 x 100,000)
    .venv/bin/python bench/scaleout.py --quick         # small sizes, about a minute
    .venv/bin/python bench/scaleout.py --phases invalidation,leadership --replicas 4

Needs a Postgres with trust auth (default 127.0.0.1:5432, or SESSION_PROXY_TEST_DATABASE_URL)
and redis-server on PATH. Makes throwaway databases (``sp_scale_<hex>``) and drops them; starts
its own redis-server on a free port. The instances are real ``proxy.simulator`` apps, many per
process (``--sim-procs`` launcher processes, each serving its share of the instances on its own
ports in one event loop: a process per instance would cost ~40 MB each).

Phases (``--phases``, all by default), each printed when done and again in the summary:

- ``invalidation``: an UPDATE of a row's owner (asyncpg, autocommit) to every replica routing
  to the new owner: status requests through each replica until ``X-Proxy-Instance`` is the new
  owner (both instances hold the session, so only the row decides).
- ``kill``: load on every replica, one replica SIGKILLed; failures on the others, and how long
  the dead replica's clients (which retry on the next replica) take to get answers again.
- ``memory``: one replica learns ``--memory-sessions`` owners (a row lookup each); its VmRSS.
- ``leadership``: replicas with a small ``RECONCILE_INTERVAL``; ``pg_locks`` sampled every
  10 ms for the reconcile advisory lock (which replica holds it, by ``application_name``); the
  holder SIGKILLed ``--leader-kills`` times; then the lock's connection terminated mid-pass
  (``pg_terminate_backend``) while another replica is asked to reconcile. Every finished pass
  (its "reconcile finished" log line: end time and duration) is checked for overlaps.
- ``redis``: replicas without a database sharing the table through Redis; fleet calls (status
  probes + list calls of snapshots) per learned session, learned one replica at a time and all
  at once; then redis-server SIGKILLed under load.
- ``reconcile``: ``session-proxy reconcile --json`` over ``--reconcile-sessions`` rows and
  ``--reconcile-instances`` instances (``--reconcile-wrong`` of the rows naming a wrong owner),
  twice (the second pass finds nothing to fix); and the instances' lists fetched directly, for
  how much of the pass is the simulators' own time. ``--cached-lists`` has each instance answer
  its list from its first answer, so the pass's time is the proxy's and Postgres's (on one
  machine the instances' own list work competes for the same cores). Then the same passes led
  by one serving replica (``POST /_proxy/reconcile``, after a tenth of the rows are made wrong
  again, and once with nothing to fix): its peak RSS (VmHWM) and its ``/healthz`` answers,
  asked every 0.1 s meanwhile (``--no-leader`` leaves this out). ``--warm-memory MIB`` has the
  bench write that much memory, and free it, just before each command: on a VM whose balloon
  reports freed pages to its host (``free page reporting`` in the machine line; these machines
  do), the first process to touch memory after a while pays a host fault a page, ~1 s of a pass
  at 400 MiB; a long-running node's memory is backed already.

Everything is bounded: ``--time-limit`` for the whole run, a deadline for every wait.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

API_KEY = "bench-key"
ADMIN_TOKEN = "bench-admin-token"
HOST = "127.0.0.1"
TABLE = "whatsapp_accounts"
LOCK_KEY = f"session-proxy-reconcile:{TABLE}"
DEFAULT_ADMIN_URL = os.environ.get(
    "SESSION_PROXY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# --- the simulator launcher: many instances in one process ----------------------------------------


def _bind(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(2048)
    return sock


def _read_ids(path: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in Path(path).read_text().splitlines() if line.strip())


def _write_json_atomically(path: Path, value: Any) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(value))
    partial.replace(path)


class _ListCache:
    """``--cached-lists``: an instance's ``GET /api/sessions`` answered from its last answer
    until a call other than a GET reaches it. On one machine the 100 instances' own list work
    (building and encoding 10,000 sessions each) competes with the proxy for the same cores; a
    real instance does that on its own machine. The answer is the simulator's own, taken once."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.cached: tuple[dict[str, Any], list[bytes]] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        listing = (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and scope["path"] == "/api/sessions"
        )
        if not listing:
            if scope["type"] == "http" and scope["method"] != "GET":
                self.cached = None  # a start, a delete, a send: the list may change
            await self.app(scope, receive, send)
            return
        if self.cached is None:
            start: dict[str, Any] = {}
            chunks: list[bytes] = []

            async def keep(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    start.update(message)
                else:
                    chunks.append(message.get("body", b""))

            await self.app(scope, receive, keep)
            if start.get("status") != 200:
                await send(start)
                await send({"type": "http.response.body", "body": b"".join(chunks)})
                return
            self.cached = (start, chunks)
        start, chunks = self.cached
        await send(start)
        await send({"type": "http.response.body", "body": b"".join(chunks)})


async def _serve_sims(spec: dict[str, Any], ready_path: Path) -> None:
    import uvicorn

    from proxy.simulator import SimulatorConfig, create_app

    servers: list[tuple[uvicorn.Server, socket.socket]] = []
    ports: dict[str, int] = {}
    for entry in spec["instances"]:
        config = SimulatorConfig(
            name=entry["name"],
            api_key=spec["api_key"],
            connect_delay=0.0,
            sessions=_read_ids(entry["sessions_file"]),
            bulk_interval=0.0,
        )
        sock = _bind(spec["host"])
        port = sock.getsockname()[1]
        ports[entry["name"]] = port
        app = create_app(config)
        server = uvicorn.Server(
            uvicorn.Config(
                _ListCache(app) if spec.get("cache_lists") else app,
                host=spec["host"],
                port=port,
                server_header=False,
                log_level="warning",
                access_log=False,
                lifespan="on",
            )
        )
        servers.append((server, sock))
    tasks = [asyncio.create_task(s.serve(sockets=[sock])) for s, sock in servers]
    while not all(s.started for s, _ in servers):
        if any(t.done() for t in tasks):
            for t in tasks:
                if t.done() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        await asyncio.sleep(0.05)
    _write_json_atomically(ready_path, {"pid": os.getpid(), "ports": ports})
    await asyncio.gather(*tasks)


def serve_sims_main(spec_path: str, ready_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve_sims(spec, Path(ready_path)))
    else:
        uvloop.run(_serve_sims(spec, Path(ready_path)))
    return 0


@dataclass
class SimInstance:
    name: str
    url: str
    port: int
    sessions: list[str]

    @property
    def stored_form(self) -> str:
        """How Laravel stores an instance (the proxy maps loopback forms by itself)."""
        return f"http://localhost:{self.port}"


class SimFleet:
    """``count`` simulated instances served by ``procs`` launcher processes."""

    def __init__(self, work: Path, tag: str) -> None:
        self.work = work
        self.tag = tag
        self.instances: list[SimInstance] = []
        self.procs: list[Any] = []

    def start(
        self, owned: list[list[str]], procs: int, timeout: float, cache_lists: bool = False
    ) -> SimFleet:
        from tests.helpers.processes import child_env, spawn

        names = [f"{self.tag}-{n:03d}" for n in range(len(owned))]
        groups: list[list[int]] = [list(range(p, len(owned), procs)) for p in range(procs)]
        readies: list[Path] = []
        for p, members in enumerate(groups):
            if not members:
                continue
            entries = []
            for n in members:
                listing = self.work / f"{names[n]}.sessions"
                listing.write_text("\n".join(owned[n]) + "\n")
                entries.append({"name": names[n], "sessions_file": str(listing)})
            spec_path = self.work / f"{self.tag}-launcher-{p}.json"
            spec_path.write_text(
                json.dumps(
                    {
                        "host": HOST,
                        "api_key": API_KEY,
                        "instances": entries,
                        "cache_lists": cache_lists,
                    }
                )
            )
            ready = self.work / f"{self.tag}-launcher-{p}.ready"
            ready.unlink(missing_ok=True)
            readies.append(ready)
            cmd = [sys.executable, __file__, "--serve-sims", str(spec_path), "--ready", str(ready)]
            out = self.work / f"{self.tag}-launcher-{p}.out"
            self.procs.append(spawn(cmd, output=out, env=child_env()))
        deadline = time.monotonic() + timeout
        ports: dict[str, int] = {}
        for ready, proc in zip(readies, self.procs, strict=True):
            while not ready.exists():
                if proc.poll() is not None:
                    raise RuntimeError(f"simulator launcher exited: {proc.args}")
                if time.monotonic() > deadline:
                    raise TimeoutError("simulator launchers not ready in time")
                time.sleep(0.05)
            ports.update(json.loads(ready.read_text())["ports"])
        for n, name in enumerate(names):
            port = ports[name]
            self.instances.append(SimInstance(name, f"http://{HOST}:{port}", port, owned[n]))
        return self

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        from tests.helpers.processes import _reap

        for proc in self.procs:
            _reap(proc)
        self.procs.clear()


# --- a small HTTP/1.1 keep-alive client (httpx costs ~10x the CPU of a request here) -------------


class HttpError(Exception):
    pass


class RawConn:
    def __init__(self, port: int, host: str = HOST) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def request(
        self, method: str, target: str, headers: Iterable[tuple[str, str]] = (), body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        try:
            return await self._request(method, target, headers, body)
        except (OSError, asyncio.IncompleteReadError, HttpError, ValueError) as exc:
            await self.close()
            raise HttpError(f"{type(exc).__name__}: {exc}") from exc

    async def _request(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines.append(f"Content-Length: {len(body)}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        found: dict[str, str] = {}
        for line in header_lines:
            if ":" in line:
                name, _, value = line.partition(":")
                found[name.strip().lower()] = value.strip()
        if "content-length" in found:
            data = await self.reader.readexactly(int(found["content-length"]))
        elif found.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            data = b"".join(parts)
        else:
            data = await self.reader.read()
            await self.close()
        if found.get("connection", "").lower() == "close":
            await self.close()
        return status, found, data


def status_target(session_id: str) -> str:
    return f"/api/sessions/{session_id}/status?api_key={API_KEY}"


# --- processes: proxies, redis, rss ---------------------------------------------------------------


def _status_mib(pid: int, field: str) -> float:
    """A memory figure of /proc/<pid>/status (``VmRSS``, ``VmHWM``), in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_mib(pid: int) -> float:
    return _status_mib(pid, "VmRSS")


def hwm_mib(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM)."""
    return _status_mib(pid, "VmHWM")


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def with_query(url: str, **params: str) -> str:
    sep = "&" if "?" in url else "?"
    return url + sep + "&".join(f"{k}={v}" for k, v in params.items())


@dataclass
class Replica:
    name: str
    proc: Any  # tests.helpers.processes.ProxyProcess
    conns: list[RawConn] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.proc.port)

    @property
    def alive(self) -> bool:
        return bool(self.proc.alive)


async def start_replicas(
    work: Path, count: int, env: dict[str, str], prefix: str, db_url: str | None
) -> list[Replica]:
    from tests.helpers.processes import ProxyProcess

    def one(n: int) -> Replica:
        name = f"{prefix}{n}"
        own = dict(env)
        if db_url:
            own["SESSION_PROXY_DATABASE_URL"] = with_query(db_url, application_name=name)
        proc = ProxyProcess.start(work, own, ready_path="/readyz", start_timeout=90)
        return Replica(name, proc)

    with ThreadPoolExecutor(max_workers=min(count, 4)) as pool:
        futures = [pool.submit(one, n) for n in range(count)]
        replicas = [await asyncio.wrap_future(f) for f in futures]
    return replicas


def stop_replicas(replicas: Sequence[Replica]) -> None:
    for r in replicas:
        r.proc.terminate()
    for r in replicas:
        try:
            r.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            r.proc.kill()


class Redis:
    def __init__(self, work: Path) -> None:
        from tests.helpers.processes import free_port

        self.port = free_port()
        self.work = work
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Redis:
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", HOST, "--save", ""),
                *("--appendonly", "no", "--dir", str(self.work)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ping = subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True)
            if ping.stdout.strip() == b"PONG":
                return self
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


# --- Postgres ------------------------------------------------------------------------------------


class Database:
    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.name = f"sp_scale_{uuid.uuid4().hex[:10]}"
        self.url = admin_url.rsplit("/", 1)[0] + "/" + self.name

    async def create(self) -> Database:
        import asyncpg

        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{self.name}"')
        finally:
            await conn.close()
        await asyncio.to_thread(self.migrate)
        return self

    def migrate(self) -> None:
        env = {
            "SESSION_PROXY_DATABASE_URL": self.url,
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        }
        subprocess.run(
            [sys.executable, "-m", "proxy", "migrate", "--create-table"],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=60,
        )

    async def fill(self, rows: Sequence[tuple[str, str]]) -> float:
        """COPY the rows in, the NOTIFY trigger off meanwhile (nobody listens yet)."""
        import asyncpg

        started = time.monotonic()
        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute(f"ALTER TABLE {TABLE} DISABLE TRIGGER session_proxy_notify")
            await conn.copy_records_to_table(
                TABLE, records=rows, columns=["session_id", "assigned_instance_url"]
            )
            await conn.execute(f"ALTER TABLE {TABLE} ENABLE TRIGGER session_proxy_notify")
            # A table in use, not one just loaded: its hint bits set and its visibility map
            # made, as autovacuum would have done (else the first pass's scan does that work,
            # or autovacuum does it beside the pass).
            await conn.execute(f"VACUUM ANALYZE {TABLE}")
        finally:
            await conn.close()
        return time.monotonic() - started

    async def drop(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        finally:
            await conn.close()


LOCK_HOLDERS_SQL = """
SELECT a.application_name, l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtext($1)::bigint
"""


# --- the run -------------------------------------------------------------------------------------


@dataclass
class Figure:
    name: str
    value: str
    goal: str
    ok: bool | None  # None: no goal, just a figure


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fleet: SimFleet | None = None
    db: Database | None = None
    extra_dbs: list[Database] = field(default_factory=list)
    replicas: list[Replica] = field(default_factory=list)
    redis: Redis | None = None
    watch_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Sessions the invalidation phase put on a second instance (later phases leave them out).
    doubled: set[str] = field(default_factory=set)

    def figure(self, name: str, value: str, goal: str, ok: bool | None) -> None:
        self.figures.append(Figure(name, value, goal, ok))
        verdict = "" if ok is None else ("  [met]" if ok else "  [NOT met]")
        print(f"  {name}: {value}   (goal: {goal}){verdict}", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  {text}", flush=True)

    def base_env(self, instances: Sequence[SimInstance]) -> dict[str, str]:
        return {
            "SESSION_PROXY_INSTANCES": ",".join(i.url for i in instances),
            "SESSION_PROXY_API_KEY": API_KEY,
            "SESSION_PROXY_ADMIN_TOKEN": ADMIN_TOKEN,
            "SESSION_PROXY_LOG_LEVEL": "warning",
            "SESSION_PROXY_RECONCILE_INTERVAL": "0",
            "SESSION_PROXY_SHUTDOWN_DRAIN": "0",
        }

    # --- setup ---

    async def setup_fleet(self) -> None:
        a = self.args
        per = a.sessions // a.instances
        owned = [[f"s{n:03d}_{k:06d}" for k in range(per)] for n in range(a.instances)]
        progress(f"starting {a.instances} instances ({per:,} sessions each) in {a.sim_procs} procs")
        started = time.monotonic()
        self.fleet = await asyncio.to_thread(
            SimFleet(self.work, "main").start, owned, a.sim_procs, 120
        )
        progress(f"instances up in {time.monotonic() - started:.1f} s")
        self.db = await Database(a.database_url).create()
        rows = [(sid, inst.stored_form) for inst in self.fleet.instances for sid in inst.sessions]
        took = await self.db.fill(rows)
        progress(f"{len(rows):,} rows copied into {self.db.name} in {took:.1f} s")
        self.note(
            f"fleet: {a.instances} instances x {per:,} sessions = {len(rows):,} rows in Postgres"
        )

    def all_sessions(self, doubled: bool = False) -> list[tuple[str, SimInstance]]:
        assert self.fleet is not None
        return [
            (sid, inst)
            for inst in self.fleet.instances
            for sid in inst.sessions
            if doubled or sid not in self.doubled
        ]

    async def sim_control(self, inst: SimInstance, session_id: str) -> None:
        conn = RawConn(inst.port)
        try:
            body = json.dumps({"session_id": session_id, "status": "connected"}).encode()
            status, _, data = await conn.request(
                "POST",
                "/_sim/sessions",
                [("x-api-key", API_KEY), ("content-type", "application/json")],
                body,
            )
            if status != 200:
                raise RuntimeError(f"/_sim/sessions answered {status}: {data[:200]!r}")
        finally:
            await conn.close()

    async def admin(self, replica: Replica, method: str, path: str) -> tuple[int, Any]:
        conn = RawConn(replica.port)
        try:
            status, _, data = await asyncio.wait_for(
                conn.request(method, path, [("authorization", f"Bearer {ADMIN_TOKEN}")]), 120
            )
        finally:
            await conn.close()
        return status, json.loads(data) if data else None

    async def db_replicas(self, prefix: str, **env: str) -> list[Replica]:
        assert self.fleet is not None and self.db is not None
        progress(f"starting {self.args.replicas} replicas ({prefix}*)")
        started = time.monotonic()
        replicas = await start_replicas(
            self.work,
            self.args.replicas,
            {**self.base_env(self.fleet.instances), **env},
            prefix,
            self.db.url,
        )
        self.replicas += replicas
        progress(f"replicas up in {time.monotonic() - started:.1f} s")
        # Every replica listening for NOTIFY before anything is measured.
        deadline = time.monotonic() + 30
        for r in replicas:
            while True:
                ready = await self.admin_ready(r)
                if ready.get("database", {}).get("listening"):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{r.name} not listening")
                await asyncio.sleep(0.1)
        return replicas

    async def admin_ready(self, r: Replica) -> dict[str, Any]:
        conn = RawConn(r.port)
        try:
            _, _, data = await conn.request("GET", "/readyz")
        finally:
            await conn.close()
        ready: dict[str, Any] = json.loads(data)
        return ready

    # --- invalidation ---

    async def invalidation(self, replicas: list[Replica]) -> None:
        import asyncpg

        assert self.fleet is not None and self.db is not None
        a = self.args
        print("\n== invalidation: UPDATE of the owner -> every replica routes to the new one")
        insts = self.fleet.instances
        chosen = []
        for k in range(a.updates):
            old = insts[k % len(insts)]
            new = insts[(k + 1 + k // len(insts)) % len(insts)]
            if new is old:
                new = insts[(k + 2) % len(insts)]
            chosen.append((old.sessions[(k // len(insts)) % len(old.sessions)], old, new))
        for sid, _old, new in chosen:
            await self.sim_control(new, sid)  # both hold it: only the row decides
            self.doubled.add(sid)
        conns = {r.name: RawConn(r.port) for r in replicas}
        wrong_warm = 0
        for sid, old, _new in chosen:
            for r in replicas:
                status, headers, _ = await conns[r.name].request("GET", status_target(sid))
                if status != 200 or headers.get("x-proxy-instance") != old.url:
                    wrong_warm += 1
        if wrong_warm:
            self.note(f"warm-up: {wrong_warm} answers not from the row's owner")
        conn = await asyncpg.connect(self.db.url)
        latencies: list[float] = []
        per_replica: list[float] = []
        commits: list[float] = []
        timeouts = 0
        polls = 0

        async def follow(r: Replica, sid: str, want: str, t0: float, until: float) -> float | None:
            nonlocal polls
            c = conns[r.name]
            while time.perf_counter() < until:
                polls += 1
                try:
                    status, headers, _ = await c.request("GET", status_target(sid))
                except HttpError:
                    await asyncio.sleep(0.005)
                    continue
                if status == 200 and headers.get("x-proxy-instance") == want:
                    return time.perf_counter() - t0
                await asyncio.sleep(0.001)
            return None

        try:
            for sid, _old, new in chosen:
                t0 = time.perf_counter()
                await conn.execute(
                    f"UPDATE {TABLE} SET assigned_instance_url = $1 WHERE session_id = $2",
                    new.stored_form,
                    sid,
                )
                commits.append(time.perf_counter() - t0)
                got = await asyncio.gather(
                    *(follow(r, sid, new.url, t0, t0 + a.update_timeout) for r in replicas)
                )
                if any(g is None for g in got):
                    timeouts += 1
                    continue
                done = [g for g in got if g is not None]
                per_replica += done
                latencies.append(max(done))
        finally:
            await conn.close()
            for c in conns.values():
                await c.close()
        n = len(latencies)
        self.note(
            f"{len(chosen)} UPDATEs (one at a time, each committed in p50 "
            f"{ms(pct(commits, 50))}), {len(replicas)} replicas polled every ~1 ms "
            f"({polls:,} status requests); {timeouts} not followed by every replica within "
            f"{a.update_timeout:g} s"
        )
        self.note(
            f"per replica: p50 {ms(pct(per_replica, 50))}, p99 {ms(pct(per_replica, 99))}, "
            f"max {ms(max(per_replica, default=float('nan')))}"
        )
        p99 = pct(latencies, 99)
        self.figure(
            "invalidation, UPDATE -> all replicas route to the new owner",
            f"p50 {ms(pct(latencies, 50))} / p99 {ms(p99)} / max "
            f"{ms(max(latencies, default=float('nan')))} over {n} updates",
            "p99 within 100 ms, >= 100 updates",
            timeouts == 0 and n >= min(100, a.updates) and p99 <= 0.100,
        )

    # --- a replica killed under load ---

    async def kill_under_load(self, replicas: list[Replica]) -> Replica:
        a = self.args
        print("\n== a replica SIGKILLed under load (its clients retry on the next replica)")
        sessions = [sid for sid, _ in self.all_sessions()]
        rng = random.Random(7)
        working = rng.sample(sessions, min(a.load_sessions, len(sessions)))
        victim = replicas[0]
        records: list[tuple[float, float, int, int, bool, str]] = []  # start, end, client, ...
        kill_at: list[float] = []
        stop_at = time.perf_counter() + a.warmup_seconds + a.load_seconds
        measure_from = time.perf_counter() + a.warmup_seconds

        async def client(cid: int, home: int) -> None:
            conns = {n: RawConn(r.port) for n, r in enumerate(replicas)}
            target = home
            crng = random.Random(cid)
            try:
                while time.perf_counter() < stop_at:
                    sid = working[crng.randrange(len(working))]
                    t = time.perf_counter()
                    try:
                        status, headers, _ = await asyncio.wait_for(
                            conns[target].request("GET", status_target(sid)), 30
                        )
                        ok = status == 200
                        why = "" if ok else f"HTTP {status} {headers.get('x-proxy-error', '')}"
                    except (HttpError, TimeoutError) as exc:
                        ok, why = False, str(exc)[:80]
                    if t >= measure_from:
                        records.append((t, time.perf_counter(), cid, target, ok, why))
                    if not ok and home == 0:
                        # A client of the dead replica tries the next one, and stays there.
                        target = (target + 1) % len(replicas)
            finally:
                for c in conns.values():
                    await c.close()

        async def killer() -> None:
            await asyncio.sleep(a.warmup_seconds + a.kill_after)
            kill_at.append(time.perf_counter())
            victim.proc.kill()

        clients = [
            client(n * a.clients_per_replica + k, n)
            for n in range(len(replicas))
            for k in range(a.clients_per_replica)
        ]
        await asyncio.gather(killer(), *clients)
        t_kill = kill_at[0]
        survivors = [r for r in records if r[3] != 0]
        failed_survivors = [r for r in survivors if not r[4]]
        dead_clients = {r[2] for r in records if r[2] < a.clients_per_replica}
        on_dead = [r for r in records if r[3] == 0]
        errors_on_dead = [r for r in on_dead if not r[4]]
        recovered: list[float] = []
        for cid in dead_clients:
            after = [r for r in records if r[2] == cid and r[0] >= t_kill and r[4] and r[3] != 0]
            recovered.append(min(r[1] for r in after) - t_kill if after else float("inf"))
        # Throughput of the dead replica's share in 100 ms bins, before and after.
        bin_s = 0.1
        before = [r for r in records if r[2] in dead_clients and r[4] and r[1] < t_kill]
        span_before = max(1e-9, t_kill - measure_from)
        rate_before = len(before) / span_before
        back_at = float("inf")
        t = t_kill
        while t < stop_at:
            inside = [r for r in records if r[2] in dead_clients and r[4] and t <= r[1] < t + bin_s]
            if len(inside) / bin_s >= 0.8 * rate_before:
                back_at = t + bin_s - t_kill
                break
            t += bin_s
        total = len(records)
        latencies = [r[1] - r[0] for r in survivors if r[4]]
        self.note(
            f"{total:,} requests in {a.load_seconds:g} s from "
            f"{len(replicas) * a.clients_per_replica} clients ({a.clients_per_replica} per "
            f"replica) over {len(working):,} sessions; "
            f"{victim.name} SIGKILLed {a.kill_after:g} s in; survivors' p50 "
            f"{ms(pct(latencies, 50))}, p99 {ms(pct(latencies, 99))}"
        )
        self.note(
            f"the dead replica's clients: {len(errors_on_dead)} requests failed on it (each "
            f"retried on the next replica), first answer from another replica after "
            f"{ms(max(recovered, default=float('nan')))} (worst client); their share's rate "
            f"back to 80% of {rate_before:.0f}/s after {ms(back_at)}"
        )
        if failed_survivors:
            reasons = sorted({r[5] for r in failed_survivors})[:5]
            self.note(f"failures on the surviving replicas: {reasons}")
        self.figure(
            "replica SIGKILLed under load: failed requests on the other replicas",
            f"{len(failed_survivors)} of {len(survivors):,}",
            "0",
            not failed_survivors,
        )
        self.figure(
            "replica SIGKILLed under load: its share of traffic recovered",
            f"{ms(max(recovered, default=float('nan')))} to the first answer elsewhere (worst "
            f"client), {ms(back_at)} to 80% of its rate",
            "(no goal: as short as the clients' retry)",
            None,
        )
        return victim

    # --- memory ---

    async def memory(self, replica: Replica, others: list[Replica]) -> None:
        a = self.args
        print(f"\n== memory: one replica learns {a.memory_sessions:,} owners (a row lookup each)")
        sessions = [sid for sid, _ in self.all_sessions(doubled=True)][: a.memory_sessions]
        # Let lazy allocations (pools, buffers) happen before the baseline.
        conn = RawConn(replica.port)
        for sid in sessions[:50]:
            await conn.request("GET", status_target(sid))
        await conn.close()
        await asyncio.sleep(0.5)
        before = rss_mib(replica.proc.pid)
        queue = iter(sessions[50:])
        learned = 0
        failed = 0
        deadline = time.monotonic() + a.fill_seconds
        started = time.monotonic()

        async def filler() -> None:
            nonlocal learned, failed
            c = RawConn(replica.port)
            try:
                for sid in queue:
                    if time.monotonic() > deadline:
                        return
                    try:
                        status, _, _ = await c.request("GET", status_target(sid))
                    except HttpError:
                        failed += 1
                        continue
                    if status == 200:
                        learned += 1
                    else:
                        failed += 1
            finally:
                await c.close()

        await asyncio.gather(*(filler() for _ in range(a.fill_connections)))
        took = time.monotonic() - started
        await asyncio.sleep(0.5)
        after = rss_mib(replica.proc.pid)
        status, page = await self.admin(replica, "GET", "/_proxy/routes?limit=1")
        known = page.get("total") if status == 200 else None
        others_rss = [rss_mib(r.proc.pid) for r in others if r.alive]
        total = learned + 50
        self.note(
            f"learned {total:,} owners in {took:.1f} s ({learned / max(took, 1e-9):,.0f}/s over "
            f"{a.fill_connections} connections; {failed} failed); routing table reports "
            f"{known} entries"
        )
        self.note(
            f"VmRSS {before:.1f} MiB -> {after:.1f} MiB: +{after - before:.1f} MiB, "
            f"{(after - before) * 1024 * 1024 / max(1, learned):,.0f} bytes per session; the "
            f"other replicas (few known sessions): {min(others_rss, default=0):.1f}-"
            f"{max(others_rss, default=0):.1f} MiB"
        )
        self.figure(
            f"memory per replica with {total:,} known sessions",
            f"{after:.1f} MiB VmRSS ({after - before:+.1f} MiB for the table)",
            "(no goal given; figure only)",
            None,
        )

    # --- leadership ---

    async def leadership(self) -> None:
        import asyncpg

        assert self.db is not None
        a = self.args
        print(
            f"\n== leadership: {a.replicas} replicas, RECONCILE_INTERVAL={a.reconcile_interval:g}"
            f", the lock holder SIGKILLed {a.leader_kills} times"
        )
        replicas = await self.db_replicas(
            "lead-",
            SESSION_PROXY_RECONCILE_INTERVAL=str(a.reconcile_interval),
            SESSION_PROXY_LOG_LEVEL="info",
        )
        by_name = {r.name: r for r in replicas}
        watcher = await asyncpg.connect(self.db.url)
        samples: list[tuple[float, list[str], list[int]]] = []
        stop = asyncio.Event()

        watch_lock = asyncio.Lock()

        async def sample() -> None:
            while not stop.is_set():
                async with watch_lock:
                    rows = await watcher.fetch(LOCK_HOLDERS_SQL, LOCK_KEY)
                samples.append((time.time(), [r[0] for r in rows], [r[1] for r in rows]))
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample())
        self.watch_lock = watch_lock

        async def holder(
            exclude: set[str], within: float
        ) -> tuple[str, int, float] | tuple[None, None, float]:
            deadline = time.monotonic() + within
            seen = len(samples)
            while time.monotonic() < deadline:
                for t, names, pids in samples[seen:]:
                    for name, pid in zip(names, pids, strict=True):
                        if name not in exclude:
                            return name, pid, t
                seen = len(samples)
                await asyncio.sleep(0.005)
            return None, None, time.time()

        wait_for = 4 * a.reconcile_interval + 30
        released: list[float] = []
        takeovers: list[float] = []
        killed: set[str] = set()
        lock_lost: dict[str, Any] = {}
        try:
            for _ in range(a.leader_kills):
                if len(killed) >= len(replicas) - (2 if a.lock_loss else 1):
                    break
                name, _pid, _ = await holder(killed, wait_for)
                if name is None:
                    self.note("no replica took the lock in time")
                    break
                t_kill = time.time()
                by_name[name].proc.kill()
                killed.add(name)
                # Released: the next sample with the killed replica no longer holding.
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    if any(t > t_kill and name not in names for t, names, _ in samples):
                        t_free = next(
                            t for t, names, _ in samples if t > t_kill and name not in names
                        )
                        released.append(t_free - t_kill)
                        break
                    await asyncio.sleep(0.005)
                new, _, t_new = await holder(killed, wait_for)
                if new is None:
                    self.note("nobody took over in time")
                    break
                takeovers.append(t_new - t_kill)
            if a.lock_loss:
                lock_lost = await self.lock_loss(
                    [r for r in replicas if r.alive], watcher, holder, wait_for
                )
            await asyncio.sleep(2 * a.reconcile_interval)
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await sampler
            await watcher.close()
        most = max((len(names) for _, names, _ in samples), default=0)
        passes = finished_passes(replicas)
        overlaps = overlapping(passes, since=lock_lost.get("t", float("inf")))
        overlaps_after = overlapping(passes, since=0, only_after=lock_lost.get("t"))
        skipped = sum(r.proc.log_text().count("another replica is reconciling") for r in replicas)
        durations = [p[2] - p[1] for p in passes]
        self.note(
            f"{len(samples):,} pg_locks samples: at most {most} holder(s) at once; "
            f"{len(passes)} passes finished (p50 {ms(pct(durations, 50))}), {skipped} skipped "
            f"with 'another replica is reconciling'"
        )
        self.figure(
            "leadership: reconcile writers at once (pg_locks, and finished passes overlapping)",
            f"at most {most} lock holder; {len(overlaps)} overlapping passes across "
            f"{len(takeovers)} leader kills",
            "exactly one at any time",
            most <= 1 and not overlaps and len(takeovers) >= 1,
        )
        self.figure(
            "leadership: a SIGKILLed leader's lock released / another replica takes over",
            f"released after {ms(max(released, default=float('nan')))} (max); taken over "
            f"after p50 {ms(pct(takeovers, 50))} / max {ms(max(takeovers, default=float('nan')))}"
            f" ({len(takeovers)} kills)",
            f"within ~1.1 x RECONCILE_INTERVAL ({1.1 * a.reconcile_interval:g} s) + a pass",
            bool(takeovers) and max(takeovers) <= 1.1 * a.reconcile_interval + 5,
        )
        if lock_lost:
            self.figure(
                "leadership: the lock's connection lost mid-pass (pg_terminate_backend)",
                lock_lost["summary"],
                "exactly one writer at any time (and the store still up)",
                not overlaps_after
                and lock_lost.get("overlap", 0.0) <= 0.0
                and lock_lost.get("db_up") is not False,
            )
        stop_replicas([r for r in replicas if r.alive])

    async def lock_loss(
        self,
        replicas: list[Replica],
        watcher: Any,
        holder: Callable[..., Awaitable[Any]],
        wait_for: float,
    ) -> dict[str, Any]:
        """Terminate the lock holder's backend (a network blip, a DBA, idle_session_timeout):
        does its pass go on writing while another replica takes the lock?"""
        name, pid, _ = await holder(set(), wait_for)
        if name is None:
            return {"summary": "no holder seen", "t": float("inf")}
        import asyncpg

        assert self.db is not None
        t_cut = time.time()
        async with self.watch_lock:
            await watcher.execute("SELECT pg_terminate_backend($1)", pid)
        # pg_terminate_backend only signals: wait until the backend is gone and the lock free
        # (on a connection of its own: the sampler keeps using ``watcher``).
        own = await asyncpg.connect(self.db.url)
        try:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                rows = await own.fetch(LOCK_HOLDERS_SQL, LOCK_KEY)
                if pid not in [r[1] for r in rows]:
                    break
                await asyncio.sleep(0.002)
        finally:
            await own.close()
        t_free = time.time()
        first = next(r for r in replicas if r.name == name)
        others = [r for r in replicas if r.name != name]
        if not others:
            return {"summary": "skipped: a second live replica is needed", "t": float("inf")}
        status, report = await self.admin(others[0], "POST", "/_proxy/reconcile")
        t_other = time.time()
        took = float(report.get("seconds") or 0) if isinstance(report, dict) else 0.0
        skipped = report.get("skipped") if isinstance(report, dict) else None
        # The cut pass's end: the replica's first reconcile line after the cut.
        end_line: dict[str, Any] | None = None
        deadline = time.monotonic() + 15
        while end_line is None and time.monotonic() < deadline:
            end_line = next((e for e in reconcile_lines(first) if e["ts"] >= t_cut), None)
            await asyncio.sleep(0.05)
        summary = (
            f"{name}'s lock backend terminated mid-pass (gone after {ms(t_free - t_cut)}); "
            f"{others[0].name}'s POST /_proxy/reconcile then answered {status}"
            + (f" ({skipped})" if skipped else f" after a {took:.2f} s pass")
        )
        overlap = 0.0
        if end_line is None:
            summary += f"; {name} logged nothing about its pass"
        else:
            t_end = float(end_line["ts"])
            if status == 200:
                overlap = max(0.0, min(t_end, t_other) - max(t_cut, t_other - took))
            summary += (
                f"; {name}'s pass went on without the lock for {t_end - t_cut:.2f} s and logged "
                f"'{end_line['msg']}'"
                + (f" ({end_line['reason']})" if end_line.get("reason") else "")
                + f": two passes at once for {overlap:.2f} s"
            )
        # After it: is the replica's store still marked up (row lookups on a miss)?
        ready = await self.admin_ready(first)
        db = ready.get("database", {})
        _, stats0 = await self.admin(first, "GET", "/_proxy/stats")
        fresh = self.all_sessions()[-1][0]
        c = RawConn(first.port)
        try:
            await c.request("GET", status_target(fresh))
        finally:
            await c.close()
        _, stats1 = await self.admin(first, "GET", "/_proxy/stats")
        after = await self.admin_ready(first)
        lookups = after["database"]["queries"]["lookup"] - db.get("queries", {}).get("lookup", 0)
        await asyncio.sleep(0.5)
        later = await self.admin_ready(first)
        summary += (
            f"; afterwards {name} reports database up={db.get('up')} (last_error "
            f"{str(db.get('last_error'))[:90]!r}); a miss then cost {lookups} row lookups and "
            f"{stats1['probes'] - stats0['probes']} fleet probes; up={later['database']['up']} "
            "0.5 s after that miss"
        )
        return {"summary": summary, "t": t_cut, "overlap": overlap, "db_up": db.get("up")}

    # --- redis ---

    async def redis_phase(self) -> None:
        assert self.fleet is not None
        a = self.args
        print("\n== Redis-shared table (no database): fleet calls per learned session, outage")
        self.redis = Redis(self.work).start()
        env = {
            **self.base_env(self.fleet.instances),
            "SESSION_PROXY_CACHE_URL": f"redis://{HOST}:{self.redis.port}/0",
        }
        progress(f"starting {a.replicas} replicas on Redis")
        replicas = await start_replicas(self.work, a.replicas, env, "redis-", None)
        self.replicas += replicas
        n_inst = len(self.fleet.instances)
        rng = random.Random(11)
        pool = rng.sample(self.all_sessions(), min(len(self.all_sessions()), 2 * a.redis_sessions))
        seq, conc = pool[: a.redis_sessions], pool[a.redis_sessions :][: a.redis_concurrent]

        rediscoveries = [0]

        async def counters() -> tuple[int, int]:
            probes = snapshots = rediscovered = 0
            for r in replicas:
                status, stats = await self.admin(r, "GET", "/_proxy/stats")
                if status == 200:
                    probes += stats["probes"]
                    snapshots += stats["snapshots"]
                    rediscovered += stats["rediscoveries"]
            rediscoveries[0] = rediscovered
            return probes, snapshots

        bad = 0

        async def ask(r: Replica, sid: str, inst: SimInstance) -> None:
            nonlocal bad
            c = RawConn(r.port)
            try:
                status, headers, _ = await c.request("GET", status_target(sid))
            finally:
                await c.close()
            if status != 200 or headers.get("x-proxy-instance") != inst.url:
                bad += 1

        sem = asyncio.Semaphore(8)

        async def learn_then_others(k: int, sid: str, inst: SimInstance) -> None:
            async with sem:
                first = replicas[k % len(replicas)]
                await ask(first, sid, inst)
                await asyncio.gather(*(ask(r, sid, inst) for r in replicas if r is not first))

        p0, s0 = await counters()
        r0 = rediscoveries[0]
        await asyncio.gather(*(learn_then_others(k, sid, i) for k, (sid, i) in enumerate(seq)))
        p1, s1 = await counters()
        r1 = rediscoveries[0]

        async def all_at_once(sid: str, inst: SimInstance) -> None:
            async with sem:
                await asyncio.gather(*(ask(r, sid, inst) for r in replicas))

        await asyncio.gather(*(all_at_once(sid, i) for sid, i in conc))
        p2, s2 = await counters()
        calls_seq = (p1 - p0) + (s1 - s0) * n_inst
        calls_conc = (p2 - p1) + (s2 - s1) * n_inst
        self.note(
            f"{len(seq)} sessions each learned on one replica, then asked on the other "
            f"{len(replicas) - 1}: {p1 - p0:,} status probes + {s1 - s0} snapshots "
            f"({(s1 - s0) * n_inst:,} list calls); {bad} answers not from the owner; "
            f"{r1 - r0} rediscoveries after a failed attempt"
        )
        self.note(
            f"{len(conc)} sessions asked on all {len(replicas)} replicas at once: "
            f"{p2 - p1:,} probes + {s2 - s1} snapshots ({(s2 - s1) * n_inst:,} list calls)"
        )
        rounds_seq = calls_seq / max(1, len(seq)) / n_inst
        rounds_conc = calls_conc / max(1, len(conc)) / n_inst
        self.figure(
            "Redis table: fleet lookups per learned session, across all replicas",
            f"{calls_seq / max(1, len(seq)):.1f} fleet calls = {rounds_seq:.2f} lookup rounds of "
            f"{n_inst} instances (learned on one replica, then asked on the others); "
            f"{rounds_conc:.2f} rounds when all {len(replicas)} ask at once",
            "one (one lookup round per session, whichever replicas ask)",
            rounds_seq <= 1.05 and rounds_conc <= 1.05,
        )
        # --- outage under load ---
        learned = seq
        records: list[tuple[float, float, bool, str]] = []
        killed_at: list[float] = []
        stop_at = time.perf_counter() + a.redis_load_seconds

        async def client(r: Replica, cid: int) -> None:
            c = RawConn(r.port)
            crng = random.Random(cid)
            try:
                while time.perf_counter() < stop_at:
                    sid, _inst = learned[crng.randrange(len(learned))]
                    t = time.perf_counter()
                    try:
                        status, headers, _ = await asyncio.wait_for(
                            c.request("GET", status_target(sid)), 30
                        )
                        ok, why = status == 200, f"HTTP {status} {headers.get('x-proxy-error', '')}"
                    except (HttpError, TimeoutError) as exc:
                        ok, why = False, str(exc)[:80]
                    records.append((t, time.perf_counter(), ok, "" if ok else why))
            finally:
                await c.close()

        async def killer() -> None:
            await asyncio.sleep(a.redis_kill_after)
            killed_at.append(time.perf_counter())
            assert self.redis is not None
            self.redis.kill()

        await asyncio.gather(
            killer(),
            *(client(r, n * 10 + k) for n, r in enumerate(replicas) for k in range(2)),
        )
        t_kill = killed_at[0]
        failed = [r for r in records if not r[2]]
        lat_before = [r[1] - r[0] for r in records if r[0] < t_kill and r[2]]
        lat_after = [r[1] - r[0] for r in records if r[0] >= t_kill and r[2]]
        p_end, s_end = await counters()
        self.note(
            f"{len(records):,} requests ({2 * len(replicas)} clients) over {len(learned)} "
            f"sessions, redis-server SIGKILLed {a.redis_kill_after:g} s in: p99 before "
            f"{ms(pct(lat_before, 99))}, after {ms(pct(lat_after, 99))} (max "
            f"{ms(max(lat_after, default=float('nan')))}); the replicas re-learned from the "
            f"fleet: {p_end - p2:,} probes + {s_end - s2} snapshots"
        )
        if failed:
            self.note(f"failures: {sorted({r[3] for r in failed})[:5]}")
        self.figure(
            "Redis outage under load: failed requests",
            f"{len(failed)} of {len(records):,}",
            "0",
            not failed,
        )
        stop_replicas(replicas)

    # --- reconcile at scale ---

    async def reconcile_phase(self) -> None:
        a = self.args
        print(
            f"\n== reconcile: {a.reconcile_sessions:,} sessions over {a.reconcile_instances} "
            f"instances ({a.reconcile_wrong:.0%} of rows naming a wrong owner)"
        )
        per = a.reconcile_sessions // a.reconcile_instances
        owned = [[f"r{n:03d}_{k:06d}" for k in range(per)] for n in range(a.reconcile_instances)]
        progress(f"starting {a.reconcile_instances} instances x {per:,} sessions")
        started = time.monotonic()
        fleet = await asyncio.to_thread(
            SimFleet(self.work, "recon").start, owned, a.sim_procs, 600, a.cached_lists
        )
        if a.cached_lists:
            self.note(
                "--cached-lists: each instance answers its list from its first answer (the "
                "instances' own list work taken off the shared cores; the first fetch fills it)"
            )
        progress(f"instances up in {time.monotonic() - started:.1f} s")
        try:
            db = await Database(a.database_url).create()
            self.extra_dbs.append(db)
            rng = random.Random(5)
            insts = fleet.instances
            rows = []
            for n, inst in enumerate(insts):
                for sid in inst.sessions:
                    if rng.random() < a.reconcile_wrong:
                        other = insts[(n + 1 + rng.randrange(len(insts) - 1)) % len(insts)]
                        rows.append((sid, other.stored_form))
                    else:
                        rows.append((sid, inst.stored_form))
            took = await db.fill(rows)
            progress(f"{len(rows):,} rows copied in {took:.1f} s")
            lists = await self.fetch_lists(insts)
            self.note(
                f"the {len(insts)} lists fetched directly, all at once: {lists['seconds']:.2f} s"
                f" wall, {lists['bytes'] / 1e6:.0f} MB ({lists['bytes'] / len(insts) / 1e6:.2f} "
                f"MB per list); simulator CPU {lists['sim_cpu']:.2f} s"
            )
            env = {
                "SESSION_PROXY_DATABASE_URL": db.url,
                "SESSION_PROXY_INSTANCES": ",".join(i.url for i in insts),
                "SESSION_PROXY_API_KEY": API_KEY,
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            }
            if a.warm_memory:
                self.note(
                    f"--warm-memory: {a.warm_memory} MiB written and freed before each command "
                    f"(free page reporting: {free_page_reporting()})"
                )
            for label in ("first pass", "second pass"):
                if a.warm_memory:
                    warm_memory(a.warm_memory)
                sims_before = sum(cpu_seconds(p) for p in fleet.pids())
                result = await asyncio.to_thread(run_reconcile, env, a.reconcile_timeout)
                sims_cpu = sum(cpu_seconds(p) for p in fleet.pids()) - sims_before
                report = result["report"]
                if report is None:
                    self.note(f"{label}: reconcile failed: {result['error']}")
                    self.figure(f"reconcile {label}", "failed", "within 5 s", False)
                    continue
                counts = report["counts"]
                calls = report["inventory_calls"]
                per_instance = calls / len(insts)
                self.note(
                    f"{label}: pass {report['seconds']:.2f} s (command {result['wall']:.2f} s, "
                    f"its CPU {result['cpu']:.2f} s, its peak RSS "
                    f"{result['peak_mib']:.0f} MiB; simulators' CPU meanwhile "
                    f"{sims_cpu:.2f} s), {calls} list calls, {report['sql_statements']} SQL "
                    f"statements, {report['rows_written']:,} rows written; verified "
                    f"{counts['verified']:,}, moved {counts['moved']:,}, unreachable "
                    f"{counts['unreachable']:,}, unknown {counts['unknown']:,}; unreachable "
                    f"instances {len(report['unreachable_instances'])}"
                )
                if report.get("timings"):
                    # The pass's parts (the lists and their COPY run at once).
                    self.note(
                        "  parts: "
                        + ", ".join(f"{k} {v:.2f} s" for k, v in report["timings"].items())
                        + f"; JSON report {result['bytes'] / 1e6:.2f} MB"
                    )
                if report["unreachable_instances"]:
                    first = sorted(report["unreachable_instances"].items())[:3]
                    self.note(f"  unreachable instances (first 3): {first}")
                self.figure(
                    f"reconcile of {len(rows):,} sessions over {len(insts)} instances, {label}",
                    f"{report['seconds']:.2f} s, {per_instance:g} list call per instance, "
                    f"{report['sql_statements']} SQL statements",
                    "within 5 s, O(instances) calls",
                    report["seconds"] <= 5.0
                    and per_instance <= 1.0
                    and report["sql_statements"] <= 8
                    and not report["unreachable_instances"],
                )
            if not a.no_leader:
                await self.leader_passes(db, insts, len(rows))
        finally:
            fleet.stop()

    async def leader_passes(self, db: Database, insts: Sequence[SimInstance], total: int) -> None:
        """The same passes led by a serving replica (what its memory limit and probes must
        allow): one after a tenth of the rows are made wrong again, one with nothing to fix.
        Its peak RSS (VmHWM) and its /healthz answers meanwhile, asked every 0.1 s."""
        import asyncpg

        progress("starting one serving replica to lead passes")
        leader = (await start_replicas(self.work, 1, self.base_env(insts), "leader", db.url))[0]
        self.replicas.append(leader)
        pid = leader.proc.pid
        try:
            before = rss_mib(pid)
            waits: list[float] = []
            sampling = True

            async def sample() -> None:
                conn = RawConn(leader.port)
                try:
                    while sampling:
                        asked = time.perf_counter()
                        await asyncio.wait_for(conn.request("GET", "/healthz"), 60)
                        waits.append(time.perf_counter() - asked)
                        await asyncio.sleep(0.1)
                finally:
                    await conn.close()

            sampler = asyncio.ensure_future(sample())
            for label in ("rows wrong again", "nothing to fix"):
                if label == "rows wrong again":
                    conn = await asyncpg.connect(db.url)
                    try:
                        # As after a fleet restart; the trigger off, as for the fill.
                        await conn.execute(
                            f"ALTER TABLE {TABLE} DISABLE TRIGGER session_proxy_notify"
                        )
                        changed = await conn.execute(
                            f"UPDATE {TABLE} SET assigned_instance_url = $1 "
                            "WHERE abs(hashtext(session_id)) % 10 = 0",
                            insts[0].stored_form,
                        )
                        await conn.execute(
                            f"ALTER TABLE {TABLE} ENABLE TRIGGER session_proxy_notify"
                        )
                    finally:
                        await conn.close()
                    progress(f"{changed.split()[-1]} rows pointed at {insts[0].stored_form}")
                first = len(waits)
                status, report = await self.admin(leader, "POST", "/_proxy/reconcile")
                during = waits[first:]
                if status != 200 or report is None or report.get("skipped"):
                    self.note(f"leader, {label}: POST /_proxy/reconcile answered {status}")
                    continue
                self.note(
                    f"leader, {label}: pass {report['seconds']:.2f} s, "
                    f"{report['rows_written']:,} rows written; parts: "
                    + ", ".join(f"{k} {v:.2f} s" for k, v in report["timings"].items())
                    + f"; /healthz meanwhile: {len(during)} answers, worst "
                    + (f"{max(during) * 1000:.0f} ms" if during else "-")
                )
            sampling = False
            await sampler
            peak, after = hwm_mib(pid), rss_mib(pid)
            self.figure(
                f"a serving replica leading passes over {total:,} sessions: memory",
                f"RSS {before:.0f} MiB before, peak {peak:.0f} MiB (VmHWM), {after:.0f} MiB "
                f"after; /healthz worst {max(waits) * 1000:.0f} ms of {len(waits)}",
                "inside the Deployment's 1Gi limit; /healthz within the probes' 3 s timeout",
                peak < 1024 and max(waits) < 3.0,
            )
        finally:
            stop_replicas([leader])

    async def fetch_lists(self, insts: Sequence[SimInstance]) -> dict[str, float]:
        pids = _launcher_pids(self.work, "recon")
        cpu0 = sum(cpu_seconds(p) for p in pids)
        started = time.perf_counter()
        sizes: list[int] = []

        async def one(inst: SimInstance) -> None:
            c = RawConn(inst.port)
            try:
                status, _, data = await asyncio.wait_for(
                    c.request("GET", f"/api/sessions?api_key={API_KEY}"), 120
                )
            finally:
                await c.close()
            if status == 200:
                sizes.append(len(data))

        await asyncio.gather(*(one(i) for i in insts))
        return {
            "seconds": time.perf_counter() - started,
            "bytes": float(sum(sizes)),
            "sim_cpu": sum(cpu_seconds(p) for p in pids) - cpu0,
        }

    # --- summary ---

    def summary(self, load_start: tuple[float, float, float], started: float) -> str:
        a = self.args
        lines = [
            "",
            "== summary",
            f"machine: {os.cpu_count()} CPUs, {mem_total_gib():.1f} GiB RAM, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"free page reporting {free_page_reporting()}; "
            f"load average at start {load_start[0]:.2f} {load_start[1]:.2f} "
            f"{load_start[2]:.2f}, at end " + " ".join(f"{x:.2f}" for x in os.getloadavg()),
            f"sizes: {a.replicas} replicas, {a.instances} instances, {a.sessions:,} sessions; "
            f"reconcile {a.reconcile_sessions:,} over {a.reconcile_instances}; "
            f"{time.monotonic() - started:.0f} s in all",
            "",
            f"{'figure':<72} {'verdict':<8}",
        ]
        for f in self.figures:
            verdict = "-" if f.ok is None else ("met" if f.ok else "NOT MET")
            lines.append(f"{f.name:<72} {verdict:<8}")
            lines.append(f"    {f.value}")
            lines.append(f"    goal: {f.goal}")
        return "\n".join(lines)

    async def cleanup(self) -> None:
        stop_replicas([r for r in self.replicas if r.alive])
        if self.redis is not None:
            self.redis.kill()
        if self.fleet is not None:
            self.fleet.stop()
        for db in [self.db, *self.extra_dbs]:
            if db is not None:
                with contextlib.suppress(Exception):
                    await db.drop()


def _launcher_pids(work: Path, tag: str) -> list[int]:
    pids = []
    for ready in work.glob(f"{tag}-launcher-*.ready"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            pids.append(int(json.loads(ready.read_text())["pid"]))
    return pids


def free_page_reporting() -> str:
    """Whether a virtio balloon returns the guest's freed pages to the host (feature bit 5):
    then a first touch of memory costs a host page fault."""
    for features in Path("/sys/bus/virtio/drivers/virtio_balloon").glob("virtio*/features"):
        with contextlib.suppress(OSError):
            bits = features.read_text().strip()
            return "on" if len(bits) > 5 and bits[5] == "1" else "off"
    return "off (no virtio balloon)"


def warm_memory(mib: int) -> None:
    """Write ``mib`` MiB (a memset, every page touched) and free it: the next process gets
    pages the host backs already, until the balloon reports them again (~2 s)."""
    block = b"\x01" * (mib << 20)
    del block


# Runs the command and reports its peak RSS and CPU from a parent of its own. Linux gives a
# child the high-water mark of the process it was forked from, so the bench's own peak (142 MB
# of lists fetched directly, say) would otherwise read as the command's.
_MEASURED = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:])\n"
    "used = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "sys.stderr.write(f'\\nmeasured {used.ru_maxrss} {used.ru_utime + used.ru_stime}\\n')\n"
    "sys.exit(done.returncode)\n"
)


def run_reconcile(env: dict[str, str], timeout: float) -> dict[str, Any]:
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-c", _MEASURED, sys.executable, "-m", "proxy", "reconcile", "--json"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"report": None, "error": f"timed out after {timeout:g} s"}
    wall = time.monotonic() - started
    measured = done.stderr.rstrip().rpartition("\n")[2].split()
    if len(measured) != 3 or measured[0] != "measured":
        return {"report": None, "error": f"exit {done.returncode}: {done.stderr[-500:]}"}
    peak_mib, cpu = int(measured[1]) / 1024, float(measured[2])
    try:
        report = json.loads(done.stdout)
    except ValueError:
        return {"report": None, "error": f"exit {done.returncode}: {done.stderr[-500:]}"}
    return {
        "report": report,
        "wall": wall,
        "cpu": cpu,
        "peak_mib": peak_mib,
        "exit": done.returncode,
        "bytes": len(done.stdout),
    }


def reconcile_lines(replica: Replica) -> list[dict[str, Any]]:
    """The replica's "reconcile finished" and "reconcile skipped" log lines, in order."""
    found = []
    for line in replica.proc.log_text().splitlines():
        if '"reconcile finished"' in line or '"reconcile skipped"' in line:
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
    return found


def finished_passes(replicas: Sequence[Replica]) -> list[tuple[str, float, float]]:
    """(replica, start, end) of every finished reconcile pass, from the "reconcile finished"
    lines (``ts`` is when the line was written; ``seconds`` the pass's own time)."""
    passes = []
    for r in replicas:
        for line in r.proc.log_text().splitlines():
            if '"reconcile finished"' not in line:
                continue
            with contextlib.suppress(ValueError, KeyError):
                entry = json.loads(line)
                end = float(entry["ts"])
                passes.append((r.name, end - float(entry["seconds"]), end))
    return sorted(passes, key=lambda p: p[1])


def overlapping(
    passes: Sequence[tuple[str, float, float]],
    since: float,
    only_after: float | None = None,
    slack: float = 0.02,
) -> list[tuple[tuple[str, float, float], tuple[str, float, float]]]:
    """Pairs of passes by different replicas that ran at the same time (more than ``slack``:
    a pass's time includes giving the lock back, which the next holder may already have).
    Passes ending after ``since`` are left out (``only_after``: only those ending after it)."""
    chosen = [
        p
        for p in passes
        if (only_after is None and p[2] < since) or (only_after is not None and p[2] >= only_after)
    ]
    found = []
    for i, p in enumerate(chosen):
        for q in chosen[i + 1 :]:
            if q[0] != p[0] and q[1] < p[2] - slack and p[1] < q[2] - slack:
                found.append((p, q))
    return found


def mem_total_gib() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    return float("nan")


PHASES = ("invalidation", "kill", "memory", "leadership", "redis", "reconcile")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {PHASES}")
    p.add_argument("--replicas", type=int, default=None, help="proxy replicas (8)")
    p.add_argument("--instances", type=int, default=None, help="simulated instances (50)")
    p.add_argument("--sessions", type=int, default=None, help="sessions in Postgres (100,000)")
    p.add_argument("--sim-procs", type=int, default=None, help="simulator launcher processes")
    p.add_argument("--updates", type=int, default=None, help="owner UPDATEs timed (100)")
    p.add_argument("--update-timeout", type=float, default=5.0)
    p.add_argument("--load-sessions", type=int, default=2000)
    p.add_argument("--clients-per-replica", type=int, default=3)
    p.add_argument("--warmup-seconds", type=float, default=2.0)
    p.add_argument("--load-seconds", type=float, default=None, help="kill phase (10)")
    p.add_argument("--kill-after", type=float, default=None, help="seconds into the load (4)")
    p.add_argument("--memory-sessions", type=int, default=None, help="(100,000)")
    p.add_argument("--fill-seconds", type=float, default=240.0)
    p.add_argument("--fill-connections", type=int, default=16)
    p.add_argument("--leader-kills", type=int, default=None, help="(5)")
    p.add_argument("--reconcile-interval", type=float, default=1.0)
    p.add_argument("--no-lock-loss", dest="lock_loss", action="store_false")
    p.add_argument("--redis-sessions", type=int, default=None, help="(200)")
    p.add_argument("--redis-concurrent", type=int, default=None, help="(50)")
    p.add_argument("--redis-load-seconds", type=float, default=None, help="(8)")
    p.add_argument("--redis-kill-after", type=float, default=None, help="(3)")
    p.add_argument("--reconcile-sessions", type=int, default=None, help="(1,000,000)")
    p.add_argument("--reconcile-instances", type=int, default=None, help="(100)")
    p.add_argument("--reconcile-wrong", type=float, default=0.1)
    p.add_argument("--reconcile-timeout", type=float, default=300.0)
    p.add_argument(
        "--no-leader",
        action="store_true",
        help="reconcile phase: leave out the passes led by a serving replica",
    )
    p.add_argument(
        "--cached-lists",
        action="store_true",
        help="reconcile phase: instances answer GET /api/sessions from their first answer, so "
        "the pass's time is the proxy's and Postgres's, not the co-located instances'",
    )
    p.add_argument(
        "--warm-memory",
        type=int,
        default=0,
        metavar="MIB",
        help="reconcile phase: write and free this much memory before each command (see above)",
    )
    p.add_argument("--database-url", default=DEFAULT_ADMIN_URL)
    p.add_argument("--keep", default=None, help="a directory for the logs, kept after the run")
    p.add_argument("--time-limit", type=float, default=1500.0, help="seconds for the whole run")
    p.add_argument("--serve-sims", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ready", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    full = {
        "replicas": 8,
        "instances": 50,
        "sessions": 100_000,
        "sim_procs": max(2, os.cpu_count() or 2),
        "updates": 100,
        "load_seconds": 10.0,
        "kill_after": 4.0,
        "memory_sessions": 100_000,
        "leader_kills": 5,
        "redis_sessions": 200,
        "redis_concurrent": 50,
        "redis_load_seconds": 8.0,
        "redis_kill_after": 3.0,
        "reconcile_sessions": 1_000_000,
        "reconcile_instances": 100,
    }
    quick = {
        **full,
        "replicas": 4,
        "instances": 6,
        "sessions": 3000,
        "sim_procs": 1,
        "updates": 20,
        "load_seconds": 5.0,
        "kill_after": 2.0,
        "memory_sessions": 3000,
        "leader_kills": 2,
        "redis_sessions": 30,
        "redis_concurrent": 10,
        "redis_load_seconds": 5.0,
        "redis_kill_after": 2.0,
        "reconcile_sessions": 20_000,
        "reconcile_instances": 10,
    }
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        p.error(f"unknown phases {sorted(unknown)}")
    return args


async def phases(bench: Bench) -> None:
    args = bench.args
    needs_fleet = {"invalidation", "kill", "memory", "leadership", "redis"} & set(args.phases)
    if needs_fleet:
        await bench.setup_fleet()
    if {"invalidation", "kill", "memory"} & set(args.phases):
        replicas = await bench.db_replicas("db-")
        if "invalidation" in args.phases:
            await bench.invalidation(replicas)
        survivors = replicas
        if "kill" in args.phases:
            victim = await bench.kill_under_load(replicas)
            survivors = [r for r in replicas if r is not victim]
        if "memory" in args.phases:
            await bench.memory(survivors[0], survivors[1:])
        stop_replicas([r for r in replicas if r.alive])
    if "leadership" in args.phases:
        await bench.leadership()
    if "redis" in args.phases:
        await bench.redis_phase()
    if "reconcile" in args.phases:
        if bench.fleet is not None:
            bench.fleet.stop()  # its CPU and memory are the reconcile's now
            bench.fleet = None
        await bench.reconcile_phase()


async def run(args: argparse.Namespace, work: Path) -> int:
    bench = Bench(args, work)
    started = time.monotonic()
    load_start = os.getloadavg()
    print(
        f"scaleout bench: {os.cpu_count()} CPUs, {mem_total_gib():.1f} GiB RAM, load "
        + " ".join(f"{x:.2f}" for x in load_start)
        + f"; phases {','.join(args.phases)}",
        flush=True,
    )
    limited = False
    try:
        await asyncio.wait_for(phases(bench), args.time_limit)
    except TimeoutError:
        limited = True
        print(f"\ntime limit of {args.time_limit:g} s reached; figures so far:", flush=True)
    except Exception:
        limited = True
        traceback.print_exc()
        print("\nthe run failed (traceback on stderr); figures so far:", flush=True)
    finally:
        await bench.cleanup()
    print(bench.summary(load_start, started), flush=True)
    if limited:
        return 2
    return 0 if all(f.ok is not False for f in bench.figures) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_sims:
        return serve_sims_main(args.serve_sims, args.ready)
    keep = Path(args.keep) if args.keep else None
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        tmp = str(keep) if keep else stack.enter_context(tempfile.TemporaryDirectory())
        try:
            try:
                import uvloop
            except ImportError:
                return asyncio.run(run(args, Path(tmp)))
            return uvloop.run(run(args, Path(tmp)))
        finally:
            from tests.helpers.processes import kill_all

            kill_all()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    raise SystemExit(main())
