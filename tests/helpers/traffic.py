"""What several real-process tests do the same way: send a message through a proxy, wait for a
condition with a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.conftest import API_KEY


def post_send(
    url: str, session_id: str, text: str, key: str | None = None, timeout: float = 40.0
) -> httpx.Response:
    """``POST /api/messages/send`` with the gateway's real body (and an Idempotency-Key)."""
    return httpx.post(
        f"{url}/api/messages/send",
        json={
            "session_id": session_id,
            "workspace_id": 1,
            "recipient_phone": "628120001111",
            "message": text,
            "type": "text",
            "api_key": API_KEY,
        },
        headers={"idempotency-key": key} if key is not None else {},
        timeout=timeout,
        trust_env=False,
    )


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """Poll ``check`` until it returns something true (returned), at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)
