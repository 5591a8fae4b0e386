"""Healing the fleet: settling a session that runs on several instances at once.

An instance restart starts every active account it is told about, so a session can end up on two
instances. Routing already picks one copy (``owners.choose_owner``); with
``SETTLE_DUPLICATES=on`` the reconcile leader also disconnects the other copies. That is off by
default because the gateway's DELETE removes the session's local files even on an instance that
has just dropped the session, and on a shared volume those files are every copy's login: each
extra copy is therefore re-checked just before it is disconnected, and only while the chosen copy
is still connected.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from . import metrics
from .client import Timeouts, UpstreamClient
from .config import Settings
from .discovery import Discovery
from .errors import ProxyError
from .instances import Instance
from .owners import CONNECTED

log = logging.getLogger("session_proxy.healing")

DELETE_PATH = "/api/sessions/{id}"


@dataclass
class Settled:
    session_id: str
    instance: str
    outcome: str  # "disconnected", or why it was left alone


class DuplicateSettler:
    def __init__(self, settings: Settings, discovery: Discovery, client: UpstreamClient) -> None:
        self._discovery = discovery
        self._client = client
        self._timeouts = Timeouts(settings.connect_timeout, settings.discovery_timeout)
        self._body = json.dumps({"api_key": settings.api_key}).encode()

    async def settle(
        self, session_id: str, keep: Instance, extras: list[Instance]
    ) -> list[Settled]:
        """Disconnect ``extras``' copies of the session, keeping ``keep``'s."""
        results: list[Settled] = []
        for extra in extras:
            outcome = await self._disconnect_extra(session_id, keep, extra)
            metrics.DUPLICATES_SETTLED.labels(outcome).inc()
            results.append(Settled(session_id, extra.url, outcome))
            log.info(
                "duplicate copy settled",
                extra={
                    "session_id": session_id,
                    "instance": extra.url,
                    "kept": keep.url,
                    "outcome": outcome,
                },
            )
        return results

    async def _disconnect_extra(self, session_id: str, keep: Instance, extra: Instance) -> str:
        try:
            # Both re-checked now: a copy that went away since the inventory must not get a
            # DELETE (its files would go), and the kept copy must still be there to serve.
            if await self._discovery.probe(keep, session_id) != CONNECTED:
                return "kept-copy-not-connected"
            if await self._discovery.probe(extra, session_id) is None:
                return "already-gone"
            response = await self._client.send(
                "DELETE",
                extra.url,
                DELETE_PATH.format(id=quote(session_id, safe="")),
                [
                    (b"host", urlsplit(extra.url).netloc.encode()),
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(self._body)).encode()),
                ],
                self._body,
                self._timeouts,
            )
            try:
                await response.read()
            finally:
                await response.close()
        except ProxyError as error:
            return f"failed: {error.code}"
        return "disconnected" if 200 <= response.status < 300 else f"failed: {response.status}"
