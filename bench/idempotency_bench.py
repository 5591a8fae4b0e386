"""What an ``Idempotency-Key`` costs a send, per store (memory, Redis, Postgres), on this machine.

    .venv/bin/python bench/idempotency_bench.py [--requests N] [--concurrency C] [--rounds R]
                                                [--stores memory,redis,postgres] [--mode-seconds S]
                                                [--env NAME=VALUE]

Everything runs as real processes on 127.0.0.1 and is torn down at exit:

- one simulator instance (``python -m proxy.simulator``) holding ``webjs_1_1732800000_bench001``;
- a redis-server of this run's own on a free port (no ``--save``, no AOF), so nothing of anyone
  else's is touched; the proxy's routing table is on it too (``CACHE_URL``);
- a throwaway Postgres database ``bench_idem_<pid>`` on 127.0.0.1:5432 (trust auth), with the
  proxy's tables installed by ``python -m proxy migrate --create-table``; dropped at exit;
- for each store in turn, a session-proxy (``python -m proxy serve``, one worker) in front of the
  instance: no store settings (memory), ``CACHE_URL=redis://...``, ``DATABASE_URL=postgresql://...``.

Against each proxy, after a warm-up (not counted), ``--rounds`` rounds of three phases, each
phase ``N / rounds`` sends of ``POST /api/messages/send`` (the same small JSON body) over
``--concurrency`` keep-alive connections (an asyncio client in this process):

1. ``no key``: no ``Idempotency-Key`` header;
2. ``keyed``: a new key each (first attempts: claimed in the store, forwarded, answer stored);
3. ``repeat``: the keys of phase 2 of the same round again, in the same order: answered from the
   store (``X-Proxy-Idempotent-Replay: true``), nothing forwarded.

Interleaving the phases in rounds keeps drift in the machine's load out of the differences. Per
phase: latency (client side, request written to answer read), requests/s, and CPU per request
(utime+stime from ``/proc/<pid>/stat``, before and after) of the proxy, of the store where it
is a process of its own (redis-server; for Postgres the backends serving the proxy's pool, from
``pg_stat_activity``: not the WAL writer or checkpointer) and of the instance. The messages the
instance sent are counted from its ``/_sim/sent`` after every phase. Every answer must be 200,
replayed exactly in the repeat phase; anything else is counted as an error. A phase also stops
at its share of ``--mode-seconds`` and says how many it got through. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
API_KEY = "demo-key"
SESSION = "webjs_1_1732800000_bench001"
SEND_PATH = "/api/messages/send"
STORES = ("memory", "redis", "postgres")
MODES = ("no key", "keyed", "repeat")
PG_ADMIN = ("-h", HOST, "-p", "5432", "-U", "postgres")
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 20.0
PROXY_ENV: dict[str, str] = {}  # extra SESSION_PROXY_* settings for every proxy (--env)
WARMUP = 200
BODY = json.dumps(
    {
        "session_id": SESSION,
        "workspace_id": 1,
        "recipient_phone": "628120001111",
        "message": "m",
        "api_key": API_KEY,
    }
).encode()


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- processes -----------------------------------------------------------------------------------

_STARTED: list[subprocess.Popen[bytes]] = []


def spawn(cmd: Sequence[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start a process in its own group, remembered for teardown; output to ``log``."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
    _STARTED.append(proc)
    return proc


def stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process group we started, SIGKILL it if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    if proc in _STARTED:
        _STARTED.remove(proc)


def stop_all() -> None:
    for proc in reversed(list(_STARTED)):
        stop(proc)


def free_ports(count: int) -> list[int]:
    """Ports the kernel hands out as free, all held at once so that none repeats."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSION_PROXY_")}
    env["PYTHONPATH"] = str(ROOT)
    return env | (extra or {})


def http_get(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_ready(port: int, path: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last = "no answer"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited: {log.read_text()[-2000:]}")
        try:
            status = http_get(port, path, timeout=1.0)[0]
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if status == 200:
                return
            last = f"HTTP {status}"
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} on {port} not ready ({last}): {log.read_text()[-2000:]}")
        time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """utime+stime of one process (fields 14 and 15 of /proc/<pid>/stat); 0 once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()  # comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# --- the stores ----------------------------------------------------------------------------------


class Redis:
    """A redis-server of this run's own, so that stopping or filling it harms nobody."""

    def __init__(self, work: Path) -> None:
        self.port = free_ports(1)[0]
        self.url = f"redis://{HOST}:{self.port}/0"
        log = work / "redis.log"
        cmd = [
            shutil.which("redis-server") or "redis-server",
            *("--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no"),
            *("--dir", str(work)),
        ]
        self.proc = spawn(cmd, log, child_env())
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.5):
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.05)

    def pids(self) -> list[int]:
        return [self.proc.pid]


def psql(sql: str, database: str = "postgres") -> str:
    done = subprocess.run(
        [shutil.which("psql") or "psql", *PG_ADMIN, "-d", database, "-Atqc", sql],
        env=os.environ | {"PGCONNECT_TIMEOUT": "5"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode != 0:
        raise RuntimeError(f"psql {sql!r}: {done.stderr.strip()}")
    return done.stdout


class Postgres:
    """A throwaway database on the local server, with the proxy's tables; dropped by ``drop``."""

    def __init__(self) -> None:
        self.name = f"bench_idem_{os.getpid()}"
        self.url = f"postgresql://postgres@{HOST}:5432/{self.name}"
        psql(f"CREATE DATABASE {self.name}")
        self.created = True
        done = subprocess.run(
            [sys.executable, "-m", "proxy", "migrate", "--create-table"],
            env=child_env({"SESSION_PROXY_DATABASE_URL": self.url}),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"migrate failed: {done.stderr.strip() or done.stdout.strip()}")

    def pids(self) -> list[int]:
        """The backends serving the proxy (this query's own excluded)."""
        rows = psql(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()",
            self.name,
        )
        return [int(line) for line in rows.split()]

    def drop(self) -> None:
        if self.created:
            with contextlib.suppress(RuntimeError, OSError, subprocess.TimeoutExpired):
                psql(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
                self.created = False


# --- the load ------------------------------------------------------------------------------------


def request_bytes(port: int, key: str | None) -> bytes:
    head = (
        f"POST {SEND_PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n"
    )
    if key is not None:
        head += f"Idempotency-Key: {key}\r\n"
    return (head + "\r\n").encode() + BODY


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


@dataclass
class Phase:
    latencies: list[float] = field(default_factory=list)  # seconds
    elapsed: float = 0.0
    proxy_cpu: float = 0.0
    store_cpu: float | None = None
    instance_cpu: float = 0.0
    sent: int = 0  # messages the instance sent
    errors: dict[str, int] = field(default_factory=dict)
    cut_short: int = 0  # sends not made: the phase ran out of time

    def add(self, other: Phase) -> None:
        self.latencies += other.latencies
        self.elapsed += other.elapsed
        self.proxy_cpu += other.proxy_cpu
        if other.store_cpu is not None:
            self.store_cpu = (self.store_cpu or 0.0) + other.store_cpu
        self.instance_cpu += other.instance_cpu
        self.sent += other.sent
        for name, count in other.errors.items():
            self.errors[name] = self.errors.get(name, 0) + count
        self.cut_short += other.cut_short


async def drive(
    port: int,
    keys: Sequence[str | None],
    replay: bool,
    concurrency: int,
    seconds: float,
    watch: Any,
) -> Phase:
    """Send one request per entry of ``keys`` over ``concurrency`` connections, timed."""
    phase = Phase()
    streams = [await asyncio.open_connection(HOST, port) for _ in range(concurrency)]
    payloads = [request_bytes(port, key) for key in keys]
    cursor = 0
    deadline = 0.0

    def error(name: str) -> None:
        phase.errors[name] = phase.errors.get(name, 0) + 1

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal cursor
        while cursor < len(payloads) and time.perf_counter() < deadline:
            payload = payloads[cursor]
            cursor += 1
            started = time.perf_counter()
            writer.write(payload)
            try:
                status, headers, _ = await read_answer(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                error(type(exc).__name__)
                return
            phase.latencies.append(time.perf_counter() - started)
            if status != 200:
                error(f"HTTP {status} {headers.get('x-proxy-error', '')}".strip())
            elif (headers.get("x-proxy-idempotent-replay") == "true") != replay:
                error("replayed" if not replay else "not replayed")
            if headers.get("connection", "").lower() == "close":
                error("connection closed")
                return

    before = watch()
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(worker(r, w) for r, w in streams))
    phase.elapsed = time.perf_counter() - started
    after = watch()
    phase.proxy_cpu = after["proxy"] - before["proxy"]
    phase.instance_cpu = after["instance"] - before["instance"]
    if "store" in after:
        # A store process that appeared during the phase counts whole (a new pool connection).
        phase.store_cpu = sum(
            t - before["store"].get(pid, 0.0) for pid, t in after["store"].items()
        )
    phase.cut_short = len(payloads) - cursor
    for _, writer in streams:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return phase


# --- one store -----------------------------------------------------------------------------------


def sent_at_instance(port: int) -> int:
    status, body = http_get(port, "/_sim/sent")
    if status != 200:
        raise RuntimeError(f"/_sim/sent answered {status}")
    return len(json.loads(body)["messages"])


def start_proxy(
    work: Path, instance_port: int, store: str, redis: Redis | None, pg: Postgres | None
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_ports(1)[0]
    env = {
        "SESSION_PROXY_INSTANCES": f"http://{HOST}:{instance_port}",
        "SESSION_PROXY_API_KEY": API_KEY,
        "SESSION_PROXY_LOG_LEVEL": "warning",
        "SESSION_PROXY_SHUTDOWN_DRAIN": "0",
        "SESSION_PROXY_HEALTH_INTERVAL": "60",
        "SESSION_PROXY_HOST": HOST,
        "SESSION_PROXY_PORT": str(port),
    }
    if store == "redis":
        assert redis is not None
        env["SESSION_PROXY_CACHE_URL"] = redis.url
    elif store == "postgres":
        assert pg is not None
        env["SESSION_PROXY_DATABASE_URL"] = pg.url
    env |= PROXY_ENV
    log = work / f"proxy-{store}.log"
    proc = spawn([sys.executable, "-m", "proxy", "serve"], log, child_env(env))
    wait_ready(port, "/readyz", proc, log)
    return proc, port


def idempotency_counts(port: int) -> dict[str, float]:
    """The proxy's own ``session_proxy_idempotency_total`` by result."""
    found: dict[str, float] = {}
    with contextlib.suppress(OSError):
        status, body = http_get(port, "/metrics")
        if status == 200:
            for line in body.decode("utf-8", "replace").splitlines():
                if line.startswith("session_proxy_idempotency_total{"):
                    label = line.split('result="', 1)[1].split('"', 1)[0]
                    found[label] = float(line.rsplit(" ", 1)[1])
    return found


def measure_store(
    store: str,
    work: Path,
    instance: subprocess.Popen[bytes],
    instance_port: int,
    args: argparse.Namespace,
    redis: Redis | None,
    pg: Postgres | None,
) -> tuple[dict[str, Phase], dict[str, float]]:
    proxy, port = start_proxy(work, instance_port, store, redis, pg)
    backend = redis if store == "redis" else pg if store == "postgres" else None
    tag = uuid.uuid4().hex[:8]

    def watch() -> dict[str, Any]:
        seen: dict[str, Any] = {
            "proxy": cpu_seconds(proxy.pid),
            "instance": cpu_seconds(instance.pid),
        }
        if backend is not None:
            seen["store"] = {pid: cpu_seconds(pid) for pid in backend.pids()}
        return seen

    def run(keys: Sequence[str | None], replay: bool, seconds: float) -> Phase:
        sent = sent_at_instance(instance_port)
        phase = asyncio.run(drive(port, keys, replay, args.concurrency, seconds, watch))
        phase.sent = sent_at_instance(instance_port) - sent
        return phase

    try:
        # Warm-up: the route learned, connections open, statements prepared.
        warm = [f"warm-{tag}-{i}" for i in range(WARMUP)]
        run([None] * WARMUP, False, 30.0)
        run(warm, False, 30.0)
        run(warm, True, 30.0)
        totals = {mode: Phase() for mode in MODES}
        per_round = max(1, args.requests // args.rounds)
        seconds = args.mode_seconds / args.rounds
        for r in range(args.rounds):
            keys: list[str | None] = [f"bench-{tag}-{r}-{i}" for i in range(per_round)]
            for mode, batch, replay in (
                ("no key", [None] * per_round, False),
                ("keyed", keys, False),
                ("repeat", keys, True),
            ):
                phase = run(batch, replay, seconds)
                totals[mode].add(phase)
                progress(
                    f"{store} round {r + 1}/{args.rounds} {mode}: {len(phase.latencies)} in "
                    f"{phase.elapsed:.2f} s, {sum(phase.errors.values())} errors"
                )
        return totals, idempotency_counts(port)
    finally:
        stop(proxy)


# --- the report ----------------------------------------------------------------------------------


def pct(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def us_per(cpu: float | None, count: int) -> str:
    return f"{cpu / count * 1e6:,.0f}" if cpu is not None and count else "-"


def report(
    results: dict[str, tuple[dict[str, Phase], dict[str, float]]], args: argparse.Namespace
) -> None:
    print(
        f"{'store':9}{'mode':8}{'n':>7}{'p50 ms':>8}{'p99 ms':>8}{'req/s':>8}"
        f"{'proxy CPU us/req':>18}{'store us/req':>14}{'instance us/req':>17}"
        f"{'sent':>7}  errors"
    )
    print("-" * 112)
    for store, (phases, _) in results.items():
        for mode in MODES:
            ph = phases[mode]
            n = len(ph.latencies)
            errors = ", ".join(f"{k}: {v}" for k, v in sorted(ph.errors.items())) or "0"
            if ph.cut_short:
                errors += f" (time bound: {ph.cut_short} not sent)"
            print(
                f"{store:9}{mode:8}{n:>7,}{pct(ph.latencies, 50) * 1e3:>8.2f}"
                f"{pct(ph.latencies, 99) * 1e3:>8.2f}{n / ph.elapsed if ph.elapsed else 0:>8,.0f}"
                f"{us_per(ph.proxy_cpu, n):>18}{us_per(ph.store_cpu, n):>14}"
                f"{us_per(ph.instance_cpu, n):>17}{ph.sent:>7,}  {errors}"
            )
    print()
    print("added cost against a send without a key (same proxy, same run)")
    print(
        f"{'store':9}{'case':8}{'+p50 ms':>9}{'+p99 ms':>9}{'+proxy CPU us':>15}"
        f"{'+store us':>11}{'+proxy+store us':>17}{'req/s ratio':>13}"
    )
    for store, (phases, _) in results.items():
        base = phases["no key"]
        nb = len(base.latencies)
        for mode in ("keyed", "repeat"):
            ph = phases[mode]
            n = len(ph.latencies)
            if not n or not nb:
                continue
            d50 = (pct(ph.latencies, 50) - pct(base.latencies, 50)) * 1e3
            d99 = (pct(ph.latencies, 99) - pct(base.latencies, 99)) * 1e3
            dcpu = (ph.proxy_cpu / n - base.proxy_cpu / nb) * 1e6
            own = (ph.store_cpu or 0.0) / n - (base.store_cpu or 0.0) / nb
            dstore = f"{own * 1e6:+,.0f}" if ph.store_cpu is not None else "-"
            both = f"{dcpu + own * 1e6:+,.0f}"
            ratio = (n / ph.elapsed) / (nb / base.elapsed)
            print(
                f"{store:9}{mode:8}{d50:>+9.2f}{d99:>+9.2f}{dcpu:>+15,.0f}{dstore:>11}"
                f"{both:>17}{ratio:>13.2f}"
            )
    print()
    for store, (_, counts) in results.items():
        shown = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(counts.items()))
        print(f"{store}: proxy's idempotency counter (warm-up included): {shown}")


def run(args: argparse.Namespace) -> dict[str, tuple[dict[str, Phase], dict[str, float]]]:
    work = Path(tempfile.mkdtemp(prefix="idem-bench-"))
    atexit.register(shutil.rmtree, work, True)
    instance_port = free_ports(1)[0]
    log = work / "instance.out"
    cmd = [
        sys.executable,
        *("-m", "proxy.simulator", "--host", HOST, "--port", str(instance_port)),
        *("--name", "inst0", "--api-key", API_KEY, "--sessions", SESSION),
    ]
    instance = spawn(cmd, log, child_env())
    wait_ready(instance_port, "/health", instance, log)
    redis = Redis(work) if "redis" in args.stores else None
    pg: Postgres | None = None
    if "postgres" in args.stores:
        pg = Postgres()
        atexit.register(pg.drop)  # registered after stop_all: runs before it, FORCE ends the pool
    results = {}
    for store in args.stores:
        progress(f"{store}: load average {load()}")
        results[store] = measure_store(store, work, instance, instance_port, args, redis, pg)
    stop_all()
    if pg is not None:
        pg.drop()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="sends per mode and store")
    parser.add_argument("--concurrency", type=int, default=8, help="connections")
    parser.add_argument("--rounds", type=int, default=4, help="the three modes, interleaved")
    parser.add_argument(
        "--mode-seconds", type=float, default=15.0, help="time bound of each mode per store"
    )
    parser.add_argument(
        "--stores", default=",".join(STORES), help="comma list of " + "/".join(STORES)
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra proxy setting, SESSION_PROXY_ prefix optional (repeatable)",
    )
    args = parser.parse_args(argv)
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--env {item!r}: expected NAME=VALUE")
        PROXY_ENV["SESSION_PROXY_" + name.removeprefix("SESSION_PROXY_")] = value
    args.stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if unknown := set(args.stores) - set(STORES):
        parser.error(f"unknown stores: {', '.join(sorted(unknown))}")
    if args.requests < 1 or args.concurrency < 1 or args.rounds < 1:
        parser.error("--requests, --concurrency and --rounds must be at least 1")
    if "redis" in args.stores and not shutil.which("redis-server"):
        parser.error("redis-server is not on PATH (apt-get install redis-server), or drop redis")
    if "postgres" in args.stores and not shutil.which("psql"):
        parser.error("psql is not on PATH (a Postgres on 127.0.0.1:5432), or drop postgres")
    signal.signal(signal.SIGTERM, _on_signal)
    atexit.register(stop_all)
    started = time.monotonic()
    start_load = load()
    print(
        f"idempotency_bench {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {args.requests:,} sends per "
        f"mode in {args.rounds} rounds, concurrency {args.concurrency}, {os.cpu_count()} cores, "
        f"Python {sys.version.split()[0]}"
    )
    if PROXY_ENV:
        print("proxy settings added: " + " ".join(f"{k}={v}" for k, v in PROXY_ENV.items()))
    print(f"load average at start: {start_load}")
    results = run(args)
    print()
    report(results, args)
    print()
    print(f"load average at end: {load()}; {time.monotonic() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
