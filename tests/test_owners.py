"""The rule that picks one copy of a duplicated session, and owner confirmations (unit tests)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from proxy.config import Settings
from proxy.owners import Confirmations, choose_owner
from proxy.sessions import Role, SessionRouter


@dataclass(eq=False)
class Box:
    url: str


A, B, C = Box("http://10.0.0.1:3000"), Box("http://10.0.0.2:3000"), Box("http://10.0.0.3:3000")


def test_the_databases_owner_wins_when_it_holds_the_session_connected() -> None:
    assert choose_owner([(A, "connected"), (B, "connected")], preferred=B) is B


def test_a_connected_copy_beats_the_databases_owner_still_starting() -> None:
    assert choose_owner([(A, "connected"), (B, "qr_scanning")], preferred=B) is A


def test_without_a_preference_the_lowest_url_among_connected_copies_wins() -> None:
    holders = [(C, "connected"), (A, "disconnected"), (B, "connected")]
    assert choose_owner(holders) is B


def test_with_no_connected_copy_the_preferred_holder_then_the_lowest_url() -> None:
    assert choose_owner([(C, "qr_scanning"), (B, "authenticated")], preferred=C) is C
    assert choose_owner([(C, "qr_scanning"), (B, "authenticated")]) is B


def test_every_order_of_answers_gives_the_same_choice() -> None:
    """Replicas see the probes answer in different orders: the choice must not depend on it."""
    holders = [(A, "qr_scanning"), (B, "connected"), (C, "connected")]
    for preferred in (None, A, B, C):
        chosen = {choose_owner(list(order), preferred) for order in itertools.permutations(holders)}
        assert len(chosen) == 1


def test_no_holders_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        choose_owner([])


def test_confirmations_expire_and_name_one_instance() -> None:
    confirmations = Confirmations(max_age=60.0)
    confirmations.confirm("s1", A.url)
    assert confirmations.is_fresh("s1", A.url)
    assert not confirmations.is_fresh("s1", B.url)
    assert not Confirmations(max_age=0.0).is_fresh("s1", A.url)
    confirmations.forget("s1")
    assert not confirmations.is_fresh("s1", A.url)


def test_confirmations_keep_only_what_can_still_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory follows the sessions confirmed within max_age, not every session ever seen."""
    from proxy import owners

    now = [1000.0]
    monkeypatch.setattr(owners.time, "monotonic", lambda: now[0])
    confirmations = Confirmations(max_age=2.0)
    for n in range(100_000):
        now[0] += 0.001  # 1,000 confirmations a second: ~2,000 can count at any time
        confirmations.confirm(f"s{n}", A.url)
    assert len(confirmations) <= 4 * 2_000
    assert confirmations.is_fresh("s99999", A.url) and not confirmations.is_fresh("s0", A.url)


def test_confirmations_have_a_hard_bound() -> None:
    confirmations = Confirmations(max_age=3600.0, limit=5_000)
    for n in range(20_000):
        confirmations.confirm(f"s{n}", A.url)
    assert len(confirmations) < 5_000 * 2


@pytest.mark.parametrize(
    ("method", "template", "role"),
    [
        ("GET", "/api/sessions/{id}/status", Role.REFUSES),
        ("GET", "/api/sessions/{id}/metadata", Role.REFUSES),
        ("PUT", "/api/sessions/{id}/metadata", Role.ACTS),
        ("POST", "/api/sessions/{id}/restore", Role.ACTS),
        ("GET", "/api/internal/sessions/{id}/last-activity", Role.ACTS),
        ("POST", "/api/sessions/{id}/reconnect", Role.STARTS),
        ("POST", "/api/sessions/{id}/regenerate-qr", Role.STARTS),
        ("DELETE", "/api/sessions/{id}", Role.DELETES),
        ("GET", "/api/messages/{id}/validate", Role.REFUSES),
    ],
)
def test_default_roles_follow_the_contract(method: str, template: str, role: Role) -> None:
    router = SessionRouter(Settings())
    assert router.role_of(method, template) is role
    path = template.replace("{id}", "webjs_1_1732800000_abcd1234")
    target = router.classify(method, path)
    assert target.role is role
    assert target.session_id == "webjs_1_1732800000_abcd1234"


def test_bulk_send_acts_and_single_sends_refuse() -> None:
    """The real bulk send answers 200 with a per-recipient "Session not found" when it does not
    hold the session; the single sends answer 404."""
    router = SessionRouter(Settings())
    assert router.classify("POST", "/api/messages/bulk-send").role is Role.ACTS
    assert router.classify("POST", "/api/messages/send").role is Role.REFUSES
    assert router.classify("POST", "/api/messages/send-media").role is Role.REFUSES


def test_roles_are_configurable() -> None:
    from proxy.config import load_settings

    settings = load_settings(
        {
            "SESSION_PROXY_CONFIRM_ROUTES": "POST /api/sessions/{id}/logout",
            "SESSION_PROXY_START_ROUTES": "",
            "SESSION_PROXY_DELETE_ROUTE": "DELETE /sessions/{id}",
        }
    )
    router = SessionRouter(settings)
    assert router.classify("POST", "/api/sessions/s1/logout").role is Role.ACTS
    assert router.classify("PUT", "/api/sessions/s1/metadata").role is Role.REFUSES
    assert router.classify("POST", "/api/sessions/s1/reconnect").role is Role.REFUSES
    assert router.classify("DELETE", "/sessions/s1").role is Role.DELETES


# The instance's own route timeouts (contract, "Measured against the real service"): the proxy's
# must be longer on every route, so the instance gives up (and crashes) first and the proxy sees
# the closed connection instead of cutting the request off itself.
INSTANCE_TIMEOUTS = {
    "/api/sessions": 60.0,
    "/api/sessions/s1/status": 60.0,
    "/api/sessions/s1/reconnect": 60.0,
    "/api/messages/send": 45.0,
    "/api/messages/send-media": 45.0,
    "/api/messages/bulk-send": 30.0,
    "/api/messages/s1/status": 30.0,
    "/api/internal/sessions/s1/last-activity": 30.0,
    "/health": 5.0,
    "/cleanup/run": 30.0,
}


@pytest.mark.parametrize(("path", "instance_seconds"), INSTANCE_TIMEOUTS.items())
def test_every_route_timeout_is_longer_than_the_instances(
    path: str, instance_seconds: float
) -> None:
    assert Settings().timeout_for(path) > instance_seconds
