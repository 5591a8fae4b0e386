"""The owner of the proxy's background loops: each one supervised, restarted and counted.

Health checks, DNS watching, LISTEN, write-back and reconcile are loops that must outlive any bug
in one pass. A loop that raises is logged with its traceback, counted
(``session_proxy_background_task_crashes_total{task}``), and started again after a back-off that
doubles up to ``MAX_BACKOFF`` (and resets once the loop has run for a while without crashing).
``status()`` is what ``/readyz`` shows. Closing cancels every loop and waits for it, as aiojobs'
scheduler does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from . import metrics

log = logging.getLogger("session_proxy.tasks")

FIRST_BACKOFF = 0.1
MAX_BACKOFF = 30.0
STABLE_AFTER = 60.0  # seconds without a crash after which the back-off starts again from the first

Loop = Callable[[], Awaitable[None]]


@dataclass
class TaskState:
    name: str
    crashes: int = 0
    restarts: int = 0
    last_error: str | None = None
    last_crash_at: float | None = None
    running: bool = False
    finished: bool = False  # the loop returned on its own: not restarted
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "crashes": self.crashes,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "last_crash_seconds_ago": (
                round(time.monotonic() - self.last_crash_at, 3) if self.last_crash_at else None
            ),
        }


class Supervisor:
    def __init__(
        self,
        first_backoff: float = FIRST_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        stable_after: float = STABLE_AFTER,
    ) -> None:
        self._first_backoff = first_backoff
        self._max_backoff = max_backoff
        self._stable_after = stable_after
        self._states: dict[str, TaskState] = {}
        self._closed = False

    def start(self, name: str, loop: Loop) -> None:
        """Run ``loop`` (a coroutine function) under supervision, as the task ``name``."""
        if self._closed:
            raise RuntimeError("the supervisor is closed")
        if name in self._states:
            raise ValueError(f"a task named {name!r} is already supervised")
        state = TaskState(name)
        self._states[name] = state
        state.task = asyncio.create_task(self._supervise(state, loop), name=name)

    async def _supervise(self, state: TaskState, loop: Loop) -> None:
        backoff = self._first_backoff
        crashes_counter = metrics.TASK_CRASHES.labels(state.name)
        while True:
            started = time.monotonic()
            state.running = True
            try:
                await loop()
            except asyncio.CancelledError:
                state.running = False
                raise
            except Exception as exc:  # the point of a supervisor: no bug ends a loop for good
                state.running = False
                state.crashes += 1
                state.last_error = f"{type(exc).__name__}: {exc}"
                state.last_crash_at = time.monotonic()
                crashes_counter.inc()
                if state.last_crash_at - started >= self._stable_after:
                    backoff = self._first_backoff
                log.exception(
                    "background task crashed; restarting",
                    extra={"task": state.name, "restart_in": round(backoff, 3)},
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)
                state.restarts += 1
                continue
            state.running = False
            state.finished = True
            return

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: state.as_dict() for name, state in self._states.items()}

    @property
    def healthy(self) -> bool:
        """Every loop is running (or finished on its own); one waiting to restart is not."""
        return all(state.running or state.finished for state in self._states.values())

    def __contains__(self, name: str) -> bool:
        return name in self._states

    async def close(self) -> None:
        self._closed = True
        tasks = [s.task for s in self._states.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
