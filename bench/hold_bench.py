"""What holding a request costs on top of the wait for its session: answer time against the
moment the session is ``connected`` again, after its owner was SIGKILLed.

    .venv/bin/python bench/hold_bench.py [--rounds N] [--sessions N] [--connect-delay S]
                                         [--modes restore,restart,listed] [--time-limit S]

Everything runs as real processes on 127.0.0.1 and is torn down at exit: three simulator
instances (``python -m proxy.simulator``), a fake Laravel (a thread of this process answering
``GET /api/whatsapp/accounts/active``), and a fresh session-proxy (``python -m proxy serve``) for
every round, so that no round inherits the ejection back-off of the one before. Each round:

1. starts the owner (instance 0) again with ``--sessions`` (N sessions, connected at once), starts
   the proxy and sends once per session through it, so the proxy knows where they are;
2. opens one connection per session to the proxy, SIGKILLs the owner's process group, and at once
   sends one ``POST /api/messages/send`` per session (in parallel): the proxy meets a refused
   connection, finds nobody holding the session, and holds the send;
3. the session comes back, by mode:

   - ``restore``: ``SESSION_PROXY_RESTORE=on``; the proxy creates the sessions on a healthy
     instance and releases the held sends when it sees them connected;
   - ``restart``: the owner is started again on its port and restores its own sessions (the
     gateway's start-up restore from the Laravel list, so each connects ``--connect-delay`` after
     it starts); the held sends' watcher notices;
   - ``listed``: the owner is started again with ``--sessions`` (the sessions are connected the
     moment the process is built, before it listens: no connect delay);

4. added latency of a send = its answer time minus the moment its session connected on the
   instance that answered (``X-Proxy-Instance``). "Connected at" is the ``session_connected``
   event's ``t`` in that instance's JSON-lines log when the simulator writes one (it does for
   every start that connects: modes restore and restart), else ``session_started``'s ``t`` plus
   the connect delay; for ``listed`` sessions, which are never started, it is the session's own
   ``connected_at`` (millisecond resolution) from the instance's status answer.

The instances' request logs also split the added latency: from "connected" to the proxy's first
look at that instance afterwards (a status probe or a session list), from there to the held send
reaching the instance, and from there to the answer at the client. Only sends answered 200 by an
instance other than the dead process are counted; anything else is listed. Progress goes to
stderr.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT  # where the proxy runs from (--source: a patched copy); simulators run from ROOT
PROXY_ENV: dict[str, str] = {}  # extra SESSION_PROXY_* settings (--env), for experiments
HOST = "127.0.0.1"
API_KEY = "bench-hold-key"
INSTANCES = 3
GOAL_MS = 50.0
SEND_TIMEOUT = 30.0  # longer than the proxy's HOLD_TIMEOUT (20 s): its own 503 comes first
START_TIMEOUT = 20.0
MAX_ROUNDS = 100
MODES = ("restore", "restart", "listed")
TITLES = {
    "restore": "(a) RESTORE=on: the proxy restores on a healthy instance",
    "restart": "(b) owner restarted, restores its own sessions",
    "listed": "(b') owner restarted with --sessions (connected at boot)",
}
TAGS = {"restore": "rs", "restart": "rb", "listed": "ls"}
BASE_TIME = int(time.time())


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


# --- processes -----------------------------------------------------------------------------------

_STARTED: list[subprocess.Popen[bytes]] = []


def spawn(
    cmd: Sequence[str], log: Path, env: dict[str, str], cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    """Start a process in its own group, remembered for teardown; output to ``log``."""
    with log.open("ab") as out:
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


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group we started, and reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    if proc in _STARTED:
        _STARTED.remove(proc)


def stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the process group we started, SIGKILL it if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    kill(proc)


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


def child_env(extra: dict[str, str] | None = None, source: Path = ROOT) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SESSION_PROXY_")}
    env["PYTHONPATH"] = str(source)
    return env | (extra or {})


def request(
    port: int,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    conn: http.client.HTTPConnection | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """One request on ``conn`` or on a connection of its own; JSON body when given."""
    own = conn is None
    conn = conn or http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        if body is None:
            conn.request(method, path)
        else:
            headers = {"Content-Type": "application/json"}
            conn.request(method, path, json.dumps(body).encode(), headers)
        response = conn.getresponse()
        answer = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, answer
    finally:
        if own:
            conn.close()


def wait_ready(
    port: int, path: str, proc: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited: {log.read_text()[-2000:]}")
        try:
            status = request(port, "GET", path, timeout=1.0)[0]
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if status == 200:
                return
            last = f"HTTP {status}"
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} on {port} not ready ({last}): {log.read_text()[-2000:]}")
        time.sleep(0.02)


# --- the instances -------------------------------------------------------------------------------


class Instance:
    """One simulator on a fixed port; every run appends to the same JSON-lines log."""

    def __init__(self, work: Path, index: int, port: int, connect_delay: float) -> None:
        self.name = f"inst{index}"
        self.port = port
        self.url = f"http://{HOST}:{port}"
        self.connect_delay = connect_delay
        self.log_path = work / f"{self.name}.jsonl"
        self.out_path = work / f"{self.name}.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, sessions: Sequence[str] = (), laravel_url: str | None = None) -> None:
        """Spawn it (without waiting: see ``wait``)."""
        self._drop_torn_tail()
        cmd = [
            sys.executable,
            *("-m", "proxy.simulator", "--host", HOST, "--port", str(self.port)),
            *("--name", self.name, "--api-key", API_KEY, "--log", str(self.log_path)),
            *("--connect-delay", str(self.connect_delay)),
        ]
        if sessions:
            cmd += ["--sessions", ",".join(sessions)]
        if laravel_url:
            cmd += ["--laravel-url", laravel_url]
        self.proc = spawn(cmd, self.out_path, child_env())

    def wait(self) -> None:
        assert self.proc is not None
        wait_ready(self.port, "/health", self.proc, self.out_path, START_TIMEOUT)

    def kill(self) -> None:
        if self.proc is not None:
            kill(self.proc)
            self.proc = None

    def _drop_torn_tail(self) -> None:
        # A SIGKILL may cut the last record short: cut it off before the next run appends.
        with contextlib.suppress(FileNotFoundError):
            data = self.log_path.read_bytes()
            if data and not data.endswith(b"\n"):
                with self.log_path.open("r+b") as fh:
                    fh.truncate(data.rfind(b"\n") + 1)

    def events(self, since: float) -> list[dict[str, Any]]:
        """Log records with ``t`` at or after ``since`` (torn or foreign lines skipped)."""
        records = []
        with contextlib.suppress(FileNotFoundError):
            for line in self.log_path.read_bytes().splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict) and record.get("t", 0) >= since:
                        records.append(record)
        return records

    def status_connected_at(self, session_id: str) -> float | None:
        """The session's own ``connected_at`` (ms resolution), from the status route."""
        path = f"/api/sessions/{session_id}/status?api_key={API_KEY}"
        status, _, body = request(self.port, "GET", path)
        value = json.loads(body).get("connected_at") if status == 200 else None
        if not isinstance(value, str):
            return None
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


# --- the fake Laravel (the instances' start-up restore reads it) --------------------------------


class Laravel:
    """``GET /api/whatsapp/accounts/active`` answering the accounts set for the round."""

    def __init__(self) -> None:
        self.accounts: list[dict[str, Any]] = []
        laravel = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/api/whatsapp/accounts/active"):
                    self._answer(200, {"success": True, "sessions": list(laravel.accounts)})
                else:
                    self._answer(404, {"message": "Not Found"})

            def do_POST(self) -> None:  # mark-disconnected, after a failed restore
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                self._answer(200, {"success": True})

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{HOST}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- the proxy -----------------------------------------------------------------------------------


def start_proxy(
    work: Path, port: int, instances: Sequence[Instance], restore: bool, name: str
) -> subprocess.Popen[bytes]:
    env = child_env(
        {
            "SESSION_PROXY_INSTANCES": ",".join(i.url for i in instances),
            "SESSION_PROXY_API_KEY": API_KEY,
            "SESSION_PROXY_HEALTH_INTERVAL": "0.5",
            "SESSION_PROXY_LOG_LEVEL": "warning",
            "SESSION_PROXY_SHUTDOWN_DRAIN": "0",
            "SESSION_PROXY_HOST": HOST,
            "SESSION_PROXY_PORT": str(port),
        },
        SOURCE,
    )
    if restore:
        env["SESSION_PROXY_RESTORE"] = "on"
    env |= PROXY_ENV
    log = work / f"{name}.log"
    proc = spawn([sys.executable, "-m", "proxy", "serve"], log, env, cwd=SOURCE)
    wait_ready(port, "/readyz", proc, log, START_TIMEOUT)
    return proc


COUNTERS = {
    "session_proxy_rediscoveries_total": "rediscoveries",
    "session_proxy_discovery_probes_total": "status probes",
    "session_proxy_discovery_snapshots_total": "fleet snapshots",
}


def proxy_counters(port: int) -> dict[str, float]:
    """A few of the proxy's own counters (``/metrics``), summed over their labels."""
    try:
        status, _, body = request(port, "GET", "/metrics")
    except OSError:
        return {}
    if status != 200:
        return {}
    found: dict[str, float] = {}
    for line in body.decode("utf-8", "replace").splitlines():
        name, _, value = line.partition(" ")
        name = name.split("{")[0]
        if name in COUNTERS:
            with contextlib.suppress(ValueError):
                found[COUNTERS[name]] = found.get(COUNTERS[name], 0.0) + float(value)
    return found


def send_body(session_id: str, text: str) -> dict[str, Any]:
    return {
        "session_id": session_id,
        "workspace_id": 1,
        "recipient_phone": "628120001111",
        "message": text,
        "api_key": API_KEY,
    }


# --- one round -----------------------------------------------------------------------------------


@dataclass
class Send:
    session_id: str
    sent: float = 0.0  # wall clock, time.time()
    answered: float = 0.0
    status: int = 0
    instance: str = ""
    attempts: str = ""
    error: str = ""


@dataclass
class Sample:
    """One held send that was answered 200 by the instance its session came back on."""

    added_ms: float  # answer - connected
    to_connected_ms: float  # kill - connected
    held_ms: float  # answer - sent
    look_ms: float | None  # connected -> the proxy's first look at that instance afterwards
    forward_ms: float | None  # that look -> the held send reaching the instance
    reply_ms: float | None  # the send reaching the instance -> its answer at the client
    truth: str  # where "connected at" came from


@dataclass
class ModeResult:
    mode: str
    samples: list[Sample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    rounds: int = 0
    counters: dict[str, float] = field(default_factory=dict)  # summed over the rounds


def held_send(port: int, conn: http.client.HTTPConnection, send: Send, go: threading.Event) -> None:
    go.wait()
    send.sent = time.time()
    try:
        body = send_body(send.session_id, f"held send for {send.session_id}")
        send.status, headers, answer = request(port, "POST", "/api/messages/send", body, conn)
        send.instance = headers.get("x-proxy-instance", "")
        send.attempts = headers.get("x-proxy-attempts", "")
        if send.status != 200:
            send.error = answer[:200].decode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as exc:
        send.error = f"{type(exc).__name__}: {exc}"
    finally:
        send.answered = time.time()
        conn.close()


def connected_at(
    mode: str, inst: Instance, events: list[dict[str, Any]], session_id: str
) -> tuple[float | None, str]:
    """When the session connected on ``inst``, and which record says so."""
    if mode == "listed":
        return inst.status_connected_at(session_id), "status connected_at"
    mine = [e for e in events if e.get("session_id") == session_id]
    for e in mine:
        if e.get("event") == "session_connected":
            return float(e["t"]), "session_connected"
    for e in mine:
        if e.get("event") == "session_started":
            return float(e["t"]) + inst.connect_delay, "session_started + delay"
    return None, "none"


def breakdown(
    events: list[dict[str, Any]], session_id: str, connected: float, answered: float
) -> tuple[float | None, float | None, float | None]:
    """From the instance's request log: connected -> first look -> send arrives -> answer."""
    requests = [e for e in events if e.get("event") == "request" and e.get("t", 0) >= connected]
    status_path = f"/api/sessions/{session_id}/status"
    looks = [
        e["t"] for e in requests if e.get("path") in (status_path, "/api/sessions")
    ]  # a status probe of this session, or a session list (shared by every held session)
    sends = [
        e["t"]
        for e in requests
        if e.get("path") == "/api/messages/send" and e.get("session_id") == session_id
    ]
    look = min(looks) if looks else None
    arrived = min(sends) if sends else None
    look_ms = (look - connected) * 1000 if look is not None else None
    forward_ms = (arrived - look) * 1000 if look is not None and arrived is not None else None
    reply_ms = (answered - arrived) * 1000 if arrived is not None else None
    return look_ms, forward_ms, reply_ms


def run_round(
    mode: str,
    index: int,
    work: Path,
    fleet: list[Instance],
    laravel: Laravel,
    proxy_port: int,
    sessions: int,
    result: ModeResult,
) -> None:
    owner = fleet[0]
    ids = [f"webjs_1_{BASE_TIME}_{TAGS[mode]}{index:02d}x{k}" for k in range(sessions)]
    laravel.accounts = [{"session_id": sid, "workspace_id": 1} for sid in ids]
    owner.kill()
    owner.start(sessions=ids)
    owner.wait()
    proxy = start_proxy(work, proxy_port, fleet, mode == "restore", f"proxy-{mode}-{index:02d}")
    try:
        for sid in ids:  # the proxy learns where each session is
            status, headers, answer = request(
                proxy_port, "POST", "/api/messages/send", send_body(sid, "warm-up")
            )
            if status != 200 or headers.get("x-proxy-instance") != owner.url:
                where = headers.get("x-proxy-instance")
                raise RuntimeError(f"warm-up {sid}: {status} from {where}: {answer[:200]!r}")
        sends = [Send(sid) for sid in ids]
        go = threading.Event()
        threads = []
        for send in sends:
            conn = http.client.HTTPConnection(HOST, proxy_port, timeout=SEND_TIMEOUT)
            conn.connect()
            thread = threading.Thread(target=held_send, args=(proxy_port, conn, send, go))
            thread.start()
            threads.append(thread)
        killed_at = time.time()
        owner.kill()
        go.set()
        if mode == "restart":
            owner.start(laravel_url=laravel.url)
        elif mode == "listed":
            owner.start(sessions=ids)
        deadline = time.monotonic() + SEND_TIMEOUT + 5
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            raise RuntimeError("a held send did not finish in time")
        counters = proxy_counters(proxy_port)
    finally:
        stop(proxy)
    for name, value in counters.items():
        result.counters[name] = result.counters.get(name, 0.0) + value
    before = len(result.samples)
    by_url = {i.url: i for i in fleet}
    events = {i.url: i.events(killed_at) for i in fleet}
    for send in sends:
        where = by_url.get(send.instance)
        if send.status != 200 or where is None:
            result.problems.append(
                f"round {index} {send.session_id[-6:]}: {send.status} from "
                f"{send.instance or '?'} {send.error[:120]}"
            )
            continue
        connected, truth = connected_at(mode, where, events[where.url], send.session_id)
        if connected is None:
            result.problems.append(f"round {index} {send.session_id[-6:]}: no connected time")
            continue
        look, forward, reply = breakdown(
            events[where.url], send.session_id, connected, send.answered
        )
        result.samples.append(
            Sample(
                added_ms=(send.answered - connected) * 1000,
                to_connected_ms=(connected - killed_at) * 1000,
                held_ms=(send.answered - send.sent) * 1000,
                look_ms=look,
                forward_ms=forward,
                reply_ms=reply,
                truth=truth,
            )
        )
    result.rounds += 1
    counted = len(result.samples) - before
    added = ", ".join(f"+{s.added_ms:.0f}" for s in result.samples[before:])
    progress(f"{mode} round {index}: {added or '-'} ms ({len(sends) - counted} not counted)")


# --- report --------------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def fmt(values: Sequence[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "       -       -       -"
    return f"{statistics.median(known):8.1f}{pct(known, 95):8.1f}{max(known):8.1f}"


def print_report(results: list[ModeResult], args: argparse.Namespace, meta: dict[str, Any]) -> None:
    print(
        f"hold bench, {meta['date']}, {os.cpu_count()} CPUs, loopback: {INSTANCES} instances, "
        f"{args.sessions} sessions on the owner, connect delay {args.connect_delay:g} s, "
        f"{args.rounds} rounds per mode, a fresh proxy per round"
    )
    print(f"load average {meta['load_start']} at start, {meta['load_end']} at end")
    if SOURCE != ROOT or PROXY_ENV:
        extra = " ".join(f"{k}={v}" for k, v in PROXY_ENV.items()) or "no extra settings"
        print(f"EXPERIMENT: proxy run from {SOURCE}, {extra}")
    print(f"{meta['elapsed']:.1f} s in all; times in ms; p50 / p95 / max")
    truths = sorted({s.truth for r in results for s in r.samples})
    print("connected at: " + (", ".join(truths) or "-"))
    print()
    head = f"{'mode':<58}{'n':>4}  {'kill->connected':>24}  {'added (answer-connected)':>24}"
    print(head)
    print("-" * len(head))
    for r in results:
        s = r.samples
        print(
            f"{TITLES[r.mode]:<58}{len(s):>4}  {fmt([x.to_connected_ms for x in s])}  "
            f"{fmt([x.added_ms for x in s])}"
        )
    print()
    print(
        "where the added latency goes (the answering instance's request log), p50 / p95 / max:\n"
        "  seen = the proxy's first look at that instance after the session connected (a status\n"
        "  probe of the session or a session list); send in = the held send reaching the instance"
    )
    head = f"{'mode':<10}{'connected->seen':>24}{'seen->send in':>24}{'send in->answer':>24}"
    print(head)
    print("-" * len(head))
    for r in results:
        s = r.samples
        print(
            f"{r.mode:<10}{fmt([x.look_ms for x in s])}{fmt([x.forward_ms for x in s])}"
            f"{fmt([x.reply_ms for x in s])}"
        )
    print()
    for r in results:
        if r.counters and r.rounds:
            per_round = ", ".join(f"{v / r.rounds:.1f} {k}" for k, v in sorted(r.counters.items()))
            print(f"{r.mode}: proxy counters per round (warm-up included): {per_round}")
    print()
    for r in results:
        if r.problems:
            print(f"{r.mode}: not counted: " + "; ".join(r.problems[:10]))
        s = r.samples
        if not s:
            print(f"{r.mode}: no samples: goal not measured")
            continue
        worst = max(x.added_ms for x in s)
        p95 = pct([x.added_ms for x in s], 95)
        verdict = "holds" if worst <= GOAL_MS else "MISSED"
        print(
            f"{r.mode}: goal (added <= {GOAL_MS:g} ms) {verdict}: p95 +{p95:.1f} ms, "
            f"max +{worst:.1f} ms over {len(s)} sends in {r.rounds} rounds"
        )


# --- main ----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    started = time.monotonic()
    meta: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    work = Path(tempfile.mkdtemp(prefix="hold-bench-"))
    laravel = Laravel()
    try:
        *ports, proxy_port = free_ports(INSTANCES + 1)
        fleet = [Instance(work, n, p, args.connect_delay) for n, p in enumerate(ports)]
        for inst in fleet[1:]:
            inst.start()
        for inst in fleet[1:]:
            inst.wait()
        progress(f"work dir {work}; instances on {', '.join(str(p) for p in ports)}")
        results = [ModeResult(m) for m in modes]
        for index in range(min(args.rounds, MAX_ROUNDS)):
            for result in results:  # the modes take turns: drift in load hits them alike
                if time.monotonic() - started > args.time_limit:
                    progress(f"time limit of {args.time_limit:g} s reached: stopping")
                    break
                run_round(
                    result.mode, index, work, fleet, laravel, proxy_port, args.sessions, result
                )
            else:
                continue
            break
        meta["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        meta["elapsed"] = time.monotonic() - started
        print_report(results, args, meta)
    finally:
        stop_all()
        laravel.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="rounds per mode (default 10)")
    parser.add_argument("--sessions", type=int, default=5, help="sessions on the owner")
    parser.add_argument("--connect-delay", type=float, default=1.0, help="start -> connected, s")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of " + "/".join(MODES))
    parser.add_argument("--time-limit", type=float, default=150.0, help="no new round after it")
    parser.add_argument("--keep", action="store_true", help="keep the logs' work directory")
    parser.add_argument(
        "--source", type=Path, default=ROOT, help="run the proxy from this copy of the tree"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra proxy setting, e.g. RESTORE_POLL_INTERVAL=0.02 (SESSION_PROXY_ added)",
    )
    args = parser.parse_args()
    global SOURCE
    SOURCE = args.source.resolve()
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--env {item!r}: expected NAME=VALUE")
        PROXY_ENV["SESSION_PROXY_" + name.upper().removeprefix("SESSION_PROXY_")] = value
    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, _on_signal)
    run(args)


if __name__ == "__main__":
    main()
