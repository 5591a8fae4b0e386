"""Traces: a failover seen as one trace, from the client's traceparent to the instance.

The proxy runs in this process (so an in-memory exporter sees its spans) with its real upstream
client, in front of real simulator processes; the owner is SIGKILLed before the traced request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from proxy import tracing
from proxy.app import create_app
from proxy.config import load_settings
from tests.conftest import API_KEY
from tests.helpers.processes import Simulator

SID = "webjs_1_1732800000_trace001"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    assert tracing.configure(exporter=memory)
    try:
        yield memory
    finally:
        tracing.TRACER = None  # the other tests run untraced


def test_a_failover_is_one_trace_through_both_attempts_and_the_rediscovery(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    owner = Simulator.start(tmp_path, "owner", api_key=API_KEY, sessions=[SID])
    heir = Simulator.start(tmp_path, "heir", api_key=API_KEY)
    settings = load_settings(
        {
            "SESSION_PROXY_INSTANCES": f"{owner.url},{heir.url}",
            "SESSION_PROXY_API_KEY": API_KEY,
            "SESSION_PROXY_HEALTH_INTERVAL": "60",
        }
    )
    app = create_app(settings)

    async def run() -> tuple[httpx.Response, list[Any]]:
        await app.start()
        try:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://proxy", timeout=20
            ) as client:
                learned = await client.get(f"/api/sessions/{SID}/status?api_key={API_KEY}")
                assert learned.headers["x-proxy-instance"] == owner.url
                await asyncio.to_thread(heir.add_session, SID)  # it comes back there...
                await asyncio.to_thread(owner.kill)  # ...as its owner dies
                exporter.clear()
                answer = await client.get(
                    f"/api/sessions/{SID}/status?api_key={API_KEY}",
                    headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"},
                )
            return answer, list(exporter.get_finished_spans())
        finally:
            await app.stop()

    try:
        answer, spans = asyncio.run(run())
    finally:
        heir.stop()
    assert answer.status_code == 200 and answer.headers["x-proxy-instance"] == heir.url
    assert answer.headers["x-proxy-attempts"] == "2"
    assert {format(s.context.trace_id, "032x") for s in spans} == {TRACE_ID}  # one trace
    (request,) = [s for s in spans if s.kind is SpanKind.SERVER]
    assert format(request.parent.span_id, "016x") == CLIENT_SPAN  # continued, not restarted
    assert request.attributes["session_proxy.session_id"] == SID
    assert request.attributes["session_proxy.instance"] == heir.url
    assert request.attributes["session_proxy.attempts"] == 2
    attempts = sorted(
        (s for s in spans if s.name == "attempt"),
        key=lambda s: s.attributes["session_proxy.attempt"],
    )
    assert [a.attributes["session_proxy.instance"] for a in attempts] == [owner.url, heir.url]
    assert attempts[0].attributes["session_proxy.error"] == "upstream-unreachable"
    assert attempts[1].attributes["http.response.status_code"] == 200
    (rediscovery,) = [s for s in spans if s.name == "rediscovery"]
    for child in [*attempts, rediscovery]:
        assert child.parent.span_id == request.context.span_id
    # The instance received the proxy's attempt span as its parent.
    seen = [
        e["headers"]["traceparent"]
        for e in heir.requests()
        if "traceparent" in e.get("headers", {}) and "/status" in str(e.get("path"))
    ]
    assert seen == [f"00-{TRACE_ID}-{format(attempts[1].context.span_id, '016x')}-01"]


def test_tracing_is_off_unless_the_otel_variables_ask() -> None:
    assert not tracing.wanted({})
    assert not tracing.wanted({"OTEL_SERVICE_NAME": "x"})
    assert tracing.wanted({"OTEL_TRACES_EXPORTER": "otlp"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert not tracing.wanted({"OTEL_TRACES_EXPORTER": "none"})
    assert not tracing.wanted(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}
    )
