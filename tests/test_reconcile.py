"""Reconcile: one inventory call per instance, one comparison in Postgres, one batched write,
one leader."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import API_KEY
from tests.helpers.faults import FaultyHop
from tests.helpers.postgres import TempDatabase
from tests.helpers.processes import Simulator, free_port
from tests.test_postgres import add_rows, laravel_form, migrate, row

ROOT = Path(__file__).resolve().parent.parent


def run_reconcile(
    db_url: str, instances: list[str], *args: str, timeout: float = 120
) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "reconcile", *args],
        env={
            "SESSION_PROXY_DATABASE_URL": db_url,
            "SESSION_PROXY_INSTANCES": ",".join(instances),
            "SESSION_PROXY_API_KEY": API_KEY,
            "PATH": "/usr/bin:/bin",
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    sys.stderr.write(done.stderr)  # the command's log lines, shown when a test fails
    return done.returncode, done.stdout


def report_of(output: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(output[output.index("{") :])
    return document


def list_calls(sim: Simulator) -> int:
    return sum(1 for e in sim.requests() if e["path"] == "/api/sessions")


def test_ten_thousand_sessions_thirty_percent_wrong_fixed_in_one_pass(
    tmp_path: Path, pg_database: TempDatabase
) -> None:
    sims = [
        Simulator.start(
            tmp_path, f"r{n}", sessions=[f"r{n}_{k:05d}" for k in range(2500)], api_key=API_KEY
        )
        for n in range(4)
    ]
    try:
        migrate(pg_database.url, "--create-table")
        rng = random.Random(4)
        rows = {}
        wrong = set()
        for n, sim in enumerate(sims):
            for k in range(2500):
                sid = f"r{n}_{k:05d}"
                if rng.random() < 0.3:
                    wrong.add(sid)
                    rows[sid] = laravel_form(sims[(n + 1 + rng.randrange(3)) % 4])
                else:
                    rows[sid] = laravel_form(sim)
        add_rows(pg_database, rows)
        urls = [s.url for s in sims]

        code, out = run_reconcile(pg_database.url, urls, "--dry-run", "--json")
        dry = report_of(out)
        assert code == 0, out
        assert dry["counts"]["moved"] == len(wrong) and dry["rows_written"] == 0
        stale = pg_database.fetch(
            "SELECT count(*) AS n FROM whatsapp_accounts WHERE session_id = ANY($1::text[]) "
            "AND assigned_instance_url <> ALL($2::text[])",
            sorted(wrong)[:1],
            [laravel_form(s) for s in sims[:1]],
        )
        assert stale  # the dry run changed nothing (checked below by the real pass's count)

        before = [list_calls(s) for s in sims]
        started = time.monotonic()
        code, out = run_reconcile(pg_database.url, urls, "--json")
        elapsed = time.monotonic() - started
        report = report_of(out)
        after = [list_calls(s) for s in sims]
    finally:
        for sim in sims:
            sim.stop()
    print(
        f"\n10,000 sessions, {len(wrong)} wrong rows: reconcile {report['seconds']:.2f} s inside "
        f"a {elapsed:.2f} s command; {report['inventory_calls']} list calls, "
        f"{report['sql_statements']} SQL statements, {report['rows_written']} rows written; "
        f"counts {report['counts']}"
    )
    assert code == 0, out
    assert report["counts"] == {
        "verified": 10_000 - len(wrong),
        "moved": len(wrong),
        "unreachable": 0,
        "duplicated": 0,
        "unknown": 0,
    }
    assert report["rows_written"] == len(wrong)
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1, 1]
    assert report["inventory_calls"] == 4
    # Whatever the row count: lock; begin and the lists' table; the owners' spellings; the
    # lists' COPY; the disagreeing rows; commit; the write; unlock.
    assert report["sql_statements"] == 8
    correct = pg_database.fetch(
        "SELECT count(*) AS n FROM whatsapp_accounts w JOIN unnest($1::text[], $2::text[]) "
        "AS e(sid, url) ON w.session_id = e.sid AND w.assigned_instance_url = e.url",
        [f"r{n}_{k:05d}" for n in range(4) for k in range(2500)],
        [laravel_form(sims[n]) for n in range(4) for _ in range(2500)],
    )
    assert correct[0]["n"] == 10_000
    migrated = pg_database.fetch(
        "SELECT count(*) AS n FROM whatsapp_accounts WHERE instance_migration_count = 1"
    )
    assert migrated[0]["n"] == len(wrong)


def test_every_class_is_reported(tmp_path: Path, pg_database: TempDatabase) -> None:
    a = Simulator.start(tmp_path, "a", sessions=["ok1", "dup", "stray"], api_key=API_KEY)
    b = Simulator.start(tmp_path, "b", sessions=["dup", "moved1"], api_key=API_KEY)
    try:
        migrate(pg_database.url, "--create-table")
        add_rows(
            pg_database,
            {
                "ok1": laravel_form(a),
                "dup": laravel_form(a),
                "moved1": laravel_form(a),
                "gone": laravel_form(b),
            },
        )
        code, out = run_reconcile(pg_database.url, [a.url, b.url], "--json")
        text_code, text = run_reconcile(pg_database.url, [a.url, b.url], "--dry-run")
    finally:
        a.stop()
        b.stop()
    assert code == 0 and text_code == 0, out
    report = report_of(out)
    assert report["counts"] == {
        "verified": 2,
        "moved": 1,
        "unreachable": 1,
        "duplicated": 1,
        "unknown": 1,
    }
    assert report["moved"] == [
        {"session_id": "moved1", "from": laravel_form(a), "to": laravel_form(b)}
    ]
    assert report["unreachable"][0]["session_id"] == "gone"
    assert report["duplicated"][0]["session_id"] == "dup"
    assert report["unknown"][0]["session_id"] == "stray"
    # The readable form: a table of instances and of classes.
    for needle in ("instance", "sessions", "verified", "duplicated", "unknown", "(dry run)"):
        assert needle in text


def test_exit_codes_when_things_are_unreachable(tmp_path: Path, pg_database: TempDatabase) -> None:
    a = Simulator.start(tmp_path, "a", sessions=["x"], api_key=API_KEY)
    try:
        migrate(pg_database.url, "--create-table")
        dead = f"http://127.0.0.1:{free_port()}"
        code, out = run_reconcile(pg_database.url, [a.url, dead], "--json")
        assert code == 3, out
        assert dead in report_of(out)["unreachable_instances"]
        code, out = run_reconcile(pg_database.url, [dead], "--json")
        assert code == 1, out
        code, out = run_reconcile(
            f"postgresql://postgres@127.0.0.1:{free_port()}/nope", [a.url], "--json"
        )
        assert code == 1, out
        assert "database unreachable" in out
    finally:
        a.stop()


def test_a_session_started_while_the_lists_come_in_is_not_lost(
    tmp_path: Path, pg_database: TempDatabase
) -> None:
    """The rows are compared as they were when the lists were asked: a session started on an
    instance after its list was taken, its row written meanwhile, is on no list the pass has.
    Compared with the rows as they are after the lists, it would be "unreachable" (and, with
    RESTORE=on, re-created elsewhere: a second copy)."""
    a = Simulator.start(tmp_path, "a", sessions=["old"], api_key=API_KEY)
    b = Simulator.start(tmp_path, "b", sessions=["b1"], api_key=API_KEY)
    slow = FaultyHop(b.port).start()
    try:
        migrate(pg_database.url, "--create-table")
        add_rows(pg_database, {"old": laravel_form(a), "b1": slow.url})
        slow.set_mode("latency", seconds=2.0)  # b's list comes ~4 s after a's
        done: list[tuple[int, str]] = []
        passing = threading.Thread(
            target=lambda: done.append(run_reconcile(pg_database.url, [a.url, slow.url], "--json"))
        )
        passing.start()
        deadline = time.monotonic() + 30
        while list_calls(a) == 0:
            assert time.monotonic() < deadline, "a's list was never asked"
            time.sleep(0.02)
        a.add_session("late")
        add_rows(pg_database, {"late": laravel_form(a)})
        passing.join(60)
        assert done, "the pass did not end"
    finally:
        slow.stop()
        a.stop()
        b.stop()
    code, out = done[0]
    assert code == 0, out
    report = report_of(out)
    assert list_calls(a) == 1
    assert report["counts"]["unreachable"] == 0, report["unreachable"]
    assert report["counts"]["verified"] == 2  # old and b1; late is for the next pass
    assert row(pg_database, "late")["assigned_instance_url"] == laravel_form(a)


def test_two_replicas_reconciling_at_once_exactly_one_writes(
    tmp_path: Path, pg_database: TempDatabase
) -> None:
    a = Simulator.start(tmp_path, "a", sessions=[f"m{k}" for k in range(50)], api_key=API_KEY)
    b = Simulator.start(tmp_path, "b", api_key=API_KEY)
    slow = FaultyHop(a.port).start()
    slow.set_mode("latency", seconds=1.0)  # the pass holds the lock for a while
    try:
        migrate(pg_database.url, "--create-table")
        add_rows(pg_database, {f"m{k}": laravel_form(b) for k in range(50)})
        env_urls = [slow.url, b.url]
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "proxy", "reconcile", "--json"],
                env={
                    "SESSION_PROXY_DATABASE_URL": pg_database.url,
                    "SESSION_PROXY_INSTANCES": ",".join(env_urls),
                    "SESSION_PROXY_INSTANCE_ALIASES": f"{laravel_form(a)}={slow.url}",
                    "SESSION_PROXY_API_KEY": API_KEY,
                    "PATH": "/usr/bin:/bin",
                },
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        slow.stop()
        a.stop()
        b.stop()
    reports = [report_of(out) for out, _ in outputs]
    codes = sorted(p.returncode for p in procs)
    writers = [r for r in reports if not r["skipped"]]
    skipped = [r for r in reports if r["skipped"]]
    print(f"\ntwo replicas: exit codes {codes}; skipped: {[r['skipped'] for r in skipped]}")
    assert codes == [0, 4]
    assert len(writers) == 1 and writers[0]["rows_written"] == 50
    assert skipped[0]["skipped"] == "another replica is reconciling"


@pytest.mark.parametrize("sessions", [1000])
def test_reconcile_json_report_shape(
    tmp_path: Path, pg_database: TempDatabase, sessions: int
) -> None:
    a = Simulator.start(tmp_path, "a", sessions=[f"j{k}" for k in range(sessions)], api_key=API_KEY)
    try:
        migrate(pg_database.url, "--create-table")
        add_rows(pg_database, {f"j{k}": laravel_form(a) for k in range(sessions)})
        code, out = run_reconcile(pg_database.url, [a.url], "--json")
    finally:
        a.stop()
    report = report_of(out)
    assert code == 0
    assert report["counts"]["verified"] == sessions
    assert set(report) >= {"started_at", "dry_run", "skipped", "seconds", "instances", "counts"}


def test_counts_are_exact_and_lists_are_capped(tmp_path: Path, pg_database: TempDatabase) -> None:
    """A million-session report must not carry a million ids: every class is counted exactly,
    and lists at most its first 1,000 rows (the report says so)."""
    a = Simulator.start(tmp_path, "a", sessions=[f"c{k}" for k in range(3000)], api_key=API_KEY)
    b = Simulator.start(tmp_path, "b", api_key=API_KEY)
    try:
        migrate(pg_database.url, "--create-table")
        add_rows(
            pg_database,
            {f"c{k}": laravel_form(a if k % 2 else b) for k in range(3000)}
            | {f"gone{k}": laravel_form(b) for k in range(1200)},
        )
        code, out = run_reconcile(pg_database.url, [a.url, b.url], "--dry-run", "--json")
        text_code, text = run_reconcile(pg_database.url, [a.url, b.url], "--dry-run")
    finally:
        a.stop()
        b.stop()
    assert code == 0 and text_code == 0, out
    report = report_of(out)
    assert report["counts"] == {
        "verified": 1500,
        "moved": 1500,
        "unreachable": 1200,
        "duplicated": 0,
        "unknown": 0,
    }
    assert [len(report[name]) for name in ("verified", "moved", "unreachable")] == [1000] * 3
    assert report["lists_capped"] is True and report["listed_per_class"] == 1000
    assert len(set(report["verified"])) == 1000
    assert "counts are exact" in text and "moved (first 20 of 1500)" in text


def test_reconcile_finds_its_instances_through_dns_as_a_cronjob_would(
    tmp_path: Path, pg_database: TempDatabase
) -> None:
    """`session-proxy reconcile` with INSTANCES_DNS and no INSTANCES (a Kubernetes CronJob next
    to a headless Service): the name is resolved once and the pass corrects a wrong row."""
    a = Simulator.start(tmp_path, "a", sessions=["dns-1"], api_key=API_KEY)
    try:
        migrate(pg_database.url, "--create-table")
        add_rows(pg_database, {"dns-1": "http://localhost:1"})
        done = subprocess.run(
            [sys.executable, "-m", "proxy", "reconcile", "--json"],
            env={
                "SESSION_PROXY_DATABASE_URL": pg_database.url,
                # A name the system resolver answers with the simulator's address only.
                "SESSION_PROXY_INSTANCES_DNS": f"127.0.0.1:{a.port}",
                "SESSION_PROXY_API_KEY": API_KEY,
                "PATH": "/usr/bin:/bin",
            },
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        sys.stderr.write(done.stderr)
        assert done.returncode == 0, done.stdout + done.stderr
        report = report_of(done.stdout)
        assert report["instances"] == {a.url: 1}
        assert [m["session_id"] for m in report["moved"]] == ["dns-1"]
        owner = pg_database.fetch(
            "SELECT assigned_instance_url FROM whatsapp_accounts WHERE session_id = 'dns-1'"
        )
        assert owner[0][0] in (a.url, laravel_form(a))
    finally:
        a.stop()
