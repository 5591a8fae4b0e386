"""One-shot commands an operator runs: ``reconcile`` and ``migrate``."""

from __future__ import annotations

import json
import sys

import asyncpg
import httpx

from .client import create_client
from .config import ConfigError, Settings
from .discovery import Discovery
from .healing import DuplicateSettler
from .health import HealthChecker
from .instances import InstanceSet
from .observe import configure_logging, redact
from .reconcile import Reconciler
from .store import Store

EXIT_OK, EXIT_UNREACHABLE, EXIT_PARTIAL, EXIT_NOT_LEADER = 0, 1, 3, 4


async def reconcile_command(settings: Settings, dry_run: bool, as_json: bool) -> int:
    if not settings.database_url:
        raise ConfigError("SESSION_PROXY_DATABASE_URL is required to reconcile")
    if not settings.instances:
        raise ConfigError("SESSION_PROXY_INSTANCES is required to reconcile")
    configure_logging(settings.log_format, "warning")
    client = create_client(settings.upstream_client)
    instances = InstanceSet(settings)
    store = Store(settings)
    try:
        await HealthChecker(settings, instances, client).check_all()
        await store.open()
        discovery = Discovery(settings, instances, client)
        settler = (
            DuplicateSettler(settings, discovery, client) if settings.settle_duplicates else None
        )
        reconciler = Reconciler(settings, instances, discovery, store, settler)
        report = await reconciler.run_once(dry_run=dry_run)
    finally:
        await store.close()
        await client.aclose()
    print(json.dumps(report.as_dict(), indent=2) if as_json else report.as_text())
    if report.skipped:
        return EXIT_NOT_LEADER if "another replica" in report.skipped else EXIT_UNREACHABLE
    if report.unreachable_instances and not report.instances:
        return EXIT_UNREACHABLE
    return EXIT_PARTIAL if report.unreachable_instances else EXIT_OK


async def migrate_command(settings: Settings, create_table: bool) -> int:
    if not settings.database_url:
        raise ConfigError("SESSION_PROXY_DATABASE_URL is required to migrate")
    try:
        done = await Store(settings).migrate(create_table)
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"migrate failed: {redact(str(exc))}", file=sys.stderr)
        return EXIT_UNREACHABLE
    for label in done:
        print(f"ok: {label}")
    return EXIT_OK


def routes_command(url: str, token: str, as_json: bool) -> int:
    """Page through ``/_proxy/routes`` of a running proxy and print every entry."""
    if not token:
        raise ConfigError("SESSION_PROXY_ADMIN_TOKEN (or --admin-token) is required for routes")
    headers = {"authorization": f"Bearer {token}"}
    query = "?limit=1000"
    count = 0
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, trust_env=False) as client:
        while query:
            try:
                response = client.get("/_proxy/routes" + query, timeout=10)
            except httpx.HTTPError as exc:
                print(f"routes: cannot reach {url}: {exc}", file=sys.stderr)
                return EXIT_UNREACHABLE
            if response.status_code != 200:
                print(f"routes: {url} answered {response.status_code}", file=sys.stderr)
                return EXIT_UNREACHABLE
            page = response.json()
            if count == 0 and not as_json:
                print(f"{'session':<48} instance")
            for entry in page["routes"]:
                count += 1
                if as_json:
                    print(json.dumps(entry))
                else:
                    print(f"{entry['session_id']:<48} {entry['instance']}")
            query = page["next"] or ""
    if not as_json:
        print(f"({count} sessions)")
    return EXIT_OK
