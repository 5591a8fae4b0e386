"""``session-proxy demo``: three simulated instances, the real proxy, a crash, and the recovery.

Everything runs for real on loopback: the instances and the proxy are separate processes, the
crash is a SIGKILL, and every line printed comes from an HTTP answer the proxy gave.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

API_KEY = "demo-key"
BOLD, DIM, GREEN, RED, CYAN, RESET = (
    "\033[1m",
    "\033[2m",
    "\033[32m",
    "\033[31m",
    "\033[36m",
    "\033[0m",
)


def _style(enabled: bool) -> dict[str, str]:
    names = ("bold", "dim", "green", "red", "cyan", "reset")
    codes = (BOLD, DIM, GREEN, RED, CYAN, RESET)
    return {n: (c if enabled else "") for n, c in zip(names, codes, strict=True)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0, trust_env=False).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout:g} s")


class Demo:
    def __init__(self, workdir: Path, fast: bool) -> None:
        self.workdir = workdir
        self.fast = fast
        self.s = _style(sys.stdout.isatty() and os.environ.get("NO_COLOR") is None)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.names: dict[str, str] = {}
        self.instance_procs: dict[str, subprocess.Popen[bytes]] = {}

    def say(self, text: str = "") -> None:
        print(text.format(**self.s), flush=True)

    def pause(self, seconds: float = 0.8) -> None:
        if not self.fast:
            time.sleep(seconds)

    def start(
        self, args: list[str], log_name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.workdir / log_name, "wb")  # noqa: SIM115 - the process owns it
        proc = subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def who(self, response: httpx.Response) -> str:
        url = response.headers.get("x-proxy-instance", "")
        return self.names.get(url, url or "the proxy")

    def run(self) -> int:
        s = self.say
        s("{bold}session-proxy demo{reset}: one address in front of a fleet of WhatsApp instances.")
        s("{dim}Each session lives in the memory of one instance. The application only knows the")
        s("proxy; the proxy finds the instance that holds each session, and finds it again after a")
        s("crash moves it.{reset}")
        s()
        urls = []
        for number in (1, 2, 3):
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            name = f"instance-{number}"
            proc = self.start(
                [
                    "proxy.simulator",
                    "--port",
                    str(port),
                    "--name",
                    name,
                    "--api-key",
                    API_KEY,
                    "--connect-delay",
                    "0.5",
                    "--log",
                    str(self.workdir / f"{name}.jsonl"),
                ],
                f"{name}.out",
            )
            _wait(url + "/health", proc)
            urls.append(url)
            self.names[url] = name
            self.instance_procs[name] = proc
            s(f"  started {{cyan}}{name}{{reset}} (simulated gateway) at {url}, pid {proc.pid}")
        proxy_port = _free_port()
        proxy_url = f"http://127.0.0.1:{proxy_port}"
        proxy = self.start(
            ["proxy", "serve"],
            "proxy.log",
            {
                "SESSION_PROXY_INSTANCES": ",".join(urls),
                "SESSION_PROXY_PORT": str(proxy_port),
                "SESSION_PROXY_API_KEY": API_KEY,
                "SESSION_PROXY_HEALTH_INTERVAL": "1",
                "SESSION_PROXY_LOG_FORMAT": "text",
            },
        )
        _wait(proxy_url + "/readyz", proxy)
        s(f"  started {{bold}}session-proxy{{reset}} at {proxy_url}, pid {proxy.pid}")
        s(f"{{dim}}  (logs in {self.workdir}){{reset}}")
        s()
        self.pause()

        with httpx.Client(base_url=proxy_url, timeout=30.0, trust_env=False) as app:
            s("{bold}1. The application creates six sessions through the proxy{reset}")
            sessions = [f"webjs_1_{int(time.time())}_{n:08d}" for n in range(1, 7)]
            for sid in sessions:
                r = app.post(
                    "/api/sessions",
                    json={
                        "session_id": sid,
                        "workspace_id": 1,
                        "account_id": 1,
                        "api_key": API_KEY,
                    },
                )
                s(
                    f"   POST /api/sessions {sid} -> {r.status_code}, "
                    f"placed on {{cyan}}{self.who(r)}{{reset}}"
                )
            s("   waiting for the sessions to connect (a real one shows a QR code here)...")
            self._wait_connected(app, sessions)
            self.pause()

            s()
            s("{bold}2. It sends a message on each; the proxy routes by session id{reset}")
            owners = self._send_round(app, sessions)
            self.pause()

            victim = owners[sessions[0]]
            lost = [sid for sid, owner in owners.items() if owner == victim]
            survivors = [u for u in urls if self.names[u] != victim]
            s()
            s(
                f"{{bold}}3. {{red}}{victim} crashes{{reset}}{{bold}} (SIGKILL){{reset}} "
                f"with {len(lost)} session(s) in memory: {', '.join(lost)}"
            )
            self.instance_procs[victim].kill()
            self.instance_procs[victim].wait()
            s("   The fleet restores them on the surviving instances, as a restart does; the")
            s("   application's database still points at the dead one.")
            for index, sid in enumerate(lost):
                target = survivors[index % len(survivors)]
                httpx.post(f"{target}/_sim/sessions", json={"session_id": sid}, trust_env=False)
                s(f"   {sid} comes back on {{cyan}}{self.names[target]}{{reset}}")
            self.pause()

            s()
            s("{bold}4. The application sends again, unchanged, to the same proxy address{reset}")
            self._send_round(app, sessions, before=owners)
            self.pause()

            listing = app.get("/api/sessions", params={"api_key": API_KEY}).json()
            s()
            s(
                f"{{bold}}5. GET /api/sessions{{reset}} merges every instance's list: "
                f"total {listing['total']}, unreachable instances named, not hidden: "
                f"{[f['instance'] for f in listing['failed_instances']] or 'none'}"
            )
        s()
        s("{green}{bold}Every message was delivered; the application never saw the crash.{reset}")
        s("{dim}Next: point your application at the proxy (README, 'Pointing Laravel').{reset}")
        return 0

    def _wait_connected(self, app: httpx.Client, sessions: list[str]) -> None:
        deadline = time.monotonic() + 15
        pending = set(sessions)
        while pending and time.monotonic() < deadline:
            for sid in list(pending):
                r = app.get(f"/api/sessions/{sid}/status", params={"api_key": API_KEY})
                if r.status_code == 200 and r.json().get("status") == "connected":
                    pending.discard(sid)
            time.sleep(0.1)
        if pending:
            raise RuntimeError(f"sessions never connected: {sorted(pending)}")
        self.say("   all six connected.")

    def _send_round(
        self, app: httpx.Client, sessions: list[str], before: dict[str, str] | None = None
    ) -> dict[str, str]:
        owners = {}
        for sid in sessions:
            started = time.perf_counter()
            r = app.post(
                "/api/messages/send",
                json={
                    "session_id": sid,
                    "phone_number": "6281234567890",
                    "message": "hello",
                    "api_key": API_KEY,
                },
            )
            ms = (time.perf_counter() - started) * 1000
            owners[sid] = self.who(r)
            attempts = r.headers.get("x-proxy-attempts")
            note = ""
            if before and before[sid] != owners[sid]:
                note = "  {green}<- owner ejected: found on its new instance before sending{reset}"
            if attempts:
                note = (
                    f"  {{green}}<- owner gone: found again, replayed ({attempts} tries){{reset}}"
                )
            colour = "green" if r.status_code == 200 else "red"
            self.say(
                f"   send via {sid} -> {{{colour}}}{r.status_code}{{reset}} from "
                f"{{cyan}}{owners[sid]}{{reset}} in {ms:.0f} ms{note}"
            )
            if r.status_code != 200:
                raise RuntimeError(f"send failed: {r.status_code} {r.text}")
        return owners


def run_demo(fast: bool = False) -> int:
    with tempfile.TemporaryDirectory(prefix="session-proxy-demo-") as tmp:
        demo = Demo(Path(tmp), fast)
        try:
            return demo.run()
        except (RuntimeError, httpx.HTTPError) as exc:
            print(f"demo failed: {exc}", file=sys.stderr)
            for log in [*sorted(Path(tmp).glob("*.out")), Path(tmp) / "proxy.log"]:
                if log.exists():
                    print(f"--- {log.name} ---\n{log.read_text()[-2000:]}", file=sys.stderr)
            return 1
        finally:
            demo.stop_all()
