"""The fast upstream client against raw-socket instances written here: exact bytes in, exact
bytes out. Each instance is a thread per connection on 127.0.0.1 that records every byte the
client wrote and answers with bytes spelled out in the test. Every test runs on the asyncio
loop and on uvloop (the production loop), each bounded to 20 s; every wait below is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

import httpx
import pytest
import uvloop
from uvicorn.config import Config
from uvicorn.server import ServerState

from proxy import client as client_module
from proxy import forward
from proxy.client import FastClient, HttpxClient, Timeouts
from proxy.errors import (
    ClientTooSlow,
    Overloaded,
    UpstreamBadResponse,
    UpstreamTimeout,
)
from proxy.server import GuardedHttpTools

HOST = [(b"host", b"up")]
QUICK = Timeouts(1.0, 2.0)
NOT_FOUND = b'{"error":"Session not found"}'
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
WAIT = 5.0  # the longest any instance thread blocks on one step
# uvloop runs timers on libuv's cached millisecond clock: one can fire up to a millisecond before
# its delay has passed on time.monotonic() (0.1996 s for a 0.2 s timeout was seen in CI)
EARLY = 0.002


# --- the instances -------------------------------------------------------------------------------


class Peer:
    """One accepted connection, seen from the instance: reads requests, writes raw answers."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(WAIT)
        self.received = bytearray()  # every byte the client wrote, in order
        self._unread = bytearray()
        self.eof = threading.Event()  # the client closed (or reset) the connection

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except (ConnectionError, TimeoutError, OSError):
            data = b""
        if not data:
            self.eof.set()
            return False
        self.received += data
        self._unread += data
        return True

    def _take(self, size: int) -> bytes:
        while len(self._unread) < size:
            if not self._fill():
                raise EOFError
        taken = bytes(self._unread[:size])
        del self._unread[:size]
        return taken

    def _line(self) -> bytes:
        for _ in range(1000):
            if b"\r\n" in self._unread:
                return self._take(self._unread.index(b"\r\n") + 2)
            if not self._fill():
                break
        raise EOFError

    def read_head(self) -> bytes:
        for _ in range(10_000):
            if b"\r\n\r\n" in self._unread:
                return self._take(self._unread.index(b"\r\n\r\n") + 4)
            if not self._fill():
                break
        raise EOFError

    def read_request(self) -> bytes:
        """One whole request as it arrived: its head, then a body framed by length or chunks."""
        head = self.read_head()
        lines = [line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line]
        fields = {name.strip().lower(): value.strip() for name, value in lines}
        if b"content-length" in fields:
            return head + self._take(int(fields[b"content-length"]))
        if fields.get(b"transfer-encoding") == b"chunked":
            body = b""
            for _ in range(100_000):
                size_line = self._line()
                body += size_line
                size = int(size_line.strip(), 16)
                body += self._take(size + 2)
                if size == 0:
                    return head + body
        return head

    def path(self, request: bytes) -> bytes:
        return request.split(b" ", 2)[1]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def until_eof(self) -> None:
        """Read (and record) whatever the client still writes, until it closes."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and self._fill():
            pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class Instance:
    """A listening socket on loopback; each connection runs ``handler(peer)`` in a thread."""

    def __init__(self, handler: Callable[[Peer], None], rcvbuf: int | None = None) -> None:
        self.handler = handler
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf is not None:  # inherited by accepted sockets: the instance stops taking bytes
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.peers: list[Peer] = []
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stop.is_set() and len(self.peers) < 1000:
            try:
                sock, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            peer = Peer(sock)
            self.peers.append(peer)
            thread = threading.Thread(target=self._serve, args=(peer,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, peer: Peer) -> None:
        try:
            self.handler(peer)
        except (EOFError, ConnectionError):
            pass
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            peer.close()

    def wait_eof(self, count: int, seconds: float = 2.0) -> int:
        """How many connections the client has closed, once ``count`` have or time is up."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            closed = sum(peer.eof.is_set() for peer in self.peers)
            if closed >= count:
                return closed
            time.sleep(0.01)
        return sum(peer.eof.is_set() for peer in self.peers)

    async def eofs(self, count: int, seconds: float = 2.0) -> int:
        """``wait_eof`` from inside the loop, which must run for the client's closes to happen."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if sum(peer.eof.is_set() for peer in self.peers) >= count:
                break
            await asyncio.sleep(0.01)
        return sum(peer.eof.is_set() for peer in self.peers)

    def stop(self) -> None:
        self._stop.set()
        self._acceptor.join(2)
        self.sock.close()
        for peer in self.peers:
            with contextlib.suppress(OSError):
                peer.sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(2)
        assert not self.errors, self.errors


@contextlib.contextmanager
def instance(handler: Callable[[Peer], None], rcvbuf: int | None = None) -> Iterator[Instance]:
    running = Instance(handler, rcvbuf)
    try:
        yield running
    finally:
        running.stop()


def answering(*answers: bytes) -> Callable[[Peer], None]:
    """An instance that answers the n-th request on a connection with ``answers[n]``."""

    def handler(peer: Peer) -> None:
        for answer in answers:
            peer.read_request()
            peer.send(answer)
        peer.until_eof()

    return handler


def routes(answers: dict[bytes, bytes]) -> Callable[[Peer], None]:
    """An instance that answers by path, ``OK`` to any other, on every connection."""

    def handler(peer: Peer) -> None:
        for _ in range(1000):
            peer.send(answers.get(peer.path(peer.read_request()), OK))

    return handler


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        async def bounded() -> Any:
            async with asyncio.timeout(20):
                return await coro

        if request.param == "uvloop":
            return uvloop.run(bounded())
        return asyncio.run(bounded())

    return runner


async def fetch(
    client: FastClient,
    base: str,
    target: str = "/",
    method: str = "GET",
    body: bytes | AsyncIterator[bytes] = b"",
    timeouts: Timeouts = QUICK,
    headers: list[tuple[bytes, bytes]] = HOST,
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    response = await client.send(method, base, target, headers, body, timeouts)
    return response.status, response.headers, await response.read()


def pool_of(client: FastClient, base: str) -> client_module._Pool:
    return client._pool(base)


# --- requests go out exactly ---------------------------------------------------------------------


def test_requests_are_written_exactly_and_answers_read_exactly(run: Any) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Case: KeEp\r\n"
        b"Content-Length: 5\r\n\r\nhello"
    )

    async def stream() -> AsyncIterator[bytes]:
        yield b"ab"
        yield b"cde"

    async def main() -> None:
        client = FastClient()
        with instance(answering(answer, answer, answer)) as up:
            got = await fetch(client, up.base, "/api/x?y=1%2F", headers=[*HOST, (b"X-A", b"b")])
            sent = await fetch(
                client,
                up.base,
                "/send",
                "POST",
                b"hello",
                headers=[*HOST, (b"content-length", b"5")],
            )
            streamed = await fetch(client, up.base, "/stream", "POST", stream())
            await client.aclose()
            await up.eofs(1)
        assert got == (
            200,
            [(b"Content-Type", b"text/plain"), (b"X-Case", b"KeEp"), (b"Content-Length", b"5")],
            b"hello",
        )
        assert sent[2] == streamed[2] == b"hello"
        assert len(up.peers) == 1  # one keep-alive connection for all three
        assert bytes(up.peers[0].received) == (
            b"GET /api/x?y=1%2F HTTP/1.1\r\nhost: up\r\nX-A: b\r\n\r\n"
            b"POST /send HTTP/1.1\r\nhost: up\r\ncontent-length: 5\r\n\r\nhello"
            b"POST /stream HTTP/1.1\r\nhost: up\r\ntransfer-encoding: chunked\r\n\r\n"
            b"2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"
        )

    run(main())


# --- one answer per request ----------------------------------------------------------------------


def test_a_second_answer_in_the_same_packet_is_neither_merged_nor_reused(run: Any) -> None:
    """The reported bug: a 404 followed by a stray 200 in one packet reached the client as 200."""
    first = (
        b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
        % (len(NOT_FOUND), NOT_FOUND)
    )
    stray = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nX-Stray: 1\r\n\r\nstrayed"

    async def main() -> None:
        client = FastClient()
        with instance(routes({b"/api/sessions/s1/status": first + stray})) as up:
            answer = await fetch(client, up.base, "/api/sessions/s1/status")
            after = await fetch(client, up.base, "/next")
            closed = await up.eofs(1)
            await client.aclose()
        assert answer == (
            404,
            [(b"Content-Type", b"application/json"), (b"Content-Length", b"29")],
            NOT_FOUND,
        )
        assert after == (200, [(b"Content-Length", b"2")], b"ok")  # not the stray 200
        assert len(up.peers) == 2 and closed >= 1  # the first connection was not used again
        assert (
            bytes(up.peers[0].received)
            == b"GET /api/sessions/s1/status HTTP/1.1\r\nhost: up\r\n\r\n"
        )
        assert bytes(up.peers[1].received).startswith(b"GET /next HTTP/1.1\r\n")

    run(main())


def test_an_unasked_answer_on_an_idle_connection_closes_it(run: Any) -> None:
    def handler(peer: Peer) -> None:
        peer.read_request()
        peer.send(OK)
        time.sleep(0.05)  # on purpose: the unasked answer comes after the asked one
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nlater")
        peer.until_eof()

    async def main() -> None:
        client = FastClient()
        with instance(handler) as up:
            await fetch(client, up.base, "/a")
            pool = pool_of(client, up.base)
            assert len(pool.idle) == 1
            for _ in range(100):  # the loop sees the unasked bytes and drops the connection
                if not pool.idle:
                    break
                await asyncio.sleep(0.01)
            assert not pool.idle and pool.open == 0
            assert await up.eofs(1) == 1
            second = await fetch(client, up.base, "/b")
            await client.aclose()
        assert second == (200, [(b"Content-Length", b"2")], b"ok")
        assert len(up.peers) == 2
        assert bytes(up.peers[0].received) == b"GET /a HTTP/1.1\r\nhost: up\r\n\r\n"

    run(main())


@pytest.mark.parametrize("what", ["bytes", "fin"])
def test_what_arrived_before_the_loop_saw_it_is_caught_on_reuse(run: Any, what: str) -> None:
    """Bytes or a FIN in the kernel, not yet seen by the event loop (it is blocked here): the
    pooled connection is not written to; the request goes on a new one."""
    go = threading.Event()

    def handler(peer: Peer) -> None:
        if peer is not up.peers[0]:
            answering(OK)(peer)
            return
        peer.read_request()
        peer.send(OK)
        go.wait(WAIT)
        if what == "bytes":
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nlater")
        else:
            peer.sock.shutdown(socket.SHUT_WR)  # half-closed: still reads what the client writes
        peer.until_eof()

    async def main() -> None:
        client = FastClient()
        await fetch(client, up.base, "/a")
        go.set()
        time.sleep(0.2)  # noqa: ASYNC251  # blocks the loop: the kernel has them, the protocol not
        second = await fetch(client, up.base, "/b")
        assert second == (200, [(b"Content-Length", b"2")], b"ok")
        await client.aclose()

    with instance(handler) as up:
        run(main())
        up.wait_eof(2)
    assert len(up.peers) == 2
    assert bytes(up.peers[0].received) == b"GET /a HTTP/1.1\r\nhost: up\r\n\r\n"  # nothing more
    assert bytes(up.peers[1].received) == b"GET /b HTTP/1.1\r\nhost: up\r\n\r\n"


def test_empty_lines_between_answers_are_dropped_not_read_as_an_answer(run: Any) -> None:
    """llhttp skips CR/LF before a message (RFC 9112 2.2); they never reach an answer."""

    async def main() -> None:
        client = FastClient()
        with instance(answering(OK + b"\r\n\r\n", OK)) as up:
            first = await fetch(client, up.base, "/a")
            second = await fetch(client, up.base, "/b")
            await client.aclose()
        assert first == second == (200, [(b"Content-Length", b"2")], b"ok")

    run(main())


def test_trailers_are_not_merged_into_the_headers(run: Any) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Digest\r\n\r\n"
        b"2\r\nok\r\n0\r\nX-Digest: sha-256=abc\r\n\r\n"
    )

    async def main() -> None:
        client = FastClient()
        with instance(answering(answer, OK)) as up:
            response = await client.send("GET", up.base, "/", HOST, b"", QUICK)
            body = await response.read()
            assert (response.status, response.headers, body) == (
                200,
                [(b"Transfer-Encoding", b"chunked"), (b"Trailer", b"X-Digest")],
                b"ok",
            )
            assert response.content_length is None
            assert (await fetch(client, up.base))[2] == b"ok"
            await client.aclose()
        assert len(up.peers) == 1

    run(main())


# --- statuses ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 600 Beyond\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 999 Far\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 099 Below\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 000 Zero\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        b"\x81\x05hello",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ],
    ids=["600", "999", "099", "000", "101-upgrade", "101-bare", "gzip-transfer-coding"],
)
def test_what_the_proxy_cannot_pass_on_is_a_bad_response(run: Any, answer: bytes) -> None:
    async def main() -> None:
        client = FastClient()
        with instance(answering(answer)) as up:
            started = time.monotonic()
            with pytest.raises(UpstreamBadResponse) as caught:
                await fetch(client, up.base)
            took = time.monotonic() - started
            closed = await up.eofs(1)
            await client.aclose()
        assert (caught.value.status, caught.value.code) == (502, "upstream-bad-response")
        assert took < 1.0 and closed == 1
        assert pool_of(client, up.base).open == 0

    run(main())


BODILESS = {
    "204-length-0": (b"HTTP/1.1 204 No Content\r\nX-A: 1\r\nContent-Length: 0\r\n\r\n", True),
    "204-length-5-and-a-body": (
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello",
        False,
    ),
    "204-chunked": (b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n", True),
    "304-length": (
        b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 1234\r\n\r\n',
        True,
    ),
}


@pytest.mark.parametrize("case", list(BODILESS))
def test_204_and_304_come_without_a_length_or_a_body(run: Any, case: str) -> None:
    answer, reusable = BODILESS[case]
    expected_headers = {
        "204-length-0": [(b"X-A", b"1")],
        "204-length-5-and-a-body": [],
        "204-chunked": [],
        "304-length": [(b"ETag", b'"v1"')],
    }[case]

    async def main() -> None:
        client = FastClient()
        with instance(routes({b"/": answer})) as up:
            response = await client.send("GET", up.base, "/", HOST, b"", QUICK)
            assert response.content_length == 0
            assert response.headers == expected_headers
            assert await response.read() == b""
            assert (await fetch(client, up.base, "/next"))[2] == b"ok"
            await client.aclose()
        # Bytes after a 204 are not its body: they close the connection.
        assert len(up.peers) == (1 if reusable else 2)

    run(main())


# --- what the proxy's server then sends ----------------------------------------------------------


@contextlib.asynccontextmanager
async def mini_proxy(base: str) -> AsyncIterator[int]:
    """The proxy's own server protocol (proxy.server.GuardedHttpTools) in front of the fast
    client, through the proxy's own forward.response_headers / buffered_body / relay."""
    client = FastClient()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        response = await client.send(scope["method"], base, scope["path"], HOST, b"", QUICK)
        headers = forward.response_headers(response, base, b"r1", 1)
        body = await forward.buffered_body(response)
        await forward.relay(send, response, headers, body)

    config = Config(
        app,
        http="httptools",
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        date_header=False,
    )
    config.load()
    state = ServerState()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: GuardedHttpTools(config=config, server_state=state, app_state={}),
        "127.0.0.1",
        0,
    )
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await client.aclose()


async def exchange(port: int, requests: list[bytes]) -> list[bytes]:
    """Each request on one connection, and what came back before the next was sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = []
    try:
        for request in requests:
            writer.write(request)
            got = b""
            with contextlib.suppress(TimeoutError):
                while True:  # until nothing more comes for 0.2 s: every byte that was sent
                    chunk = await asyncio.wait_for(reader.read(65536), 0.2)
                    if not chunk:
                        break
                    got += chunk
            answers.append(got)
    finally:
        writer.close()
    return answers


def test_the_proxy_server_relays_204_and_304_cleanly(run: Any) -> None:
    answers = (
        b"HTTP/1.1 204 No Content\r\nX-A: 1\r\nContent-Length: 5\r\n\r\n",
        b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 1234\r\n\r\n',
    )

    async def main() -> None:
        with instance(answering(*answers)) as up:
            async with mini_proxy(up.base) as port:
                got = await exchange(
                    port,
                    [b"GET /a HTTP/1.1\r\nHost: p\r\n\r\n", b"GET /b HTTP/1.1\r\nHost: p\r\n\r\n"],
                )
        instance_header = b"x-proxy-instance: " + up.base.encode() + b"\r\n"
        assert got == [
            b"HTTP/1.1 204 No Content\r\nx-a: 1\r\nx-request-id: r1\r\n"
            + instance_header
            + b"\r\n",
            b'HTTP/1.1 304 Not Modified\r\netag: "v1"\r\nx-request-id: r1\r\n'
            + instance_header
            + b"\r\n",
        ]

    run(main())


def test_the_proxy_server_sends_the_404_not_the_stray_200_after_it(run: Any) -> None:
    first = b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%b" % (len(NOT_FOUND), NOT_FOUND)
    stray = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def main() -> None:
        with instance(answering(first + stray)) as up:
            async with mini_proxy(up.base) as port:
                got = await exchange(
                    port, [b"GET /api/sessions/s1/status HTTP/1.1\r\nHost: p\r\n\r\n"]
                )
        assert got == [
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 29\r\nx-request-id: r1\r\n"
            b"x-proxy-instance: " + up.base.encode() + b"\r\n\r\n" + NOT_FOUND
        ]

    run(main())


# --- HEAD ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "reused"),
    [
        (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1234\r\n\r\n",
            True,
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n", True),  # no framing at all
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", False),  # a body it must not send
    ],
    ids=["length", "chunked", "unframed", "close", "http10", "with-a-body"],
)
def test_head_reuses_its_connection(run: Any, answer: bytes, reused: bool) -> None:
    async def main() -> None:
        client = FastClient()
        with instance(routes({b"/h": answer})) as up:
            response = await client.send("HEAD", up.base, "/h", HOST, b"", QUICK)
            assert response.status == 200
            assert await response.read() == b""
            after = await fetch(client, up.base, "/g")
            await client.aclose()
        assert after == (200, [(b"Content-Length", b"2")], b"ok")
        assert len(up.peers) == (1 if reused else 2)
        if reused:
            assert bytes(up.peers[0].received) == (
                b"HEAD /h HTTP/1.1\r\nhost: up\r\n\r\nGET /g HTTP/1.1\r\nhost: up\r\n\r\n"
            )

    run(main())


# --- bodies of any framing -----------------------------------------------------------------------


def test_a_chunked_session_not_found_is_readable_whole(run: Any) -> None:
    def handler(peer: Peer) -> None:
        peer.read_request()
        peer.send(
            b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n9\r\n" + NOT_FOUND[:9] + b"\r\n"
        )
        time.sleep(0.05)  # the rest in a later packet
        rest = NOT_FOUND[9:]
        peer.send(b"%x\r\n%b\r\n0\r\n\r\n" % (len(rest), rest))
        answering(OK)(peer)

    async def main() -> None:
        client = FastClient()
        with instance(handler) as up:
            response = await client.send(
                "GET", up.base, "/api/sessions/s1/status", HOST, b"", QUICK
            )
            assert response.content_length is None  # what forward.buffered_body goes by today
            body = await response.read_upto(forward.BUFFER_RESPONSE_LIMIT)
            assert body == NOT_FOUND
            assert forward.is_session_not_found(response.status, body)
            assert (await fetch(client, up.base))[2] == b"ok"
            await client.aclose()
        assert len(up.peers) == 1

    run(main())


def test_read_upto_gives_up_past_its_limit_and_loses_nothing(run: Any) -> None:
    parts = [bytes([65 + k]) * 100_000 for k in range(3)]
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts)
        + b"0\r\n\r\n"
    )

    async def main() -> None:
        client = FastClient()
        with instance(answering(answer, answer, OK)) as up:
            response = await client.send("GET", up.base, "/", HOST, b"", QUICK)
            assert await response.read_upto(250_000) is None
            assert b"".join([c async for c in response.chunks()]) == b"".join(parts)
            response = await client.send("GET", up.base, "/", HOST, b"", QUICK)
            assert await response.read_upto(300_000) == b"".join(parts)
            assert (await fetch(client, up.base))[2] == b"ok"
            await client.aclose()
        assert len(up.peers) == 1

    run(main())


def test_httpx_seam_reads_upto_the_same_way(run: Any) -> None:
    async def stream() -> AsyncIterator[bytes]:
        yield NOT_FOUND[:9]
        yield NOT_FOUND[9:]

    async def main() -> None:
        client = HttpxClient(httpx.MockTransport(lambda _: httpx.Response(404, content=stream())))
        whole = await client.send("GET", "http://up", "/", HOST, b"", QUICK)
        assert await whole.read_upto(1000) == NOT_FOUND
        assert await whole.read() == NOT_FOUND
        cut = await client.send("GET", "http://up", "/", HOST, b"", QUICK)
        assert await cut.read_upto(5) is None
        assert await cut.read() == NOT_FOUND

    run(main())


# --- the pool ------------------------------------------------------------------------------------


def test_idle_connections_expire_while_newer_ones_are_reused(
    run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a burst, reuse takes the newest connection; the older ones still close on expiry
    (they used to stay open while traffic continued: fds 16 -> 44 and never back)."""
    monkeypatch.setattr(client_module, "KEEPALIVE_EXPIRY", 0.3)
    burst = 12
    together = threading.Barrier(burst, timeout=WAIT)

    def handler(peer: Peer) -> None:
        for _ in range(1000):
            request = peer.read_request()
            if peer.path(request) == b"/burst":
                together.wait()  # every burst request on a connection of its own
            peer.send(OK)

    async def main() -> None:
        client = FastClient()
        with instance(handler) as up:
            await asyncio.gather(*(fetch(client, up.base, "/burst") for _ in range(burst)))
            pool = pool_of(client, up.base)
            assert pool.open == burst and len(pool.idle) == burst
            until = time.monotonic() + 0.9
            for _ in range(100):  # steady traffic, one request at a time
                if time.monotonic() > until:
                    break
                await fetch(client, up.base, "/one")
                await asyncio.sleep(0.03)  # paces the steady traffic, on purpose
            assert pool.open == 1 and len(pool.idle) == 1
            assert await up.eofs(burst - 1) == burst - 1
            await asyncio.sleep(0.5)  # no traffic: the last one expires too
            assert pool.open == 0 and not pool.idle
            assert await up.eofs(burst) == burst
            await client.aclose()
        assert len(up.peers) == burst

    run(main())


def test_connections_per_instance_are_capped(run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "MAX_CONNECTIONS_PER_INSTANCE", 2)

    def handler(peer: Peer) -> None:
        for _ in range(100):
            peer.read_request()
            time.sleep(0.05)  # on purpose: a slow instance, so requests queue for connections
            peer.send(OK)

    async def main() -> None:
        client = FastClient()
        with instance(handler) as up:
            answers = await asyncio.gather(*(fetch(client, up.base, f"/{k}") for k in range(6)))
            pool = pool_of(client, up.base)
            assert pool.open == 2 and not pool.waiters
            await client.aclose()
        assert [a[0] for a in answers] == [200] * 6
        assert len(up.peers) == 2  # the waiting requests were handed the two connections

    run(main())


def test_waiting_for_a_free_connection_is_bounded_by_the_connect_timeout(
    run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "MAX_CONNECTIONS_PER_INSTANCE", 1)

    def handler(peer: Peer) -> None:
        for _ in range(100):
            request = peer.read_request()
            if peer.path(request) == b"/slow":
                time.sleep(0.6)  # on purpose: holds the only connection
            peer.send(OK)

    async def main() -> None:
        client = FastClient()
        with instance(handler) as up:
            slow = asyncio.create_task(fetch(client, up.base, "/slow"))
            for _ in range(400):  # polled for: the slow one has the only connection
                if pool_of(client, up.base).open == 1:
                    break
                await asyncio.sleep(0.005)
            started = time.monotonic()
            with pytest.raises(Overloaded) as caught:
                await fetch(client, up.base, "/waits", timeouts=Timeouts(0.2, 2.0))
            took = time.monotonic() - started
            cancelled = asyncio.create_task(fetch(client, up.base, "/cancelled"))
            for _ in range(400):  # polled for: it waits for the connection
                if pool_of(client, up.base).waiters:
                    break
                await asyncio.sleep(0.005)
            cancelled.cancel()
            assert (await slow)[0] == 200
            assert (await fetch(client, up.base, "/after"))[0] == 200
            pool = pool_of(client, up.base)
            assert pool.open == 1 and not pool.waiters and len(pool.idle) == 1
            await client.aclose()
        assert 0.15 < took < 0.5
        assert (caught.value.status, caught.value.retry_after) == (503, 1)
        assert len(up.peers) == 1
        assert b"/waits" not in up.peers[0].received and b"/cancelled" not in up.peers[0].received

    run(main())


# --- timeouts and bounds -------------------------------------------------------------------------


async def big_body(chunks: int = 256) -> AsyncIterator[bytes]:
    piece = b"x" * (256 * 1024)
    for _ in range(chunks):
        yield piece


def test_write_timeout_when_the_instance_takes_no_body(run: Any) -> None:
    done = threading.Event()

    def handler(peer: Peer) -> None:
        peer.read_head()
        done.wait(WAIT)  # reads nothing more: the client's writes back up

    async def main() -> None:
        client = FastClient()
        with instance(handler, rcvbuf=4096) as up:
            started = time.monotonic()
            with pytest.raises(UpstreamTimeout) as caught:
                await fetch(
                    client, up.base, "/up", "POST", big_body(), Timeouts(1.0, 5.0, write=0.3)
                )
            took = time.monotonic() - started
            done.set()
            await client.aclose()
        assert 0.3 - EARLY <= took < 3.0 and "took none of the request body" in caught.value.detail
        assert pool_of(client, up.base).open == 0

    run(main())


def test_body_idle_timeout_on_a_stalled_answer(run: Any) -> None:
    def handler(peer: Peer) -> None:
        peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        peer.until_eof()

    async def main() -> None:
        client = FastClient()
        with instance(handler) as up:
            response = await client.send(
                "GET", up.base, "/", HOST, b"", Timeouts(1.0, 5.0, body_idle=0.2)
            )
            got = []
            started = time.monotonic()
            with pytest.raises(UpstreamTimeout):
                async for chunk in response.chunks():
                    got.append(chunk)
            took = time.monotonic() - started
            assert await up.eofs(1) == 1
            await client.aclose()
        assert got == [b"abc"] and 0.2 - EARLY <= took < 1.5

    run(main())


def test_body_idle_timeout_on_a_stalled_request_body(run: Any) -> None:
    async def stalls() -> AsyncIterator[bytes]:
        yield b"a"
        await asyncio.sleep(10)  # on purpose: the body stalls past the idle timeout
        yield b"never"

    def handler(peer: Peer) -> None:
        peer.read_head()
        peer.until_eof()

    async def main() -> None:
        client = FastClient()
        with instance(handler) as up:
            started = time.monotonic()
            with pytest.raises(ClientTooSlow):
                await fetch(
                    client, up.base, "/up", "POST", stalls(), Timeouts(1.0, 5.0, body_idle=0.2)
                )
            took = time.monotonic() - started
            assert await up.eofs(1) == 1
            await client.aclose()
        assert 0.2 - EARLY <= took < 1.5
        assert bytes(up.peers[0].received) == (
            b"POST /up HTTP/1.1\r\nhost: up\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n"
        )

    run(main())


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000,  # a header that never ends
        b"HTTP/1.1 200 OK\r\n"
        + b"".join(b"X-H%d: %b\r\n" % (k, b"v" * 30) for k in range(2000))
        + b"Content-Length: 0\r\n\r\n",  # complete, but 80 KB of headers
        b"HTTP/1.1 100 Continue\r\n\r\n" * 4000,  # interim answers without end
    ],
    ids=["unterminated-header", "many-headers", "endless-interim"],
)
def test_the_response_head_is_bounded(run: Any, answer: bytes) -> None:
    def handler(peer: Peer) -> None:
        peer.read_request()
        peer.send(answer)
        peer.until_eof()

    async def main() -> None:
        client = FastClient()
        with instance(handler) as up:
            started = time.monotonic()
            with pytest.raises(UpstreamBadResponse):
                await fetch(client, up.base, timeouts=Timeouts(1.0, 5.0))
            took = time.monotonic() - started
            await client.aclose()
        assert took < 1.0  # not the read timeout

    run(main())


# --- an answer before the request is all sent ----------------------------------------------------


@pytest.mark.parametrize("reads", [True, False], ids=["keeps-reading", "reads-nothing"])
def test_an_early_answer_while_the_body_streams_is_read(run: Any, reads: bool) -> None:
    early = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\n\r\ntoo large"

    def handler(peer: Peer) -> None:
        if peer is not up.peers[0]:
            answering(OK)(peer)
            return
        peer.read_head()
        peer.send(early)
        if reads:
            peer.until_eof()
        else:
            peer.eof.wait(WAIT)

    async def slowly() -> AsyncIterator[bytes]:
        for _ in range(200):
            yield b"y" * 65536
            await asyncio.sleep(0.005)  # paces the upload, on purpose

    async def main() -> None:
        client = FastClient()
        started = time.monotonic()
        answer = await fetch(client, up.base, "/up", "POST", slowly() if reads else big_body())
        took = time.monotonic() - started
        after = await fetch(client, up.base, "/next")
        await client.aclose()
        assert answer == (413, [(b"Content-Length", b"9")], b"too large")
        assert after[2] == b"ok"
        assert took < 1.0  # not after the whole body, not after a timeout

    with instance(handler, rcvbuf=None if reads else 4096) as up:
        run(main())
        up.peers[0].eof.set()
    assert len(up.peers) == 2  # cut short: the first connection is not used again
    received = bytes(up.peers[0].received)
    head = b"POST /up HTTP/1.1\r\nhost: up\r\ntransfer-encoding: chunked\r\n\r\n"
    assert received.startswith(head)
    if reads:  # what it read: whole chunks, fewer than all 200, and no last chunk
        assert received[len(head) :].startswith(b"10000\r\n")
        assert len(received) < 100 * 65536 and not received.endswith(b"0\r\n\r\n")


# --- small pieces --------------------------------------------------------------------------------


def test_timeouts_default_and_within() -> None:
    plain = Timeouts(2.0, 30.0)
    assert (plain.write_limit, plain.idle_limit) == (30.0, 30.0)
    assert Timeouts(2.0, 30.0, 5.0, 7.0).within(6.0) == Timeouts(2.0, 6.0, 5.0, 6.0)
    assert plain.within(-1.0).connect == 0.001


def test_an_early_answer_to_a_buffered_body_does_not_reuse_the_connection(run: Any) -> None:
    """The answer came while most of the body still sat in the client's buffer: reused, the
    connection would send the next request behind it, to an instance that reads no more."""
    early = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\n\r\ntoo large"
    body = b"z" * (8 * 1024 * 1024)

    def handler(peer: Peer) -> None:
        if peer is not up.peers[0]:
            answering(OK)(peer)
            return
        peer.read_head()
        peer.send(early)
        peer.eof.wait(WAIT)

    async def main() -> None:
        client = FastClient()
        length = [*HOST, (b"content-length", str(len(body)).encode())]
        answer = await fetch(client, up.base, "/up", "POST", body, headers=length)
        after = await fetch(client, up.base, "/next")
        await client.aclose()
        assert answer == (413, [(b"Content-Length", b"9")], b"too large")
        assert after == (200, [(b"Content-Length", b"2")], b"ok")

    with instance(handler, rcvbuf=4096) as up:
        run(main())
        up.peers[0].eof.set()
    assert len(up.peers) == 2
