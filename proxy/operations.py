"""One-shot commands an operator runs: ``reconcile`` and ``migrate``."""

from __future__ import annotations

import json
import sys

import asyncpg

from .client import UpstreamClient
from .config import ConfigError, Settings
from .discovery import Discovery
from .instances import HealthChecker, InstanceSet
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
    client = UpstreamClient()
    instances = InstanceSet(settings)
    store = Store(settings)
    try:
        await HealthChecker(settings, instances, client).check_all()
        await store.open()
        reconciler = Reconciler(settings, instances, Discovery(settings, instances, client), store)
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
