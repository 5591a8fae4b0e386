"""Start, watch and reliably clean up the processes a test needs.

Every child runs in its own session (``start_new_session=True``): a signal meant for one test's
process group cannot reach pytest, and a Ctrl-C in the terminal does not race our own shutdown.
Output goes to files, never pipes, so a chatty child can never block on a full pipe buffer.
Each child is registered; ``atexit`` kills what is left, so a crashed test never keeps a port.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
STOP_GRACE = 5.0
_TAIL_BYTES = 4000
_PORT_RETRIES = 3

Popen = subprocess.Popen[bytes]


class ProcessExitedError(RuntimeError):
    """A child exited while we were waiting for it to become ready."""


# --- registry ------------------------------------------------------------------------------------

_lock = threading.Lock()
_live: dict[int, Popen] = {}
_outputs: dict[int, Path] = {}


def _register(proc: Popen, output: Path) -> None:
    with _lock:
        _live[proc.pid] = proc
        _outputs[proc.pid] = output


def _signal_group(proc: Popen, sig: signal.Signals) -> None:
    # The child leads its own session, so its process group is the child plus anything it forked
    # (uvicorn workers): signalling the group never orphans a worker that still holds the port.
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _reap(proc: Popen, timeout: float = 5.0) -> None:
    _signal_group(proc, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    with _lock:
        _live.pop(proc.pid, None)


def live_processes() -> list[Popen]:
    """Children started by these helpers that have not been reaped yet."""
    with _lock:
        return [p for p in _live.values() if p.poll() is None]


def kill_all() -> None:
    """SIGKILL every registered child that is still running (last-resort cleanup)."""
    with _lock:
        procs = list(_live.values())
    for proc in procs:
        _reap(proc, timeout=2.0)


atexit.register(kill_all)


@contextlib.contextmanager
def process_scope() -> Iterator[None]:
    """Kill, on exit, every child started inside the block; for fixtures: ``with ...: yield``."""
    with _lock:
        before = set(_live)
    try:
        yield
    finally:
        with _lock:
            started = [p for pid, p in _live.items() if pid not in before]
        for proc in started:
            _reap(proc)


def spawn(
    cmd: Sequence[str],
    *,
    output: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path = REPO_ROOT,
) -> Popen:
    """Start ``cmd`` with stdout and stderr appended to ``output``, registered for cleanup."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("ab") as sink:
        # The child keeps its own copy of the descriptor; ours can close at once.
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    _register(proc, output)
    return proc


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # A developer's HTTP(S)_PROXY must never capture the loopback traffic between test processes.
    no_proxy = ",".join(p for p in (env.get("NO_PROXY", ""), "127.0.0.1,localhost") if p)
    env["NO_PROXY"] = env["no_proxy"] = no_proxy
    env.update(extra or {})
    return env


def output_tail(proc: Popen, limit: int = _TAIL_BYTES) -> str:
    """The last ``limit`` bytes a child wrote to stdout/stderr, or '' if we do not know where."""
    with _lock:
        path = _outputs.get(proc.pid)
    if path is None or not path.exists():
        return ""
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - limit))
        return fh.read().decode("utf-8", "replace")


# --- waiting -------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller races everyone else)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _is_200(status: int) -> bool:
    return status == 200


def wait_http(
    url: str,
    timeout: float = 15.0,
    proc: Popen | None = None,
    ok: Callable[[int], bool] = _is_200,
) -> None:
    """Poll ``url`` until ``ok(status)``; fail early, with the child's output, if ``proc`` dies."""
    deadline = time.monotonic() + timeout
    last = "no attempt made"
    with httpx.Client(timeout=1.0, trust_env=False) as client:
        while True:
            if proc is not None and proc.poll() is not None:
                raise ProcessExitedError(
                    f"{_describe(proc)} exited with {proc.returncode} before {url} was ready;"
                    f" output tail:\n{output_tail(proc)}"
                )
            try:
                status = client.get(url).status_code
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if ok(status):
                    return
                last = f"HTTP {status}"
            if time.monotonic() >= deadline:
                tail = f"; output tail:\n{output_tail(proc)}" if proc is not None else ""
                raise TimeoutError(f"{url} not ready after {timeout:g}s (last: {last}){tail}")
            time.sleep(0.05)


def _describe(proc: Popen) -> str:
    args = proc.args if isinstance(proc.args, list | tuple) else [proc.args]
    return f"pid {proc.pid} ({' '.join(str(a) for a in args)[:200]})"


def _bind_conflict(proc: Popen) -> bool:
    return "address already in use" in output_tail(proc).lower()


def _start_listening(
    build: Callable[[int], Popen],
    port: int | None,
    ready_url: Callable[[int], str],
    timeout: float,
) -> tuple[int, Popen]:
    """Start a server child, retrying on a fresh port if ``free_port`` lost its race."""
    attempts = 1 if port is not None else _PORT_RETRIES
    for attempt in range(attempts):
        chosen = port if port is not None else free_port()
        proc = build(chosen)
        try:
            wait_http(ready_url(chosen), timeout=timeout, proc=proc)
        except ProcessExitedError:
            _reap(proc)
            if attempt + 1 < attempts and _bind_conflict(proc):
                continue
            raise
        except BaseException:
            _reap(proc)
            raise
        return chosen, proc
    raise AssertionError("unreachable")


class _Child:
    """What the simulator and the proxy have in common: one registered child process."""

    proc: Popen
    output_path: Path

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL, as if the machine pulled the plug on it, and reap it."""
        _reap(self.proc)

    def terminate(self) -> None:
        """Send SIGTERM and return at once; see ``wait``."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = STOP_GRACE) -> int:
        """The exit code; raises ``subprocess.TimeoutExpired`` if it is still running."""
        code = self.proc.wait(timeout)
        with _lock:
            _live.pop(self.proc.pid, None)
        return code

    def stop(self, grace: float = STOP_GRACE) -> int:
        """SIGTERM, then SIGKILL if it has not exited within ``grace`` seconds."""
        self.terminate()
        try:
            return self.wait(grace)
        except subprocess.TimeoutExpired:
            _reap(self.proc)
            return self.proc.returncode

    def log_text(self) -> str:
        """Everything the child wrote to stdout and stderr so far."""
        try:
            return self.output_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


# --- the gateway simulator -----------------------------------------------------------------------


class Simulator(_Child):
    """One ``python -m proxy.simulator`` instance, i.e. a fake gateway."""

    def __init__(
        self,
        tmp_path: Path,
        name: str,
        port: int,
        *,
        api_key: str,
        connect_delay: float,
        send_delay: float,
        start_timeout: float,
        bulk_interval: float = 0.0,
        timeout_scale: float = 1.0,
        laravel_url: str | None = None,
        laravel_api_key: str | None = None,
        auth_dir: Path | str | None = None,
    ) -> None:
        self.tmp_path = tmp_path
        self.name = name
        self.host = HOST
        self.port = port
        self.url = f"http://{HOST}:{port}"
        self.log_path = tmp_path / f"sim-{name}.jsonl"
        self.output_path = tmp_path / f"sim-{name}.out"
        self.api_key = api_key
        self.connect_delay = connect_delay
        self.send_delay = send_delay
        self.start_timeout = start_timeout
        self.bulk_interval = bulk_interval
        self.timeout_scale = timeout_scale
        self.laravel_url = laravel_url
        self.laravel_api_key = laravel_api_key
        self.auth_dir = auth_dir
        self._restores_before = 0  # restore summaries in the log before the current run

    @classmethod
    def start(
        cls,
        tmp_path: Path,
        name: str,
        *,
        sessions: Iterable[str] = (),
        api_key: str = "demo-key",
        connect_delay: float = 0.0,
        send_delay: float = 0.0,
        port: int | None = None,
        start_timeout: float = 15.0,
        host: str = HOST,
        bulk_interval: float = 0.0,
        timeout_scale: float = 1.0,
        laravel_url: str | None = None,
        laravel_api_key: str | None = None,
        auth_dir: Path | str | None = None,
    ) -> Simulator:
        """Start one instance and wait for its /health.

        ``bulk_interval`` is the pause after each message of a bulk send (the real one waits
        1 s; 0 here keeps tests fast). ``timeout_scale`` multiplies the route timeouts whose
        expiry crashes the instance. With ``laravel_url`` the instance restores, at start, every
        account ``GET {laravel_url}/api/whatsapp/accounts/active`` lists (see ``restored``).
        With ``auth_dir`` (``--auth-dir``) sessions' logins are saved there (instances given the
        same one share them) and a start without one waits for ``scan``.
        """
        sim = cls(
            tmp_path,
            name,
            port or 0,
            api_key=api_key,
            connect_delay=connect_delay,
            send_delay=send_delay,
            start_timeout=start_timeout,
            bulk_interval=bulk_interval,
            timeout_scale=timeout_scale,
            laravel_url=laravel_url,
            laravel_api_key=laravel_api_key,
            auth_dir=auth_dir,
        )
        sim.host = host  # another loopback address (127.0.0.2, ...) plays another host
        sim._launch(tuple(sessions), port)
        return sim

    def _command(self, port: int, sessions: tuple[str, ...]) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "proxy.simulator",
            "--port",
            str(port),
            "--host",
            self.host,
            "--name",
            self.name,
            "--api-key",
            self.api_key,
            "--connect-delay",
            str(self.connect_delay),
            "--send-delay",
            str(self.send_delay),
            "--bulk-interval",
            str(self.bulk_interval),
            "--timeout-scale",
            str(self.timeout_scale),
            "--log",
            str(self.log_path),
        ]
        if self.laravel_url:
            cmd += ["--laravel-url", self.laravel_url]
        if self.laravel_api_key:
            cmd += ["--laravel-api-key", self.laravel_api_key]
        if self.auth_dir is not None:
            cmd += ["--auth-dir", str(self.auth_dir)]
        if sessions:
            # One argument may not exceed 128 KiB: many ids go through a file.
            listing = self.tmp_path / f"sim-{self.name}.sessions"
            listing.write_text("\n".join(sessions) + "\n")
            cmd += ["--sessions-file", str(listing)]
        return cmd

    def _launch(self, sessions: tuple[str, ...], port: int | None) -> None:
        self._restores_before = len(self.events("restore_done"))

        def build(p: int) -> Popen:
            return spawn(self._command(p, sessions), output=self.output_path, env=child_env())

        self.port, self.proc = _start_listening(
            build, port, lambda p: f"http://{self.host}:{p}/health", self.start_timeout
        )
        self.url = f"http://{self.host}:{self.port}"

    def restart(self, sessions: Iterable[str] = ()) -> None:
        """Stop (if running) and start again on the same port, appending to the same log."""
        if self.alive:
            self.stop()
        self._drop_torn_tail()
        self._launch(tuple(sessions), self.port)

    def _drop_torn_tail(self) -> None:
        # A SIGKILL can cut the last record short; the next run's first record would then be glued
        # onto it and both would be lost, so cut the fragment off while nobody is writing.
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with self.log_path.open("r+b") as fh:
                fh.truncate(keep)

    # --- the JSON-lines log ---

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The log records so far, optionally only those whose "event" is ``kind``."""
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        records: list[dict[str, Any]] = []
        for index, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                # Only the record being written right now may be incomplete.
                if index == len(lines) - 1:
                    break
                raise ValueError(f"{self.log_path}:{index + 1}: not JSON: {line[:200]!r}") from None
            if kind is None or record.get("event") == kind:
                records.append(record)
        return records

    def requests(self) -> list[dict[str, Any]]:
        return self.events("request")

    def wait_event(
        self, kind: str, timeout: float = 10.0, since: int = 0, **match: Any
    ) -> dict[str, Any]:
        """The first log record of ``kind`` (after the first ``since`` of them) whose fields
        equal ``match``, waiting for it up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events(kind) if all(e.get(k) == v for k, v in match.items())]
            if len(found) > since:
                return found[since]
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self!r}: no {kind!r} event {match} after {timeout:g}s")
            time.sleep(0.02)

    def restored(self, timeout: float = 10.0) -> dict[str, Any]:
        """The start-up restore's summary (``restore_done``) of the current run."""
        return self.wait_event("restore_done", timeout, since=self._restores_before)

    # --- test controls ---

    def _control(self, method: str, path: str, body: Any = None) -> httpx.Response:
        response = httpx.request(
            method,
            self.url + path,
            json=body,
            headers={"x-api-key": self.api_key},
            timeout=5.0,
            trust_env=False,
        )
        response.raise_for_status()
        return response

    def add_session(self, session_id: str, status: str = "connected") -> None:
        self._control("POST", "/_sim/sessions", {"session_id": session_id, "status": status})

    def drop_session(self, session_id: str) -> None:
        self._control("DELETE", f"/_sim/sessions/{session_id}")

    def scan(self, session_id: str) -> None:
        """Scan the QR code of a start waiting for one (``POST /_sim/sessions/{id}/scan``)."""
        self._control("POST", f"/_sim/sessions/{session_id}/scan")

    def starts(self) -> dict[str, int]:
        """``starting`` (starts in progress now) and ``max_starting`` (the most at once)."""
        listed = self._control("GET", "/_sim/sessions").json()
        return {"starting": listed["starting"], "max_starting": listed["max_starting"]}

    def set_faults(self, **faults: Any) -> None:
        self._control("POST", "/_sim/faults", faults)

    def sim_log(self) -> list[dict[str, Any]]:
        """The requests the simulator holds in memory (``GET /_sim/log``)."""
        requests: list[dict[str, Any]] = self._control("GET", "/_sim/log").json()["requests"]
        return requests

    def sim_events(self) -> list[dict[str, Any]]:
        """The life-cycle events the simulator holds in memory (``GET /_sim/events``)."""
        events: list[dict[str, Any]] = self._control("GET", "/_sim/events").json()["events"]
        return events

    def sent(self) -> list[dict[str, Any]]:
        """The messages the simulator reports as sent (``GET /_sim/sent``)."""
        messages: list[dict[str, Any]] = self._control("GET", "/_sim/sent").json()["messages"]
        return messages

    def __repr__(self) -> str:
        return f"Simulator({self.name!r}, url={self.url!r}, alive={self.alive})"


# --- the proxy -----------------------------------------------------------------------------------


class ProxyProcess(_Child):
    """``python -m proxy serve`` configured through ``SESSION_PROXY_*`` variables."""

    def __init__(self, port: int, proc: Popen, output_path: Path, env: dict[str, str]) -> None:
        self.port = port
        self.url = f"http://{HOST}:{port}"
        self.proc = proc
        self.output_path = output_path
        self.env = env

    @classmethod
    def start(
        cls,
        tmp_path: Path,
        env: Mapping[str, str],
        *,
        port: int | None = None,
        args: Sequence[str] = ("serve",),
        start_timeout: float = 15.0,
        ready_path: str = "/healthz",
    ) -> ProxyProcess:
        output = tmp_path / f"proxy-{time.monotonic_ns()}.log"
        if port is None and "SESSION_PROXY_PORT" in env:
            port = int(env["SESSION_PROXY_PORT"])
        used: dict[str, str] = {}

        def build(p: int) -> Popen:
            used.clear()
            # No drain on SIGTERM unless the test sets one: the 3 s default is for load balancers
            # to notice the 503s, and every stop() at a test's end would wait it out.
            used.update(
                {
                    "SESSION_PROXY_HOST": HOST,
                    "SESSION_PROXY_PORT": str(p),
                    "SESSION_PROXY_SHUTDOWN_DRAIN": "0",
                    **env,
                }
            )
            return spawn([sys.executable, "-m", "proxy", *args], output=output, env=child_env(used))

        chosen, proc = _start_listening(
            build, port, lambda p: f"http://{HOST}:{p}{ready_path}", start_timeout
        )
        return cls(chosen, proc, output, dict(used))

    def __repr__(self) -> str:
        return f"ProxyProcess(url={self.url!r}, alive={self.alive})"
