"""A stand-in for the Laravel side of Blazz, in a thread of the test process, on loopback.

It answers what a gateway instance asks Laravel for:

- ``GET /api/whatsapp/accounts/active`` -> ``{"success": true, "sessions": [...], "count": N}``
  with the accounts given to it (the start-up restore reads ``sessions``);
- anything else -> ``{"success": true}`` (webhooks, mark-disconnected, ...).

Every request is recorded (method, path, headers, parsed JSON body). ``fail_with`` makes the
accounts route answer an error status instead, to test that a failed call is ignored.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

ACTIVE_PATH = "/api/whatsapp/accounts/active"


class LaravelStandIn:
    def __init__(self, accounts: Iterable[dict[str, Any]] = ()) -> None:
        self.accounts: list[dict[str, Any]] = list(accounts)
        self.fail_with: int | None = None
        self.received: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self, status: int, document: Any) -> None:
                data = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode("latin-1")
                with stand_in._lock:
                    stand_in.received.append(
                        {
                            "method": self.command,
                            "path": self.path,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": body,
                        }
                    )
                    accounts = list(stand_in.accounts)
                    fail_with = stand_in.fail_with
                if self.command == "GET" and self.path.split("?")[0] == ACTIVE_PATH:
                    if fail_with is not None:
                        self._answer(fail_with, {"message": "Server Error"})
                        return
                    self._answer(
                        200, {"success": True, "sessions": accounts, "count": len(accounts)}
                    )
                    return
                self._answer(200, {"success": True})

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        return Handler

    def requests_to(self, path: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.received if r["path"].split("?")[0] == path]

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
