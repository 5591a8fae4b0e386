"""Prometheus metrics: what happened (counters, histograms) and what is (gauges).

Everything is defined here, once, and imports nothing from the package, so any module may record
into it. With several workers (``PROMETHEUS_MULTIPROC_DIR`` set by the server before forking),
prometheus-client writes per-process files and ``/metrics`` merges them; gauges then say how
they combine across processes.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

PREFIX = "session_proxy"
_MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

REQUESTS = Counter(
    f"{PREFIX}_requests",
    "Proxied requests by outcome (proxied, error, client_closed) and status class",
    ["outcome", "status_class"],
)
REQUEST_SECONDS = Histogram(
    f"{PREFIX}_request_seconds",
    "Time from request to the start of the answer, including replays",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
UPSTREAM_SECONDS = Histogram(
    f"{PREFIX}_upstream_seconds",
    "Time for one attempt to an instance, until its response headers",
    ["instance"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
ERRORS = Counter(f"{PREFIX}_errors", "Answers the proxy made itself, by X-Proxy-Error", ["code"])
TABLE_LOOKUPS = Counter(
    f"{PREFIX}_table_lookups", "Routing table lookups by result (hit, miss, negative)", ["result"]
)
REDISCOVERIES = Counter(
    f"{PREFIX}_rediscoveries",
    "Owners looked for again after a failure, by result (found, not_found, error)",
    ["result"],
)
REPLAYS = Counter(f"{PREFIX}_replays", "Requests sent again, by what failed first", ["reason"])
PROBES = Counter(f"{PREFIX}_discovery_probes", "Status probes sent to instances")
SNAPSHOTS = Counter(f"{PREFIX}_discovery_snapshots", "Fleet snapshots taken instead of probes")
EJECTIONS = Counter(f"{PREFIX}_ejections", "Instances ejected, by instance", ["instance"])
INSTANCE_HEALTHY = Gauge(
    f"{PREFIX}_instance_healthy",
    "1 when the instance takes traffic, 0 when ejected",
    ["instance"],
    multiprocess_mode="livemax",
)
DB_QUERIES = Counter(f"{PREFIX}_db_queries", "Statements sent to Postgres, by purpose", ["purpose"])
DB_UP = Gauge(f"{PREFIX}_db_up", "1 when the database answers", multiprocess_mode="livemin")
NOTIFY_TRIGGER_CURRENT = Gauge(
    f"{PREFIX}_notify_trigger_current",
    "1 when the table's NOTIFY trigger is this version's, 0 when missing or outdated",
    multiprocess_mode="livemin",
)
WRITEBACK_PENDING = Gauge(
    f"{PREFIX}_writeback_pending",
    "Moves waiting to be written to the database",
    multiprocess_mode="livesum",
)
RECONCILE_RUNS = Counter(
    f"{PREFIX}_reconcile_runs", "Reconcile passes by result (done, skipped)", ["result"]
)
RECONCILE_LAST_SUCCESS = Gauge(
    f"{PREFIX}_reconcile_last_success_timestamp_seconds",
    "When the last reconcile pass finished",
    multiprocess_mode="max",
)
RECONCILE_SESSIONS = Gauge(
    f"{PREFIX}_reconcile_sessions",
    "Sessions per class in the last reconcile report",
    ["class"],
    multiprocess_mode="mostrecent",
)
DUPLICATES_SETTLED = Counter(
    f"{PREFIX}_duplicates_settled",
    "Extra copies of a session handled by reconcile (disconnected, or why not)",
    ["outcome"],
)
OWNER_CONFIRMATIONS = Counter(
    f"{PREFIX}_owner_confirmations",
    "Status probes before an acting route, by answer (held, not_held, failed)",
    ["answer"],
)
TASK_CRASHES = Counter(
    f"{PREFIX}_background_task_crashes",
    "Background loops that raised and were restarted, by task",
    ["task"],
)
HOLDS = Counter(
    f"{PREFIX}_holds",
    "Requests held while their session came back, by result (released, expired, refused)",
    ["result"],
)
HOLDS_CURRENT = Gauge(
    f"{PREFIX}_holds_current", "Requests held right now", multiprocess_mode="livesum"
)
HOLD_SECONDS = Histogram(
    f"{PREFIX}_hold_seconds",
    "How long a released request was held",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30),
)
STARTS = Counter(
    f"{PREFIX}_starts",
    "Session starts the proxy made itself (restores, moves), by outcome "
    "(connected, failed, timed_out)",
    ["outcome"],
)
START_SECONDS = Histogram(
    f"{PREFIX}_start_seconds",
    "From the proxy's create call to the session being connected",
    buckets=(0.25, 0.5, 1, 2, 5, 10, 20, 30, 60),
)
STARTS_RUNNING = Gauge(
    f"{PREFIX}_starts_running",
    "Starts the proxy is running on each instance now (bounded by RESTORE_CONCURRENCY)",
    ["instance"],
    multiprocess_mode="livesum",
)
RESTORES = Counter(
    f"{PREFIX}_restores",
    "Sessions of a dead instance the proxy restored, by result "
    "(started, succeeded, failed, already_running)",
    ["result"],
)
INSTANCE_DRAINING = Gauge(
    f"{PREFIX}_instance_draining",
    "1 while an instance is being drained or stays drained (takes no new sessions)",
    ["instance"],
    multiprocess_mode="max",
)
MOVES = Counter(
    f"{PREFIX}_moves",
    "Sessions moved off an instance by a drain or a rebalance, by result (moved, failed)",
    ["result"],
)
IDEMPOTENCY = Counter(
    f"{PREFIX}_idempotency",
    "Requests with an Idempotency-Key, by what happened (first, replayed, waited, mismatch, "
    "stored_ambiguous, released)",
    ["result"],
)
PACED = Counter(
    f"{PREFIX}_paced_sends",
    "Sends under SEND_RATE, by what happened (immediate, waited, refused)",
    ["result"],
)
PACE_WAIT_SECONDS = Histogram(
    f"{PREFIX}_pace_wait_seconds",
    "How long a paced send waited for its session's budget",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60),
)
PACE_QUEUED = Gauge(
    f"{PREFIX}_paced_sends_waiting",
    "Sends waiting for their session's budget now",
    multiprocess_mode="livesum",
)
CACHE_FALLBACKS = Counter(
    f"{PREFIX}_cache_fallbacks", "Shared-table (Redis) failures answered from the local table"
)


INSTANCE_SESSIONS = Gauge(
    f"{PREFIX}_instance_sessions",
    "Sessions each instance reports holding (its /health), plus placements since",
    ["instance"],
    multiprocess_mode="max",
)

# A labelled series exists only from its first event, so rate() and increase() would never count
# that event: every label value known in advance is created at 0 now.
_KNOWN_LABELS: tuple[tuple[Any, tuple[str, ...]], ...] = (
    (REDISCOVERIES, ("found", "not_found", "error")),
    (RECONCILE_RUNS, ("done", "skipped")),
    (HOLDS, ("released", "expired", "refused")),
    (STARTS, ("connected", "failed", "timed_out")),
    (RESTORES, ("started", "succeeded", "failed", "already_running")),
    (MOVES, ("moved", "failed")),
    (
        IDEMPOTENCY,
        ("first", "replayed", "waited", "mismatch", "stored_ambiguous", "released", "store_down"),
    ),
    (PACED, ("immediate", "waited", "refused")),
)
for _metric, _values in _KNOWN_LABELS:
    for _value in _values:
        _metric.labels(_value)


def known_codes(codes: Iterable[str]) -> None:
    """Create the error and replay series of every X-Proxy-Error code at 0 (see above)."""
    for code in codes:
        ERRORS.labels(code)
        REPLAYS.labels(code)
    for outcome in ("proxied", "error", "answered_by_proxy", "idempotent_replay", "client_closed"):
        for status_class in ("2xx", "4xx", "5xx"):
            REQUESTS.labels(outcome, status_class)


# --- the per-request series -----------------------------------------------------------------------
# prometheus-client takes a lock and checks its arguments on every inc and observe (~1 us each,
# three or four a request). The series recorded per request are kept here in plain numbers
# instead, and added to their prometheus-client series when /metrics is rendered: what it shows
# is the same, to the request. Only the event loop's thread records into them or renders. With
# several worker processes, another worker renders /metrics from the files each one writes, so
# there they are recorded at once, as before.


class _Tally:
    """A counter child's increments, until the next render."""

    __slots__ = ("_child", "count")

    def __init__(self, child: Any) -> None:
        self._child = child
        self.count = 0

    def inc(self) -> None:
        self.count += 1

    def flush(self) -> None:
        if self.count:
            count, self.count = self.count, 0
            self._child.inc(count)


class _HistogramTally:
    """A histogram child's observations, bucketed as prometheus-client buckets them (the first
    bound not below the value), until the next render."""

    __slots__ = ("_bounds", "_child", "_counts", "_sum")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._bounds: list[float] = list(child._upper_bounds)  # ends with +Inf
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, amount: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, amount)] += 1
        self._sum += amount

    def flush(self) -> None:
        counts = self._counts
        if not any(counts):
            return
        self._counts = [0] * len(counts)
        total, self._sum = self._sum, 0.0
        child = self._child
        child._sum.inc(total)
        for i, count in enumerate(counts):
            if count:
                child._buckets[i].inc(count)


_TALLIES: list[_Tally | _HistogramTally] = []
_HISTOGRAMS: dict[Any, Any] = {}  # child (hashed by identity) -> what records into it


def histogram(child: Any) -> Any:
    """What to ``observe`` a per-request histogram series through (``child`` is a labelled
    child or a histogram without labels); looked up by the child, made on first use."""
    found = _HISTOGRAMS.get(child)
    if found is None:
        found = _HISTOGRAMS[child] = child if _MULTIPROCESS else _HistogramTally(child)
        if not _MULTIPROCESS:
            _TALLIES.append(found)
    return found


def counter(child: Any) -> Any:
    """What to ``inc()`` (by one) a per-request counter series through: made once per series
    and kept by the caller, like a labelled child (``TABLE_LOOKUPS.labels("hit")``)."""
    if _MULTIPROCESS:
        return child
    tally = _Tally(child)
    _TALLIES.append(tally)
    return tally


_REQUEST_CHILDREN: dict[tuple[str, int], Any] = {}
_REQUEST_SECONDS = histogram(REQUEST_SECONDS)


def count_request(outcome: str, status: int, seconds: float) -> None:
    """One proxied request; label children are looked up once and kept (this is per request)."""
    key = (outcome, status // 100)
    child = _REQUEST_CHILDREN.get(key)
    if child is None:
        child = _REQUEST_CHILDREN[key] = counter(REQUESTS.labels(outcome, f"{status // 100}xx"))
    child.inc()
    _REQUEST_SECONDS.observe(seconds)


def flush() -> None:
    """Add what was tallied since the last render to the prometheus-client series."""
    for tally in _TALLIES:
        tally.flush()


def render() -> tuple[bytes, str]:
    """The exposition text; merged across worker processes when there are several."""
    flush()
    if _MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
