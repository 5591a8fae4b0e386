"""Which instance owns a session when the fleet says more than one thing, and how fresh that is.

Two facts the gateway forces on the proxy:

- A session can run on two instances at once (an instance restart starts every active account).
  Every replica must then route it to the same copy, so the choice is a pure function of what the
  fleet and the database say: the database's owner if it holds the session ``connected``, else
  a connected holder, else any holder, ties broken by URL (replicas may list instances in other
  orders; a URL sorts the same everywhere).
- Some routes answer success for a session the instance does not hold (see the contract), so a
  routing-table entry is not proof enough for them. A confirmation is a recent answer from that
  instance that could only come from a holder: a status probe's 200, or any 2xx of a route that
  refuses when it does not hold the session.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol, TypeVar

CONNECTED = "connected"


class HasUrl(Protocol):
    @property
    def url(self) -> str: ...


T = TypeVar("T", bound=HasUrl)


def choose_owner(holders: Sequence[tuple[T, str]], preferred: T | None = None) -> T:
    """The one copy every replica routes to, from ``(instance, status)`` pairs (not empty)."""
    if not holders:
        raise ValueError("no holders to choose from")
    connected = [instance for instance, status in holders if status == CONNECTED]
    if preferred is not None and any(instance is preferred for instance in connected):
        return preferred
    if connected:
        return min(connected, key=lambda instance: instance.url)
    if preferred is not None and any(instance is preferred for instance, _ in holders):
        return preferred
    return min((instance for instance, _ in holders), key=lambda instance: instance.url)


class Confirmations:
    """When each session was last shown to be held by an instance.

    Only confirmations younger than ``max_age`` count, so older ones are swept away whenever
    the map has doubled since the last sweep: memory follows the sessions confirmed in the last
    ``max_age`` seconds, not every session ever seen (measured: a plain dict entry costs ~117
    bytes; keeping one per known session added half to the routing table's memory). Past
    ``limit`` even after a sweep, everything is dropped: a lost confirmation costs one probe.
    """

    def __init__(self, max_age: float, limit: int = 100_000) -> None:
        self.max_age = max_age
        self._limit = limit
        self._seen: dict[str, tuple[str, float]] = {}
        self._sweep_at = 1024

    def confirm(self, session_id: str, url: str) -> None:
        now = time.monotonic()
        self._seen[session_id] = (url, now)
        if len(self._seen) >= self._sweep_at:
            oldest = now - self.max_age
            self._seen = {k: v for k, v in self._seen.items() if v[1] >= oldest}
            if len(self._seen) >= self._limit:
                self._seen.clear()
            self._sweep_at = max(1024, 2 * len(self._seen))

    def is_fresh(self, session_id: str, url: str) -> bool:
        entry = self._seen.get(session_id)
        return entry is not None and entry[0] == url and time.monotonic() - entry[1] <= self.max_age

    def forget(self, session_id: str) -> None:
        self._seen.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._seen)
