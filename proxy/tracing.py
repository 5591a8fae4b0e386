"""Traces (OpenTelemetry): the proxied request, each attempt, rediscoveries, holds, restores and
database queries, continued from the client's W3C ``traceparent`` and passed on to the instance.

Off unless the standard variables ask for it: ``OTEL_TRACES_EXPORTER`` (``otlp`` or ``console``)
or an ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``, and not ``OTEL_SDK_DISABLED=true``; sampling,
service name and the exporter's endpoint and headers come from the usual ``OTEL_*`` variables.
Needs the ``tracing`` extra (``pip install 'session-proxy[tracing]'``; the image has it).

Off, nothing here runs on the hot path: every caller checks ``TRACER is None`` first, once.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("session_proxy.tracing")

# The tracer when tracing is on, else None. Read it as ``tracing.TRACER`` (it is set at start).
TRACER: Any = None
_PROPAGATOR: Any = None
_API: Any = None  # the opentelemetry.trace module, imported once tracing is on
_PROVIDER: Any = None  # the tracer provider configure() made

Headers = list[tuple[bytes, bytes]]


def wanted(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Do the standard OTEL_* variables ask for traces?"""
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(
        exporter
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure(exporter: Any = None, sampler: Any = None) -> bool:
    """Set tracing up from the environment (or with ``exporter``, for tests); True when on."""
    global TRACER, _PROPAGATOR, _API, _PROVIDER
    if exporter is None and not wanted():
        TRACER = None
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        log.error(
            "OTEL_* variables ask for traces, but the tracing extra is not installed "
            "(pip install 'session-proxy[tracing]'); tracing stays off"
        )
        TRACER = None
        return False
    resource = Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME", "session-proxy")}
    )
    provider = TracerProvider(resource=resource, sampler=sampler)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        provider.add_span_processor(BatchSpanProcessor(_exporter_from_env()))
    TRACER = provider.get_tracer("session-proxy")
    _PROPAGATOR = TraceContextTextMapPropagator()
    _API = trace
    _PROVIDER = provider
    trace.set_tracer_provider(provider)
    return True


def _exporter_from_env() -> Any:
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout: the OTEL_EXPORTER_OTLP_* variables


def shutdown() -> None:
    """Export what the batch processor still holds (blocks: call it off the event loop)."""
    if _PROVIDER is not None:
        _PROVIDER.shutdown()


# --- spans ----------------------------------------------------------------------------------------


def _carrier(headers: Headers) -> dict[str, str]:
    return {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in headers
        if name in (b"traceparent", b"tracestate")
    }


@contextlib.contextmanager
def request_span(method: str, path: str, headers: Headers) -> Iterator[Any]:
    """The proxied request's server span, continuing the client's ``traceparent``."""
    parent = _PROPAGATOR.extract(_carrier(headers))
    with TRACER.start_as_current_span(
        f"{method} proxied",
        context=parent,
        kind=_API.SpanKind.SERVER,
        attributes={"http.request.method": method, "url.path": path},
    ) as span:
        yield span


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """An internal span under the current one (no-op when tracing is off)."""
    if TRACER is None:
        yield None
        return
    with TRACER.start_as_current_span(
        name, attributes={k: v for k, v in attributes.items() if v is not None}
    ) as current:
        yield current


@contextlib.contextmanager
def attempt_span(instance: str, attempt: int) -> Iterator[Any]:
    """One attempt: a client span, whose context the instance receives as its parent."""
    with TRACER.start_as_current_span(
        "attempt",
        kind=_API.SpanKind.CLIENT,
        attributes={"session_proxy.instance": instance, "session_proxy.attempt": attempt},
    ) as current:
        yield current


def with_traceparent(headers: Headers) -> Headers:
    """The upstream request's headers, its ``traceparent``/``tracestate`` the current span's."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    kept = [(n, v) for n, v in headers if n not in (b"traceparent", b"tracestate")]
    kept.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in carrier.items())
    return kept


def describe_request(
    session_id: str | None,
    status: int,
    outcome: str,
    instance: str | None,
    attempts: int,
    error_code: str,
) -> None:
    """What the proxied request's span says once it is answered."""
    current = _API.get_current_span()
    if not current.is_recording():
        return  # not sampled: nothing to describe
    current.set_attribute("http.response.status_code", status)
    current.set_attribute("session_proxy.outcome", outcome)
    current.set_attribute("session_proxy.attempts", attempts)
    if session_id is not None:
        current.set_attribute("session_proxy.session_id", session_id)
    if instance is not None:
        current.set_attribute("session_proxy.instance", instance)
    if error_code:
        current.set_attribute("session_proxy.error", error_code)
    if status >= 500:
        current.set_status(_API.Status(_API.StatusCode.ERROR, error_code or str(status)))


def record_error(current: Any, error: BaseException) -> None:
    if not current.is_recording():
        return
    current.set_status(_API.Status(_API.StatusCode.ERROR, str(error)[:200]))
    code = getattr(error, "code", None)
    if code:
        current.set_attribute("session_proxy.error", code)
