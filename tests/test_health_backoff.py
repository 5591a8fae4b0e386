"""Ejection and its back-off on a fake clock (unit tests of proxy/health.py; tests/test_health.py
shows the same with real processes)."""

from __future__ import annotations

import pytest

from proxy import health as health_module
from proxy.client import create_client
from proxy.config import load_settings
from proxy.health import HealthChecker
from proxy.instances import Instance, InstanceSet

URL = "http://127.0.0.1:3001"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(health_module.time, "monotonic", fake)
    return fake


def checker(**env: str) -> tuple[HealthChecker, Instance]:
    settings = load_settings(
        {
            "SESSION_PROXY_INSTANCES": URL,
            "SESSION_PROXY_EJECT_BASE_SECONDS": "5",
            "SESSION_PROXY_EJECT_MAX_SECONDS": "40",
            "SESSION_PROXY_EJECT_AFTER_FAILURES": "3",
            **{f"SESSION_PROXY_{k.upper()}": v for k, v in env.items()},
        }
    )
    instances = InstanceSet(settings)
    instance = instances.get(URL)
    assert instance is not None
    return HealthChecker(settings, instances, create_client("fast")), instance


def test_failures_in_a_row_eject_and_a_success_between_resets_the_count(clock: FakeClock) -> None:
    health, instance = checker()
    health.record_failure(instance, "reset")
    health.record_failure(instance, "reset")
    health.record_success(instance)
    health.record_failure(instance, "reset")
    health.record_failure(instance, "reset")
    assert instance.healthy
    health.record_failure(instance, "reset")
    assert not instance.healthy and instance.last_error == "reset"


def test_a_refused_connection_ejects_at_once(clock: FakeClock) -> None:
    health, instance = checker()
    health.eject(instance, "connection refused")
    assert not instance.healthy
    assert instance.ejected_until == clock.now + 5


def test_a_passing_check_restores_only_after_the_back_off(clock: FakeClock) -> None:
    health, instance = checker()
    health.eject(instance, "refused")
    clock.now += 4.9
    health.apply_check(instance, True, 0, "")
    assert not instance.healthy  # it answers again, but the back-off has not run out
    clock.now += 0.2
    health.apply_check(instance, True, 0, "")
    assert instance.healthy


def test_the_back_off_doubles_with_each_ejection_in_a_row_up_to_its_bound(
    clock: FakeClock,
) -> None:
    health, instance = checker()
    backoffs = []
    for _ in range(6):
        health.eject(instance, "refused")
        backoffs.append(instance.ejected_until - clock.now)
        clock.now = instance.ejected_until
        health.apply_check(instance, True, 0, "")  # back, then it flaps again at once
        assert instance.healthy
    assert backoffs == [5, 10, 20, 40, 40, 40]


def test_staying_healthy_long_enough_forgets_the_flapping(clock: FakeClock) -> None:
    health, instance = checker()
    for _ in range(3):
        health.eject(instance, "refused")
        clock.now = instance.ejected_until
        health.apply_check(instance, True, 0, "")
    clock.now += 40 + 1  # stable for longer than EJECT_MAX_SECONDS
    health.apply_check(instance, True, 0, "")
    health.eject(instance, "refused")
    assert instance.ejected_until - clock.now == 5  # short again


def test_a_failed_active_check_ejects_and_counts_sessions_from_a_passing_one(
    clock: FakeClock,
) -> None:
    health, instance = checker()
    health.apply_check(instance, True, 12, "")
    assert instance.sessions == 12
    health.apply_check(instance, False, None, "/health answered 503")
    assert not instance.healthy and instance.last_error == "/health answered 503"
    assert instance.last_check_at == clock.now
