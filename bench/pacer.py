"""An open-loop HTTP/1.1 load generator: requests sent on a fixed schedule, latency measured
from the time each one was due (not from when it went out), so that a slow answer is counted
against every request it held up instead of quietly slowing the load down (what wrk2 does;
wrk2 is not packaged for Debian).

    python bench/pacer.py PORT RATE CONNECTIONS SECONDS REQUESTS.json [WARMUP]
    python bench/pacer.py PORT,PORT,... RATE CONNECTIONS SECONDS A.json,B.json,... [WARMUP]

``REQUESTS.json`` is a list of raw requests (latin-1 strings) sent in turn. Request ``k`` is due
at ``start + k / RATE`` on connection ``k % CONNECTIONS``; if that connection still waits for
an earlier answer, the request waits for it (and that wait counts in its latency). One process,
one thread, ``select`` (microsecond timeouts, where ``epoll``'s are milliseconds), blocking
nowhere. Prints one JSON object: the latencies (us) of the requests due after ``WARMUP`` s,
how late each request whose connection was free went out against its schedule (the pacer's
own jitter), and the errors. With several ports (and as many request files), each target
gets its own connections and its own schedule at RATE, the schedules interleaved in one loop
(``run_interleaved``), and the output is a list, one object per target.
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


class Target:
    """One target's connections, schedule and results within a run."""

    def __init__(
        self, port: int, requests: list[bytes], connections: int, offset: float, total: int
    ) -> None:
        self.conns = [Conn(port) for _ in range(connections)]
        self.requests = requests
        self.offset = offset  # its schedule's shift, so interleaved targets alternate
        self.total = total
        self.k = 0  # requests scheduled so far
        self.sent = 0
        self.answered = 0
        self.latencies: list[int] = []
        self.lateness: list[int] = []
        self.errors = {"status": 0, "closed": 0, "timeout": 0}

    def result(self, rate: float, seconds: float) -> dict[str, object]:
        return {
            "rate": rate,
            "connections": len(self.conns),
            "seconds": seconds,
            "counted": len(self.latencies),
            "latencies_us": self.latencies,
            "p50_us": percentile(self.latencies, 50),
            "p99_us": percentile(self.latencies, 99),
            "send_late_p50_us": percentile(self.lateness, 50),
            "send_late_p99_us": percentile(self.lateness, 99),
            "send_late_max_us": max(self.lateness, default=0),
            "errors": self.errors,
        }


def run(
    port: int, rate: float, connections: int, seconds: float, requests: list[bytes], warmup: float
) -> dict[str, object]:
    return run_interleaved([(port, requests)], rate, connections, seconds, warmup)[0]


def run_interleaved(
    targets: list[tuple[int, list[bytes]]],
    rate: float,
    connections: int,
    seconds: float,
    warmup: float,
) -> list[dict[str, object]]:
    """Every target at ``rate`` on its own ``connections``, in one loop: target ``t``'s request
    ``k`` is due at ``start + (k + t / len(targets)) / rate``. A stall of the machine (or of
    this process) then falls on all of them alike, instead of on whichever ran at the time."""
    total = int(rate * seconds)
    interval = 1.0 / rate
    runs = [
        Target(port, requests, connections, t * interval / len(targets), total)
        for t, (port, requests) in enumerate(targets)
    ]
    by_fd = {c.sock.fileno(): (r, c) for r in runs for c in r.conns}
    start = time.perf_counter() + 0.05
    counted_from = start + warmup
    deadline = start + seconds + 10

    def send(r: Target, conn: Conn, due: float, now: float, idle: bool) -> None:
        conn.sent_at = due
        conn.sock.send(r.requests[r.sent % len(r.requests)])
        r.sent += 1
        # Only a request whose connection was free when it fell due shows the pacer's own
        # lateness; one sent as the answer before it arrived waited for the target.
        if idle and due >= counted_from:
            r.lateness.append(int((now - due) * 1e6))

    def next_due(r: Target) -> float:
        return start + r.offset + r.k * interval

    while any(r.answered < r.total for r in runs):
        now = time.perf_counter()
        if now > deadline:
            for r in runs:
                r.errors["timeout"] += r.total - r.answered
            break
        for r in runs:
            while r.k < r.total and next_due(r) <= now:
                r.conns[r.k % len(r.conns)].due.append(next_due(r))
                r.k += 1
            for conn in r.conns:
                if conn.sent_at is None and conn.due:
                    send(r, conn, conn.due.popleft(), time.perf_counter(), True)
        waiting = [c.sock for r in runs for c in r.conns if c.sent_at is not None]
        pending = [next_due(r) for r in runs if r.k < r.total]
        wait = max(0.0, min(pending) - time.perf_counter()) if pending else 0.5
        readable = select.select(waiting, [], [], wait)[0] if waiting else []
        if not waiting and wait > 0:
            time.sleep(wait)
        for sock in readable:
            r, conn = by_fd[sock.fileno()]
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            got = time.perf_counter()
            if not data:
                r.errors["closed"] += 1
                r.answered += 1
                del by_fd[sock.fileno()]
                conn.reopen()
                by_fd[conn.sock.fileno()] = (r, conn)
                continue
            conn.buf += data
            while conn.sent_at is not None and (end := answer_end(conn.buf)) is not None:
                status, length = end
                del conn.buf[:length]
                if conn.sent_at >= counted_from:
                    r.latencies.append(int((got - conn.sent_at) * 1e6))
                if status >= 400:
                    r.errors["status"] += 1
                r.answered += 1
                conn.sent_at = None
                if conn.due:
                    send(r, conn, conn.due.popleft(), got, False)
    for r in runs:
        for conn in r.conns:
            conn.sock.close()
    return [r.result(rate, seconds) for r in runs]


def main(argv: list[str]) -> int:
    port, rate, connections, seconds, path = argv[:5]
    warmup = float(argv[5]) if len(argv) > 5 else 0.5
    # PORT,PORT,... with PATH,PATH,...: those targets interleaved; one JSON list of results.
    ports, paths = port.split(","), path.split(",")
    targets = [
        (int(p), [r.encode("latin-1") for r in json.loads(Path(f).read_text())])
        for p, f in zip(ports, paths, strict=True)
    ]
    results = run_interleaved(targets, float(rate), int(connections), float(seconds), warmup)
    print(json.dumps(results if len(targets) > 1 else results[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
