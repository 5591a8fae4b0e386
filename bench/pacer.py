"""An open-loop HTTP/1.1 load generator: requests sent on a fixed schedule, latency measured
from the time each one was due (not from when it went out), so that a slow answer is counted
against every request it held up instead of quietly slowing the load down (what wrk2 does;
wrk2 is not packaged for Debian).

    python bench/pacer.py PORT RATE CONNECTIONS SECONDS REQUESTS.json [WARMUP]

``REQUESTS.json`` is a list of raw requests (latin-1 strings) sent in turn. Request ``k`` is due
at ``start + k / RATE`` on connection ``k % CONNECTIONS``; if that connection still waits for
an earlier answer, the request waits for it (and that wait counts in its latency). One process,
one thread, ``select`` (microsecond timeouts, where ``epoll``'s are milliseconds), blocking
nowhere. Prints one JSON object: the latencies (us) of the requests due after ``WARMUP`` s,
how late each request whose connection was free went out against its schedule (the pacer's
own jitter), and the errors.
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time
from collections import deque
from pathlib import Path

HOST = "127.0.0.1"


class Conn:
    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = self._open()
        self.due: deque[float] = deque()  # schedule times of requests waiting for this conn
        self.sent_at: float | None = None  # schedule time of the request on the wire
        self.buf = bytearray()

    def _open(self) -> socket.socket:
        sock = socket.create_connection((HOST, self.port), timeout=5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        return sock

    def reopen(self) -> None:
        self.sock.close()
        self.sock = self._open()
        self.sent_at = None
        self.buf.clear()


def answer_end(buf: bytearray) -> tuple[int, int] | None:
    """(status, length of the first whole answer in ``buf``), or None while it is incomplete."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = bytes(buf[:head_end]).lower()
    status = int(head[9:12])
    body_start = head_end + 4
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name == b"content-length":
            end = body_start + int(value)
            return (status, end) if len(buf) >= end else None
        if name == b"transfer-encoding" and b"chunked" in value:
            last = buf.find(b"\r\n0\r\n\r\n", body_start - 2)
            return (status, last + 7) if last >= 0 else None
    return (status, body_start)  # no body (a 204, or a close-delimited one: not expected here)


def percentile(values: list[int], q: float) -> int:
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def run(
    port: int, rate: float, connections: int, seconds: float, requests: list[bytes], warmup: float
) -> dict[str, object]:
    conns = [Conn(port) for _ in range(connections)]
    by_fd = {c.sock.fileno(): c for c in conns}
    total = int(rate * seconds)
    interval = 1.0 / rate
    latencies: list[int] = []
    lateness: list[int] = []
    errors = {"status": 0, "closed": 0, "timeout": 0}
    start = time.perf_counter() + 0.05
    counted_from = start + warmup
    k = answered = 0
    deadline = start + seconds + 10
    sent = [0]

    def send(conn: Conn, due: float, now: float, idle: bool) -> None:
        conn.sent_at = due
        conn.sock.send(requests[sent[0] % len(requests)])
        sent[0] += 1
        # Only a request whose connection was free when it fell due shows the pacer's own
        # lateness; one sent as the answer before it arrived waited for the target.
        if idle and due >= counted_from:
            lateness.append(int((now - due) * 1e6))

    while answered < total:
        now = time.perf_counter()
        if now > deadline:
            errors["timeout"] += total - answered
            break
        while k < total and start + k * interval <= now:
            conns[k % connections].due.append(start + k * interval)
            k += 1
        for conn in conns:
            if conn.sent_at is None and conn.due:
                send(conn, conn.due.popleft(), time.perf_counter(), True)
        waiting = [c.sock for c in conns if c.sent_at is not None]
        wait = max(0.0, start + k * interval - time.perf_counter()) if k < total else 0.5
        readable = select.select(waiting, [], [], wait)[0] if waiting else []
        if not waiting and wait > 0:
            time.sleep(wait)
        for sock in readable:
            conn = by_fd[sock.fileno()]
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            got = time.perf_counter()
            if not data:
                errors["closed"] += 1
                answered += 1
                del by_fd[sock.fileno()]
                conn.reopen()
                by_fd[conn.sock.fileno()] = conn
                continue
            conn.buf += data
            while conn.sent_at is not None and (end := answer_end(conn.buf)) is not None:
                status, length = end
                del conn.buf[:length]
                if conn.sent_at >= counted_from:
                    latencies.append(int((got - conn.sent_at) * 1e6))
                if status >= 400:
                    errors["status"] += 1
                answered += 1
                conn.sent_at = None
                if conn.due:
                    send(conn, conn.due.popleft(), got, False)
    for conn in conns:
        conn.sock.close()
    return {
        "rate": rate,
        "connections": connections,
        "seconds": seconds,
        "counted": len(latencies),
        "latencies_us": latencies,
        "p50_us": percentile(latencies, 50),
        "p99_us": percentile(latencies, 99),
        "send_late_p50_us": percentile(lateness, 50),
        "send_late_p99_us": percentile(lateness, 99),
        "send_late_max_us": max(lateness, default=0),
        "errors": errors,
    }


def main(argv: list[str]) -> int:
    port, rate, connections, seconds, path = argv[:5]
    warmup = float(argv[5]) if len(argv) > 5 else 0.5
    requests = [r.encode("latin-1") for r in json.loads(Path(path).read_text())]
    result = run(int(port), float(rate), int(connections), float(seconds), requests, warmup)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
