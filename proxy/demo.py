"""``session-proxy demo``: three simulated instances, the real proxy, three crashes, the recovery.

Everything runs for real on loopback: the instances and the proxy are separate processes, a
crash is a SIGKILL, and every line printed comes from an HTTP answer the proxy gave. The demo
shows the three ways the proxy learns that a session's owner is wrong or gone:

- from the request itself: the owner was killed just after a health check, so the send meets a
  refused connection, and the proxy ejects the instance, finds the session and replays the send;
- from the instance's answer: the session moved while its old instance stayed up, so the send
  meets ``404 "Session not found"`` and is replayed on the new owner;
- from a health check: the owner was killed while the application was idle, so the proxy had
  already ejected it and the send goes straight to the new owner.

Then nothing else restores a crashed instance's sessions: the proxy does (``RESTORE=on``), and
the sends made meanwhile are held and delivered once the sessions are back.

The logs (the proxy's, and each instance's JSON-lines request log) are kept after the demo.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

API_KEY = "demo-key"
WORKSPACE_ID = 1
RECIPIENT = "6281234567890"
# The demo's proxy checks every instance this often; a crash right after a check stays unseen
# by the health checks for this long, so a request meets it first.
HEALTH_INTERVAL = 2.0
EJECT_BASE_SECONDS = 5.0
CONNECT_DELAY = 0.5  # a simulated session start, create to connected
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


def short(session_id: str) -> str:
    """How a session id is shown on screen: its last 8 characters (the random part)."""
    return "…" + session_id[-8:]


def _new_session_ids(count: int) -> list[str]:
    """Ids in the application's format, ``webjs_{workspace}_{unixtime}_{random8}``."""
    alphabet = string.ascii_lowercase + string.digits
    now = int(time.time())
    ids: list[str] = []
    while len(ids) < count:
        sid = f"webjs_{WORKSPACE_ID}_{now}_{''.join(random.choices(alphabet, k=8))}"
        if all(short(sid) != short(other) for other in ids):
            ids.append(sid)
    return ids


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


class Demo:
    def __init__(self, workdir: Path, fast: bool) -> None:
        self.workdir = workdir
        self.fast = fast
        self.s = _style(sys.stdout.isatty() and os.environ.get("NO_COLOR") is None)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.names: dict[str, str] = {}  # instance URL -> instance-N
        self.urls: dict[str, str] = {}  # instance-N -> URL
        self.instance_procs: dict[str, subprocess.Popen[bytes]] = {}
        self.dead: set[str] = set()
        self.app: httpx.Client  # the application's client, pointed at the proxy
        self.fleet: httpx.Client  # the fleet's own controls (/_sim), straight to the instances

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

    def name(self, url: str) -> str:
        return self.names.get(url.rstrip("/"), url)

    def who(self, response: httpx.Response) -> str:
        url = response.headers.get("x-proxy-instance", "")
        return self.name(url) if url else "the proxy"

    def run(self) -> int:
        s = self.say
        s("{bold}session-proxy demo{reset}: one address in front of a fleet of WhatsApp instances.")
        s("{dim}Each session lives in the memory of one instance. The application only knows the")
        s("proxy; the proxy finds the instance that holds each session, and finds it again after a")
        s("crash moves it.{reset}")
        s()
        for number in (1, 2, 3):
            name = f"instance-{number}"
            url = self._start_instance(name, _free_port())
            proc = self.instance_procs[name]
            s(f"  started {{cyan}}{name}{{reset}} (simulated gateway) at {url}, pid {proc.pid}")
        proxy_port = _free_port()
        proxy_url = f"http://127.0.0.1:{proxy_port}"
        proxy = self.start(
            ["proxy", "serve"],
            "proxy.log",
            {
                "SESSION_PROXY_INSTANCES": ",".join(self.urls.values()),
                "SESSION_PROXY_PORT": str(proxy_port),
                "SESSION_PROXY_API_KEY": API_KEY,
                "SESSION_PROXY_HEALTH_INTERVAL": f"{HEALTH_INTERVAL:g}",
                "SESSION_PROXY_EJECT_BASE_SECONDS": f"{EJECT_BASE_SECONDS:g}",
                # The instances share session state here (any one can start any session), so
                # the proxy may restore a dead instance's sessions itself (step 6).
                "SESSION_PROXY_RESTORE": "on",
                "SESSION_PROXY_LOG_FORMAT": "text",
            },
        )
        _wait(proxy_url + "/readyz", proxy)
        s(
            f"  started {{bold}}session-proxy{{reset}} at {proxy_url}, pid {proxy.pid} "
            f"(health checks every {HEALTH_INTERVAL:g} s)"
        )
        s(f"{{dim}}  logs: {self.workdir} (kept after the demo){{reset}}")
        s()
        self.pause()

        with (
            httpx.Client(base_url=proxy_url, timeout=30.0, trust_env=False) as app,
            httpx.Client(timeout=10.0, trust_env=False) as fleet,
        ):
            self.app, self.fleet = app, fleet
            self._steps()
        s()
        s("{green}{bold}Every message was delivered; the application never saw a crash.{reset}")
        s(f"{{dim}}Logs kept in {self.workdir}{{reset}}")
        s(
            "{dim}(proxy.log: the proxy's own; "
            "instance-N.jsonl: every request each instance saw){reset}"
        )
        s("{dim}Next: point your application at the proxy (README, 'Pointing Laravel').{reset}")
        return 0

    def _steps(self) -> None:
        s = self.say
        s("{bold}1. The application creates six sessions through the proxy{reset}")
        sessions = _new_session_ids(6)
        s(f"{{dim}}   session ids look like {sessions[0]};")
        s(f"   shown here by their last 8 characters: {short(sessions[0])}{{reset}}")
        owners: dict[str, str] = {}
        for sid in sessions:
            r = self.app.post(
                "/api/sessions",
                json={
                    "session_id": sid,
                    "workspace_id": WORKSPACE_ID,
                    "account_id": sessions.index(sid) + 1,
                    "api_key": API_KEY,
                    "priority": "normal",
                },
            )
            if r.status_code != 200:
                raise RuntimeError(f"create {short(sid)} failed: {r.status_code} {r.text}")
            owners[sid] = self.who(r)
            s(
                f"   POST /api/sessions {short(sid)} -> {r.status_code}, "
                f"placed on {{cyan}}{owners[sid]}{{reset}}"
            )
        s("   waiting for the sessions to connect (a real one shows a QR code here)...")
        self._wait_connected(sessions)
        self.pause()

        s()
        s("{bold}2. It sends a message on each; the proxy routes by session id{reset}")
        s("{dim}   (from each answer: X-Proxy-Instance, the instance that served it, and")
        s(
            "   X-Proxy-Attempts, the number of attempts, sent only when there was more "
            "than one){reset}"
        )
        owners = self._send_round(sessions, owners)
        self.pause()

        # --- 3. a crash the proxy learns about from the request itself -------------------------
        victim = owners[sessions[0]]
        lost = [sid for sid in sessions if owners[sid] == victim]
        survivors = [name for name in self.urls if name != victim]
        s()
        s(
            f"{{bold}}3. {{red}}{victim} crashes{{reset}}{{bold}} (SIGKILL) just after a health "
            f"check{{reset}}, holding {', '.join(short(sid) for sid in lost)}"
        )
        s(
            f"   The proxy's next check is {HEALTH_INTERVAL:g} s away, so a request, not a check, "
            f"meets the crash."
        )
        self._just_checked(victim)
        self._kill(victim)
        s("   The fleet restores the sessions on the surviving instances, as a restart does;")
        s(f"   the application's database still points at {victim}.")
        for index, sid in enumerate(lost):
            target = survivors[index % len(survivors)]
            self._hold(target, sid)
            s(f"   {short(sid)} comes back on {{cyan}}{target}{{reset}}")
        s("   The application sends at once, unchanged, to the same proxy address:")
        owners = self._send_round(sessions, owners)
        s(
            f"   {{bold}}Ejected{{reset}}: the proxy has stopped sending anything to {victim} "
            f"(no requests, no new"
        )
        s("   sessions), as it does after a refused connection, a failed health check or failed")
        s("   requests in a row. It keeps checking it, and lets it back in when a check passes")
        s(
            f"   after a back-off ({EJECT_BASE_SECONDS:g} s now, doubling with each ejection "
            f"in a row)."
        )
        state = self._state(victim)
        if state.get("ejected"):
            s(
                f"{{dim}}   /readyz now: {victim} ejected, back-off "
                f"{float(state.get('ejected_for_seconds') or 0):.1f} s left{{reset}}"
            )
        self.pause()

        # --- 4. a session that moved while its instance stayed up ------------------------------
        alive = [name for name in survivors if name not in self.dead]
        old = max(alive, key=lambda name: sum(owner == name for owner in owners.values()))
        new = next(name for name in alive if name != old)
        moved = next(sid for sid in sessions if owners[sid] == old)
        s()
        s("{bold}4. A session moves while its instance stays up{reset}")
        s(f"   The fleet moves {short(moved)} from {old} to {new}, behind the proxy's back:")
        self._hold(new, moved)
        self.fleet.delete(f"{self.urls[old]}/_sim/sessions/{moved}")
        owners = self._send_round([moved], owners)
        self.pause()

        # --- 5. a crash the proxy learns about from a health check -----------------------------
        victim2 = old
        lost2 = [sid for sid in sessions if owners[sid] == victim2]
        s()
        s(
            f"{{bold}}5. {{red}}{victim2} crashes{{reset}}{{bold}} (SIGKILL) while the "
            f"application is idle{{reset}}, holding {', '.join(short(sid) for sid in lost2)}"
        )
        self._kill(victim2)
        killed_at = time.monotonic()
        for sid in lost2:
            self._hold(new, sid)
            s(f"   {short(sid)} comes back on {{cyan}}{new}{{reset}}")
        self._wait_ejected(victim2)
        s(
            f"   The proxy's next health check found {victim2} down "
            f"{time.monotonic() - killed_at:.1f} s later and ejected it;"
        )
        s("   no request met the crash. The application sends again:")
        owners = self._send_round(lost2, owners)
        self.pause()

        # --- 6. nothing else restores the sessions: the proxy does, and holds the send ---------
        last = next(name for name in self.urls if name not in self.dead)
        lost3 = [sid for sid in sessions if owners[sid] == last]
        back = victim
        s()
        s(
            f"{{bold}}6. {{red}}{last} crashes{{reset}}{{bold}} too, and this time nothing else "
            f"brings its sessions back{{reset}}"
        )
        self._start_instance(back, int(self.urls[back].rsplit(":", 1)[1]))
        self._wait_available(back)
        s(f"   {back} was restarted empty a moment ago (its own start-up restore is off).")
        s(f"   {last} holds {', '.join(short(sid) for sid in lost3)}; it is killed and the")
        s("   application sends at once. The proxy restores the sessions itself (RESTORE=on:")
        s("   the instances share session state) and holds the sends until they are back:")
        self._kill(last)
        for sid in lost3[:3]:
            started = time.perf_counter()
            r = self.app.post(
                "/api/messages/send",
                json={
                    "session_id": sid,
                    "workspace_id": WORKSPACE_ID,
                    "recipient_phone": RECIPIENT,
                    "message": "hello again",
                    "type": "text",
                    "api_key": API_KEY,
                },
            )
            held = time.perf_counter() - started
            if r.status_code != 200:
                raise RuntimeError(f"send via {short(sid)} failed: {r.status_code} {r.text}")
            owners[sid] = self.who(r)
            if held >= 0.05:
                s(
                    f"   send via {short(sid)} -> {{green}}200{{reset}}, held {held:.1f} s while "
                    f"the session restarted on {{cyan}}{owners[sid]}{{reset}}"
                )
            else:
                s(
                    f"   send via {short(sid)} -> {{green}}200{{reset}} at once: restored on "
                    f"{{cyan}}{owners[sid]}{{reset}} alongside the one before"
                )
        restores = self._admin_restores()
        if restores is not None:
            s(
                f"{{dim}}   the proxy restored {restores} sessions; a start takes "
                f"{CONNECT_DELAY:g} s here, tens of seconds for real{{reset}}"
            )
        self.pause()

        listing = self.app.get("/api/sessions", params={"api_key": API_KEY}).json()
        unreachable = [self.name(str(f["instance"])) for f in listing["failed_instances"]]
        s()
        s(
            f"{{bold}}7. GET /api/sessions{{reset}} merges every instance's list: "
            f"total {listing['total']}"
        )
        s(f"   unreachable: {', '.join(unreachable) or 'none'} (named in the answer, not hidden)")

    def _admin_restores(self) -> int | None:
        """How many sessions the proxy restored, from /readyz."""
        restore = self.app.get("/readyz").json().get("restore")
        if not isinstance(restore, dict):
            return None
        return int(restore.get("counts", {}).get("succeeded", 0))

    def _wait_available(self, name: str) -> None:
        """Until the proxy has let ``name`` back in (a passed check after its back-off)."""
        deadline = time.monotonic() + EJECT_BASE_SECONDS * 4 + HEALTH_INTERVAL * 3
        while time.monotonic() < deadline:
            if self._state(name).get("healthy"):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the proxy did not let {name} back in")

    def _start_instance(self, name: str, port: int) -> str:
        url = f"http://127.0.0.1:{port}"
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
                f"{CONNECT_DELAY:g}",
                "--log",
                str(self.workdir / f"{name}.jsonl"),
            ],
            f"{name}.out",
        )
        _wait(url + "/health", proc)
        self.names[url] = name
        self.urls[name] = url
        self.instance_procs[name] = proc
        self.dead.discard(name)
        return url

    def _kill(self, name: str) -> None:
        proc = self.instance_procs[name]
        proc.kill()
        proc.wait()
        self.dead.add(name)

    def _hold(self, name: str, session_id: str) -> None:
        """The fleet starts ``session_id`` on ``name`` (connected, as a restore does)."""
        r = self.fleet.post(f"{self.urls[name]}/_sim/sessions", json={"session_id": session_id})
        if r.status_code != 200:
            raise RuntimeError(f"{name} did not take {short(session_id)}: {r.status_code}")

    def _state(self, name: str) -> dict[str, Any]:
        """The proxy's view of one instance, from its /readyz."""
        for state in self.app.get("/readyz").json().get("instance_states", []):
            if isinstance(state, dict) and self.name(str(state.get("url", ""))) == name:
                return state
        raise RuntimeError(f"/readyz does not list {name}")

    def _just_checked(self, name: str) -> None:
        """Return right after the proxy's health check of ``name``: the next is a full
        HEALTH_INTERVAL away, so a request, not a check, meets the crash."""
        deadline = time.monotonic() + HEALTH_INTERVAL * 3 + 5
        while time.monotonic() < deadline:
            ago = self._state(name).get("last_check_seconds_ago")
            if isinstance(ago, int | float) and ago < 0.2:
                return
            time.sleep(0.02)
        raise RuntimeError(f"the proxy did not health-check {name} within {HEALTH_INTERVAL:g} s")

    def _wait_ejected(self, name: str) -> None:
        deadline = time.monotonic() + HEALTH_INTERVAL * 3 + 5
        while time.monotonic() < deadline:
            if self._state(name).get("ejected"):
                return
            time.sleep(0.05)
        raise RuntimeError(f"the proxy's health checks did not eject {name}")

    def _wait_connected(self, sessions: list[str]) -> None:
        deadline = time.monotonic() + 15
        pending = set(sessions)
        while pending and time.monotonic() < deadline:
            for sid in list(pending):
                r = self.app.get(f"/api/sessions/{sid}/status", params={"api_key": API_KEY})
                if r.status_code == 200 and r.json().get("status") == "connected":
                    pending.discard(sid)
            time.sleep(0.1)
        if pending:
            raise RuntimeError(
                f"sessions never connected: {', '.join(short(sid) for sid in sorted(pending))}"
            )
        self.say("   all six connected.")

    def _send_round(self, sessions: list[str], before: dict[str, str]) -> dict[str, str]:
        """One send per session; ``before`` is where each was last answered from."""
        owners = dict(before)
        for sid in sessions:
            started = time.perf_counter()
            r = self.app.post(
                "/api/messages/send",
                json={
                    "session_id": sid,
                    "workspace_id": WORKSPACE_ID,
                    "recipient_phone": RECIPIENT,
                    "message": "hello",
                    "type": "text",
                    "api_key": API_KEY,
                },
            )
            ms = (time.perf_counter() - started) * 1000
            owners[sid] = self.who(r)
            attempts = int(r.headers.get("x-proxy-attempts") or 1)
            colour = "green" if r.status_code == 200 else "red"
            self.say(
                f"   send via {short(sid)} -> {{{colour}}}{r.status_code}{{reset}} from "
                f"{{cyan}}{owners[sid]}{{reset}}, {_plural(attempts, 'attempt')}, {ms:.0f} ms"
            )
            old, new = before[sid], owners[sid]
            if attempts > 1:
                why = (
                    f"{old} refused the connection: ejected;"
                    if old in self.dead
                    else f'{old} answered "Session not found":'
                )
                self.say(f"     {{green}}↳ {why} found on {new}, send replayed{{reset}}")
            elif old != new:
                self.say(
                    f"     {{green}}↳ {old} already ejected: found on {new} before sending, "
                    f"no replay{{reset}}"
                )
            if r.status_code != 200:
                raise RuntimeError(f"send via {short(sid)} failed: {r.status_code} {r.text}")
        return owners


def run_demo(fast: bool = False) -> int:
    # Not a TemporaryDirectory: the logs are the demo's evidence, and it says where they are.
    workdir = Path(tempfile.mkdtemp(prefix="session-proxy-demo-"))
    demo = Demo(workdir, fast)
    try:
        return demo.run()
    except (RuntimeError, httpx.HTTPError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        for log in [*sorted(workdir.glob("*.out")), workdir / "proxy.log"]:
            text = log.read_text() if log.exists() else ""
            if text.count("\n") > 1:  # more than an instance's "listening" line
                print(f"--- {log.name} (the end) ---\n{text[-2000:]}", file=sys.stderr)
        print(f"logs kept in {workdir}", file=sys.stderr)
        return 1
    finally:
        demo.stop_all()
