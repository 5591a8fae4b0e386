"""Hold a real simulator process to every row of the contract table (``contract_rows.py``).

One simulator serves the whole module; each row gets a session id of its own, so the rows do
not depend on each other. The instance creates sessions slowly (600 s) so that a session a row
started is reliably still ``qr_scanning`` when the row looks at it; a row that needs a connected
session gets one created with no delay.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.contract_rows import ROWS, Listing, Matcher, Row, fake_phone
from tests.helpers.laravel import LaravelStandIn
from tests.helpers.processes import Simulator

KEY = "k"
SLOW = 600.0  # the instance's connect delay while rows run
LIST_KEYS = {"session_id", "workspace_id", "status", "phone_number", "connected_at"}


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    tmp: Path = tmp_path_factory.mktemp("contract")
    # A Laravel URL, as every real instance has one (it decides /health/ready).
    with LaravelStandIn() as laravel:
        sim = Simulator.start(
            tmp, "contract", api_key=KEY, connect_delay=SLOW, laravel_url=laravel.url
        )
        with sim:
            sim.restored()
            yield sim


class _Client:
    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.http = httpx.Client(base_url=sim.url, trust_env=False, timeout=10.0)

    def faults(self, **faults: Any) -> None:
        self.http.post("/_sim/faults", json=faults).raise_for_status()

    def create(self, sid: str, connect_delay: float) -> None:
        self.faults(connect_delay=connect_delay)
        try:
            body = {"session_id": sid, "workspace_id": 1, "account_id": 11, "api_key": KEY}
            assert self.http.post("/api/sessions", json=body).status_code == 200
        finally:
            self.faults(connect_delay=SLOW)

    def status(self, sid: str) -> httpx.Response:
        return self.http.get(f"/api/sessions/{sid}/status", params={"api_key": KEY})


def _session_for(row: Row, index: int) -> str:
    return f"foo-{index}" if row.plain_id else f"webjs_1_{1700000000 + index}_{index:08x}"


def _setup(client: _Client, row: Row, sid: str) -> None:
    if row.setup == "connected":
        client.create(sid, connect_delay=0.0)
        assert client.status(sid).json()["status"] == "connected"
    elif row.setup == "starting":
        client.create(sid, connect_delay=SLOW)
        assert client.status(sid).json()["status"] == "qr_scanning"
    else:
        assert row.setup == "none", row.setup
        assert client.status(sid).status_code == 404


class _Check:
    """Compares an answer with a row's expectation, placeholders filled in."""

    def __init__(self, sid: str) -> None:
        self.values = {"{id}": sid, "{key}": KEY, "{phone}": fake_phone(sid)}

    def fill(self, value: Any) -> Any:
        if isinstance(value, str):
            for placeholder, real in self.values.items():
                value = value.replace(placeholder, real)
            return value
        if isinstance(value, dict):
            return {self.fill(k): self.fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.fill(v) for v in value]
        return value

    def same(self, expected: Any, actual: Any, where: str = "body") -> None:
        if isinstance(expected, Listing):
            assert isinstance(actual, list), f"{where}: {actual!r} is not a list"
            for entry in actual:
                assert isinstance(entry, dict) and set(entry) <= LIST_KEYS, f"{where}: {entry!r}"
            wanted = self.fill(expected.entry)
            mine = [e for e in actual if e.get("session_id") == wanted["session_id"]]
            assert len(mine) == 1, f"{where}: {wanted['session_id']} listed {len(mine)} times"
            self.same(wanted, mine[0], f"{where}[{wanted['session_id']}]")
        elif isinstance(expected, Matcher):
            assert expected.ok(actual), f"{where}: {actual!r} does not match {expected!r}"
        elif isinstance(expected, dict):
            assert isinstance(actual, dict), f"{where}: {actual!r} is not an object"
            assert set(actual) == set(expected), (
                f"{where}: keys {sorted(actual)} != {sorted(expected)}"
            )
            for key, value in expected.items():
                self.same(value, actual[key], f"{where}.{key}")
        elif isinstance(expected, list):
            assert isinstance(actual, list) and len(actual) == len(expected), (
                f"{where}: {actual!r} != {expected!r}"
            )
            for n, (e, a) in enumerate(zip(expected, actual, strict=True)):
                self.same(e, a, f"{where}[{n}]")
        else:
            expected = self.fill(expected)
            assert type(actual) is type(expected) and actual == expected, (
                f"{where}: {actual!r} != {expected!r}"
            )


def _events(client: _Client) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = client.http.get("/_sim/events").json()["events"]
    return events


@pytest.mark.parametrize("index", range(len(ROWS)), ids=[row.name for row in ROWS])
def test_the_simulator_answers_like_the_real_service(instance: Simulator, index: int) -> None:
    row = ROWS[index]
    sid = _session_for(row, index)
    client = _Client(instance)
    check = _Check(sid)
    _setup(client, row, sid)
    events_before = len(_events(client))

    response = client.http.request(
        row.method,
        check.fill(row.path),
        params=check.fill(row.query) if row.query is not None else None,
        json=check.fill(row.json) if row.json is not None else None,
        content=row.content,
        headers={
            **(check.fill(row.headers) if row.headers else {}),
            **({"content-type": "application/json"} if row.content is not None else {}),
        },
    )

    assert response.status_code == row.status, response.text
    if row.html is not None:
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert row.html in response.text, response.text
    else:
        assert response.headers["content-type"] == "application/json; charset=utf-8"
        check.same(row.body, response.json())

    if row.after is not None:
        after_status, after_body = row.after
        later = client.status(sid)
        assert later.status_code == after_status, later.text
        check.same(after_body, later.json(), "status afterwards")
    new_events = _events(client)[events_before:]
    if row.event is not None:
        wanted = check.fill(row.event)
        assert any(all(e.get(k) == v for k, v in wanted.items()) for e in new_events), new_events
    if row.no_event is not None:
        assert not [
            e for e in new_events if e["event"] == row.no_event and e.get("session_id") == sid
        ], new_events
    assert instance.alive


def test_every_route_of_the_contract_has_rows() -> None:
    routes = {f"{row.method} {row.path}" for row in ROWS}
    for route in (
        "POST /api/sessions",
        "GET /api/sessions",
        "GET /api/sessions/{id}/status",
        "GET /api/sessions/{id}/metadata",
        "PUT /api/sessions/{id}/metadata",
        "POST /api/sessions/{id}/restore",
        "POST /api/sessions/{id}/reconnect",
        "POST /api/sessions/{id}/regenerate-qr",
        "DELETE /api/sessions/{id}",
        "POST /api/messages/send",
        "POST /api/messages/send-media",
        "POST /api/messages/bulk-send",
        "GET /api/messages/{id}/status",
        "GET /api/messages/{id}/validate",
        "GET /api/internal/sessions/{id}/last-activity",
        "GET /health",
        "GET /info",
        "GET /sessions/{id}/status",
    ):
        assert route in routes, route
    # Each session route is held to the four cases where they apply.
    for route in (
        "GET /api/sessions/{id}/status",
        "POST /api/messages/send",
        "POST /api/messages/send-media",
        "GET /api/messages/{id}/validate",
    ):
        cases = {row.case for row in ROWS if f"{row.method} {row.path}" == route}
        assert {"held, connected", "held, not connected", "not held"} <= cases, route
        assert any("key" in case for case in cases), route
