"""The floors under session-proxy's CPU per request: what the same server and client cost with
no proxy logic at all, so that the proxy's own share can be told from theirs.

    python bench/floors.py uvicorn PORT            # uvicorn alone: a fixed 200 JSON
    python bench/floors.py client PORT UPSTREAM    # uvicorn + proxy.client, forwarding

Both run uvicorn with the proxy's own settings (``proxy.server.uvicorn_config``: loop, lifespan,
no access log, no server or date header, ...) except the protocol class: uvicorn's own httptools
protocol, where the proxy may use a subclass of its own (that subclass is the proxy's cost, not
the floor's). The client floor forwards every request to ``UPSTREAM`` with the proxy's upstream
client (``proxy.client.create_client("fast")``): the request's own headers, the body read whole,
the answer read whole and sent back with the upstream's headers (``connection`` left out), one
``send`` per request; no routing, no request id, no metrics, no logging.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

GET_BODY = b'{"success":true,"status":"connected","info":{"pushname":"bench"}}'
POST_BODY = b'{"success":true,"message_id":"bench-1","status":"sent"}'


async def _body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def fixed_app() -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        await _body(receive)
        body = POST_BODY if scope["method"] == "POST" else GET_BODY
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def client_app(upstream: str) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    from proxy.client import Timeouts, create_client

    client = create_client("fast")
    timeouts = Timeouts(connect=2.0, read=30.0)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        body = await _body(receive)
        target = scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        response = await client.send(
            scope["method"], upstream, target, scope["headers"], body, timeouts
        )
        try:
            answer = await response.read()
        finally:
            await response.close()
        headers = [(n, v) for n, v in response.headers if n.lower() != b"connection"]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    return app


def config(app: Any, port: int) -> Any:
    """The proxy's uvicorn settings for ``app`` on ``port``, with uvicorn's own protocol."""
    import uvicorn

    try:
        from proxy.config import load_settings
        from proxy.server import uvicorn_config

        env = {"SESSION_PROXY_HOST": "127.0.0.1", "SESSION_PROXY_PORT": str(port)}
        cfg = uvicorn_config(load_settings(env), app)
        if not isinstance(cfg, uvicorn.Config):
            raise TypeError(f"it gave {type(cfg).__name__}, not a uvicorn.Config")
    except (ImportError, TypeError, AttributeError) as exc:
        # The proxy's server module is being reworked: the floor must still run, with the
        # settings it had when this was written, and say so.
        print(f"proxy.server.uvicorn_config not usable ({exc}): the bench's own copy", flush=True)
        cfg = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            loop="uvloop",
            ws="none",
            access_log=False,
            proxy_headers=False,
            server_header=False,
            date_header=False,
            log_config=None,
        )
    cfg.http = "httptools"
    cfg.workers = 1
    cfg.lifespan = "on"
    return cfg


def main(argv: list[str]) -> int:
    import uvicorn

    kind, port = argv[0], int(argv[1])
    app = fixed_app() if kind == "uvicorn" else client_app(argv[2])
    cfg = config(app, port)
    print(f"floor {kind} on {port}: loop={cfg.loop} http={cfg.http} pid={os.getpid()}", flush=True)
    uvicorn.Server(cfg).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
