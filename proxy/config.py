"""Settings, built once at the edge from flags and ``SESSION_PROXY_*`` variables.

Nothing else in the package reads ``os.environ``: every module receives the ``Settings`` it needs.
Every value is validated here, and a bad one stops start-up with a message naming the variable.

Each setting is one line of ``Settings``: its type, its default and its parser (the field's
``metadata["parse"]``). Its variable is ``SESSION_PROXY_`` + the field name in capitals.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar
from urllib.parse import urlsplit

ENV_PREFIX = "SESSION_PROXY_"

T = TypeVar("T")
Parser = Callable[[str, str], Any]  # (setting name, raw value) -> the value, or ConfigError


class ConfigError(ValueError):
    """A setting has a value the proxy cannot run with."""


@dataclass(frozen=True)
class RouteTimeout:
    """The read timeout for paths starting with ``prefix`` (the longest prefix wins)."""

    prefix: str
    seconds: float


# --- parsing -------------------------------------------------------------------------------------


def _bad(name: str, value: str, why: str) -> ConfigError:
    return ConfigError(f"{ENV_PREFIX}{name.upper()}={value!r}: {why}")


def _split(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip())


def _float(name: str, value: str, minimum: float = 0.0) -> float:
    try:
        number = float(value)
    except ValueError:
        raise _bad(name, value, "is not a number") from None
    if not number >= minimum:
        raise _bad(name, value, f"must be at least {minimum:g}")
    return number


def _int(name: str, value: str, minimum: int = 0) -> int:
    try:
        number = int(value)
    except ValueError:
        raise _bad(name, value, "is not an integer") from None
    if number < minimum:
        raise _bad(name, value, f"must be at least {minimum}")
    return number


def _seconds(minimum: float) -> Parser:
    """A number of seconds (or a rate), at least ``minimum``."""
    return lambda name, value: _float(name, value, minimum)


def _count(minimum: int) -> Parser:
    return lambda name, value: _int(name, value, minimum)


def _text(_name: str, value: str) -> str:
    return value


def _list(_name: str, value: str) -> tuple[str, ...]:
    return _split(value)


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2}
_SIZE_UNITS |= {"mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gib": 1024**3}


def _size(name: str, value: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", value)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise _bad(name, value, "is not a size (bytes, or with k/m/g)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def normalise_url(name: str, value: str) -> str:
    """``http://host:port`` without a trailing slash; anything else is refused."""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _bad(name, value, "is not an http(s)://host:port URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise _bad(name, value, "must be just scheme://host:port (no path, query or credentials)")
    try:
        port = parts.port
    except ValueError:
        raise _bad(name, value, "has an invalid port") from None
    port = port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port}"


def _urls(name: str, value: str) -> tuple[str, ...]:
    return tuple(normalise_url(name, u) for u in _split(value))


def _aliases(name: str, value: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in _split(value):
        alias, sep, target = item.partition("=")
        if not sep:
            raise _bad(name, value, f"entry {item!r} is not alias=url")
        pairs.append((alias.strip().rstrip("/"), normalise_url(name, target)))
    return tuple(pairs)


def _route_timeouts(name: str, value: str) -> tuple[RouteTimeout, ...]:
    out = []
    for item in _split(value):
        prefix, sep, seconds = item.rpartition("=")
        if not sep or not prefix.startswith("/"):
            raise _bad(name, value, f"entry {item!r} is not /prefix=seconds")
        out.append(RouteTimeout(prefix, _float(name, seconds, 0.001)))
    return tuple(out)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value.lower() not in choices:
        raise _bad(name, value, f"must be one of {', '.join(choices)}")
    return value.lower()


def _one_of(*choices: str) -> Parser:
    return lambda name, value: _choice(name, value, choices)


def _identifier(name: str, value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?", value):
        raise _bad(name, value, "is not a plain SQL identifier")
    return value


def _pattern(name: str, value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise _bad(name, value, f"is not a regular expression ({exc})") from None
    return value


def _path_patterns(name: str, value: str) -> tuple[str, ...]:
    items = _split(value)
    for item in items:
        if not item.startswith("/") or item.count("{id}") != 1:
            raise _bad(name, value, f"entry {item!r} must start with / and contain {{id}} once")
    return items


def _routes(name: str, value: str) -> tuple[str, ...]:
    items = tuple(" ".join(i.split()) for i in _split(value))
    for item in items:
        method, _, path = item.partition(" ")
        if not method.isalpha() or not path.startswith("/"):
            raise _bad(name, value, f"entry {item!r} is not 'METHOD /path'")
    return tuple(f"{i.split(' ')[0].upper()} {i.split(' ')[1]}" for i in items)


def _templates(name: str, value: str) -> tuple[str, ...]:
    """Routes by template: ``{id}`` where the path names the session, none for a body route."""
    routes = _routes(name, value)
    for route in routes:
        if route.count("{id}") > 1:
            raise _bad(name, value, f"entry {route!r} has more than one {{id}}")
    return routes


def _template(name: str, value: str) -> str:
    routes = _templates(name, value)
    if len(routes) != 1 or "{id}" not in routes[0]:
        raise _bad(name, value, "must be exactly one 'METHOD /path/{id}'")
    return routes[0]


_PER = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
}


def _rate(name: str, value: str) -> float:
    """``20/min`` (also ``/s``, ``/h``, or a bare number per second): sends per second; 0 off."""
    count, sep, unit = value.strip().partition("/")
    per = _PER.get(unit.strip().lower()) if sep else 1.0
    if per is None:
        raise _bad(name, value, "must be N/s, N/min or N/h (or 0: off)")
    return _float(name, count.strip(), 0.0) / per


def _switch(name: str, value: str) -> bool:
    return _choice(name, value, ("on", "off", "true", "false", "1", "0")) in ("on", "true", "1")


def _route(name: str, value: str) -> str:
    routes = _routes(name, value)
    if len(routes) != 1:
        raise _bad(name, value, "must be exactly one 'METHOD /path'")
    return routes[0]


def _database_url(name: str, value: str) -> str:
    if value and urlsplit(value).scheme not in ("postgres", "postgresql"):
        raise _bad(name, "<redacted>", "is not a postgres:// or postgresql:// URL")
    return value


def _cache_url(name: str, value: str) -> str:
    if urlsplit(value).scheme not in ("memory", "redis", "rediss"):
        raise _bad(name, value, "must be memory:// or redis://host:port/db")
    return value


def _port(name: str, value: str) -> int:
    port = _int(name, value, 0)
    if port > 65535:
        raise _bad(name, value, "must be a port number (0-65535)")
    return port


def _dns(name: str, value: str) -> str:
    host, sep, port = value.rpartition(":")
    if value and (not sep or not host or not port.isdigit() or int(port) > 65535):
        raise _bad(name, value, "must be host:port")
    return value


def _setting(default: T, parse: Parser) -> T:
    """A field of ``Settings``: its default and how its variable's string is parsed."""
    return field(default=default, metadata={"parse": parse})


# --- the settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    # The fleet
    instances: tuple[str, ...] = _setting((), _urls)
    instances_dns: str = _setting("", _dns)
    instances_dns_interval: float = _setting(10.0, _seconds(0.1))
    drain_timeout: float = _setting(300.0, _seconds(0.0))
    instance_aliases: tuple[tuple[str, str], ...] = _setting((), _aliases)
    api_key: str = _setting("", _text)
    # Storage
    database_url: str = _setting("", _database_url)
    cache_url: str = _setting("memory://", _cache_url)
    cache_ttl: float = _setting(3600.0, _seconds(1.0))
    negative_ttl: float = _setting(5.0, _seconds(0.0))
    table_name: str = _setting("whatsapp_accounts", _identifier)
    column_session_id: str = _setting("session_id", _identifier)
    column_instance_url: str = _setting("assigned_instance_url", _identifier)
    column_status: str = _setting("status", _identifier)
    column_deleted_at: str = _setting("deleted_at", _identifier)
    active_status: str = _setting("connected", _text)
    # What a re-create sends as account_id (the row's id) and workspace_id, when the table has them.
    column_account_id: str = _setting("id", _identifier)
    column_workspace_id: str = _setting("workspace_id", _identifier)
    database_pool_size: int = _setting(4, _count(1))
    writeback_queue_limit: int = _setting(100_000, _count(1))
    # Routing
    session_id_pattern: str = _setting(r"[A-Za-z0-9_-]{1,128}", _pattern)
    path_patterns: tuple[str, ...] = _setting(
        (
            "/api/sessions/{id}",
            "/api/messages/{id}",
            "/api/internal/sessions/{id}",
            "/sessions/{id}",
            "/cleanup/{id}",
            "/remoteauth/migration/{id}",
        ),
        _path_patterns,
    )
    body_routes: tuple[str, ...] = _setting(
        (
            "POST /api/messages/send",
            "POST /api/messages/send-media",
            "POST /api/messages/bulk-send",
            "POST /api/sessions",
        ),
        _routes,
    )
    create_route: str = _setting("POST /api/sessions", _route)
    list_route: str = _setting("GET /api/sessions", _route)
    # Routes the gateway answers with success for a session it does not hold (see the contract):
    # they go only to an owner confirmed to hold the session, within CONFIRM_MAX_AGE seconds.
    confirm_routes: tuple[str, ...] = _setting(
        (
            "POST /api/messages/bulk-send",  # 200 with a per-recipient "Session not found"
            "PUT /api/sessions/{id}/metadata",
            "POST /api/sessions/{id}/restore",
            "GET /api/internal/sessions/{id}/last-activity",
        ),
        _templates,
    )
    # Confirmed like the above; when no live instance holds the session, placed like a create.
    start_routes: tuple[str, ...] = _setting(
        ("POST /api/sessions/{id}/reconnect", "POST /api/sessions/{id}/regenerate-qr"),
        _templates,
    )
    # Sent to every instance holding the session, and to no other (it deletes the local files).
    delete_route: str = _setting("DELETE /api/sessions/{id}", _template)
    confirm_max_age: float = _setting(2.0, _seconds(0.0))
    # Disconnect the extra copies of a session found on several instances (reconcile, leader).
    settle_duplicates: bool = _setting(False, _switch)
    # Holding requests for a session that should exist but that no live instance holds yet:
    # under Laravel's 30 s client timeout, so the client hears 503 session-restoring, not its own.
    hold_timeout: float = _setting(20.0, _seconds(0.0))
    hold_max_per_session: int = _setting(100, _count(1))
    hold_max_bytes: int = _setting(64 * 1024 * 1024, _size)
    hold_poll_interval: float = _setting(0.025, _seconds(0.01))
    hold_fail_fast: float = _setting(5.0, _seconds(0.0))
    # Restoring a dead instance's sessions on healthy ones (only where instances share session
    # state: RemoteAuth or a shared volume; elsewhere a moved session needs a new QR scan).
    restore: bool = _setting(False, _switch)
    # Starts the proxy itself makes (restores, moves) at a time per instance: a reconnect storm
    # must not take the fleet down.
    restore_concurrency: int = _setting(4, _count(1))
    restore_attempts: int = _setting(2, _count(1))  # instances tried per session, then reported
    restore_connect_timeout: float = _setting(60.0, _seconds(0.1))  # create to `connected`
    restore_poll_interval: float = _setting(0.025, _seconds(0.01))  # a starting session, asked
    # Exactly once: a request with an Idempotency-Key is carried out at most once per key and
    # session; repeats get the stored answer (Postgres, else Redis, else memory).
    idempotency_ttl: float = _setting(86400.0, _seconds(1.0))
    idempotency_max_body: int = _setting(1024 * 1024, _size)  # answers kept whole up to this
    idempotency_wait: float = _setting(25.0, _seconds(0.0))  # a repeat waits for the first
    # Pacing: sends per session beyond SEND_RATE (after a burst of SEND_BURST) wait in order.
    send_rate: float = _setting(0.0, _rate)  # "20/min"; 0: off
    send_burst: int = _setting(1, _count(1))
    send_routes: tuple[str, ...] = _setting(
        (
            "POST /api/messages/send",
            "POST /api/messages/send-media",
            "POST /api/messages/bulk-send",  # one message per recipient
        ),
        _routes,
    )
    send_queue_max: int = _setting(100, _count(1))  # sends waiting per session, then 429
    send_max_wait: float = _setting(20.0, _seconds(0.0))  # the longest a send waits, then 429
    # Moving sessions off an instance (drain) or between instances (rebalance).
    drain_concurrency: int = _setting(4, _count(1))  # sessions moved at a time
    drain_in_flight_wait: float = _setting(60.0, _seconds(0.0))  # for a session's requests
    rebalance_tolerance: float = _setting(0.1, _seconds(0.0))  # of the mean, at least 1 session
    passthrough_routes: tuple[str, ...] = _setting(
        (
            "/",
            "/health",
            "/health/*",
            "/info",
            "/cleanup/run",
            "/cleanup/stats",
            "/remoteauth/*",
        ),
        _list,
    )
    # Timeouts: longer than the instance's own (60 s sessions, 45 s sends, 5 s health, 30 s other)
    # so that the instance, not the proxy, is the one that gives up first.
    upstream_client: str = _setting("fast", _one_of("fast", "httpx"))
    connect_timeout: float = _setting(2.0, _seconds(0.001))
    route_timeouts: tuple[RouteTimeout, ...] = _setting(
        (
            RouteTimeout("/api/sessions", 65.0),
            RouteTimeout("/api/messages", 50.0),
            RouteTimeout("/health", 10.0),
            RouteTimeout("/", 35.0),
        ),
        _route_timeouts,
    )
    discovery_timeout: float = _setting(3.0, _seconds(0.001))
    # The proxy's own list calls (reconcile's inventory, fleet snapshots, start polls): an
    # instance holding thousands of sessions takes seconds to list them, far past a status
    # probe's DISCOVERY_TIMEOUT; a snapshot is awaited by lookups, so not the 65 s of clients'.
    list_timeout: float = _setting(30.0, _seconds(0.001))
    # Limits
    max_body_size: int = _setting(64 * 1024 * 1024, _size)
    replay_body_limit: int = _setting(1024 * 1024, _size)
    max_header_bytes: int = _setting(32 * 1024, _size)
    max_in_flight: int = _setting(4096, _count(1))
    max_in_flight_per_client: int = _setting(1024, _count(1))
    client_header_timeout: float = _setting(10.0, _seconds(0.1))
    client_body_timeout: float = _setting(30.0, _seconds(0.1))
    max_attempts: int = _setting(3, _count(1))
    replay_deadline: float = _setting(15.0, _seconds(0.001))
    # Health checking
    health_interval: float = _setting(5.0, _seconds(0.05))
    health_timeout: float = _setting(2.0, _seconds(0.001))
    eject_after_failures: int = _setting(3, _count(1))
    eject_base_seconds: float = _setting(5.0, _seconds(0.0))
    eject_max_seconds: float = _setting(120.0, _seconds(0.0))
    rediscovery_rate: float = _setting(20.0, _seconds(0.1))
    snapshot_interval: float = _setting(1.0, _seconds(0.05))
    # Reconcile
    reconcile_interval: float = _setting(300.0, _seconds(0.0))
    # Operations
    admin_token: str = _setting("", _text)
    host: str = _setting("127.0.0.1", _text)
    port: int = _setting(8080, _port)
    workers: int = _setting(1, _count(1))
    log_format: str = _setting("json", _one_of("json", "text"))
    log_level: str = _setting("info", _one_of("debug", "info", "warning", "error"))
    shutdown_drain: float = _setting(3.0, _seconds(0.0))
    shutdown_grace: float = _setting(20.0, _seconds(0.0))

    def timeout_for(self, path: str) -> float:
        best = RouteTimeout("", 35.0)
        for rt in self.route_timeouts:
            if path.startswith(rt.prefix) and len(rt.prefix) > len(best.prefix):
                best = rt
        return best.seconds


_PARSERS: dict[str, Parser] = {f.name: f.metadata["parse"] for f in fields(Settings)}
SETTING_NAMES = tuple(_PARSERS)


def load_settings(
    environ: Mapping[str, str], overrides: Mapping[str, str | None] | None = None
) -> Settings:
    """Build the settings from the environment, with ``overrides`` (from flags) taking precedence.

    Both hold strings, parsed the same way, so a flag and its variable can never disagree.
    """
    raw: dict[str, str] = {}
    for name in SETTING_NAMES:
        value = environ.get(ENV_PREFIX + name.upper())
        if value is not None:
            raw[name] = value
    for name, value in (overrides or {}).items():
        if name not in _PARSERS:
            raise ConfigError(f"unknown setting {name!r}")
        if value is not None:
            raw[name] = value
    values = {name: _PARSERS[name](name, value) for name, value in raw.items()}
    settings = Settings(**values)
    _check(settings)
    return settings


def _check(s: Settings) -> None:
    tls = [u for u in s.instances if u.startswith("https://")]
    if tls and s.upstream_client == "fast":
        raise ConfigError(
            f"{ENV_PREFIX}INSTANCES: {tls[0]} is https://, which the default upstream client does "
            f"not speak; use http:// instances or {ENV_PREFIX}UPSTREAM_CLIENT=httpx"
        )
    if s.replay_body_limit > s.max_body_size:
        raise ConfigError(
            f"{ENV_PREFIX}REPLAY_BODY_LIMIT={s.replay_body_limit} is larger than "
            f"{ENV_PREFIX}MAX_BODY_SIZE={s.max_body_size}"
        )
    if s.restore and not s.api_key:
        raise ConfigError(
            f"{ENV_PREFIX}RESTORE=on needs {ENV_PREFIX}API_KEY: the proxy re-creates sessions "
            "with the gateway's own create call, which the key authorizes"
        )
    if s.eject_max_seconds < s.eject_base_seconds:
        raise ConfigError(
            f"{ENV_PREFIX}EJECT_MAX_SECONDS={s.eject_max_seconds:g} is smaller than "
            f"{ENV_PREFIX}EJECT_BASE_SECONDS={s.eject_base_seconds:g}"
        )
    targets = set(s.instances)
    for alias, target in s.instance_aliases:
        if targets and target not in targets and not s.instances_dns:
            raise ConfigError(
                f"{ENV_PREFIX}INSTANCE_ALIASES: alias {alias!r} points at {target}, "
                f"which is not in {ENV_PREFIX}INSTANCES"
            )
