"""The background-task supervisor: a loop that raises is logged, counted and started again."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

import pytest

from proxy import metrics
from proxy.tasks import Supervisor


async def wait_until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10.0):
        while not condition():  # noqa: ASYNC110 - polling a plain condition is the point
            await asyncio.sleep(0.01)


async def test_a_crashing_loop_is_restarted_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    supervisor = Supervisor(first_backoff=0.01, max_backoff=0.05)
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 3:
            raise RuntimeError(f"injected failure {runs}")
        await asyncio.Event().wait()  # the fourth run keeps going, as a healthy loop does

    before = metrics.TASK_CRASHES.labels("flaky-test")._value.get()
    with caplog.at_level(logging.ERROR, logger="session_proxy.tasks"):
        supervisor.start("flaky-test", flaky)
        await wait_until(lambda: runs == 4 and supervisor.healthy)
    status = supervisor.status()["flaky-test"]
    assert status["crashes"] == 3 and status["restarts"] == 3 and status["running"]
    assert status["last_error"] == "RuntimeError: injected failure 3"
    assert metrics.TASK_CRASHES.labels("flaky-test")._value.get() - before == 3
    crashes = [r for r in caplog.records if r.getMessage().startswith("background task crashed")]
    assert len(crashes) == 3 and all(r.exc_info for r in crashes)  # with the traceback
    await supervisor.close()
    assert not supervisor.status()["flaky-test"]["running"]


async def test_a_loop_waiting_to_restart_makes_the_supervisor_unhealthy() -> None:
    supervisor = Supervisor(first_backoff=30.0)

    async def broken() -> None:
        raise ValueError("always")

    supervisor.start("broken-test", broken)
    await wait_until(lambda: supervisor.status()["broken-test"]["crashes"] == 1)
    assert not supervisor.healthy
    await supervisor.close()  # cancels the back-off sleep at once


async def test_the_back_off_doubles_up_to_its_bound() -> None:
    supervisor = Supervisor(first_backoff=0.02, max_backoff=0.08)
    crash_times: list[float] = []

    async def broken() -> None:
        crash_times.append(asyncio.get_running_loop().time())
        raise ValueError("always")

    supervisor.start("backoff-test", broken)
    await wait_until(lambda: len(crash_times) >= 8)
    await supervisor.close()
    gaps = [b - a for a, b in itertools.pairwise(crash_times)]
    assert gaps[0] >= 0.02 and gaps[1] >= 0.04 and gaps[2] >= 0.08 and gaps[3] >= 0.08
    # Bounded by max_backoff: unbounded, the 6th and 7th gaps would be 0.64 s and 1.28 s.
    assert gaps[5] < 0.6 and gaps[6] < 0.6


async def test_names_are_unique_and_a_closed_supervisor_starts_nothing() -> None:
    supervisor = Supervisor()

    async def idle() -> None:
        await asyncio.Event().wait()

    supervisor.start("one", idle)
    with pytest.raises(ValueError):
        supervisor.start("one", idle)
    await supervisor.close()
    with pytest.raises(RuntimeError):
        supervisor.start("two", idle)


async def test_the_proxys_health_loop_survives_an_injected_bug_and_readyz_shows_it() -> None:
    """Before the supervisor, one unexpected exception ended the health loop silently, and an
    ejected instance would never have come back."""
    import httpx

    from proxy.app import create_app
    from proxy.config import load_settings

    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        if request.url.path == "/health":
            calls += 1
            if calls in (2, 3):  # the start-up check passes; the loop's next two hit the bug
                raise RuntimeError("injected bug in a health check")
        return httpx.Response(200, json={"status": "healthy", "sessions": {"total": 0}})

    settings = load_settings(
        {
            "SESSION_PROXY_INSTANCES": "http://127.0.0.1:3001",
            "SESSION_PROXY_UPSTREAM_CLIENT": "httpx",
            "SESSION_PROXY_HEALTH_INTERVAL": "0.05",
        }
    )
    app = create_app(settings, transport=httpx.MockTransport(handler))
    await app.start()
    try:
        await wait_until(lambda: calls >= 6)  # checks go on after the two crashes
        status = app.tasks.status()["health-checks"]
        assert status["crashes"] == 2 and status["running"]
        assert status["last_error"] == "RuntimeError: injected bug in a health check"
        ready, detail = app.readiness()
        assert ready and detail["background_tasks"]["health-checks"]["crashes"] == 2
    finally:
        await app.stop()
