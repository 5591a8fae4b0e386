"""Hostile input and broken upstreams, against real processes; each test prints what it tried."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import API_KEY
from tests.helpers.processes import ProxyProcess, Simulator

TOKEN = "hardening-admin"


def raw_exchange(port: int, data: bytes, wait: float = 3.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass
    return received


def status_of(answer: bytes) -> int | None:
    if not answer.startswith(b"HTTP/1.1 "):
        return None
    return int(answer[9:12])


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[tuple[Simulator, ProxyProcess]]:
    sim = Simulator.start(tmp_path, "h", sessions=["s1"], api_key=API_KEY, send_delay=1.0)
    proxy = ProxyProcess.start(
        tmp_path,
        {
            "SESSION_PROXY_INSTANCES": sim.url,
            "SESSION_PROXY_API_KEY": API_KEY,
            "SESSION_PROXY_ADMIN_TOKEN": TOKEN,
            "SESSION_PROXY_MAX_IN_FLIGHT_PER_CLIENT": "5",
            "SESSION_PROXY_CLIENT_HEADER_TIMEOUT": "1",
            "SESSION_PROXY_CLIENT_BODY_TIMEOUT": "1",
            "SESSION_PROXY_MAX_BODY_SIZE": "1m",
        },
        ready_path="/readyz",
    )
    try:
        yield sim, proxy
    finally:
        proxy.stop()
        sim.stop()


SMUGGLING = {
    "content-length and transfer-encoding": (
        b"POST /api/messages/send HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /api/sessions/s1/status HTTP/1.1\r\n"
        b"Host: x\r\n\r\n"
    ),
    "two content-lengths": (
        b"POST /api/messages/send HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Content-Length: 40\r\n\r\n{}{}"
    ),
    "obsolete line folding": (
        b"GET /api/sessions/s1/status HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n"
    ),
    "bare CR in a header value": (
        b"GET /api/sessions/s1/status HTTP/1.1\r\nHost: x\r\nX-Bad: a\rb\r\n\r\n"
    ),
    "bare LF in a header value": (
        b"GET /api/sessions/s1/status HTTP/1.1\r\nHost: x\r\nX-Bad: a\nX-Injected: b\r\n\r\n"
    ),
}


def test_request_smuggling_shapes_are_refused(
    guarded: tuple[Simulator, ProxyProcess],
) -> None:
    sim, proxy = guarded
    for name, data in SMUGGLING.items():
        before = len(sim.requests())
        answer = raw_exchange(proxy.port, data)
        reached = sim.requests()[before:]
        print(
            f"\n{name}: proxy answered {status_of(answer)}; reached the instance: "
            f"{[(e['method'], e['path']) for e in reached]}"
        )
        if name == "bare LF in a header value":
            # llhttp reads a lone LF as a line end: two headers, normalised, nothing smuggled.
            assert status_of(answer) in (200, 400)
            assert all(e["headers"].get("x-bad") in (None, "a") for e in reached)
            continue
        assert status_of(answer) == 400, answer[:200]
        assert reached == []


def test_expect_100_continue_is_answered_by_the_proxy(
    guarded: tuple[Simulator, ProxyProcess],
) -> None:
    """curl sends Expect: 100-continue for bodies over 1 KB; the instance must not see it."""
    sim, proxy = guarded
    body = b'{"session_id":"s1","api_key":"demo-key","recipient_phone":"1","message":"%s"}' % (
        b"x" * 2000
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(
            b"POST /api/messages/send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nx-request-id: expect-1\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        interim = sock.recv(4096)
        sock.sendall(body)
        final = b""
        while b"success" not in final:
            chunk = sock.recv(65536)
            if not chunk:
                break
            final += chunk
    seen = next(e for e in sim.requests() if e.get("request_id") == "expect-1")
    print(
        f"\nExpect: 100-continue: {interim[:25]!r} then {status_of(final)}; the instance saw "
        f"expect={seen['headers'].get('expect')!r}"
    )
    assert interim.startswith(b"HTTP/1.1 100")
    assert status_of(final) == 200
    assert "expect" not in seen["headers"]


def test_limits_headers_body_concurrency(guarded: tuple[Simulator, ProxyProcess]) -> None:
    _sim, proxy = guarded
    big = httpx.get(
        proxy.url + "/api/sessions/s1/status", headers={"x-big": "a" * 40_000}, trust_env=False
    )
    print(f"\n40 KB of headers: {big.status_code} {big.headers.get('x-proxy-error')}")
    assert big.status_code == 431 and big.headers["x-proxy-error"] == "headers-too-large"

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(
            b"POST /api/messages/send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000000\r\n\r\n{"
        )
        answer = sock.recv(4096)
        took = time.monotonic() - started
    print(
        f"5 MB declared over a 1 MiB limit: {status_of(answer)} after {took * 1000:.1f} ms, "
        "without waiting for the body"
    )
    assert status_of(answer) == 413 and b"body-too-large" in answer
    assert took < 1.0

    async def burst() -> Counter[tuple[int, str]]:
        body = {"session_id": "s1", "api_key": API_KEY, "recipient_phone": "1", "message": "m"}
        async with httpx.AsyncClient(base_url=proxy.url, trust_env=False, timeout=30) as client:
            responses = await asyncio.gather(
                *(client.post("/api/messages/send", json=body) for _ in range(12))
            )
        for r in responses:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1"
        return Counter((r.status_code, r.headers.get("x-proxy-error", "")) for r in responses)

    outcome = asyncio.run(burst())
    print(f"12 slow sends at once from one client (limit 5): {dict(outcome)}")
    assert outcome[(200, "")] == 5 and outcome[(503, "overloaded")] == 7


def test_slow_clients_are_cut_off_and_leave_nothing_behind(
    guarded: tuple[Simulator, ProxyProcess],
) -> None:
    _sim, proxy = guarded
    auth = {"authorization": f"Bearer {TOKEN}"}

    def stats() -> dict[str, int]:
        found: dict[str, int] = httpx.get(
            proxy.url + "/_proxy/stats", headers=auth, trust_env=False
        ).json()
        return found

    baseline = stats()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"GET /api/sessions/s1/status HTTP/1.1\r\nHo")
        started = time.monotonic()
        closed = sock.recv(1024) == b""
        header_cut = time.monotonic() - started
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(
            b"PUT /api/sessions/s1/metadata HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
        )
        answer = sock.recv(4096)
    print(
        f"\nheaders trickled: connection closed {closed} after {header_cut:.2f} s; "
        f"body trickled: {status_of(answer)} {b'client-timeout' in answer}"
    )
    assert closed and 0.8 < header_cut < 3
    assert status_of(answer) == 408 and b"client-timeout" in answer
    # Polled for (up to 5 s) instead of a fixed 0.5 s: the cut connections' tasks and fds go.
    deadline = time.monotonic() + 5.0
    after = stats()
    while time.monotonic() < deadline and not (
        after["asyncio_tasks"] <= baseline["asyncio_tasks"]
        and after["open_fds"] <= baseline["open_fds"]
    ):
        time.sleep(0.05)
        after = stats()
    print(
        f"tasks {baseline['asyncio_tasks']} -> {after['asyncio_tasks']}, "
        f"fds {baseline['open_fds']} -> {after['open_fds']}"
    )
    assert after["asyncio_tasks"] <= baseline["asyncio_tasks"]
    assert after["open_fds"] <= baseline["open_fds"]


class BrokenInstance:
    """An instance that answers /health properly and /bad/<mode> badly."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.seen: Counter[str] = Counter()
        self.writers: list[asyncio.StreamWriter] = []
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(5)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0)
        )
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        while True:
            head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
            if not head:
                return
            path = head.split(b" ")[1].decode()
            self.seen[path] += 1
            if path.startswith("/health"):
                body = b'{"status":"healthy","sessions":{"total":0}}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
            elif path == "/bad/garbage":
                writer.write(b"NOT HTTP AT ALL\r\n\r\n")
                writer.close()
                return
            elif path == "/bad/truncated":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                writer.close()
                return
            elif path == "/bad/hugeheader":
                writer.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
            elif path == "/bad/redirect":
                writer.write(
                    b"HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/latest/\r\n"
                    b"Content-Length: 0\r\n\r\n"
                )
            elif path == "/bad/eof":  # no length, no chunks: the body ends at the close
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
                writer.close()
                return
            elif path == "/bad/continue":  # an interim 100 before the answer
                writer.write(
                    b"HTTP/1.1 100 Continue\r\n\r\n"
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"
                )
            elif path == "/bad/silent":
                await asyncio.sleep(3600)  # on purpose: an upstream that never answers
            await writer.drain()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_broken_upstreams_end_in_clear_proxy_errors(tmp_path: Path) -> None:
    broken = BrokenInstance()
    proxy = ProxyProcess.start(
        tmp_path,
        {
            "SESSION_PROXY_INSTANCES": f"http://127.0.0.1:{broken.port}",
            "SESSION_PROXY_PASSTHROUGH_ROUTES": "/health,/bad/*",
            "SESSION_PROXY_ROUTE_TIMEOUTS": "/=1",
            "SESSION_PROXY_HEALTH_INTERVAL": "60",
            "SESSION_PROXY_EJECT_AFTER_FAILURES": "3",
            "SESSION_PROXY_ADMIN_TOKEN": TOKEN,
        },
        ready_path="/readyz",
    )
    expected = {
        "garbage": (502, "upstream-bad-response"),
        "truncated": (502, "upstream-ambiguous"),
        "hugeheader": (502, "upstream-bad-response"),
        "silent": (504, "upstream-timeout"),
    }
    try:
        # First, while the instance is still in good standing: a redirect is not followed, and
        # answers that are unusual but valid HTTP come through whole.
        redirect = httpx.get(proxy.url + "/bad/redirect", trust_env=False, timeout=10)
        close_delimited = httpx.get(proxy.url + "/bad/eof", trust_env=False, timeout=10)
        interim = httpx.get(proxy.url + "/bad/continue", trust_env=False, timeout=10)
        results = {}
        for mode in expected:
            r = httpx.post(proxy.url + f"/bad/{mode}", content=b"{}", trust_env=False, timeout=10)
            results[mode] = (r.status_code, r.headers.get("x-proxy-error"))
        instances = httpx.get(
            proxy.url + "/_proxy/instances",
            headers={"authorization": f"Bearer {TOKEN}"},
            trust_env=False,
        ).json()["instances"]
    finally:
        proxy.stop()
        broken.stop()
    print(
        f"\nbroken upstream answers: {results}; redirect: {redirect.status_code} "
        f"{redirect.headers.get('location')}; the instance after them: "
        f"ejected={instances[0]['ejected']}, last error {instances[0]['last_error']!r}"
    )
    assert results == expected
    assert (close_delimited.status_code, close_delimited.text) == (200, "all of it")
    assert (interim.status_code, interim.text) == (200, "final")
    assert redirect.status_code == 302  # passed on as the instance said it, never followed
    assert redirect.headers["location"] == "http://169.254.169.254/latest/"
    assert broken.seen["/bad/redirect"] == 1 and broken.seen["/latest/"] == 0
    assert instances[0]["ejected"] is True  # it kept failing
