"""Self-tests for the test helpers: FaultyHop's modes as an HTTP client sees them, and the
process helpers, against a tiny in-test HTTP server (no simulator or proxy needed)."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.helpers.faults import FaultyHop, _RequestFramer
from tests.helpers.processes import (
    ProcessExitedError,
    Simulator,
    free_port,
    live_processes,
    process_scope,
    spawn,
    wait_http,
)

SHORT = 0.3  # a client timeout long enough for loopback, short enough to keep tests fast


class Upstream:
    """A minimal HTTP/1.1 keep-alive server that records what reached it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bytes]] = []
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                if "chunked" in (self.headers.get("transfer-encoding") or ""):
                    body = self._read_chunked()
                seen.append((self.command, self.path, body))
                status = 404 if self.path == "/missing" else 200
                payload = json.dumps({"path": self.path, "size": len(body)}).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _read_chunked(self) -> bytes:
                body = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return body

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def paths(self) -> list[str]:
        return [path for _, path, _ in self.seen]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.close()


@pytest.fixture
def hop(upstream: Upstream) -> Iterator[FaultyHop]:
    with FaultyHop(upstream.port) as running:
        yield running
    assert not running.errors


def client(timeout: float = 2.0) -> httpx.Client:
    return httpx.Client(timeout=timeout, trust_env=False)


def eventually(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# --- the modes -----------------------------------------------------------------------------------


def test_pass_forwards_both_ways(hop: FaultyHop, upstream: Upstream) -> None:
    with client() as c:
        response = c.get(hop.url + "/a")
        assert response.status_code == 200
        assert response.json() == {"path": "/a", "size": 0}
        # A Content-Length body, then a chunked one, on the same keep-alive connection.
        assert c.post(hop.url + "/b", content=b"x" * 100_000).json()["size"] == 100_000
        chunks = iter([b"ab", b"cd" * 1000])
        assert c.post(hop.url + "/c", content=chunks).json()["size"] == 2002
    assert upstream.paths() == ["/a", "/b", "/c"]
    assert hop.connections == 1
    assert hop.requests_forwarded == 3


def test_latency_delays_each_direction(hop: FaultyHop) -> None:
    hop.set_mode("latency", seconds=0.2)
    with client() as c:
        started = time.monotonic()
        assert c.get(hop.url + "/slow").status_code == 200
        elapsed = time.monotonic() - started
    # 0.2 s on the way there and 0.2 s on the way back.
    assert elapsed >= 0.39


def test_stall_never_answers(hop: FaultyHop, upstream: Upstream) -> None:
    hop.set_mode("stall")
    with client(SHORT) as c, pytest.raises(httpx.ReadTimeout):
        c.get(hop.url + "/hang")
    assert upstream.seen == []
    assert hop.requests_forwarded == 0


def test_reset_after_request_loses_only_the_response(hop: FaultyHop, upstream: Upstream) -> None:
    hop.set_mode("reset_after_request")
    with client() as c, pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        c.post(hop.url + "/send", json={"to": "someone"})
    # Checked right after the client failed: the hop waits for the upstream's answer first.
    assert upstream.paths() == ["/send"]
    assert hop.requests_forwarded == 1
    assert hop.faults_injected == 1


def test_reset_before_request_forwards_nothing(hop: FaultyHop, upstream: Upstream) -> None:
    hop.set_mode("reset_before_request")
    # Depending on when the RST lands, httpx reports it while connecting, writing or reading.
    with (
        client() as c,
        pytest.raises(
            (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)
        ),
    ):
        c.post(hop.url + "/send", json={"to": "someone"})
    time.sleep(0.05)  # on purpose: the claim is that nothing arrives, so there is nothing to poll
    assert upstream.seen == []
    assert hop.requests_forwarded == 0
    assert hop.connections == 1


def test_refuse_then_listen_again_on_the_same_port(hop: FaultyHop) -> None:
    port = hop.port
    hop.set_mode("refuse")
    with client() as c, pytest.raises(httpx.ConnectError):
        c.get(hop.url + "/")
    hop.set_mode("pass")
    assert hop.port == port
    with client() as c:
        assert c.get(hop.url + "/back").status_code == 200


def test_blackhole_times_out(hop: FaultyHop, upstream: Upstream) -> None:
    hop.set_mode("blackhole")
    with client(SHORT) as c, pytest.raises(httpx.ReadTimeout):
        c.get(hop.url + "/void")
    assert upstream.seen == []


def test_close_after_request_is_an_empty_reply(hop: FaultyHop, upstream: Upstream) -> None:
    hop.set_mode("close_after_request")
    with (
        client() as c,
        pytest.raises(httpx.RemoteProtocolError, match="without sending a response"),
    ):
        c.get(hop.url + "/once")
    assert upstream.paths() == ["/once"]
    assert hop.requests_forwarded == 1


# --- mode changes and existing connections --------------------------------------------------------


def test_new_mode_reaches_a_pooled_connection(hop: FaultyHop, upstream: Upstream) -> None:
    with client(SHORT) as c:
        assert c.get(hop.url + "/1").status_code == 200
        hop.set_mode("stall")
        with pytest.raises(httpx.ReadTimeout):
            c.get(hop.url + "/2")
    assert hop.connections == 1
    assert upstream.paths() == ["/1"]


def test_after_request_modes_apply_on_a_pooled_connection(
    hop: FaultyHop, upstream: Upstream
) -> None:
    with client() as c:
        assert c.get(hop.url + "/1").status_code == 200
        hop.set_mode("close_after_request")
        with pytest.raises(httpx.RemoteProtocolError):
            c.get(hop.url + "/2")
        hop.set_mode("pass")
        assert c.get(hop.url + "/3").status_code == 200
    assert upstream.paths() == ["/1", "/2", "/3"]
    assert hop.connections == 2


def test_refuse_resets_existing_connections(hop: FaultyHop) -> None:
    hop.set_mode("stall")
    stalled = socket.create_connection(("127.0.0.1", hop.port), timeout=2)
    stalled.sendall(b"GET /0 HTTP/1.1\r\nHost: x\r\n\r\n")
    eventually(lambda: hop.connections == 1)  # the hop picks the mode when it accepts
    hop.set_mode("pass")
    with stalled, socket.create_connection(("127.0.0.1", hop.port), timeout=2) as sock:
        sock.sendall(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while not reply.endswith(b"}"):  # the whole JSON body, which may come in two segments
            reply += sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200")
        hop.set_mode("refuse")
        with pytest.raises(ConnectionResetError):
            sock.recv(65536)
        with pytest.raises(ConnectionResetError):
            stalled.recv(65536)


async def test_works_from_an_async_test(hop: FaultyHop) -> None:
    async with httpx.AsyncClient(timeout=2, trust_env=False) as c:
        assert (await c.get(hop.url + "/async")).status_code == 200
        hop.set_mode("reset_before_request")
        with pytest.raises(httpx.TransportError):
            await c.get(hop.url + "/async")


def test_dead_upstream_looks_like_a_reset() -> None:
    with FaultyHop(free_port()) as dead, client() as c, pytest.raises(httpx.TransportError):
        c.get(dead.url + "/")


def test_set_mode_validates_its_arguments(hop: FaultyHop) -> None:
    with pytest.raises(ValueError):
        hop.set_mode("flaky")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        hop.set_mode("latency")
    with pytest.raises(TypeError):
        hop.set_mode("stall", seconds=1)
    assert hop.mode == "pass"


def test_stop_closes_everything_and_joins_the_thread(upstream: Upstream) -> None:
    threads_before = threading.active_count()
    hop = FaultyHop(upstream.port).start()
    hop.set_mode("stall")
    stalled = socket.create_connection(("127.0.0.1", hop.port), timeout=2)
    stalled.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    eventually(lambda: hop.connections == 1)
    hop.set_mode("blackhole")
    holed = socket.create_connection(("127.0.0.1", hop.port), timeout=2)
    eventually(lambda: hop.connections == 2)
    hop.stop()
    hop.stop()
    assert not hop.running
    assert threading.active_count() == threads_before
    for sock in (stalled, holed):
        # The hop is gone: either a clean EOF or a reset, but never a hang.
        with sock, contextlib.suppress(ConnectionResetError):
            assert sock.recv(1) == b""
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", hop.port), timeout=1).close()
    assert hop.connections == 2
    assert not hop.errors


def test_request_framer_across_arbitrary_splits() -> None:
    stream = (
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /b HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
        b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: 1\r\n\r\n"
        b"GET /d HTTP/1.1\r\n\r\n"
    )
    for step in (1, 2, 7, len(stream)):
        framer = _RequestFramer()
        completed = [framer.feed(stream[i : i + step]) for i in range(0, len(stream), step)]
        assert sum(completed) == 4
        assert framer.idle
    framer = _RequestFramer()
    assert framer.feed(b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert framer.raw


# --- process helpers -----------------------------------------------------------------------------


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_wait_http(upstream: Upstream) -> None:
    wait_http(upstream.url + "/health", timeout=2)
    wait_http(upstream.url + "/missing", timeout=2, ok=lambda status: status < 500)
    with pytest.raises(TimeoutError, match="HTTP 404"):
        wait_http(upstream.url + "/missing", timeout=0.3)
    with pytest.raises(TimeoutError, match="ConnectError"):
        wait_http(f"http://127.0.0.1:{free_port()}/", timeout=0.3)


def test_wait_http_reports_a_dead_child(tmp_path: Path) -> None:
    script = "import sys; print('cannot start: bad config', file=sys.stderr); sys.exit(3)"
    proc = spawn([sys.executable, "-c", script], output=tmp_path / "child.out")
    with pytest.raises(ProcessExitedError, match=r"(?s)exited with 3.*bad config"):
        wait_http(f"http://127.0.0.1:{free_port()}/", timeout=10, proc=proc)


def test_process_scope_kills_what_it_started(tmp_path: Path) -> None:
    port = free_port()
    with process_scope():
        proc = spawn(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
            output=tmp_path / "http.out",
            cwd=tmp_path,
        )
        wait_http(f"http://127.0.0.1:{port}/", timeout=10, proc=proc)
        assert proc in live_processes()
    assert proc.poll() is not None
    assert proc not in live_processes()


def test_simulator_events_tolerate_a_torn_last_line(tmp_path: Path) -> None:
    sim = Simulator(tmp_path, "a", 1, api_key="k", connect_delay=0, send_delay=0, start_timeout=1)
    assert sim.events() == []
    sim.log_path.write_text(
        '{"event": "request", "path": "/x"}\n{"event": "sent", "session_id": "s"}\n{"event": "re'
    )
    assert [e["event"] for e in sim.events()] == ["request", "sent"]
    assert sim.requests() == [{"event": "request", "path": "/x"}]
    sim._drop_torn_tail()
    assert sim.log_path.read_text().endswith('"s"}\n')


def test_simulator_helper_round_trip(tmp_path: Path) -> None:
    # Exercises the helper against the real simulator when it exists; the rest of this file
    # never depends on it.
    if not (Path(__file__).parents[1] / "proxy" / "simulator.py").exists():
        pytest.skip("proxy/simulator.py not written yet")
    with Simulator.start(tmp_path, "alpha", sessions=["s1"]) as sim:
        sim.add_session("s2")
        with client() as c:
            response = c.get(sim.url + "/api/sessions/s2/status", params={"api_key": "demo-key"})
        assert response.status_code == 200
        assert any(e.get("session_id") == "s2" for e in sim.requests())
        before = len(sim.events())
        port = sim.port
        sim.kill()
        assert not sim.alive
        sim.restart()
        assert sim.alive
        assert sim.port == port
        assert len(sim.events()) > before
        sim.drop_session("s1")
    assert not sim.alive
    assert sim.proc not in live_processes()
