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
from collections import OrderedDict
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
    """When each session was last shown to be held by an instance, bounded in size.

    Only the most recent confirmation per session is kept; the oldest sessions are dropped first
    once ``limit`` is reached, so memory stays flat under a flood of ids.
    """

    def __init__(self, max_age: float, limit: int = 100_000) -> None:
        self.max_age = max_age
        self._limit = limit
        self._seen: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def confirm(self, session_id: str, url: str) -> None:
        seen = self._seen
        if session_id in seen:
            seen.move_to_end(session_id)
        elif len(seen) >= self._limit:
            seen.popitem(last=False)
        seen[session_id] = (url, time.monotonic())

    def is_fresh(self, session_id: str, url: str) -> bool:
        entry = self._seen.get(session_id)
        return entry is not None and entry[0] == url and time.monotonic() - entry[1] <= self.max_age

    def forget(self, session_id: str) -> None:
        self._seen.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._seen)
