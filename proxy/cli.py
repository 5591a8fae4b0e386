"""``session-proxy``: the command line, the one place that reads flags and the environment."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from .config import ENV_PREFIX, SETTING_NAMES, ConfigError, Settings, load_settings

# Flags every command that talks to the fleet accepts; each mirrors a SESSION_PROXY_* variable.
_COMMON_FLAGS = {
    "instances": "comma-separated instance URLs",
    "instance_aliases": "alias=url pairs, comma-separated (the strings the database stores)",
    "api_key": "api key for the proxy's own calls to instances",
    "database_url": "postgresql:// URL (optional)",
    "log_format": "json or text",
    "log_level": "debug, info, warning or error",
}
_SERVE_FLAGS = {
    "host": "address to listen on",
    "port": "port to listen on",
    "workers": "worker processes",
    "cache_url": "memory:// or redis://",
    "admin_token": "bearer token for /_proxy/ (admin API off when empty)",
}


def _add_flags(parser: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    for name, help_text in flags.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            help=f"{help_text} [{ENV_PREFIX}{name.upper()}]",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="session-proxy",
        description="One address for a fleet of stateful WhatsApp gateway instances.",
        epilog=f"Every setting also reads {ENV_PREFIX}<NAME> from the environment; see README.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the proxy")
    _add_flags(serve, _COMMON_FLAGS | _SERVE_FLAGS)

    # Every argument after `simulate` (--help included) is the simulator's own: its parser,
    # proxy/simulator.py main(), is the only one that declares them.
    commands.add_parser("simulate", help="run one simulated instance", add_help=False)

    reconcile = commands.add_parser(
        "reconcile",
        help="one reconcile pass: fleet inventory against the database, moves written back",
        description="Exit codes: 0 done; 1 database or every instance unreachable; "
        "3 done, but some instances were unreachable; 4 another replica is reconciling.",
    )
    _add_flags(reconcile, _COMMON_FLAGS)
    reconcile.add_argument("--dry-run", action="store_true", help="report, write nothing")
    reconcile.add_argument("--json", action="store_true", help="print the report as JSON")

    migrate = commands.add_parser("migrate", help="install the NOTIFY trigger")
    _add_flags(migrate, {"database_url": _COMMON_FLAGS["database_url"]})
    migrate.add_argument(
        "--create-table", action="store_true", help="create a minimal table (no Laravel)"
    )

    routes = commands.add_parser("routes", help="print a running proxy's routing table")
    routes.add_argument("--url", default=None, help="the proxy (default http://HOST:PORT)")
    _add_flags(routes, {"admin_token": _SERVE_FLAGS["admin_token"], "host": "", "port": ""})
    routes.add_argument("--json", action="store_true", help="print JSON lines")

    drain = commands.add_parser(
        "drain",
        help="move every session off an instance of a running proxy (before stopping it)",
        description="Exit codes: 0 done (or started, without --wait); 1 the proxy could not be "
        "asked or the drain did not finish in time; 3 drained, but some sessions could not be "
        "moved.",
    )
    drain.add_argument("instance", help="the instance's URL or alias")
    drain.add_argument("--url", default=None, help="the proxy (default http://HOST:PORT)")
    drain.add_argument(
        "--wait",
        nargs="?",
        type=float,
        const=600.0,
        default=None,
        metavar="SECONDS",
        help="follow the drain until it is done (at most SECONDS, default 600)",
    )
    _add_flags(drain, {"admin_token": _SERVE_FLAGS["admin_token"], "host": "", "port": ""})

    rebalance = commands.add_parser(
        "rebalance", help="move sessions from the most to the least loaded instances"
    )
    rebalance.add_argument("--url", default=None, help="the proxy (default http://HOST:PORT)")
    rebalance.add_argument("--dry-run", action="store_true", help="print the plan, move nothing")
    rebalance.add_argument("--json", action="store_true", help="print the plan as JSON")
    _add_flags(rebalance, {"admin_token": _SERVE_FLAGS["admin_token"], "host": "", "port": ""})

    demo = commands.add_parser(
        "demo",
        help="watch routing, crashes and the recovery",
        description="Watch the proxy work: start three simulated gateway instances and the "
        "real proxy on loopback, send through it, then SIGKILL instances and move a session, "
        "showing how each send still reaches its session (which instance answered, after how "
        "many attempts). About 10 s; needs nothing else running. The logs are kept.",
    )
    demo.add_argument("--fast", action="store_true", help="no pauses between steps")
    return parser


def settings_from(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    overrides = {name: getattr(args, name) for name in SETTING_NAMES if hasattr(args, name)}
    return load_settings(os.environ if environ is None else environ, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "simulate":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "simulate":
            from . import simulator

            return simulator.main(rest, prog=f"{parser.prog} simulate")
        if args.command == "serve":
            from .server import serve

            settings = settings_from(args)
            # Worker processes rebuild their settings from the environment: put the flags there.
            for name in SETTING_NAMES:
                value = getattr(args, name, None)
                if value is not None:
                    os.environ[ENV_PREFIX + name.upper()] = value
            return serve(settings)
        if args.command == "reconcile":
            from .operations import reconcile_command

            return asyncio.run(reconcile_command(settings_from(args), args.dry_run, args.json))
        if args.command == "migrate":
            from .operations import migrate_command

            return asyncio.run(migrate_command(settings_from(args), args.create_table))
        if args.command == "routes":
            from .operations import routes_command

            settings = settings_from(args)
            url = args.url or f"http://{settings.host}:{settings.port}"
            return routes_command(url, settings.admin_token, args.json)
        if args.command in ("drain", "rebalance"):
            from .operations import drain_command, rebalance_command

            settings = settings_from(args)
            url = args.url or f"http://{settings.host}:{settings.port}"
            if args.command == "drain":
                return drain_command(url, settings.admin_token, args.instance, args.wait)
            return rebalance_command(url, settings.admin_token, args.dry_run, args.json)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(fast=args.fast)
    except ConfigError as exc:
        print(f"session-proxy: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2
