"""What session-proxy costs per request, next to nginx doing the same job, on this machine.

    .venv/bin/python bench/proxy_bench.py [--duration S] [--rounds N] [--quick] [--workers N]
                                          [--json PATH] [--with-reconcile] [--source DIR]
                                          [--aiohttp] [--tracing] [--skip-memory] [--repeat N]
                                          [--paced-rate R] [--paced-seconds S] [--paced-rounds N]
                                          [--no-paced] [--no-floors] [--no-layers]
                                          [--no-snapshot]

One run starts, all on 127.0.0.1 and all torn down at exit:

- the upstream: one nginx process (1 worker) answering like instances with fixed JSON on 22 ports:
  ports A and B hold the 100 load sessions by id parity (the other port answers the instances'
  own 404 "Session not found"), ports R0..R19 serve the memory fill and the rediscovery timing;
- the bar: nginx as a reverse proxy (1 worker, upstream keepalive 64), routing path-addressed
  requests by session parity with a ``map`` and body-addressed ones round robin;
- session-proxy (``python -m proxy serve``), its routing table warmed for every load session;
- the floors (``bench/floors.py``): uvicorn alone answering a fixed 200 JSON, and uvicorn plus
  the proxy's own upstream client forwarding to port A, both with the proxy's uvicorn settings;
- the optional layers, each a session-proxy of its own: metrics off (a setting if the proxy has
  one, else its prometheus_client calls stubbed), the access log on (``LOG_LEVEL=info``), and
  tracing off / 1% / 100% (OpenTelemetry, exporting to a sink the bench runs).

wrk (``-t 2``, ``-c 8`` and ``-c 64``; the layers at ``-c 8``) then drives every target in
rounds, the targets in reverse order every other round, with GETs
(``/api/sessions/<id>/status``) and ~1 KB POSTs (``/api/messages/send``), and the CPU each
target spent (utime+stime of its whole process tree, from /proc) is divided by the requests
wrk counted; medians of the rounds. Then an open-loop pacer (``bench/pacer.py``) sends 1,000
requests a second over 8 connections to direct, nginx and the proxy, in short alternating
rounds, for p50/p99 from each request's scheduled time and the p99 each adds over direct.
Everything the issue asks for is printed again as one table at the end (ratio against 5x,
added p99 against 1 ms: PASS/FAIL, or NOISY when the pacer's own lateness is over 1 ms);
``--repeat 2`` runs it all twice, with fresh processes, and sets each figure of the second run
against the first's (flagged beyond 15%). Every proxy runs from a copy of proxy/ taken at start
(``--no-snapshot``: from the tree), so that edits made meanwhile cannot split the runs. Then, unless
``--skip-memory``, the routing table's memory for 100,000 sessions and the time of one
rediscovery across 20 instances.

``--tracing`` also runs the three tracing proxies at c64, counts what they export against what
was sent, and profiles one more off, 1% and 100% proxy each with a sampling profiler of its own
(SIGPROF). Where a plain proxy's CPU goes: ``bench/profile.py`` (py-spy).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import http.client
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT  # where ``python -m proxy`` runs from (--source): compare a copy with the tree
SOURCE_NOTE = ""  # where SOURCE came from, when it is a snapshot
HOST = "127.0.0.1"
LOAD_SESSIONS = [f"s-{k:04d}" for k in range(100)]  # even last digit on port A, odd on port B
REDISCOVERY_INSTANCES = 20
REDISCOVERY_IDS = 20
FILL_SESSIONS = 100_000
FILL_CONNECTIONS = 8
SPARE_PORTS = 8
# 967 characters: with the field names the real instance reads, the body stays 1,057 bytes.
MESSAGE = ("Hello from the benchmark, this is a message of about one kilobyte. " * 15)[:967]
CLK_TCK = os.sysconf("SC_CLK_TCK")
TARGETS = ("direct", "nginx", "proxy")
SHAPES = ("GET", "POST")

HEALTH_BODY = '{"status":"healthy","sessions":{"total":0}}'
STATUS_BODY = '{"success":true,"status":"connected","info":{"pushname":"bench"}}'
NOT_FOUND_BODY = '{"success":false,"error":"Session not found"}'
SENT_BODY = '{"success":true,"message_id":"bench-1","status":"sent"}'


# --- processes -----------------------------------------------------------------------------------

_STARTED: list[subprocess.Popen[bytes]] = []


def spawn(
    cmd: Sequence[str], log: Path, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    """Start a process in its own group (so its workers go with it), remembered for teardown."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    _STARTED.append(proc)
    return proc


def stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process group we started, SIGKILL it if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(grace)
    # Workers may outlive a master that was killed: take the rest of the group too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc in _STARTED:
        _STARTED.remove(proc)


def stop_all() -> None:
    for proc in reversed(list(_STARTED)):
        stop(proc)


def _on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


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


def wait_listening(ports: Sequence[int], proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    for port in ports:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited: {log.read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.5):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {port}: {log.read_text()[-2000:]}")
            time.sleep(0.05)


# --- /proc accounting ----------------------------------------------------------------------------


def _stat_fields(pid: int, task: int | None = None) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (or of its thread ``task``), None once it is gone."""
    try:
        path = f"/proc/{pid}/stat" if task is None else f"/proc/{pid}/task/{task}/stat"
        text = Path(path).read_text()
    except OSError:
        return None
    # Field 2 (comm) may hold spaces; everything after its closing parenthesis splits cleanly.
    return text[text.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_seconds(root: int) -> float:
    """utime+stime of a process and every live descendant (uvicorn workers, nginx workers)."""
    ticks = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / CLK_TCK


def other_threads_seconds(pid: int) -> float:
    """CPU of one process's threads other than its main one, live or ended (the process's own
    stat counts every thread): in a traced proxy, the span exporter's thread."""
    whole, main = _stat_fields(pid), _stat_fields(pid, pid)
    if whole is None or main is None:
        return 0.0
    ticks = int(whole[11]) + int(whole[12]) - int(main[11]) - int(main[12])
    return max(0, ticks) / CLK_TCK


def rss_mib(root: int) -> float:
    total = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


# --- tools ---------------------------------------------------------------------------------------


def ensure_tools() -> None:
    """nginx and wrk from Debian, installed when missing."""
    missing = [pkg for tool, pkg in (("nginx", "nginx-light"), ("wrk", "wrk")) if not find(tool)]
    if not missing:
        return
    print(f"installing {' '.join(missing)} with apt-get ...", file=sys.stderr, flush=True)
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", *lock, "install", "-y", "-q", *missing]
    if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode != 0:
        subprocess.run(
            ["apt-get", *lock, "update", "-q"], env=env, capture_output=True, timeout=600
        )
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise SystemExit(
                f"could not install {' '.join(missing)} (apt-get exit {done.returncode}):\n"
                f"{done.stderr[-2000:]}\nInstall them by hand: apt-get install -y nginx-light wrk"
            )
    for tool in ("nginx", "wrk"):
        if not find(tool):
            raise SystemExit(f"{tool} is still not on PATH after apt-get install")


def find(tool: str) -> str | None:
    return shutil.which(tool) or next(
        (p for d in ("/usr/sbin", "/usr/bin") if os.access(p := f"{d}/{tool}", os.X_OK)), None
    )


def versions() -> dict[str, str]:
    nginx = subprocess.run([find("nginx") or "nginx", "-v"], capture_output=True, text=True)
    wrk = subprocess.run([find("wrk") or "wrk", "-v"], capture_output=True, text=True)
    found: dict[str, str] = {
        "nginx": (nginx.stderr or nginx.stdout).strip().removeprefix("nginx version: "),
        "wrk": (wrk.stdout + wrk.stderr).splitlines()[0].split(" Copyright")[0],
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }
    dists = ("uvicorn", "starlette", "httpx", "httpcore", "uvloop", "httptools", "aiocache")
    for dist in (*dists, "aiohttp"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[dist] = metadata.version(dist)
    return found


# --- configuration files -------------------------------------------------------------------------


@dataclass
class Ports:
    a: int
    b: int
    fleet: list[int]  # R0..R19
    nginx: int
    proxy: int
    fill_proxy: int
    rediscovery_proxy: int
    upstream_status: int  # the upstream nginx's stub_status: connections it accepted
    aiohttp_proxy: int = 0  # session-proxy with aiohttp as its upstream client (--aiohttp)
    tracing: list[int] = field(default_factory=list)  # the --tracing proxies, then the profiled
    otlp_sink: int = 0  # the OTLP/HTTP sink the --tracing proxies export to
    spare: list[int] = field(default_factory=list)  # floors, layers: taken with ``take``

    @classmethod
    def pick(cls) -> Ports:
        extra = 2 * len(TRACING_VARIANTS) + 1
        p = free_ports(8 + extra + REDISCOVERY_INSTANCES + SPARE_PORTS)
        fleet_end = 8 + extra + REDISCOVERY_INSTANCES
        ports = cls(p[0], p[1], p[8 + extra : fleet_end], p[2], p[3], p[4], p[5], p[6], p[7])
        ports.tracing, ports.otlp_sink = p[8 : 8 + extra - 1], p[8 + extra - 1]
        ports.spare = p[fleet_end:]
        return ports

    def take(self) -> int:
        return self.spare.pop()


def _nginx_main(prefix: Path, http_body: str) -> str:
    temp = "\n".join(
        f"  {kind}_temp_path {prefix}/{kind}_temp;"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  default_type application/json;
  keepalive_requests 1000000;
  keepalive_timeout 65s;
{temp}
{http_body}
}}
"""


def session_list(ids: Sequence[str]) -> str:
    """An instance's ``GET /api/sessions`` answer (what the proxy's fleet snapshots read)."""
    entries = [{"session_id": sid, "status": "connected"} for sid in ids]
    return json.dumps(
        {"success": True, "sessions": entries, "total": len(ids)}, separators=(",", ":")
    )


def write_session_list(path: Path, ids: Sequence[str]) -> None:
    temp = path.with_suffix(".tmp")
    temp.write_text(session_list(ids))
    temp.chmod(0o644)
    temp.replace(path)  # atomic: nginx never serves half a list


def _instance_server(
    port: int, held: str, listed: Sequence[str] = (), list_file: Path | None = None
) -> str:
    """One fake instance: ``held`` is a regex of the session ids it holds; its session list is
    ``listed``, or the file ``list_file`` (rewritten while it runs; each read is logged)."""
    if list_file is None:
        sessions = f"return 200 '{session_list(listed)}';"
    else:
        sessions = f"access_log {list_file}.log; alias {list_file};"
    return f"""
  server {{
    listen {HOST}:{port};
    location = /health {{ return 200 '{HEALTH_BODY}'; }}
    location = /api/sessions {{ {sessions} }}
    location = /api/messages/send {{ return 200 '{SENT_BODY}'; }}
    location ~ ^/api/sessions/[^/]+/status$ {{
      if ($uri !~ "^/api/sessions/({held})/status$") {{ return 404 '{NOT_FOUND_BODY}'; }}
      return 200 '{STATUS_BODY}';
    }}
    location / {{ return 404 '{{"success":false,"error":"Endpoint not found"}}'; }}
  }}"""


def _even(session_id: str) -> bool:
    return int(session_id[-1]) % 2 == 0


def fill_list_file(upstream_prefix: Path) -> Path:
    return upstream_prefix / "r0-sessions.json"


def upstream_conf(prefix: Path, ports: Ports) -> str:
    prefix.mkdir(mode=0o755, exist_ok=True)
    servers = [
        # The load sessions: an even last digit on port A, odd on port B.
        _instance_server(ports.a, r"[^/]*[02468]", [s for s in LOAD_SESSIONS if _even(s)]),
        _instance_server(ports.b, r"[^/]*[13579]", [s for s in LOAD_SESSIONS if not _even(s)]),
    ]
    for n, port in enumerate(ports.fleet):
        # R0 holds every fill session; rediscovery session rd-K-oNN is held by R(NN) only.
        if n == 0:
            write_session_list(fill_list_file(prefix), [])
            held, list_file = "fill-[^/]*|rd-[0-9]+-o00", fill_list_file(prefix)
        else:
            held, list_file = f"rd-[0-9]+-o{n:02d}", None
        servers.append(_instance_server(port, held, list_file=list_file))
    servers.append(f"  server {{ listen {HOST}:{ports.upstream_status}; stub_status; }}")
    return _nginx_main(prefix, "\n".join(servers))


def upstream_accepts(status_port: int) -> int:
    """Connections the upstream has accepted so far (stub_status; each reading counts one)."""
    text = http_get(status_port, "/")[2].decode()
    return int(text.splitlines()[2].split()[0])


def nginx_proxy_conf(prefix: Path, ports: Ports) -> str:
    """The bar: path-addressed requests routed by session (a map), body-addressed ones round
    robin (nginx cannot read a JSON body), keepalive to the instances, the same headers added."""
    body = f"""
  upstream inst_a {{ server {HOST}:{ports.a}; keepalive 64; keepalive_requests 1000000; }}
  upstream inst_b {{ server {HOST}:{ports.b}; keepalive 64; keepalive_requests 1000000; }}
  upstream fleet {{
    server {HOST}:{ports.a}; server {HOST}:{ports.b}; keepalive 64; keepalive_requests 1000000;
  }}
  map $uri $owner {{
    "~^/api/sessions/[^/]*[02468]/" inst_a;
    "~^/api/sessions/[^/]*[13579]/" inst_b;
    default fleet;
  }}
  server {{
    listen {HOST}:{ports.nginx};
    location / {{
      proxy_pass http://$owner;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $host;
      proxy_set_header X-Request-Id $request_id;
      add_header X-Proxy-Instance $upstream_addr always;
      add_header X-Request-Id $request_id always;
    }}
  }}"""
    return _nginx_main(prefix, body)


def start_nginx(name: str, conf: str, work: Path, ports: Sequence[int]) -> subprocess.Popen[bytes]:
    prefix = work / name
    prefix.mkdir(mode=0o755, exist_ok=True)
    (prefix / "nginx.conf").write_text(conf)
    log = prefix / "stdout.log"
    cmd = [find("nginx") or "nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf")]
    check = subprocess.run([*cmd, "-t", "-e", str(prefix / "error.log")], capture_output=True)
    if check.returncode != 0:
        raise RuntimeError(f"nginx -t failed for {name}: {check.stderr.decode()[-2000:]}")
    proc = spawn([*cmd, "-e", str(prefix / "error.log")], log)
    wait_listening(ports, proc, log)
    return proc


# --- session-proxy -------------------------------------------------------------------------------


def start_proxy(
    name: str,
    port: int,
    instances: Sequence[int],
    work: Path,
    workers: int,
    launcher: Sequence[str] = ("-m", "proxy", "serve"),
    otel: dict[str, str] | None = None,
    wrapper: Sequence[str] = (),
    **extra: str,
) -> subprocess.Popen[bytes]:
    """A session-proxy process; ``otel`` are its OTEL_* variables (none are inherited, so that
    a shell's tracing settings cannot turn tracing on in the proxies measured without it);
    ``wrapper`` goes before the interpreter (``py-spy record ... --``); ``extra`` are settings
    (``log_level="info"``: SESSION_PROXY_LOG_LEVEL=info)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SESSION_PROXY_") and not k.startswith("OTEL_")
    }
    env |= otel or {}
    env |= {
        "SESSION_PROXY_INSTANCES": ",".join(f"http://{HOST}:{p}" for p in instances),
        "SESSION_PROXY_HOST": HOST,
        "SESSION_PROXY_PORT": str(port),
        "SESSION_PROXY_WORKERS": str(workers),
        "SESSION_PROXY_LOG_LEVEL": "warning",
        "SESSION_PROXY_API_KEY": "k",
        "SESSION_PROXY_SHUTDOWN_GRACE": "2",
    }
    env |= {f"SESSION_PROXY_{k.upper()}": v for k, v in extra.items()}
    env["PYTHONPATH"] = str(SOURCE)
    log = work / f"{name}.log"
    proc = spawn([*wrapper, sys.executable, *launcher], log, env, cwd=SOURCE)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"session-proxy {name} exited: {log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            if http_get(port, "/readyz")[0] == 200:
                return proc
        if time.monotonic() > deadline:
            raise RuntimeError(f"session-proxy {name} not ready in 30 s: {log.read_text()[-3000:]}")
        time.sleep(0.1)


def http_get(
    port: int, path: str, conn: http.client.HTTPConnection | None = None, body: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request (a POST when ``body`` is given) on ``conn`` or a connection of its own."""
    own = conn is None
    conn = conn or http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        if body is None:
            conn.request("GET", path)
        else:
            headers = {"Content-Type": "application/json"}
            conn.request("POST", path, body.encode(), headers)
        response = conn.getresponse()
        answer = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, answer
    finally:
        if own:
            conn.close()


def warm(port: int, ports: Ports) -> None:
    """Make the proxy learn every load session's owner, and check that both request shapes go
    to the instance that holds the session."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        for sid in LOAD_SESSIONS:
            owner = ports.a if _even(sid) else ports.b
            status_path = f"/api/sessions/{sid}/status?api_key=k"
            for path, body in (
                (status_path, None),  # a miss: learned here
                (status_path, None),  # a table hit
                ("/api/messages/send", post_body(sid)),
            ):
                status, headers, answer = http_get(port, path, conn, body)
                instance = headers.get("x-proxy-instance", "")
                if status != 200 or not instance.endswith(f":{owner}"):
                    raise RuntimeError(
                        f"warm-up {sid}: {status} from {instance!r}: {answer[:200]!r}"
                    )
    finally:
        conn.close()


# --- wrk -----------------------------------------------------------------------------------------

_LUA_DONE = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"non2xx":%d,"connect":%d,"read":%d,'
    .. '"write":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
"""


def _lua_list(items: Sequence[str]) -> str:
    return "{" + ",".join(json.dumps(i) for i in items) + "}"


def lua_get(ids: Sequence[str]) -> str:
    return f"""
local ids = {_lua_list(ids)}
local n = 0
function request()
  n = n + 1
  return wrk.format("GET", "/api/sessions/" .. ids[(n % #ids) + 1] .. "/status?api_key=k")
end
{_LUA_DONE}"""


def post_body(session_id: str) -> str:
    """A send of about 1 KB, addressed by the body's ``session_id``."""
    return json.dumps(
        {
            "session_id": session_id,
            "api_key": "k",
            "recipient_phone": "628123456789",
            "message": MESSAGE,
        }
    )


def lua_post(ids: Sequence[str]) -> str:
    bodies = [post_body(sid) for sid in ids]
    return f"""
local bodies = {_lua_list(bodies)}
local headers = {{["Content-Type"] = "application/json"}}
local n = 0
function request()
  n = n + 1
  return wrk.format("POST", "/api/messages/send", headers, bodies[(n % #bodies) + 1])
end
{_LUA_DONE}"""


def lua_fill(per_thread: int, marker: Path) -> str:
    """Distinct session ids (fill-<thread>-<n>). Every 500 requests a thread writes its ``n`` to
    ``<marker>.progress.<thread>``; after ``per_thread`` answers it stops and leaves
    ``<marker>.<thread>`` (wrk itself would sleep out its whole ``-d`` regardless)."""
    return f"""
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
local n, answered = 0, 0
function request()
  n = n + 1
  if n % 500 == 0 then
    local f = io.open("{marker}.progress." .. tid, "w")
    f:write(n)
    f:close()
  end
  return wrk.format("GET", "/api/sessions/fill-" .. tid .. "-" .. n .. "/status?api_key=k")
end
function response(status, headers, body)
  answered = answered + 1
  if answered == {per_thread} then
    io.open("{marker}." .. tid, "w"):close()
    wrk.thread:stop()
  end
end
{_LUA_DONE}"""


def wrk_command(port: int, script: Path, connections: int, seconds: int) -> list[str]:
    return [
        *(find("wrk") or "wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s"),
        *("--timeout", "5s", "--latency", "-s", str(script), f"http://{HOST}:{port}"),
    ]


def wrk_result(returncode: int, stdout: str, stderr: str) -> dict[str, float]:
    line = next((ln for ln in stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({returncode}): {stdout[-1500:]}{stderr[-1500:]}")
    result: dict[str, float] = json.loads(line.removeprefix("WRKJSON "))
    return result


def run_wrk(port: int, script: Path, connections: int, duration: float) -> dict[str, float]:
    seconds = max(1, round(duration))
    cmd = wrk_command(port, script, connections, seconds)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    return wrk_result(done.returncode, done.stdout, done.stderr)


def run_wrk_until(
    port: int,
    script: Path,
    connections: int,
    limit: float,
    markers: Sequence[Path],
    tick: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """wrk until every marker file exists (then SIGINT: wrk stops and reports) or ``limit`` s;
    ``tick`` is called every 50 ms meanwhile."""
    seconds = max(1, round(limit))
    proc = subprocess.Popen(
        wrk_command(port, script, connections, seconds),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + seconds + 5
        while proc.poll() is None and time.monotonic() < deadline:
            if all(m.exists() for m in markers):
                proc.send_signal(signal.SIGINT)
                break
            tick()
            time.sleep(0.05)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return wrk_result(proc.returncode, stdout, stderr)


# --- the load matrix -----------------------------------------------------------------------------


@dataclass
class Run:
    target: str
    shape: str
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float  # the target's CPU per request
    upstream_cpu_us: float  # the fake instances' CPU per request (same work for every target)
    upstream_conns: int  # connections the upstream accepted during the run
    requests: int
    errors: int
    threads_cpu_us: float = 0.0  # of cpu_us: the root process's threads but its main one


@dataclass
class Cell:
    """Medians over the rounds for one target, shape and concurrency."""

    target: str
    shape: str
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float
    upstream_cpu_us: float
    upstream_conns: float
    errors: int
    threads_cpu_us: float = 0.0
    added_p50_ms: float = 0.0
    added_p99_ms: float = 0.0
    rounds: list[dict[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Target:
    name: str
    port: int  # where wrk sends (for the upstream: its stub_status port)
    pid: int  # the process tree whose CPU is counted
    connections: tuple[int, ...] = (8, 64)  # the concurrencies it is measured at
    one_port: bool = False  # sends only ids port A holds (direct, and the floors: no routing)


def measure_once(
    target: Target, shape: str, connections: int, upstream: Target, script: Path, duration: float
) -> Run:
    before, up_before = cpu_seconds(target.pid), cpu_seconds(upstream.pid)
    threads_before = other_threads_seconds(target.pid)
    accepts = upstream_accepts(upstream.port)
    w = run_wrk(target.port, script, connections, duration)
    used, up_used = cpu_seconds(target.pid) - before, cpu_seconds(upstream.pid) - up_before
    threads_used = other_threads_seconds(target.pid) - threads_before
    conns = upstream_accepts(upstream.port) - accepts - 1  # less the stub_status request itself
    requests = int(w["requests"])
    errors = int(w["non2xx"] + w["connect"] + w["read"] + w["write"] + w["timeout"])
    return Run(
        target.name,
        shape,
        connections,
        rps=requests / (w["duration_us"] / 1e6),
        p50_ms=w["p50_us"] / 1000,
        p99_ms=w["p99_us"] / 1000,
        cpu_us=used * 1e6 / max(1, requests),
        upstream_cpu_us=up_used * 1e6 / max(1, requests),
        upstream_conns=conns,
        requests=requests,
        errors=errors,
        threads_cpu_us=threads_used * 1e6 / max(1, requests),
    )


def median_cell(runs: list[Run]) -> Cell:
    first = runs[0]

    def med(get: Callable[[Run], float]) -> float:
        return statistics.median(get(r) for r in runs)

    return Cell(
        first.target,
        first.shape,
        first.connections,
        rps=med(lambda r: r.rps),
        p50_ms=med(lambda r: r.p50_ms),
        p99_ms=med(lambda r: r.p99_ms),
        cpu_us=med(lambda r: r.cpu_us),
        upstream_cpu_us=med(lambda r: r.upstream_cpu_us),
        upstream_conns=med(lambda r: r.upstream_conns),
        errors=sum(r.errors for r in runs),
        threads_cpu_us=med(lambda r: r.threads_cpu_us),
        rounds=[asdict(r) for r in runs],
    )


DIRECT_IDS = [sid for sid in LOAD_SESSIONS if _even(sid)]  # all held by port A


def load_matrix(
    work: Path,
    targets: list[Target],
    upstream: Target,
    duration: float,
    rounds: int,
    alternate: bool = True,
) -> list[Cell]:
    """Every shape and concurrency, the targets one after another inside each round (with
    ``alternate``, in reverse order every other round, so that no target always runs right
    after the same other one, and a load that comes and goes on the machine is spread over all
    of them); a target only at the concurrencies it lists."""
    scripts: dict[tuple[str, str], Path] = {}
    names = [target.name for target in targets]
    for target in targets:
        ids = DIRECT_IDS if target.one_port else LOAD_SESSIONS
        for shape, text in (("GET", lua_get(ids)), ("POST", lua_post(ids))):
            path = work / f"{target.name}-{shape}.lua"
            path.write_text(text)
            scripts[target.name, shape] = path
    runs: dict[tuple[str, str, int], list[Run]] = {}
    total = rounds * len(SHAPES) * sum(len(t.connections) for t in targets)
    done = 0
    for round_no in range(rounds):
        for shape in SHAPES:
            for connections in (8, 64):
                order = targets[::-1] if alternate and round_no % 2 else targets
                for target in (t for t in order if connections in t.connections):
                    script = scripts[target.name, shape]
                    run = measure_once(target, shape, connections, upstream, script, duration)
                    runs.setdefault((target.name, shape, connections), []).append(run)
                    done += 1
                    progress(
                        f"[{done}/{total}] round {round_no + 1} {shape} c{connections} "
                        f"{target.name}: "
                        f"{run.rps:,.0f} req/s, {run.cpu_us:,.0f} us CPU/req, "
                        f"p99 {run.p99_ms:.2f} ms, errors {run.errors}"
                    )
    cells = {key: median_cell(value) for key, value in runs.items()}
    for (_target, shape, connections), cell in cells.items():
        direct = cells["direct", shape, connections]
        cell.added_p50_ms = cell.p50_ms - direct.p50_ms
        cell.added_p99_ms = cell.p99_ms - direct.p99_ms
    return [cells[t, s, c] for s in SHAPES for c in (8, 64) for t in names if (t, s, c) in cells]


# --- memory and rediscovery ----------------------------------------------------------------------


def table_memory(work: Path, ports: Ports, sessions: int, fill_seconds: float) -> dict[str, Any]:
    """VmRSS of a proxy that learned ``sessions`` owners minus the same process before.

    The proxy runs with its default settings, so a flood of unknown ids takes the path it takes
    in production: 20 status probes a second, every other miss answered from a fleet snapshot
    (one ``GET /api/sessions`` per instance, at most one a second). R0 holds every fill id; its
    list shows a window just ahead of the ids wrk is sending (rewritten as wrk reports progress)
    so that the snapshots stay small and the growth measured is the routing table's. At the end
    a snapshot of an empty fleet replaces the last one before the last measurement."""
    list_file = fill_list_file(work / "upstream")
    warm_ids = [f"fill-warm-{k}" for k in range(100)]
    write_session_list(list_file, warm_ids)
    proc = start_proxy("fill-proxy", ports.fill_proxy, ports.fleet[:2], work, 1)
    try:
        warm_script = work / "fill-warm.lua"
        warm_script.write_text(lua_get(warm_ids))
        run_wrk(ports.fill_proxy, warm_script, FILL_CONNECTIONS, 2)  # pools, buffers in place
        time.sleep(0.5)
        empty = rss_mib(proc.pid)
        per_thread = sessions // 2
        script, marker = work / "fill.lua", work / "fill-done"
        script.write_text(lua_fill(per_thread, marker))
        window = FillWindow(list_file, [Path(f"{marker}.progress.{t}") for t in range(2)])
        window.tick()
        time.sleep(1.2)  # the warm-up's snapshot (without the fill ids) is stale now
        markers = [Path(f"{marker}.{t}") for t in range(2)]
        lists_before = _lines(Path(f"{list_file}.log"))
        started = time.monotonic()
        w = run_wrk_until(
            ports.fill_proxy, script, FILL_CONNECTIONS, fill_seconds, markers, window.tick
        )
        took = time.monotonic() - started
        snapshots = _lines(Path(f"{list_file}.log")) - lists_before
        learned = int(w["requests"] - w["non2xx"])
        if learned < sessions:
            progress(f"fill learned only {learned:,} of {sessions:,} in {fill_seconds:.0f} s")
        replaced = _replace_snapshot(ports.fill_proxy, list_file)
        time.sleep(0.5)
        full = rss_mib(proc.pid)
        return {
            "sessions_learned": learned,
            "not_learned": int(w["non2xx"]),
            "fill_seconds": round(took, 1),
            "fill_rate_per_s": round(learned / took),
            "fill_snapshots": snapshots,
            "fill_p99_ms": round(w["p99_us"] / 1000, 1),
            "snapshot_replaced": replaced,
            "rss_empty_mib": round(empty, 1),
            "rss_full_mib": round(full, 1),
            "table_mib": round(full - empty, 1),
            "bytes_per_session": round((full - empty) * 1024 * 1024 / max(1, learned)),
        }
    finally:
        stop(proc)


class FillWindow:
    """Keeps R0's session list to the ids each wrk thread is about to send."""

    AHEAD, BEHIND = 4000, 1000

    def __init__(self, list_file: Path, progress_files: Sequence[Path]) -> None:
        self.list_file = list_file
        self.progress_files = progress_files
        self.shown: list[int] = []

    def tick(self) -> None:
        sent = []
        for path in self.progress_files:
            try:
                sent.append(int(path.read_text() or 0))
            except (OSError, ValueError):
                sent.append(0)
        if self.shown and all(s < shown + 1000 for s, shown in zip(sent, self.shown, strict=True)):
            return
        self.shown = sent
        ids = [
            f"fill-{thread}-{n}"
            for thread, at in enumerate(sent)
            for n in range(max(1, at - self.BEHIND), at + self.AHEAD)
        ]
        write_session_list(self.list_file, ids)


def _lines(path: Path) -> int:
    with contextlib.suppress(OSError):
        return len(path.read_bytes().splitlines())
    return 0


def _replace_snapshot(port: int, list_file: Path) -> bool:
    """Empty R0's list and send unknown ids until the probe budget is spent and the proxy takes
    a new (empty) snapshot; True once R0 saw that list call."""
    write_session_list(list_file, [])
    time.sleep(1.2)
    log = Path(f"{list_file}.log")
    before = _lines(log)
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        for k in range(200):
            status, _headers, _body = http_get(port, f"/api/sessions/gone-{k}/status", conn)
            if status != 404:
                raise RuntimeError(f"unknown session gone-{k} answered {status}")
            if _lines(log) > before:
                return True
    finally:
        conn.close()
    return False


def rediscovery(work: Path, ports: Ports) -> dict[str, Any]:
    """A first request for an unknown session (status probes to 20 instances, one holds it)
    against the same request once the owner is known; sequential, one keep-alive client."""
    port = ports.rediscovery_proxy
    # A budget of 1000 probe rounds a second (default 20), so that no lookup here is answered
    # from a fleet snapshot instead: what is timed is the round of 20 status probes.
    proc = start_proxy("rediscovery-proxy", port, ports.fleet, work, 1, rediscovery_rate="1000")
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    unknown: list[float] = []
    known: list[float] = []
    try:
        for k in range(5):  # connections and code paths warm, not counted
            for _ in range(2):
                http_get(port, f"/api/sessions/rd-9{k}-o{k:02d}/status?api_key=k", conn)
        for k in range(REDISCOVERY_IDS):
            owner = k % REDISCOVERY_INSTANCES
            path = f"/api/sessions/rd-{k}-o{owner:02d}/status?api_key=k"
            for bucket in (unknown, known):
                started = time.perf_counter()
                status, headers, body = http_get(port, path, conn)
                bucket.append((time.perf_counter() - started) * 1000)
                instance = headers.get("x-proxy-instance", "")
                if status != 200 or not instance.endswith(f":{ports.fleet[owner]}"):
                    raise RuntimeError(f"rediscovery {path}: {status} {instance!r} {body[:200]!r}")
        return {
            "instances": REDISCOVERY_INSTANCES,
            "ids": REDISCOVERY_IDS,
            "unknown_median_ms": round(statistics.median(unknown), 2),
            "unknown_max_ms": round(max(unknown), 2),
            "known_median_ms": round(statistics.median(known), 2),
            "rediscovery_added_ms": round(statistics.median(unknown) - statistics.median(known), 2),
        }
    finally:
        conn.close()
        stop(proc)


def reconcile_output() -> str:
    cmd = [sys.executable, "bench/reconcile.py", "--sessions", "10000", "100000"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    return done.stdout + (
        f"\n(exit {done.returncode}) {done.stderr[-2000:]}" if done.returncode else ""
    )


# --- output --------------------------------------------------------------------------------------


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def print_report(report: dict[str, Any]) -> None:
    s = report["settings"]
    m = report["machine"]
    print(f"session-proxy benchmark, {report['date']}, {s['cpus']} CPUs, loopback")
    print(f"machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}")
    print(f"uptime at start: {s['uptime_start']}")
    print(f"uptime at end:   {s['uptime_end']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    print(
        f"wrk -t2, {s['duration_s']} s per run, {s['rounds']} rounds (medians), "
        f"{len(LOAD_SESSIONS)} sessions over 2 upstream ports; nginx worker_processes 1; "
        f"session-proxy workers {s['workers']}; load average {s['loadavg_start']} at start, "
        f"{s['loadavg_end']} at end"
    )
    print(f"session-proxy run from {s['source']}")
    print(
        "upstream: one nginx (1 worker) with fixed JSON answers: GET /api/sessions/<id>/status, "
        f"POST /api/messages/send with a {s['post_body_bytes']} byte JSON body"
    )
    print(
        "columns: CPU us/req = the target's own CPU (utime+stime of its process tree, /proc) per "
        "request wrk counted;\n  upstream us = the instances' CPU per request; up conns = "
        "connections the instances accepted during the run;\n  +p50/+p99 = over direct at the "
        "same concurrency (direct p99 is noisy: wrk and nginx share 2 cores)\n"
    )
    head = (
        f"{'shape':<5} {'conc':>4} {'target':<10} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'+p50 ms':>8} {'+p99 ms':>8} {'CPU us/req':>10} {'upstream us':>11} "
        f"{'up conns':>8} {'errors':>6}"
    )
    print(head)
    print("-" * len(head))
    for c in report["cells"]:
        added = (
            ("", "")
            if c["target"] == "direct"
            else (f"{c['added_p50_ms']:.2f}", f"{c['added_p99_ms']:.2f}")
        )
        print(
            f"{c['shape']:<5} {'c' + str(c['connections']):>4} {c['target']:<10} {c['rps']:>8,.0f} "
            f"{c['p50_ms']:>7.2f} {c['p99_ms']:>7.2f} {added[0]:>8} {added[1]:>8} "
            f"{c['cpu_us']:>10,.0f} {c['upstream_cpu_us']:>11,.0f} "
            f"{c['upstream_conns']:>8,.0f} {c['errors']:>6}"
        )
    print(f"\nCPU per request, session-proxy / nginx (goal: at most {CPU_GOAL:g}x)")
    print(
        f"{'shape':<5} {'conc':>4} {'nginx us':>9} {'proxy us':>9} {'ratio':>6} {'rps ratio':>10}"
        f" {'verdict':>7}"
    )
    for r in report["ratios"]:
        print(
            f"{r['shape']:<5} {'c' + str(r['connections']):>4} {r['nginx_cpu_us']:>9,.0f} "
            f"{r['proxy_cpu_us']:>9,.0f} {r['cpu_ratio']:>6.1f} {r['rps_ratio']:>10.2f}"
            f" {'PASS' if r['cpu_ratio'] <= CPU_GOAL else 'FAIL':>7}"
        )
    if any(c["target"] in dict(FLOORS) for c in report["cells"]):
        print("floors: " + "; ".join(f"{name} = {what}" for name, what in FLOORS))
    if report.get("paced"):
        print_paced(report)
    if report.get("paced_interleaved"):
        print_paced(report, "paced_interleaved")
    if report.get("layers") or report.get("layer_notes"):
        print_layers(report)
    if "memory" not in report:
        print("\n(routing table memory and rediscovery not measured: --skip-memory)")
    else:
        print_memory(report)
    if "clients" in report:
        print_clients(report["clients"])
    if "tracing" in report:
        print_tracing(report)
    if "reconcile" in report:
        print("\nbench/reconcile.py --sessions 10000 100000:\n" + report["reconcile"].rstrip())
    print_summary(report["summary"], report)


def print_memory(report: dict[str, Any]) -> None:
    m = report["memory"]
    print(
        f"\nrouting table memory: {m['sessions_learned']:,} sessions learned in "
        f"{m['fill_seconds']} s ({m['fill_rate_per_s']:,}/s, default settings: 20 probe rounds/s, "
        f"{m['fill_snapshots']} fleet snapshots, p99 {m['fill_p99_ms']} ms, "
        f"{m['not_learned']} not found);\n  VmRSS {m['rss_empty_mib']} MiB -> "
        f"{m['rss_full_mib']} MiB: {m['table_mib']} MiB ({m['bytes_per_session']} bytes per "
        "session)"
    )
    r = report["rediscovery"]
    print(
        f"rediscovery across {r['instances']} instances (one holds the session), median of "
        f"{r['ids']} ids: first request {r['unknown_median_ms']} ms (max {r['unknown_max_ms']}), "
        f"known {r['known_median_ms']} ms: rediscovery adds {r['rediscovery_added_ms']} ms"
    )


def print_clients(rows: list[dict[str, Any]]) -> None:
    print("\nupstream client: session-proxy's own (fast) against aiohttp, same proxy otherwise")
    print(
        f"{'shape':<5} {'conc':>4} {'fast us':>8} {'aiohttp us':>10} {'ratio':>6} "
        f"{'fast req/s':>10} {'aiohttp req/s':>13} {'fast p99':>8} {'aiohttp p99':>11} "
        f"{'errors':>6}"
    )
    for r in rows:
        print(
            f"{r['shape']:<5} {'c' + str(r['connections']):>4} {r['fast_cpu_us']:>8,.0f} "
            f"{r['aiohttp_cpu_us']:>10,.0f} {r['cpu_ratio']:>6.2f} {r['fast_rps']:>10,} "
            f"{r['aiohttp_rps']:>13,} {r['fast_p99_ms']:>8.2f} {r['aiohttp_p99_ms']:>11.2f} "
            f"{r['aiohttp_errors']:>6}"
        )


def ratios(cells: list[Cell]) -> list[dict[str, Any]]:
    by = {(c.target, c.shape, c.connections): c for c in cells}
    out = []
    for shape in SHAPES:
        for conc in (8, 64):
            nginx, proxy = by["nginx", shape, conc], by["proxy", shape, conc]
            out.append(
                {
                    "shape": shape,
                    "connections": conc,
                    "nginx_cpu_us": round(nginx.cpu_us, 1),
                    "proxy_cpu_us": round(proxy.cpu_us, 1),
                    "cpu_ratio": round(proxy.cpu_us / max(nginx.cpu_us, 0.1), 1),
                    "rps_ratio": round(proxy.rps / max(nginx.rps, 1.0), 2),
                }
            )
    return out


# --- aiohttp as session-proxy's upstream client (--aiohttp) --------------------------------------

SERVE_WITH_AIOHTTP = "--serve-with-aiohttp"  # argv[1] of a proxy process this file starts


def aiohttp_client_class() -> type[Any]:
    """``proxy.client.UpstreamClient`` over aiohttp, set up as a proxy needs it: no cookie jar
    (``DummyCookieJar``), no decompression, no proxy settings from the environment, no headers
    of its own, no redirects, raw paths left as sent; the same per-instance connection cap and
    idle expiry as the fast client. Built here, not in ``proxy/``: it exists to be measured."""
    from collections.abc import AsyncIterator

    import aiohttp
    from yarl import URL

    from proxy.client import (
        KEEPALIVE_EXPIRY,
        MAX_CONNECTIONS_PER_INSTANCE,
        Timeouts,
        UpstreamClient,
        UpstreamResponse,
    )
    from proxy.errors import (
        ProxyError,
        UpstreamAmbiguous,
        UpstreamBadResponse,
        UpstreamTimeout,
        UpstreamUnreachable,
    )

    def mapped(exc: BaseException) -> ProxyError:
        detail = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
            return UpstreamUnreachable(detail)
        if isinstance(exc, TimeoutError):
            return UpstreamTimeout(detail)
        if isinstance(exc, aiohttp.ClientResponseError):
            return UpstreamBadResponse(detail)
        return UpstreamAmbiguous(detail)

    class AiohttpResponse(UpstreamResponse):
        def __init__(self, response: aiohttp.ClientResponse) -> None:
            self._response = response
            self.status = response.status
            self.headers = list(response.raw_headers)
            self._prefix: list[bytes] = []

        async def chunks(self) -> AsyncIterator[bytes]:
            try:
                for chunk in self._prefix:
                    yield chunk
                async for chunk in self._response.content.iter_any():
                    yield chunk
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise mapped(exc) from exc
            finally:
                self._response.release()

        async def read(self) -> bytes:
            return b"".join([chunk async for chunk in self.chunks()])

        async def read_upto(self, limit: int) -> bytes | None:
            size = 0
            try:
                async for chunk in self._response.content.iter_any():
                    self._prefix.append(chunk)
                    size += len(chunk)
                    if size > limit:
                        return None
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._response.release()
                raise mapped(exc) from exc
            self._response.release()
            whole, self._prefix = b"".join(self._prefix), []
            return whole

        async def close(self) -> None:
            self._response.release()

    class AiohttpClient(UpstreamClient):
        def __init__(self) -> None:
            self._session: aiohttp.ClientSession | None = None
            self._timeouts: dict[Timeouts, aiohttp.ClientTimeout] = {}

        def _client(self) -> aiohttp.ClientSession:
            if self._session is None:  # inside the loop: aiohttp wants one at construction
                connector = aiohttp.TCPConnector(
                    limit=0,
                    limit_per_host=MAX_CONNECTIONS_PER_INSTANCE,
                    keepalive_timeout=KEEPALIVE_EXPIRY,
                    ttl_dns_cache=None,
                )
                self._session = aiohttp.ClientSession(
                    connector=connector,
                    cookie_jar=aiohttp.DummyCookieJar(),
                    auto_decompress=False,
                    trust_env=False,
                    skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
                    requote_redirect_url=False,
                )
            return self._session

        async def send(
            self,
            method: str,
            base: str,
            target: str,
            headers: Sequence[tuple[bytes, bytes]],
            body: Any,
            timeouts: Timeouts,
        ) -> UpstreamResponse:
            timeout = self._timeouts.get(timeouts)
            if timeout is None:
                timeout = aiohttp.ClientTimeout(
                    total=None, sock_connect=timeouts.connect, sock_read=timeouts.read
                )
                self._timeouts[timeouts] = timeout
            try:
                response = await self._client().request(
                    method,
                    URL(base + target, encoded=True),
                    headers=[(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers],
                    data=body or None,
                    allow_redirects=False,
                    timeout=timeout,
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise mapped(exc) from exc
            return AiohttpResponse(response)

        async def aclose(self) -> None:
            if self._session is not None:
                await self._session.close()

    return AiohttpClient


def serve_with_aiohttp() -> int:
    """``python -m proxy serve`` (one worker), its upstream client replaced by aiohttp's."""
    from proxy import app as proxy_app
    from proxy.cli import main as proxy_main

    client_class = aiohttp_client_class()
    create_client = proxy_app.create_client

    def with_aiohttp(kind: str, transport: Any = None) -> Any:
        return client_class() if transport is None else create_client(kind, transport)

    proxy_app.create_client = with_aiohttp
    result: int = proxy_main(["serve"])
    return result


def client_comparison(cells: list[Cell]) -> list[dict[str, Any]]:
    """CPU per request of session-proxy with its own client against the same with aiohttp's."""
    by = {(c.target, c.shape, c.connections): c for c in cells}
    out = []
    for shape in SHAPES:
        for conc in (8, 64):
            fast, other = by["proxy", shape, conc], by["aiohttp", shape, conc]
            out.append(
                {
                    "shape": shape,
                    "connections": conc,
                    "fast_cpu_us": round(fast.cpu_us, 1),
                    "aiohttp_cpu_us": round(other.cpu_us, 1),
                    "cpu_ratio": round(other.cpu_us / max(fast.cpu_us, 0.1), 2),
                    "fast_rps": round(fast.rps),
                    "aiohttp_rps": round(other.rps),
                    "fast_p99_ms": round(fast.p99_ms, 2),
                    "aiohttp_p99_ms": round(other.p99_ms, 2),
                    "aiohttp_errors": other.errors,
                }
            )
    return out


# --- OpenTelemetry tracing (--tracing) -----------------------------------------------------------

# Target name, what it is, its OTEL_* variables besides the exporter's (see ``otel_env``).
TRACING_VARIANTS: tuple[tuple[str, str, dict[str, str]], ...] = (
    (
        "tr-off",
        "OTEL_SDK_DISABLED=true, every other variable as for 100%",
        {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_SAMPLER": "always_on"},
    ),
    ("tr-100%", "OTEL_TRACES_SAMPLER=always_on", {"OTEL_TRACES_SAMPLER": "always_on"}),
    (
        "tr-1%",
        "OTEL_TRACES_SAMPLER=traceidratio, OTEL_TRACES_SAMPLER_ARG=0.01",
        {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
    ),
)
SAMPLED = {"tr-off": 0.0, "tr-100%": 1.0, "tr-1%": 0.01}
SPANS_PER_REQUEST = 2  # the proxied request's server span and its one attempt's client span
BSP_SCHEDULE_DELAY = 5.0  # the BatchSpanProcessor's default: a batch under 512 waits this long
SERVE_OTLP_SINK = "--serve-otlp-sink"  # argv[1] of the sink process this file starts
SERVE_PROFILED = "--serve-profiled"  # argv[1] of a proxy process with a sampling profiler


def otel_env(variant: str, sink_port: int) -> dict[str, str]:
    """The OTEL_* variables of one tracing variant: OTLP/HTTP protobuf to the bench's sink."""
    own = next((v for name, _what, v in TRACING_VARIANTS if name == variant), {})
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{HOST}:{sink_port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": f"bench-{variant}",
        **own,
    }


def serve_otlp_sink(port: int) -> int:
    """An OTLP/HTTP trace receiver: 200 (an empty ``ExportTraceServiceResponse``) to every
    ``POST /v1/traces``, counting per ``service.name`` the requests, body bytes and spans it got
    (the protobuf is decoded, so a broken export would show); ``GET /stats`` answers the counts.
    HTTP/1.1 keep-alive, as a collector, so the exporter reuses its connection."""
    import gzip
    import threading
    import zlib
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    lock = threading.Lock()
    counts: dict[str, dict[str, int]] = {}

    class Sink(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def answer(
            self, status: int, body: bytes = b"", kind: str = "application/x-protobuf"
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path != "/v1/traces":
                self.answer(404)
                return
            encoding = (self.headers.get("Content-Encoding") or "").lower()
            service, spans = "undecodable", 0
            try:
                if encoding == "gzip":
                    raw = gzip.decompress(body)
                elif encoding == "deflate":
                    raw = zlib.decompress(body)
                else:
                    raw = body
                for resource in ExportTraceServiceRequest.FromString(raw).resource_spans:
                    for attribute in resource.resource.attributes:
                        if attribute.key == "service.name":
                            service = attribute.value.string_value
                    spans += sum(len(scope.spans) for scope in resource.scope_spans)
            except Exception:
                service, spans = "undecodable", 0
            with lock:
                entry = counts.setdefault(service, {"requests": 0, "bytes": 0, "spans": 0})
                entry["requests"] += 1
                entry["bytes"] += len(body)
                entry["spans"] += spans
            self.answer(200)

        def do_GET(self) -> None:
            if self.path != "/stats":
                self.answer(404)
                return
            with lock:
                body = json.dumps(counts).encode()
            self.answer(200, body, "application/json")

    server = ThreadingHTTPServer((HOST, port), Sink)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, _on_signal)
    with contextlib.suppress(SystemExit, KeyboardInterrupt):
        server.serve_forever()
    server.server_close()
    return 0


def start_sink(work: Path, port: int) -> subprocess.Popen[bytes]:
    log = work / "otlp-sink.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), SERVE_OTLP_SINK, str(port)]
    proc = spawn(cmd, log)
    wait_listening([port], proc, log)
    return proc


def sink_counts(port: int) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = json.loads(http_get(port, "/stats")[2])
    return counts


def protobuf_loaded(pid: int) -> bool:
    """Is protobuf's C extension mapped in the process? The OTLP exporter needs it; a proxy
    with tracing off should never have imported the tracing packages at all."""
    with contextlib.suppress(OSError):
        return "_upb" in Path(f"/proc/{pid}/maps").read_text()
    return False


def start_tracing_proxies(
    work: Path, ports: Ports, workers: int
) -> dict[str, subprocess.Popen[bytes]]:
    """The three tracing variants, each warmed."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for (name, _what, _env), port in zip(TRACING_VARIANTS, ports.tracing, strict=False):
        otel = otel_env(name, ports.otlp_sink)
        procs[name] = start_proxy(
            name, port, [ports.a, ports.b], work, workers, otel=otel, shutdown_drain="0"
        )
        warm(port, ports)
    return procs


def export_counts(
    cells: list[Cell],
    before: dict[str, dict[str, int]],
    after: dict[str, dict[str, int]],
    loaded: dict[str, bool],
    work: Path,
) -> list[dict[str, Any]]:
    """What each variant exported during the load matrix, against the requests wrk counted."""
    rows = []
    for name, _what, _env in TRACING_VARIANTS:
        requests = sum(int(r["requests"]) for c in cells if c.target == name for r in c.rounds)
        service = f"bench-{name}"
        got = {
            key: after.get(service, {}).get(key, 0) - before.get(service, {}).get(key, 0)
            for key in ("requests", "bytes", "spans")
        }
        log = work / f"{name}.log"
        rows.append(
            {
                "variant": name,
                "requests": requests,
                "spans": got["spans"],
                "spans_per_request": round(got["spans"] / max(1, requests), 4),
                "expected_per_request": SPANS_PER_REQUEST * SAMPLED[name],
                "posts": got["requests"],
                "bytes": got["bytes"],
                "bytes_per_request": round(got["bytes"] / max(1, requests), 1),
                "queue_full_warnings": log.read_text(errors="replace").count("Queue full")
                if log.exists()
                else 0,
                "protobuf_loaded": loaded[name],
            }
        )
    return rows


def tracing_comparison(cells: list[Cell]) -> list[dict[str, Any]]:
    """Per shape and concurrency: the plain proxy of the same run, tracing off, 100%, 1%."""
    by = {(c.target, c.shape, c.connections): c for c in cells}
    names = {"base": "proxy", "off": "tr-off", "on": "tr-100%", "one": "tr-1%"}
    out = []
    for shape in SHAPES:
        for conc in (8, 64):
            got = {key: by[name, shape, conc] for key, name in names.items()}
            base_rounds = [r["cpu_us"] for r in got["base"].rounds]
            base = got["base"].cpu_us
            off_rounds = [r["cpu_us"] for r in got["off"].rounds]
            out.append(
                {
                    "shape": shape,
                    "connections": conc,
                    **{f"{k}_cpu_us": round(c.cpu_us, 1) for k, c in got.items()},
                    **{f"{k}_export_us": round(c.threads_cpu_us, 1) for k, c in got.items()},
                    **{f"{k}_p50_ms": round(c.p50_ms, 2) for k, c in got.items()},
                    **{f"{k}_p99_ms": round(c.p99_ms, 2) for k, c in got.items()},
                    **{f"{k}_rps": round(c.rps) for k, c in got.items()},
                    **{f"{k}_errors": c.errors for k, c in got.items()},
                    **{
                        f"{k}_rounds_cpu_us": [round(r["cpu_us"]) for r in c.rounds]
                        for k, c in got.items()
                    },
                    "off_base": round(got["off"].cpu_us / max(base, 0.1), 3),
                    "on_off": round(got["on"].cpu_us / max(got["off"].cpu_us, 0.1), 3),
                    "one_off": round(got["one"].cpu_us / max(got["off"].cpu_us, 0.1), 3),
                    "base_round_range": [
                        round(min(base_rounds) / max(base, 0.1), 3),
                        round(max(base_rounds) / max(base, 0.1), 3),
                    ],
                    # The same, pairing each round's off with that round's base (back to back).
                    "off_base_per_round": [
                        round(o / max(b, 0.1), 3)
                        for o, b in zip(off_rounds, base_rounds, strict=True)
                    ],
                }
            )
    return out


# --- where a traced proxy's CPU goes: a sampling profiler ----------------------------------------


def serve_profiled(out: str) -> int:
    """``python -m proxy serve`` (one worker) with a sampling profiler in it: between SIGUSR1
    and SIGUSR2, SIGPROF comes every ``SAMPLE_EVERY`` s of the process's CPU; each time, the
    event loop's stack (the signal's frame: Python runs handlers in the main thread) and every
    other thread's (``sys._current_frames``) are recorded, each weighted by the CPU that thread
    used since the last sample (its own CPU clock). No tracing of calls, so the code is not
    slowed down unevenly, as cProfile slows code made of many small calls. Written to ``out``
    (JSON) when the server has stopped."""
    import threading

    from proxy.cli import main as proxy_main

    main_ident = threading.main_thread().ident or 0
    clocks: dict[int, int] = {}
    last: dict[int, float] = {}
    threads: dict[str, dict[str, Any]] = {}
    state = {"on": False, "samples": 0}

    def record(ident: int, frame: Any, name: str) -> None:
        if ident == main_ident:
            now = time.thread_time()
        else:
            with contextlib.suppress(OSError, ValueError):
                clocks.setdefault(ident, time.pthread_getcpuclockid(ident))
            if ident not in clocks:
                return
            now = time.clock_gettime(clocks[ident])
        used, last[ident] = now - last.get(ident, now), now
        if used <= 0 or frame is None:
            return
        got = threads.setdefault(name, {"cpu_s": 0.0, "areas": {}, "functions": {}, "under": 0.0})
        code = frame.f_code
        area = _area(code.co_filename)
        function = f"{Path(code.co_filename).name}:{code.co_firstlineno}({code.co_name})"
        got["cpu_s"] += used
        got["areas"][area] = got["areas"].get(area, 0.0) + used
        got["functions"][function] = [
            got["functions"].get(function, [0.0, area])[0] + used,
            area,
        ]
        caller = frame
        while caller is not None:  # anywhere in the stack: tracing's own code, or OTel's
            file = caller.f_code.co_filename
            if file.endswith("/proxy/tracing.py") or "/opentelemetry/" in file:
                got["under"] += used
                break
            caller = caller.f_back

    def sample(_signum: int, frame: Any) -> None:
        if not state["on"]:
            return
        state["samples"] += 1
        record(main_ident, frame, "main")
        for ident, other in sys._current_frames().items():
            if ident != main_ident:
                thread = threading._active.get(ident)  # type: ignore[attr-defined]
                record(ident, other, thread.name if thread is not None else str(ident))

    def toggle(signum: int, _frame: object) -> None:
        state["on"] = signum == signal.SIGUSR1
        last.clear()
        if state["on"]:
            last[main_ident] = time.thread_time()
            signal.setitimer(signal.ITIMER_PROF, SAMPLE_EVERY, SAMPLE_EVERY)
        else:
            signal.setitimer(signal.ITIMER_PROF, 0)

    signal.signal(signal.SIGPROF, sample)
    signal.signal(signal.SIGUSR1, toggle)
    signal.signal(signal.SIGUSR2, toggle)
    try:
        result: int = proxy_main(["serve"])
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        Path(out).write_text(json.dumps({"samples": state["samples"], "threads": threads}))
    return result


# First match wins: where a function's file lies, which part of the work it is.
PROFILE_AREAS: tuple[tuple[str, str], ...] = (
    ("/proxy/tracing.py", "proxy/tracing.py"),
    ("/opentelemetry/sdk/trace/export/", "otel batch processor"),
    ("/opentelemetry/sdk/_shared_internal/", "otel batch processor"),
    ("/opentelemetry/sdk/trace/sampling.py", "otel sampler"),
    ("/opentelemetry/sdk/", "otel SDK spans (start, end, attributes)"),
    ("/opentelemetry/exporter/otlp/proto/common/", "otel OTLP encoder (spans to protobuf)"),
    ("/opentelemetry/exporter/", "otel OTLP exporter (post)"),
    ("/opentelemetry/proto/", "protobuf"),
    ("/google/protobuf/", "protobuf"),
    ("/opentelemetry/context/", "otel context (attach, detach)"),
    ("/opentelemetry/attributes/", "otel attribute checks"),
    ("/opentelemetry/trace/propagation/", "otel propagator (traceparent)"),
    ("/opentelemetry/propagators/", "otel propagator (traceparent)"),
    ("/opentelemetry/util/", "otel util (its context managers)"),
    ("/opentelemetry/", "otel trace API (use_span, span objects)"),
    ("/requests/", "requests/urllib3/http.client"),
    ("/urllib3/", "requests/urllib3/http.client"),
    ("/http/client.py", "requests/urllib3/http.client"),
    ("/proxy/", "proxy (the rest)"),
    ("/uvicorn/", "uvicorn/starlette"),
    ("/starlette/", "uvicorn/starlette"),
    ("/prometheus_client/", "prometheus_client"),
    ("/contextlib.py", "contextlib (with-blocks)"),
    ("/asyncio/", "asyncio/uvloop"),
    ("/threading.py", "threading"),
    ("/logging/", "logging"),
)
OTHER_AREA = "other (stdlib)"
PROFILE_VARIANTS = ("tr-off", "tr-1%", "tr-100%")
PROFILE_SECONDS = 2  # of wrk per shape and profiled proxy
SAMPLE_EVERY = 0.004  # s of the process's CPU between samples (the timer's granularity here)


def _area(path: str) -> str:
    return next((area for marker, area in PROFILE_AREAS if marker in path), OTHER_AREA)


def profile_tracing(work: Path, ports: Ports, seconds: int) -> dict[str, Any]:
    """A proxy per variant (off, 1%, 100%) with the sampling profiler, one after the other:
    warmed, then profiled while wrk sends GETs then POSTs at 8 connections, ``seconds`` each;
    its CPU measured from /proc over the same window, to check the samples add up."""
    launcher_file = str(Path(__file__).resolve())
    out: dict[str, Any] = {"seconds_per_shape": seconds, "variants": {}}
    first_port = len(TRACING_VARIANTS)
    for n, variant in enumerate(PROFILE_VARIANTS):
        result, port = work / f"profile-{n}.json", ports.tracing[first_port + n]
        proc = start_proxy(
            f"profiled-{variant}",
            port,
            [ports.a, ports.b],
            work,
            1,
            (launcher_file, SERVE_PROFILED, str(result)),
            otel_env(variant, ports.otlp_sink) | {"OTEL_SERVICE_NAME": f"bench-profiled-{n}"},
            shutdown_drain="0",
        )
        requests = 0
        try:
            warm(port, ports)
            proc.send_signal(signal.SIGUSR1)
            cpu, threads = cpu_seconds(proc.pid), other_threads_seconds(proc.pid)
            for shape, text in (("GET", lua_get(LOAD_SESSIONS)), ("POST", lua_post(LOAD_SESSIONS))):
                script = work / f"profile-{shape}.lua"
                script.write_text(text)
                requests += int(run_wrk(port, script, 8, seconds)["requests"])
            cpu, threads = cpu_seconds(proc.pid) - cpu, other_threads_seconds(proc.pid) - threads
            proc.send_signal(signal.SIGUSR2)
        finally:
            stop(proc, grace=20)
        if not result.exists():
            log = (work / f"profiled-{variant}.log").read_text()[-2000:]
            raise RuntimeError(f"no profile written for {variant}: {log}")
        profile = json.loads(result.read_text())
        out["variants"][variant] = {
            "requests": requests,
            "samples": profile["samples"],
            "measured_main_us": round((cpu - threads) * 1e6 / max(1, requests), 1),
            "measured_other_us": round(threads * 1e6 / max(1, requests), 1),
            "threads": profile["threads"],
        }
    return out


def print_tracing(report: dict[str, Any]) -> None:
    t = report["tracing"]
    print(
        "\ntracing (OpenTelemetry): session-proxy processes of their own in the same rounds, "
        "exporting with a\n  BatchSpanProcessor (defaults) over OTLP/HTTP protobuf to the "
        "bench's sink (another process, not counted)"
    )
    print("  base = the proxy above (no OTEL_* variables at all)")
    for name, what, _env in TRACING_VARIANTS:
        print(f"  {name.removeprefix('tr-')} = {what}")
    print(
        "  CPU us/req = the proxy process's (all threads); export us = of that, its threads "
        "other than the event loop's\n  (the span exporter's); ratios of the medians\n"
    )
    head = (
        f"{'shape':<5} {'conc':>4} {'base us':>8} {'off us':>7} {'100% us':>8} {'1% us':>6} "
        f"{'off/base':>8} {'100%/off':>8} {'1%/off':>7} {'export 100%':>11} {'export 1%':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in t["rows"]:
        print(
            f"{r['shape']:<5} {'c' + str(r['connections']):>4} {r['base_cpu_us']:>8,.0f} "
            f"{r['off_cpu_us']:>7,.0f} {r['on_cpu_us']:>8,.0f} {r['one_cpu_us']:>6,.0f} "
            f"{r['off_base']:>8.2f} {r['on_off']:>8.2f} {r['one_off']:>7.2f} "
            f"{r['on_export_us']:>11,.0f} {r['one_export_us']:>9,.0f}"
        )
    print("\nlatency (wrk p50 / p99, ms) and req/s")
    head = (
        f"{'shape':<5} {'conc':>4} {'base':>13} {'off':>13} {'100%':>13} {'1%':>13} "
        f"{'req/s base':>10} {'off':>7} {'100%':>7} {'1%':>7} {'errors':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in t["rows"]:
        lat = [
            f"{r[k + '_p50_ms']:.2f} / {r[k + '_p99_ms']:.2f}" for k in ("base", "off", "on", "one")
        ]
        errors = sum(r[k + "_errors"] for k in ("base", "off", "on", "one"))
        print(
            f"{r['shape']:<5} {'c' + str(r['connections']):>4} "
            + " ".join(f"{x:>13}" for x in lat)
            + f" {r['base_rps']:>10,} {r['off_rps']:>7,} {r['on_rps']:>7,} {r['one_rps']:>7,}"
            f" {errors:>6}"
        )
    print(
        "\nper round, CPU us/req (base / off / 100% / 1%; with --tracing every other round runs "
        "the targets in reverse order):"
    )
    for r in t["rows"]:
        rounds = " | ".join(
            "/".join(str(r[k + "_rounds_cpu_us"][n]) for k in ("base", "off", "on", "one"))
            for n in range(len(r["base_rounds_cpu_us"]))
        )
        print(f"  {r['shape']:<4} c{r['connections']:<3} {rounds}")
    offs = [r["off_base"] for r in t["rows"]]
    paired = [x for r in t["rows"] for x in r["off_base_per_round"]]
    low = min(r["base_round_range"][0] for r in t["rows"])
    high = max(r["base_round_range"][1] for r in t["rows"])
    inside = sum(
        r["base_round_range"][0] <= r["off_base"] <= r["base_round_range"][1] for r in t["rows"]
    )
    print(
        f"off against base, round by round ({len(paired)} pairs): geometric mean "
        f"{statistics.geometric_mean(paired):.3f}, median {statistics.median(paired):.3f}"
    )
    print(
        f"off against base: median ratio {min(offs):.2f}-{max(offs):.2f} over the "
        f"{len(offs)} cells (round by round {min(paired):.2f}-{max(paired):.2f}); base's own "
        f"rounds lie at {low:.2f}-{high:.2f} of its median;\n  off's median is inside base's "
        f"round range in {inside} of {len(offs)} cells"
    )
    print("\nexported to the sink during the rounds (the proxies flushed at exit)")
    head = (
        f"{'variant':<8} {'requests':>9} {'spans':>8} {'spans/req':>9} {'expected':>8} "
        f"{'POSTs':>6} {'KiB':>7} {'bytes/req':>9} {'queue full':>10} {'protobuf loaded':>15}"
    )
    print(head)
    print("-" * len(head))
    for e in t["export"]:
        print(
            f"{e['variant']:<8} {e['requests']:>9,} {e['spans']:>8,} "
            f"{e['spans_per_request']:>9.3f} {e['expected_per_request']:>8.3f} {e['posts']:>6,} "
            f"{e['bytes'] / 1024:>7,.0f} {e['bytes_per_request']:>9,.0f} "
            f"{e['queue_full_warnings']:>10} {'yes' if e['protobuf_loaded'] else 'no':>15}"
        )
    print(
        f"sink: {t['sink_cpu_s']:.2f} s CPU in all, {t['sink_us_per_span']:.1f} us per span "
        "received (decoding included; in no proxy's figures)"
    )
    if "profile" in t:
        print_profile(t["profile"], t["rows"])


def print_profile(p: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    variants = p["variants"]

    def per_request(variant: str, seconds: float) -> float:
        return float(seconds * 1e6 / max(1, variants[variant]["requests"]))

    empty: dict[str, Any] = {"cpu_s": 0.0, "areas": {}, "functions": {}, "under": 0.0}
    mains = {v: info["threads"].get("main", empty) for v, info in variants.items()}
    counts = ", ".join(
        f"{k.removeprefix('tr-')} {v['requests']:,} requests, {v['samples']:,} samples"
        f" ({per_request(k, mains[k]['cpu_s']) / max(1, v['samples']):.2f} us/req each)"
        for k, v in variants.items()
    )
    print(
        "\nwhere the CPU goes: a sampling profiler inside one more proxy per variant (SIGPROF "
        f"per {SAMPLE_EVERY * 1000:.0f} ms of the process's CPU\n  at most; each thread's stack "
        "weighted by the CPU that thread used since the last sample; a C call\n  counts as the "
        "Python "
        f"function that made it), while wrk sends GET then POST at c8, {p['seconds_per_shape']}"
        f" s each:\n  {counts}"
    )
    names = [v.removeprefix("tr-") for v in variants]
    head = f"{'event loop (main thread), CPU us/req':<44}" + "".join(f"{n:>9}" for n in names)
    head += f"{'100%-off':>10}"
    print("\n" + head)
    print("-" * len(head))

    def line(label: str, got: list[float]) -> None:
        print(f"{label:<44}" + "".join(f"{x:>9.1f}" for x in got) + f"{got[-1] - got[0]:>10.1f}")

    areas = sorted(
        {a for t in mains.values() for a in t["areas"]},
        key=lambda a: -max(t["areas"].get(a, 0.0) for t in mains.values()),
    )
    for area in areas:
        got = [per_request(v, t["areas"].get(area, 0.0)) for v, t in mains.items()]
        if max(got) >= 1.0:
            line(area, got)
    line("total (this proxy, profiled)", [per_request(v, t["cpu_s"]) for v, t in mains.items()])
    keys = {"tr-off": "off", "tr-1%": "one", "tr-100%": "on"}
    c8 = [r for r in rows if r["connections"] == 8]
    line(
        "  in the rounds, c8 (no profiler)",
        [
            float(statistics.mean(r[f"{keys[v]}_cpu_us"] - r[f"{keys[v]}_export_us"] for r in c8))
            for v in variants
        ],
    )
    line(
        "  of it under proxy/tracing.py or OTel code",
        [per_request(v, t["under"]) for v, t in mains.items()],
    )
    for variant, info in variants.items():
        for name, t in info["threads"].items():
            if name == "main" or per_request(variant, t["cpu_s"]) < 1.0:
                continue
            print(
                f"\n{variant.removeprefix('tr-')}, thread {name}: "
                f"{per_request(variant, t['cpu_s']):.1f} us/req sampled "
                f"({info['measured_other_us']:.1f} from /proc for all threads but the loop)"
            )
            for area, seconds in sorted(t["areas"].items(), key=lambda kv: -kv[1]):
                if per_request(variant, seconds) >= 0.5:
                    print(f"  {per_request(variant, seconds):>6.1f}  {area}")
            top = sorted(t["functions"].items(), key=lambda kv: -kv[1][0])[:8]
            print("  top functions (innermost Python frame):")
            for function, (seconds, area) in top:
                print(f"  {per_request(variant, seconds):>6.1f}  {function} [{area}]")

    def functions(variant: str) -> dict[str, tuple[float, str]]:
        return {
            k: (per_request(variant, s), a) for k, (s, a) in mains[variant]["functions"].items()
        }

    off = functions("tr-off")
    for variant in ("tr-1%", "tr-100%"):
        now = functions(variant)
        grown = sorted(
            ((us - off.get(k, (0.0, ""))[0], k, area) for k, (us, area) in now.items()),
            reverse=True,
        )[:14]
        print(
            f"\n{variant.removeprefix('tr-')}, event loop: the functions (innermost Python frame) "
            "that grew most over off, CPU us/req"
        )
        for more, function, area in grown:
            print(f"  {more:>+6.1f}  {function} [{area}]")


# --- floors: uvicorn alone, uvicorn + the proxy's client (bench/floors.py) -----------------------

FLOORS = (
    ("uvicorn", "uvicorn alone answering a fixed 200 JSON (the proxy's uvicorn settings)"),
    ("uv+client", "uvicorn + proxy.client forwarding to the upstream, no proxy logic"),
)


def start_floor(kind: str, port: int, work: Path, upstream_port: int) -> subprocess.Popen[bytes]:
    log = work / f"floor-{kind}.log"
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "floors.py")]
    cmd += ["uvicorn", str(port)] if kind == "uvicorn" else ["client", str(port)]
    if kind != "uvicorn":
        cmd.append(f"http://{HOST}:{upstream_port}")
    env = dict(os.environ) | {"PYTHONPATH": str(SOURCE)}
    proc = spawn(cmd, log, env, cwd=SOURCE)
    try:
        wait_listening([port], proc, log)
        for path, body in ((f"/api/sessions/{DIRECT_IDS[0]}/status?api_key=k", None),) * 3 + (
            ("/api/messages/send", post_body(DIRECT_IDS[0])),
        ):
            status, _headers, answer = http_get(port, path, body=body)
            if status != 200:
                raise RuntimeError(f"floor {kind}: {status} {answer[:200]!r}")
    except (RuntimeError, OSError) as exc:
        stop(proc)
        raise RuntimeError(f"{exc}; log: {log.read_text()[-500:]}") from exc
    return proc


# --- optional layers: metrics, the access log, tracing -------------------------------------------

SERVE_WITHOUT_METRICS = "--serve-without-metrics"  # argv[1] of a proxy with metrics stubbed


def proxy_setting_names() -> list[str]:
    """The settings of the proxy under test (``--source``), read from its own proxy/config.py."""
    code = "from proxy.config import SETTING_NAMES; print(' '.join(SETTING_NAMES))"
    env = dict(os.environ) | {"PYTHONPATH": str(SOURCE)}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=SOURCE,
        timeout=60,
    )
    return done.stdout.split() if done.returncode == 0 else []


def serve_without_metrics() -> int:
    """``python -m proxy serve`` with metrics recorded nowhere: the recording methods (``inc``,
    ``dec``, ``set``, ``observe``) of prometheus_client's metric classes and of any class
    proxy.metrics defines, and proxy.metrics' per-request helpers (``count_*``, ``observe_*``,
    ``record_*``), made no-ops before the app is built; every object and attribute stays as it
    was, so the proxy runs its usual code up to the call. ``labels`` lookups are kept. What
    metrics cost per request when there is no setting to turn them off; /metrics still answers
    (zeros), and is not scraped during the load."""
    import prometheus_client.metrics as pm

    def nothing(*_args: Any, **_kwargs: Any) -> None:
        return None

    stubbed = []
    for cls in (pm.Counter, pm.Gauge, pm.Histogram, pm.Summary):
        for method in ("inc", "dec", "set", "observe"):
            if hasattr(cls, method):
                setattr(cls, method, nothing)
                stubbed.append(f"{cls.__name__}.{method}")
    from proxy import metrics as proxy_metrics

    for name, value in list(vars(proxy_metrics).items()):
        if isinstance(value, type) and value.__module__ == proxy_metrics.__name__:
            for method in ("inc", "dec", "observe"):
                if method in vars(value):
                    setattr(value, method, nothing)
                    stubbed.append(f"proxy.metrics.{name}.{method}")
        elif callable(value) and name.startswith(("count_", "observe_", "record_")):
            setattr(proxy_metrics, name, nothing)
            stubbed.append(f"proxy.metrics.{name}")
    print(f"metrics stubbed: {', '.join(stubbed)}", flush=True)
    from proxy.cli import main as proxy_main

    result: int = proxy_main(["serve"])
    return result


@dataclass
class Layer:
    name: str  # the target's name in the rounds
    what: str  # how it differs from the plain proxy
    cost: str  # what "cost" means: layer - base, or base - layer (metrics off)
    switch: str  # the setting that turns it on or off in production, or why there is none


def layer_plan(tracing_available: bool) -> tuple[list[Layer], list[str]]:
    """The optional layers this proxy has, and notes on what cannot be switched."""
    names = set(proxy_setting_names())
    notes: list[str] = []
    layers: list[Layer] = []
    metric_settings = sorted(n for n in names if "metric" in n)
    if metric_settings:
        setting = metric_settings[0]
        layers.append(
            Layer(
                "no-metrics",
                f"SESSION_PROXY_{setting.upper()}=off",
                "base - no-metrics",
                f"SESSION_PROXY_{setting.upper()}",
            )
        )
    else:
        layers.append(
            Layer(
                "no-metrics",
                "prometheus_client calls stubbed by the bench (--serve-without-metrics)",
                "base - no-metrics",
                "none: proxy/config.py has no setting to turn metrics off",
            )
        )
        notes.append(
            "metrics cannot be switched off (no setting in proxy/config.py): their cost is "
            "measured with the recording calls stubbed inside the bench"
        )
    access = sorted(n for n in names if "access" in n and "log" in n)
    what = "SESSION_PROXY_LOG_LEVEL=info (base: warning)"
    if access:
        what += f", SESSION_PROXY_{access[0].upper()}=on"
    else:
        notes.append(
            "the access log has no switch of its own: it is on whenever LOG_LEVEL is info or "
            "debug (proxy/app.py checks session_proxy.access at INFO)"
        )
    layers.append(
        Layer(
            "log-info",
            what,
            "log-info - base",
            "SESSION_PROXY_LOG_LEVEL" + (f", SESSION_PROXY_{access[0].upper()}" if access else ""),
        )
    )
    if tracing_available:
        for name, what, _env in TRACING_VARIANTS:
            layers.append(Layer(name, what, f"{name} - base", "OTEL_* variables"))
    else:
        notes.append("tracing not measured: the tracing extra (opentelemetry-sdk) is not installed")
    return layers, notes


def start_layer(
    layer: Layer, port: int, ports: Ports, work: Path, workers: int
) -> subprocess.Popen[bytes]:
    instances = [ports.a, ports.b]
    if layer.name == "no-metrics":
        if layer.switch.startswith("SESSION_PROXY_"):
            setting = layer.switch.removeprefix("SESSION_PROXY_").lower()
            proc = start_proxy(layer.name, port, instances, work, workers, **{setting: "off"})
        else:
            launcher = (str(Path(__file__).resolve()), SERVE_WITHOUT_METRICS)
            proc = start_proxy(layer.name, port, instances, work, 1, launcher)
    elif layer.name == "log-info":
        extra = {"log_level": "info"}
        if "," in layer.switch:
            extra[layer.switch.split(", ")[1].removeprefix("SESSION_PROXY_").lower()] = "on"
        proc = start_proxy(layer.name, port, instances, work, workers, **extra)
    else:
        raise ValueError(layer.name)
    try:
        warm(port, ports)
    except RuntimeError:
        stop(proc)
        raise
    return proc


def layer_costs(cells: list[Cell], layers: list[Layer]) -> list[dict[str, Any]]:
    """Per layer, shape and concurrency: its CPU per request against the plain proxy's of the
    same rounds (the median of the round-by-round differences: each pair ran back to back)."""
    by = {(c.target, c.shape, c.connections): c for c in cells}
    out = []
    for layer in layers:
        for shape in SHAPES:
            for conc in (8, 64):
                cell, base = by.get((layer.name, shape, conc)), by.get(("proxy", shape, conc))
                if cell is None or base is None:
                    continue
                sign = -1.0 if layer.cost.startswith("base") else 1.0
                pairs = [
                    sign * (r["cpu_us"] - b["cpu_us"])
                    for r, b in zip(cell.rounds, base.rounds, strict=False)
                ]
                out.append(
                    {
                        "layer": layer.name,
                        "what": layer.what,
                        "switch": layer.switch,
                        "cost": layer.cost,
                        "shape": shape,
                        "connections": conc,
                        "base_cpu_us": round(base.cpu_us, 1),
                        "layer_cpu_us": round(cell.cpu_us, 1),
                        "cost_us": round(statistics.median(pairs), 1),
                        "cost_rounds_us": [round(x, 1) for x in pairs],
                        "errors": cell.errors,
                    }
                )
    return out


# --- paced latency: an open-loop schedule (bench/pacer.py) ---------------------------------------

PACED_TARGETS = ("direct", "nginx", "proxy")


def raw_requests(shape: str, ids: Sequence[str]) -> list[str]:
    out = []
    for sid in ids:
        if shape == "GET":
            out.append(f"GET /api/sessions/{sid}/status?api_key=k HTTP/1.1\r\nHost: {HOST}\r\n\r\n")
        else:
            body = post_body(sid)
            out.append(
                f"POST /api/messages/send HTTP/1.1\r\nHost: {HOST}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
            )
    return out


PACED_WARMUP = 0.2  # s at the start of each paced run not counted (its connections are new)


def run_pacer(
    port: int, requests: Path, rate: float, connections: int, seconds: float
) -> dict[str, Any]:
    result: dict[str, Any] = run_pacers([port], [requests], rate, connections, seconds)[0]
    return result


def steal_seconds() -> float:
    """CPU time the hypervisor gave to others while this VM's CPUs had work (``steal`` of
    /proc/stat, all CPUs): a round with much of it measured the host, not the targets."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    return 0.0


def run_pacers(
    ports: Sequence[int], requests: Sequence[Path], rate: float, connections: int, seconds: float
) -> list[dict[str, Any]]:
    """One pacer process; with several targets their schedules interleaved (bench/pacer.py).
    Each result also says how much CPU time the hypervisor stole meanwhile (``steal_ms``)."""
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "pacer.py")]
    cmd += [",".join(map(str, ports)), str(rate), str(connections), str(seconds + PACED_WARMUP)]
    cmd += [",".join(map(str, requests)), str(PACED_WARMUP)]
    stolen = steal_seconds()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 40)
    stolen = steal_seconds() - stolen
    if done.returncode != 0:
        raise RuntimeError(f"pacer failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout)
    results = result if isinstance(result, list) else [result]
    for one in results:
        one["steal_ms"] = round(stolen * 1000)
    return results


def paced_matrix(
    work: Path,
    targets: list[Target],
    rate: float,
    connections: int,
    seconds: float,
    rounds: int,
    interleaved: bool = False,
) -> list[dict[str, Any]]:
    """Each target and shape at ``rate`` requests a second over ``connections``, ``seconds``
    counted per run (after ``PACED_WARMUP``), the targets one after the other in each round
    and in reverse order every other round, so that a burst of load from elsewhere on the
    machine falls on all of them alike; the latencies of all rounds pooled, then p50 and p99.
    "added" is over direct's. ``interleaved``: the targets at once instead, each at ``rate``
    on its own connections, their schedules interleaved in one pacer: a stall of the machine
    lands on all of them in the same round, not on whichever ran then."""
    paths: dict[tuple[str, str], Path] = {}
    for target in targets:
        for shape in SHAPES:
            ids = DIRECT_IDS if target.one_port else LOAD_SESSIONS
            path = work / f"paced-{target.name}-{shape}.json"
            path.write_text(json.dumps(raw_requests(shape, ids)))
            paths[target.name, shape] = path
    pooled: dict[tuple[str, str], list[dict[str, Any]]] = {}
    total, done = rounds * len(SHAPES) * (1 if interleaved else len(targets)), 0
    for round_no in range(rounds):
        for shape in SHAPES:
            order = targets[::-1] if round_no % 2 else targets
            if interleaved:
                # All targets in one pacer process, their schedules interleaved.
                runs = run_pacers(
                    [t.port for t in order],
                    [paths[t.name, shape] for t in order],
                    rate,
                    connections,
                    seconds,
                )
                for target, got in zip(order, runs, strict=True):
                    pooled.setdefault((target.name, shape), []).append(got)
                done += 1
                progress(
                    f"[paced interleaved {done}/{total}] round {round_no + 1} {shape}: "
                    + ", ".join(
                        f"{t.name} p99 {g['p99_us'] / 1000:.2f} ms "
                        f"(late {g['send_late_p99_us'] / 1000:.2f})"
                        for t, g in zip(order, runs, strict=True)
                    )
                    + f"; steal {runs[0]['steal_ms']} ms"
                )
                continue
            for target in order:
                got = run_pacer(target.port, paths[target.name, shape], rate, connections, seconds)
                pooled.setdefault((target.name, shape), []).append(got)
                done += 1
                progress(
                    f"[paced {done}/{total}] round {round_no + 1} {shape} {target.name}: "
                    f"p50 {got['p50_us'] / 1000:.2f} ms, p99 {got['p99_us'] / 1000:.2f} ms, "
                    f"late p99 {got['send_late_p99_us'] / 1000:.2f} ms, errors {got['errors']}, "
                    f"steal {got['steal_ms']} ms"
                )
    rows: list[dict[str, Any]] = []
    for shape in SHAPES:
        for target in targets:
            runs = pooled[target.name, shape]
            lat = sorted(x for r in runs for x in r["latencies_us"])
            late = [r["send_late_p99_us"] for r in runs]

            def pct(q: float, values: list[int] = lat) -> float:
                return values[min(len(values) - 1, int(q / 100 * len(values)))] / 1000

            rows.append(
                {
                    "target": target.name,
                    "shape": shape,
                    "rate": rate,
                    "connections": connections,
                    "counted": len(lat),
                    "p50_ms": round(pct(50), 3),
                    "p90_ms": round(pct(90), 3),
                    "p99_ms": round(pct(99), 3),
                    "max_ms": round(lat[-1] / 1000, 3) if lat else 0.0,
                    "rounds_p99_ms": [round(r["p99_us"] / 1000, 3) for r in runs],
                    "send_late_p99_ms": round(statistics.median(late) / 1000, 3),
                    "rounds_steal_ms": [r.get("steal_ms", 0) for r in runs],
                    "errors": sum(sum(r["errors"].values()) for r in runs),
                }
            )
    by = {(r["target"], r["shape"]): r for r in rows}
    for r in rows:
        direct = by["direct", r["shape"]]
        r["added_p50_ms"] = round(r["p50_ms"] - direct["p50_ms"], 3)
        r["added_p99_ms"] = round(r["p99_ms"] - direct["p99_ms"], 3)
    return rows


# --- the machine ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
    }


def uptime() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["uptime"], capture_output=True, text=True, timeout=10)
        if done.returncode == 0:
            return done.stdout.strip()
    return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


# --- the one table (issue 17), and a second run against the first --------------------------------

COLUMNS = tuple(f"{s} c{c}" for s in SHAPES for c in (8, 64))
CPU_GOAL = 5.0  # proxy / nginx CPU per request, at most
ADDED_P99_GOAL_MS = 1.0  # paced p99 over direct's, at most
REPEAT_TOLERANCE = 0.15  # a second run's figure within 15% of the first's
# For figures that are differences (added p99, a layer's cost), a change smaller than this is
# not flagged however large it is relative to a small difference.
REPEAT_FLOOR = {"us": 10.0, "ms": 0.1, "x": 0.0}


def summary(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The figures the issue asks for, one row each: ``values`` by column ("GET c8", ...),
    ``unit``, ``kind`` ("value" or "difference": how a second run is compared)."""
    by = {(c["target"], c["shape"], c["connections"]): c for c in report["cells"]}
    rows: list[dict[str, Any]] = []

    def row(
        figure: str, unit: str, values: dict[str, Any], kind: str = "value", goal: str = ""
    ) -> None:
        rows.append({"figure": figure, "unit": unit, "values": values, "kind": kind, "goal": goal})

    def cpu(target: str) -> dict[str, Any]:
        return {
            f"{s} c{c}": round(by[target, s, c]["cpu_us"], 1)
            for s in SHAPES
            for c in (8, 64)
            if (target, s, c) in by
        }

    row("direct (upstream answering) CPU", "us", cpu("direct"))
    row("nginx proxy_pass CPU", "us", cpu("nginx"))
    row("session-proxy CPU", "us", cpu("proxy"))
    ratio = {r_key(r): r["cpu_ratio"] for r in report["ratios"]}
    row("proxy / nginx", "x", ratio, goal=f"<= {CPU_GOAL:g}x")
    row(
        "  verdict",
        "",
        {k: "PASS" if v <= CPU_GOAL else "FAIL" for k, v in ratio.items()},
        kind="verdict",
    )
    for name, _what in FLOORS:
        if any(t == name for t, _s, _c in by):
            row(f"floor: {name}", "us", cpu(name))
    if any(t == "uv+client" for t, _s, _c in by):
        floor = cpu("uv+client")
        row(
            "  proxy above the uv+client floor",
            "us",
            {k: round(v - floor[k], 1) for k, v in cpu("proxy").items() if k in floor},
            kind="difference",
        )
    for key, mode in (("paced", ""), ("paced_interleaved", "paced interleaved")):
        paced = {(p["target"], p["shape"]): p for p in report.get(key, [])}
        if not paced:
            continue
        first = report[key][0]
        label = f"{mode or 'paced'} {first['rate']:g}/s c{first['connections']}"
        for target in PACED_TARGETS:
            for q in ("p50", "p99"):
                row(
                    f"{label}: {target} {q}",
                    "ms",
                    {f"{s} c8": paced[target, s][f"{q}_ms"] for s in SHAPES},
                )
        for target in ("nginx", "proxy"):
            row(
                f"{label}: {target} added p99",
                "ms",
                {f"{s} c8": paced[target, s]["added_p99_ms"] for s in SHAPES},
                kind="difference",
                goal=f"<= {ADDED_P99_GOAL_MS:g} ms" if target == "proxy" else "",
            )
        row(
            "  verdict (NOISY: pacer late p99 > goal)",
            "",
            {f"{s} c8": paced_verdict(paced["proxy", s], paced["direct", s]) for s in SHAPES},
            kind="verdict",
        )
        row(
            f"{label}: pacer lateness p99 (direct)",
            "ms",
            {f"{s} c8": paced["direct", s]["send_late_p99_ms"] for s in SHAPES},
        )
        row(
            f"{label}: steal, worst proxy round",
            "ms",
            {f"{s} c8": max(paced["proxy", s]["rounds_steal_ms"], default=0) for s in SHAPES},
        )
    layers: dict[str, dict[str, Any]] = {}
    stubbed = False
    for c in report.get("layers", []):
        layers.setdefault(c["layer"], {})[f"{c['shape']} c{c['connections']}"] = c["cost_us"]
        stubbed = stubbed or (c["layer"] == "no-metrics" and c["switch"].startswith("none"))
    labels = {
        "no-metrics": "layer cost: metrics" + (" (stubbed: no setting)" if stubbed else ""),
        "log-info": "layer cost: access log at info",
        "tr-off": "layer cost: tracing off (SDK present)",
        "tr-1%": "layer cost: tracing 1%",
        "tr-100%": "layer cost: tracing 100%",
    }
    for name, values in layers.items():
        row(labels.get(name, f"layer cost: {name}"), "us", values, kind="difference")
    return rows


def paced_verdict(proxy: dict[str, Any], direct: dict[str, Any]) -> str:
    """PASS/FAIL against the added-p99 goal, or NOISY when the pacer itself sent late by more
    than the goal at p99: then the difference of two tails says nothing either way."""
    if direct["send_late_p99_ms"] > ADDED_P99_GOAL_MS:
        return "NOISY"
    return "PASS" if proxy["added_p99_ms"] <= ADDED_P99_GOAL_MS else "FAIL"


def r_key(r: dict[str, Any]) -> str:
    return f"{r['shape']} c{r['connections']}"


def print_summary(rows: list[dict[str, Any]], report: dict[str, Any]) -> None:
    m = report["machine"]
    print(
        f"\nissue 17, one table ({m['cpu']}, {m['cores']} cores; CPU = utime+stime per request, "
        "medians of the rounds;\n  paced = open-loop pacer, latencies of all rounds pooled; "
        "layer cost = against the plain proxy, median of the round-by-round differences)"
    )
    head = f"{'figure':<56} {'unit':<4}" + "".join(f"{c:>10}" for c in COLUMNS) + "  goal"
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = []
        for col in COLUMNS:
            v = r["values"].get(col)
            if v is None:
                cells.append(f"{'-':>10}")
            elif isinstance(v, str):
                cells.append(f"{v:>10}")
            elif r["unit"] == "ms":
                cells.append(f"{v:>10.2f}")
            elif r["unit"] == "x":
                cells.append(f"{v:>10.1f}")
            else:
                cells.append(f"{v:>10,.0f}")
        print(f"{r['figure']:<56} {r['unit']:<4}" + "".join(cells) + f"  {r['goal']}")
    print(f"load: {report['settings']['uptime_start']}\n   -> {report['settings']['uptime_end']}")


def repeat_diff(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each figure of the second run against the first: second/first - 1; flagged over 15%
    (differences only when they also moved by more than ``REPEAT_FLOOR``)."""
    out = []
    seen: dict[str, int] = {}
    index = {}
    for r in second:
        n = seen.get(r["figure"], 0)
        seen[r["figure"]] = n + 1
        index[r["figure"], n] = r
    seen.clear()
    for r in first:
        n = seen.get(r["figure"], 0)
        seen[r["figure"]] = n + 1
        other = index.get((r["figure"], n))
        if other is None or r["kind"] == "verdict":
            continue
        for col in COLUMNS:
            a, b = r["values"].get(col), other["values"].get(col)
            if not isinstance(a, int | float) or not isinstance(b, int | float):
                continue
            rel = (b - a) / abs(a) if a else (0.0 if b == a else float("inf"))
            moved = abs(b - a) > REPEAT_FLOOR.get(r["unit"], 0.0)
            flag = abs(rel) > REPEAT_TOLERANCE and (r["kind"] == "value" or moved)
            out.append(
                {
                    "figure": r["figure"],
                    "column": col,
                    "unit": r["unit"],
                    "kind": r["kind"],
                    "first": a,
                    "second": b,
                    "change": round(rel, 3) if rel != float("inf") else None,
                    "flag": flag,
                }
            )
    return out


def print_repeat(diffs: list[dict[str, Any]]) -> None:
    print(
        f"\nsecond run against the first (second/first - 1; FLAG: more than "
        f"{REPEAT_TOLERANCE:.0%}; for differences also more than "
        f"{REPEAT_FLOOR['us']:g} us or {REPEAT_FLOOR['ms']:g} ms)"
    )
    figures = list(dict.fromkeys(d["figure"] for d in diffs))
    head = f"{'figure':<56}" + "".join(f"{c:>18}" for c in COLUMNS)
    print(head)
    print("-" * len(head))
    by = {(d["figure"], d["column"]): d for d in diffs}
    for figure in figures:
        cells = []
        for col in COLUMNS:
            d = by.get((figure, col))
            if d is None:
                cells.append(f"{'-':>18}")
                continue
            fmt = ".2f" if d["unit"] == "ms" else ".1f" if d["unit"] == "x" else ".0f"
            change = "n/a" if d["change"] is None else f"{d['change']:+.0%}"
            text = f"{d['first']:{fmt}}>{d['second']:{fmt}} {change}" + ("!" if d["flag"] else "")
            cells.append(f"{text:>18}")
        print(f"{figure:<56}" + "".join(cells))
    flagged = [d for d in diffs if d["flag"]]
    print(
        f"{len(flagged)} of {len(diffs)} figures moved more than {REPEAT_TOLERANCE:.0%} "
        "(marked !)"
        + (
            ": " + "; ".join(f"{d['figure'].strip()} {d['column']}" for d in flagged)
            if flagged
            else ""
        )
    )


def print_layers(report: dict[str, Any]) -> None:
    print("\noptional layers, CPU us/req against the plain proxy of the same rounds")
    for note in report.get("layer_notes", []):
        print(f"  note: {note}")
    head = (
        f"{'layer':<11} {'shape':<5} {'conc':>4} {'base us':>8} {'layer us':>9} {'cost us':>8} "
        f"{'per round':<24} {'errors':>6}  what (switch)"
    )
    print(head)
    print("-" * len(head))
    for c in report.get("layers", []):
        rounds = "/".join(f"{x:.0f}" for x in c["cost_rounds_us"])
        print(
            f"{c['layer']:<11} {c['shape']:<5} {'c' + str(c['connections']):>4} "
            f"{c['base_cpu_us']:>8,.0f} {c['layer_cpu_us']:>9,.0f} {c['cost_us']:>+8,.0f} "
            f"{rounds:<24} {c['errors']:>6}  {c['what']} ({c['switch']})"
        )
    log = report.get("access_log")
    if log:
        print(
            f"  log-info wrote {log['bytes_per_request']:.0f} bytes of log per request "
            f"({log['lines']:,} lines for {log['requests']:,} requests)"
        )


def print_paced(report: dict[str, Any], key: str = "paced") -> None:
    rows = report[key]
    first = rows[0]
    how = " (the targets at once, schedules interleaved)" if key == "paced_interleaved" else ""
    print(
        f"\npaced latency{how}: {first['rate']:g} requests/s over {first['connections']} "
        "connections, "
        "open loop (bench/pacer.py; latency from each request's scheduled time),\n  all rounds "
        "pooled; added = over direct; late p99 = how late the pacer itself sent (median of rounds)"
    )
    head = (
        f"{'shape':<5} {'target':<7} {'counted':>8} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
        f"{'max ms':>7} {'+p50 ms':>8} {'+p99 ms':>8} {'p99 per round':<20} {'late p99':>8} "
        f"{'errors':>6}  steal ms per round"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        per_round = "/".join(f"{x:.2f}" for x in r["rounds_p99_ms"])
        added = (
            ("", "")
            if r["target"] == "direct"
            else (f"{r['added_p50_ms']:.2f}", f"{r['added_p99_ms']:.2f}")
        )
        print(
            f"{r['shape']:<5} {r['target']:<7} {r['counted']:>8,} {r['p50_ms']:>7.2f} "
            f"{r['p90_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['max_ms']:>7.2f} {added[0]:>8} "
            f"{added[1]:>8} {per_round:<20} {r['send_late_p99_ms']:>8.2f} {r['errors']:>6}  "
            + "/".join(str(x) for x in r.get("rounds_steal_ms", []))
        )


# --- main ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
    path.chmod(0o755)  # nginx workers run as nobody
    try:
        yield path
    finally:
        stop_all()
        shutil.rmtree(path, ignore_errors=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    ensure_tools()
    report: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "versions": versions(),
        "settings": {
            "duration_s": args.duration,
            "rounds": args.rounds,
            "workers": args.workers,
            "source": str(SOURCE) + SOURCE_NOTE,
            "fill_sessions": args.fill_sessions,
            "cpus": os.cpu_count(),
            "post_body_bytes": len(post_body(LOAD_SESSIONS[0])),
            "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "uptime_start": uptime(),
            "paced": {
                "rate": args.paced_rate,
                "connections": PACED_CONNECTIONS,
                "seconds": args.paced_seconds,
                "rounds": args.paced_rounds,
            },
        },
    }
    tracing_available = importlib.util.find_spec("opentelemetry.sdk") is not None
    layers, notes = ([], []) if args.no_layers else layer_plan(tracing_available)
    report["layer_notes"] = notes
    tracing_layers = {layer.name for layer in layers if layer.name.startswith("tr-")}
    with workdir() as work:
        ports = Ports.pick()
        all_upstream = [ports.a, ports.b, *ports.fleet]
        upstream = start_nginx(
            "upstream", upstream_conf(work / "upstream", ports), work, all_upstream
        )
        nginx = start_nginx("nginx", nginx_proxy_conf(work / "nginx", ports), work, [ports.nginx])
        traced: dict[str, subprocess.Popen[bytes]] = {}
        if args.tracing or tracing_layers:
            # Started and warmed first: their warm-up spans are exported (the batch processor
            # sends a batch under 512 spans after 5 s) before the rounds are counted.
            sink = start_sink(work, ports.otlp_sink)
            traced = start_tracing_proxies(work, ports, args.workers)
            warmed_at = time.monotonic()
        proxy = start_proxy("proxy", ports.proxy, [ports.a, ports.b], work, args.workers)
        warm(ports.proxy, ports)
        other = None
        if args.aiohttp:
            launcher = (str(Path(__file__).resolve()), SERVE_WITH_AIOHTTP)
            other = start_proxy(
                "aiohttp-proxy", ports.aiohttp_proxy, [ports.a, ports.b], work, 1, launcher
            )
            warm(ports.aiohttp_proxy, ports)
        progress(f"started; work dir {work}; proxy pid {proxy.pid}, nginx pid {nginx.pid}")
        targets = [
            Target("direct", ports.a, upstream.pid, one_port=True),
            Target("nginx", ports.nginx, nginx.pid),
            Target("proxy", ports.proxy, proxy.pid),
        ]
        if not args.no_floors:
            for name, _what in FLOORS:
                port = ports.take()
                kind = "uvicorn" if name == "uvicorn" else "client"
                try:
                    floor = start_floor(kind, port, work, ports.a)
                except RuntimeError as exc:  # reported; the rest of the run goes on
                    notes.append(f"floor {name} not measured: {str(exc)[:300]}")
                    progress(notes[-1])
                    continue
                targets.append(Target(name, port, floor.pid, one_port=True))
        if other is not None:
            targets.append(Target("aiohttp", ports.aiohttp_proxy, other.pid))
        layer_procs: dict[str, subprocess.Popen[bytes]] = {}
        for layer in list(layers):
            if layer.name in tracing_layers:
                continue
            port = ports.take()
            try:
                layer_procs[layer.name] = start_layer(layer, port, ports, work, args.workers)
            except RuntimeError as exc:
                # A layer that cannot run (the proxy's code moved under the bench's stub, say)
                # is reported, not allowed to sink the rest of the run.
                notes.append(f"layer {layer.name} not measured: {str(exc)[:300]}")
                progress(notes[-1])
                layers.remove(layer)
                continue
            targets.append(Target(layer.name, port, layer_procs[layer.name].pid, (8,)))
        for (name, _what, _env), port in zip(TRACING_VARIANTS, ports.tracing, strict=False):
            if name in traced:
                targets.append(
                    Target(name, port, traced[name].pid, (8, 64) if args.tracing else (8,))
                )
        if args.tracing:
            time.sleep(max(0.0, warmed_at + BSP_SCHEDULE_DELAY + 0.5 - time.monotonic()))
            exported_before, sink_cpu_before = sink_counts(ports.otlp_sink), cpu_seconds(sink.pid)
        log_before = _log_size(work / "log-info.log")
        instances = Target("upstream", ports.upstream_status, upstream.pid)
        cells = load_matrix(work, targets, instances, args.duration, args.rounds)
        report["cells"] = [asdict(c) for c in cells]
        report["ratios"] = ratios(cells)
        report["layers"] = layer_costs(cells, layers)
        if "log-info" in layer_procs:
            lines_now, size_now = _log_size(work / "log-info.log")
            lines, size = lines_now - log_before[0], size_now - log_before[1]
            requests = sum(
                int(r["requests"]) for c in cells if c.target == "log-info" for r in c.rounds
            )
            report["access_log"] = {
                "lines": lines,
                "bytes": size,
                "requests": requests,
                "bytes_per_request": round(size / max(1, requests), 1),
            }
        if not args.no_paced:
            paced = [t for t in targets if t.name in PACED_TARGETS]
            for key, interleaved in (("paced", False), ("paced_interleaved", True)):
                report[key] = paced_matrix(
                    work,
                    paced,
                    args.paced_rate,
                    PACED_CONNECTIONS,
                    args.paced_seconds,
                    args.paced_rounds,
                    interleaved=interleaved,
                )
        for proc in (proxy, *layer_procs.values()):
            stop(proc)
        if other is not None:
            report["clients"] = client_comparison(cells)
            stop(other)
        if traced:
            loaded = {name: protobuf_loaded(proc.pid) for name, proc in traced.items()}
            for proc in traced.values():  # SIGTERM: each flushes its last batch at exit
                stop(proc, grace=20)
        if args.tracing:
            exported = sink_counts(ports.otlp_sink)
            sink_cpu = cpu_seconds(sink.pid) - sink_cpu_before
            spans = sum(e.get("spans", 0) for e in exported.values()) - sum(
                e.get("spans", 0) for e in exported_before.values()
            )
            report["tracing"] = {
                "rows": tracing_comparison(cells),
                "export": export_counts(cells, exported_before, exported, loaded, work),
                "sink_cpu_s": round(sink_cpu, 2),
                "sink_us_per_span": round(sink_cpu * 1e6 / max(1, spans), 2),
            }
            progress("off, 1% and 100% proxies with a sampling profiler ...")
            report["tracing"]["profile"] = profile_tracing(work, ports, PROFILE_SECONDS)
        if not args.skip_memory:
            progress("routing table memory ...")
            report["memory"] = table_memory(work, ports, args.fill_sessions, args.fill_seconds)
            progress("rediscovery across 20 instances ...")
            report["rediscovery"] = rediscovery(work, ports)
    if args.with_reconcile:
        progress("bench/reconcile.py ...")
        report["reconcile"] = reconcile_output()
    report["settings"]["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    report["settings"]["uptime_end"] = uptime()
    report["summary"] = summary(report)
    return report


def _log_size(path: Path) -> tuple[int, int]:
    """Lines and bytes of a log file so far."""
    with contextlib.suppress(OSError):
        data = path.read_bytes()
        return data.count(b"\n"), len(data)
    return 0, 0


PACED_CONNECTIONS = 8


def snapshot(source: Path) -> tuple[Path, str]:
    """A copy of ``source``'s proxy/ taken now, to run every proxy (and floor) of every run
    from: files edited while the bench runs would otherwise make the first and the second run
    measure different code. The note says what was copied (commit, files changed since)."""
    copy = Path(tempfile.mkdtemp(prefix="proxy-bench-source-"))
    copy.chmod(0o755)
    shutil.copytree(source / "proxy", copy / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    atexit.register(shutil.rmtree, copy, True)
    note = f" (a copy of {source}/proxy taken at start"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--", "proxy"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode == 0:
            changed = len(dirty.stdout.splitlines())
            note += f": commit {head.stdout.strip()}, {changed} file(s) under proxy/ changed since"
    return copy, note + ")"


def main(argv: Sequence[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else list(argv)
    if given[:1] == [SERVE_WITH_AIOHTTP]:
        return serve_with_aiohttp()
    if given[:1] == [SERVE_WITHOUT_METRICS]:
        return serve_without_metrics()
    if given[:1] == [SERVE_OTLP_SINK]:
        return serve_otlp_sink(int(given[1]))
    if given[:1] == [SERVE_PROFILED]:
        return serve_profiled(given[1])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (the median is reported)")
    parser.add_argument("--workers", type=int, default=1, help="session-proxy worker processes")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 s runs, 1 round")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--with-reconcile", action="store_true", help="run bench/reconcile.py")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the whole measurement this many times (fresh processes each time) and set "
        "the second run's figures against the first's (flagged beyond 15%%)",
    )
    parser.add_argument(
        "--paced-rate", type=float, default=1000.0, help="paced requests a second (default 1000)"
    )
    parser.add_argument(
        "--paced-seconds",
        type=float,
        default=2.0,
        help="seconds counted per paced run (default 2; short runs, many rounds: a burst of "
        "load elsewhere falls on every target alike)",
    )
    parser.add_argument(
        "--paced-rounds", type=int, default=5, help="paced rounds, pooled (default 5)"
    )
    parser.add_argument("--no-paced", action="store_true", help="leave out the paced latency")
    parser.add_argument(
        "--no-snapshot",
        action="store_true",
        help="run proxy/ from the tree itself, not from a copy taken at start",
    )
    parser.add_argument("--no-floors", action="store_true", help="leave out the floors")
    parser.add_argument(
        "--no-layers", action="store_true", help="leave out the optional layers' costs"
    )
    parser.add_argument(
        "--aiohttp",
        action="store_true",
        help="also run session-proxy with aiohttp as its upstream client (pip install aiohttp)",
    )
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="also run the tracing proxies (off / 100%% / 1%%) at c64, count what they export "
        "to an OTLP/HTTP sink of the bench's own, compare, and profile them (needs the tracing "
        "extra); without it they are measured at c8 as layers",
    )
    parser.add_argument(
        "--skip-memory",
        action="store_true",
        help="leave out the routing-table memory fill and the rediscovery timing",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=ROOT,
        help="directory to run `python -m proxy` from (default: this repo; e.g. a copy of an "
        "older version, to compare)",
    )
    parser.add_argument("--fill-sessions", type=int, default=FILL_SESSIONS, help=argparse.SUPPRESS)
    parser.add_argument("--fill-seconds", type=float, default=240.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = 2.0, 1
        args.paced_seconds, args.paced_rounds = 2.0, 1
        args.fill_sessions = min(args.fill_sessions, 10_000)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if not (args.source / "proxy" / "__main__.py").exists():
        parser.error(f"--source {args.source}: no proxy/__main__.py there")
    if args.tracing and not (args.source / "proxy" / "tracing.py").exists():
        parser.error(f"--tracing: --source {args.source} has no proxy/tracing.py")
    if args.tracing and importlib.util.find_spec("opentelemetry.sdk") is None:
        parser.error("--tracing needs the tracing extra: pip install -e '.[tracing]'")
    global SOURCE, SOURCE_NOTE
    SOURCE = args.source.resolve()
    if not args.no_snapshot:
        SOURCE, SOURCE_NOTE = snapshot(SOURCE)
    signal.signal(signal.SIGTERM, _on_signal)
    atexit.register(stop_all)
    reports = []
    for n in range(args.repeat):
        if args.repeat > 1:
            progress(f"=== run {n + 1} of {args.repeat} ===")
        reports.append(run(args))
    diffs = repeat_diff(reports[0]["summary"], reports[1]["summary"]) if len(reports) > 1 else []
    for n, report in enumerate(reports):
        if len(reports) > 1:
            print(f"\n=== run {n + 1} of {len(reports)} ===")
        print_report(report)
    if diffs:
        print_repeat(diffs)
    if args.json:
        out: dict[str, Any] = (
            reports[0]
            if len(reports) == 1
            else {
                "runs": reports,
                "repeat": diffs,
            }
        )
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        progress(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
