"""An instance killed between an answer's headers and its body (the soak test met it: a status
GET answered ``502 upstream-ambiguous``). Nothing has reached the client yet, so a request safe
to repeat is asked again; a send is not, and its client is told it may have gone out.

The instance is a real TCP server on loopback that speaks just enough of the gateway's API: the
health check, the session list, and a status answer whose first forwarded copy (the one marked
by the client's ``x-break-once`` header) stops after its headers."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import API_KEY
from tests.helpers.processes import ProxyProcess, free_port

SESSION = "webjs_1_1732800000_broken01"


class BreakingInstance:
    """Answers like an instance; the first request carrying ``x-break-once`` gets its status
    line and headers, part of the body, and then the connection closes."""

    def __init__(self) -> None:
        self.port = free_port()
        self.broken = 0
        self.asked: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> BreakingInstance:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port)
        )
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1].split("?")[0]
                headers = {
                    k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])
                }
                length = int(headers.get("content-length") or 0)
                if length:
                    await reader.readexactly(length)
                self.asked.append(path)
                if path == "/health":
                    body = {"status": "ok", "sessions": 1}
                elif path == "/api/sessions":
                    body = {"sessions": [{"session_id": SESSION, "status": "connected"}]}
                elif path == f"/api/sessions/{SESSION}/status":
                    body = {"session_id": SESSION, "status": "connected"}
                else:
                    body = {"error": "Session not found"}
                data = json.dumps(body).encode()
                status = "404 Not Found" if "error" in body else "200 OK"
                answer = (
                    f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n"
                ).encode() + data
                if headers.get("x-break-once") and not self.broken:
                    self.broken += 1
                    writer.write(answer[: answer.index(b"\r\n\r\n") + 6])  # headers, 2 bytes
                    await writer.drain()
                    writer.transport.abort()
                    return
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[tuple[ProxyProcess, BreakingInstance]]:
    instance = BreakingInstance().start()
    env = {
        "SESSION_PROXY_INSTANCES": instance.url,
        "SESSION_PROXY_API_KEY": API_KEY,
        "SESSION_PROXY_HEALTH_INTERVAL": "0.5",
    }
    started = ProxyProcess.start(tmp_path, env, ready_path="/readyz")
    try:
        yield started, instance
    finally:
        started.stop()
        instance.stop()


def test_a_get_whose_answer_breaks_off_is_asked_again(
    proxy: tuple[ProxyProcess, BreakingInstance],
) -> None:
    server, instance = proxy
    answer = httpx.get(
        f"{server.url}/api/sessions/{SESSION}/status",
        params={"api_key": API_KEY},
        headers={"x-break-once": "1"},
        timeout=30,
        trust_env=False,
    )
    assert instance.broken == 1, "the instance never broke an answer"
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"session_id": SESSION, "status": "connected"}


def test_a_send_whose_answer_breaks_off_is_not_sent_again(
    proxy: tuple[ProxyProcess, BreakingInstance],
) -> None:
    server, instance = proxy
    answer = httpx.post(
        f"{server.url}/api/messages/send",
        json={"session_id": SESSION, "api_key": API_KEY, "recipient_phone": "1", "message": "x"},
        headers={"x-break-once": "1"},
        timeout=30,
        trust_env=False,
    )
    assert instance.broken == 1, "the instance never broke an answer"
    assert answer.status_code == 502, answer.text
    assert answer.headers["x-proxy-error"] == "upstream-ambiguous"
    assert instance.asked.count("/api/messages/send") == 1
