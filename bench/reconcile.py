"""Reconcile time at scale: N sessions over four simulated instances, 30% of rows wrong.

    .venv/bin/python bench/reconcile.py [--sessions 10000 100000] [--database-url URL]

Needs a Postgres (default: the one the tests use, SESSION_PROXY_TEST_DATABASE_URL or
127.0.0.1:5432); makes a throwaway database per size and drops it. Prints, per size, the pass's
own time, the whole command's time, list calls, SQL statements and rows written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers.processes import Simulator  # noqa: E402

API_KEY = "demo-key"


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _fill(url: str, rows: dict[str, str]) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.copy_records_to_table(
            "whatsapp_accounts",
            records=list(rows.items()),
            columns=["session_id", "assigned_instance_url"],
        )
    finally:
        await conn.close()


def run_size(admin_url: str, total: int, tmp: Path) -> dict[str, float | int | str]:
    name = f"sp_bench_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(admin_url, f'CREATE DATABASE "{name}"'))
    db_url = admin_url.rsplit("/", 1)[0] + "/" + name
    per = total // 4
    sims = []
    try:
        sims = [
            Simulator.start(
                tmp,
                f"b{n}_{total}",
                sessions=[f"b{n}_{k:06d}" for k in range(per)],
                api_key=API_KEY,
                start_timeout=60,
            )
            for n in range(4)
        ]
        env = {
            "SESSION_PROXY_DATABASE_URL": db_url,
            "SESSION_PROXY_INSTANCES": ",".join(s.url for s in sims),
            "SESSION_PROXY_API_KEY": API_KEY,
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        }
        subprocess.run(
            [sys.executable, "-m", "proxy", "migrate", "--create-table"],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=60,
        )
        rng = random.Random(total)
        rows = {}
        for n, _sim in enumerate(sims):
            for k in range(per):
                owner = sims[(n + 1 + rng.randrange(3)) % 4] if rng.random() < 0.3 else sims[n]
                rows[f"b{n}_{k:06d}"] = f"http://localhost:{owner.port}"
        asyncio.run(_fill(db_url, rows))
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "proxy", "reconcile", "--json"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        command_seconds = time.monotonic() - started
        report = json.loads(done.stdout)
        return {
            "sessions": total,
            "pass_s": report["seconds"],
            "command_s": round(command_seconds, 2),
            "list_calls": report["inventory_calls"],
            "sql": report["sql_statements"],
            "moved": report["counts"]["moved"],
            "written": report["rows_written"],
        }
    finally:
        for sim in sims:
            sim.stop()
        asyncio.run(_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "SESSION_PROXY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for total in args.sessions:
            results.append(run_size(args.database_url, total, Path(tmp)))
    print(
        f"{'sessions':>9} {'pass s':>8} {'command s':>10} {'list calls':>11} {'SQL':>5} "
        f"{'moved':>7} {'written':>8}"
    )
    for r in results:
        print(
            f"{r['sessions']:>9} {r['pass_s']:>8} {r['command_s']:>10} {r['list_calls']:>11} "
            f"{r['sql']:>5} {r['moved']:>7} {r['written']:>8}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
