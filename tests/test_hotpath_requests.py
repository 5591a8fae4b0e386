"""The hot path's shortcuts (issue 17) change nothing a client or an operator can see: a body
that comes after its headers is still waited for and forwarded whole, request ids keep their
form and stay unique, and ``/metrics`` counts every request the moment it is read."""

from __future__ import annotations

import json
import multiprocessing
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy import observe
from tests.conftest import API_KEY
from tests.helpers.processes import ProxyProcess, Simulator

SID = "hotpath-1"
KEY = {"api_key": API_KEY}


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Simulator, ProxyProcess]]:
    sim = Simulator.start(tmp_path, "hp", sessions=[SID], api_key=API_KEY)
    proxy = ProxyProcess.start(
        tmp_path,
        {
            "SESSION_PROXY_INSTANCES": sim.url,
            "SESSION_PROXY_API_KEY": API_KEY,
            "SESSION_PROXY_CLIENT_BODY_TIMEOUT": "2",
        },
        ready_path="/readyz",
    )
    try:
        yield sim, proxy
    finally:
        proxy.stop()
        sim.stop()


def _send_body(text: str) -> bytes:
    document = {
        "session_id": SID,
        "workspace_id": 1,
        "recipient_phone": "628120001111",
        "message": text,
        "type": "text",
        "api_key": API_KEY,
    }
    return json.dumps(document).encode()


def _answer(sock: socket.socket) -> tuple[int, bytes]:
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(65536)
    return int(head[9:12]), body


def test_a_body_sent_after_its_headers_is_waited_for_and_forwarded_whole(
    stack: tuple[Simulator, ProxyProcess],
) -> None:
    """The body is not in the server's hands when the app asks for it: the wait that follows
    (the slow path, with the body timeout armed) gets it, in pieces, and the send goes out."""
    sim, proxy = stack
    body = _send_body("late body")
    head = (
        b"POST /api/messages/send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-Request-Id: late-body-1\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(head)
        time.sleep(0.3)  # on purpose: the app is already waiting for the body
        sock.sendall(body[:10])
        time.sleep(0.3)
        sock.sendall(body[10:])
        status, answer = _answer(sock)
        # The same connection serves the next request with its body in the first packet.
        sock.sendall(head.replace(b"late-body-1", b"late-body-2") + body)
        second, _ = _answer(sock)
    print(f"\nbody after its headers: {status} {answer[:80]!r}; then in one packet: {second}")
    assert status == 200 and json.loads(answer)["success"] is True
    assert second == 200
    # The instance parsed both bodies (a cut one would be its own 400 for malformed JSON).
    sent = [(r["request_id"], r["status"]) for r in sim.requests() if r["method"] == "POST"]
    assert sent == [("late-body-1", 200), ("late-body-2", 200)]


def test_a_body_that_stops_coming_is_cut_off_at_the_body_timeout(
    stack: tuple[Simulator, ProxyProcess],
) -> None:
    _sim, proxy = stack
    body = _send_body("never finished")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(
            b"POST /api/messages/send HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body[:20]
        )
        started = time.monotonic()
        status, answer = _answer(sock)
        waited = time.monotonic() - started
    print(f"\nbody stalled: {status} after {waited:.2f} s")
    assert status == 408 and json.loads(answer)["code"] == "client-timeout"
    assert 1.8 < waited < 5


def test_request_ids_are_32_hex_digits_and_unique(stack: tuple[Simulator, ProxyProcess]) -> None:
    _sim, proxy = stack
    ids = set()
    with httpx.Client(base_url=proxy.url, trust_env=False) as client:
        for _ in range(50):
            answer = client.get(f"/api/sessions/{SID}/status", params=KEY)
            assert answer.status_code == 200
            ids.add(answer.headers["x-request-id"])
        kept = client.get(
            f"/api/sessions/{SID}/status", params=KEY, headers={"x-request-id": "mine-1"}
        )
    assert len(ids) == 50
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in ids)
    assert kept.headers["x-request-id"] == "mine-1"


def _ids_in_child(queue: multiprocessing.Queue[list[str]]) -> None:
    queue.put([observe.new_request_id() for _ in range(1000)])


def test_a_forked_worker_makes_ids_of_its_own() -> None:
    """Workers fork from one process: their ids must not repeat the parent's sequence."""
    observe.new_request_id()  # the generator is in use before the fork
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[list[str]] = context.Queue()
    child = context.Process(target=_ids_in_child, args=(queue,))
    child.start()
    theirs = queue.get(timeout=10)
    child.join(10)
    ours = [observe.new_request_id() for _ in range(1000)]
    assert not set(ours) & set(theirs)
    assert len(set(ours)) == len(set(theirs)) == 1000


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        metric, _, rest = series.partition("{")
        if metric != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return 0.0


def test_metrics_count_every_request_as_soon_as_they_are_read(
    stack: tuple[Simulator, ProxyProcess],
) -> None:
    """Counted in plain numbers per request, added at each scrape: every scrape is exact."""
    sim, proxy = stack
    with httpx.Client(base_url=proxy.url, trust_env=False) as client:
        before = client.get("/metrics").text
        for n in range(1, 4):
            for _ in range(n * 10):
                assert client.get(f"/api/sessions/{SID}/status", params=KEY).status_code == 200
            assert client.get("/api/sessions/nobody!/status").status_code == 400
            after = client.get("/metrics").text
            proxied = _sample(
                after, "session_proxy_requests_total", outcome="proxied", status_class="2xx"
            ) - _sample(
                before, "session_proxy_requests_total", outcome="proxied", status_class="2xx"
            )
            errors = _sample(
                after, "session_proxy_requests_total", outcome="error", status_class="4xx"
            ) - _sample(before, "session_proxy_requests_total", outcome="error", status_class="4xx")
            timed = _sample(after, "session_proxy_request_seconds_count") - _sample(
                before, "session_proxy_request_seconds_count"
            )
            within = _sample(after, "session_proxy_request_seconds_bucket", le="+Inf") - _sample(
                before, "session_proxy_request_seconds_bucket", le="+Inf"
            )
            upstream = _sample(
                after, "session_proxy_upstream_seconds_count", instance=sim.url
            ) - _sample(before, "session_proxy_upstream_seconds_count", instance=sim.url)
            print(f"\nafter {n * 10} GETs and 1 refusal: {proxied} proxied, {errors} errors")
            assert proxied == n * 10 and errors == 1
            assert timed == within == n * 10 + 1
            assert upstream >= n * 10  # and the health checks' own
            before = after
    assert "session_proxy_request_seconds_sum" in after
    assert "session_proxy_requests_created" in after
