"""One-shot commands an operator runs: ``reconcile`` and ``migrate``, and the ones that ask a
running proxy: ``routes``, ``drain``, ``rebalance``."""

from __future__ import annotations

import json
import sys
import time

import asyncpg
import httpx

from .client import create_client
from .config import ConfigError, Settings
from .discovery import Discovery
from .dns import DnsWatcher
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
    if not settings.instances and not settings.instances_dns:
        raise ConfigError(
            "SESSION_PROXY_INSTANCES or SESSION_PROXY_INSTANCES_DNS is required to reconcile"
        )
    configure_logging(settings.log_format, "warning")
    client = create_client(settings.upstream_client)
    instances = InstanceSet(settings)
    store = Store(settings)
    try:
        health = HealthChecker(settings, instances, client)
        if settings.instances_dns:
            # Resolved once, as the proxy does at start: a CronJob has no replica to ask.
            await DnsWatcher(settings, instances, health).refresh()
        await health.check_all()
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


def _admin_client(url: str, token: str, command: str) -> httpx.Client:
    if not token:
        raise ConfigError(f"SESSION_PROXY_ADMIN_TOKEN (or --admin-token) is required for {command}")
    headers = {"authorization": f"Bearer {token}"}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, trust_env=False, timeout=30)


def drain_command(url: str, token: str, instance: str, wait: float | None) -> int:
    """Ask a running proxy to move every session off ``instance``; with ``wait``, follow it
    until the instance is drained (exit 3 if some sessions could not be moved, 1 on time-out)."""
    with _admin_client(url, token, "drain") as client:
        try:
            response = client.post("/_proxy/instances/drain", json={"instance": instance})
        except httpx.HTTPError as exc:
            print(f"drain: cannot reach {url}: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        if response.status_code != 202:
            print(f"drain: {url} answered {response.status_code}: {response.text}", file=sys.stderr)
            return EXIT_UNREACHABLE
        state = response.json()
        print(f"draining {state['url']}: {state['drain']['remaining']} sessions to move")
        if wait is None:
            return EXIT_OK
        deadline = time.monotonic() + wait
        while state["state"] == "draining":
            if time.monotonic() >= deadline:
                print(f"drain: not drained within {wait:g} s", file=sys.stderr)
                return EXIT_UNREACHABLE
            time.sleep(0.5)
            try:
                listing = client.get("/_proxy/instances").json()["instances"]
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                print(f"drain: cannot follow the drain: {exc}", file=sys.stderr)
                return EXIT_UNREACHABLE
            state = next((i for i in listing if i["url"] == state["url"]), state)
            drain = state["drain"]
            print(f"  moved {drain['moved']}, failed {drain['failed']}, left {drain['remaining']}")
    drain = state["drain"]
    print(
        f"{state['url']} {state['state']} in {drain['seconds']} s: moved {drain['moved']}, "
        f"failed {drain['failed']}, left {drain['remaining']}"
    )
    return EXIT_PARTIAL if drain["failed"] or drain["remaining"] else EXIT_OK


def rebalance_command(url: str, token: str, dry_run: bool, as_json: bool) -> int:
    """Ask a running proxy for a rebalance (or only its plan, with ``dry_run``)."""
    with _admin_client(url, token, "rebalance") as client:
        try:
            response = client.post("/_proxy/rebalance", params={"dry_run": "1" if dry_run else "0"})
        except httpx.HTTPError as exc:
            print(f"rebalance: cannot reach {url}: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
    if response.status_code not in (200, 202):
        print(f"rebalance: {url} answered {response.status_code}: {response.text}", file=sys.stderr)
        return EXIT_UNREACHABLE
    plan = response.json()
    if as_json:
        print(json.dumps(plan))
        return EXIT_OK
    print(f"{'instance':<40} {'now':>6} {'after':>6}")
    for instance, count in sorted(plan["before"].items()):
        print(f"{instance:<40} {count:>6} {plan['after'][instance]:>6}")
    verb = "would move" if dry_run else "moving"
    print(
        f"{verb} {len(plan['moves'])} sessions (mean {plan['mean']}, tolerance "
        f"{plan['tolerance']:g} of it)"
    )
    for move in plan["moves"][:20]:
        print(f"  {move['session_id']}: {move['from']} -> {move['to']}")
    return EXIT_OK
