"""Chaos with RESTORE=on: steady numbered sends while an instance is SIGKILLed every ~10 s.

The instances share session state (any one can start any session) and restart empty (their own
start-up restore is off), a start takes 1 s to connect: whatever comes back, the proxy brought
back. Each session has one sender sending ``<session>#<n>`` in turn. What must hold:

- every send answers 200, except one cut off in flight by the kill itself (sent to the instance,
  which died before answering): that one is truly ambiguous and must say so (502
  ``upstream-ambiguous`` naming the killed instance), and is counted;
- no message is delivered twice, and no session's messages are delivered out of order (read from
  the instances' own delivery logs);
- no instance ever runs more than RESTORE_CONCURRENCY starts at once.

SESSION_PROXY_TEST_RESTORE_CHAOS_SECONDS sets the length (60 s by default: six kills).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import statistics
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import API_KEY
from tests.helpers.processes import ProxyProcess, Simulator
from tests.helpers.traffic import wait_for
from tests.test_restore import admin, create, holders, proxy_env, sid

DURATION = float(os.environ.get("SESSION_PROXY_TEST_RESTORE_CHAOS_SECONDS", "60"))
KILL_EVERY = 10.0
DOWN_FOR = 3.0  # a killed instance restarts (empty) this long after
SESSIONS = 8
CONCURRENCY = 2


class Sender(threading.Thread):
    def __init__(self, proxy: ProxyProcess, session_id: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.proxy, self.session_id, self.stop = proxy, session_id, stop
        # (n, status, error code, instance, started, ended)
        self.results: list[tuple[int, int, str, str, float, float]] = []

    def run(self) -> None:
        with httpx.Client(trust_env=False, timeout=40) as client:
            n = 0
            while not self.stop.is_set() and n < 5000:
                started = time.monotonic()
                answer = client.post(
                    f"{self.proxy.url}/api/messages/send",
                    json={
                        "session_id": self.session_id,
                        "workspace_id": 1,
                        "recipient_phone": "628120001111",
                        "message": f"{self.session_id}#{n}",
                        "api_key": API_KEY,
                    },
                )
                self.results.append(
                    (
                        n,
                        answer.status_code,
                        answer.headers.get("x-proxy-error", ""),
                        answer.headers.get("x-proxy-instance", ""),
                        started,
                        time.monotonic(),
                    )
                )
                n += 1
                time.sleep(0.05)


def test_restore_chaos_no_failed_duplicate_or_reordered_send(tmp_path: Path) -> None:
    sims = [
        Simulator.start(tmp_path, f"c{n}", api_key=API_KEY, connect_delay=1.0) for n in range(4)
    ]
    proxy = ProxyProcess.start(
        tmp_path,
        proxy_env(
            sims,
            SESSION_PROXY_RESTORE_CONCURRENCY=str(CONCURRENCY),
            SESSION_PROXY_EJECT_BASE_SECONDS="0.5",
            SESSION_PROXY_EJECT_MAX_SECONDS="2",
        ),
        ready_path="/readyz",
    )
    stop = threading.Event()
    senders: list[Sender] = []
    kills: list[tuple[str, float, float]] = []  # instance url, signalled, reaped
    most_starting: dict[str, int] = {}
    try:
        ids = [sid(500 + n) for n in range(SESSIONS)]
        for n, session_id in enumerate(ids):
            assert create(proxy, session_id, 900 + n).status_code == 200
        wait_for(
            lambda: all([h[1] for h in holders(sims, s)] == ["connected"] for s in ids),
            20,
            "every session connected",
        )
        senders = [Sender(proxy, s, stop) for s in ids]
        for sender in senders:
            sender.start()
        rng = random.Random(13)
        started = time.monotonic()
        next_kill = started + KILL_EVERY / 2
        while next_kill < started + DURATION - DOWN_FOR:
            time.sleep(max(0.0, next_kill - time.monotonic()))
            next_kill += KILL_EVERY
            loaded = [sim for sim in sims if sim.alive and any(holders([sim], s) for s in ids)]
            if not loaded:
                continue
            victim = rng.choice(loaded)
            for sim in sims:
                if sim.alive:
                    most = sim.starts()["max_starting"]
                    most_starting[sim.name] = max(most_starting.get(sim.name, 0), most)
            signalled = time.monotonic()
            victim.kill()  # SIGKILL, then reaped: dead by the time it returns
            kills.append((victim.url, signalled, time.monotonic()))
            time.sleep(DOWN_FOR)
            victim.restart()  # empty: its own start-up restore is off
        time.sleep(max(0.0, started + DURATION - time.monotonic()))
        stop.set()
        for sender in senders:
            sender.join(60)
        for sim in sims:
            most = sim.starts()["max_starting"]
            most_starting[sim.name] = max(most_starting.get(sim.name, 0), most)

        results = [(s.session_id, *r) for s in senders for r in s.results]
        failed = [r for r in results if r[2] != 200]
        cut_off = [
            r
            for r in failed
            if r[3] == "upstream-ambiguous"
            # In flight at the kill: sent before the instance was gone, answered after the signal.
            and any(
                url == r[4] and r[5] <= dead and r[6] >= signalled for url, signalled, dead in kills
            )
        ]
        assert [r for r in failed if r not in cut_off] == [], (failed[:5], kills)

        delivered: dict[str, list[tuple[float, int]]] = {}
        texts: list[str] = []
        for sim in sims:
            for event in sim.events("sent"):
                text = str(event.get("text") or "")
                session_id, _, n = text.partition("#")
                if session_id in ids:
                    texts.append(text)
                    delivered.setdefault(session_id, []).append((event["t"], int(n)))
        duplicates = len(texts) - len(set(texts))
        inversions = 0
        for events in delivered.values():
            order = [n for _, n in sorted(events)]
            inversions += sum(1 for a, b in itertools.pairwise(order) if b < a)
        ok = {(r[0], r[1]) for r in results if r[2] == 200}
        delivered_set = {(t.partition("#")[0], int(t.partition("#")[2])) for t in texts}
        assert ok <= delivered_set  # every 200 was delivered
        assert duplicates == 0 and inversions == 0, (duplicates, inversions)

        held = []
        for line in proxy.log_text().splitlines():
            if '"held request released"' in line:
                held.append(json.loads(line)["held_ms"])
        held.sort()
        restores = admin(proxy, "/_proxy/restores")
        assert restores["counts"]["failed"] == 0, restores
        assert max(restores["most_starts_at_once"].values(), default=0) <= CONCURRENCY
        assert max(most_starting.values()) <= CONCURRENCY, most_starting

        def pct(p: float) -> float:
            return held[min(len(held) - 1, int(p * len(held)))] if held else 0.0

        print(
            f"\nrestore chaos: {DURATION:.0f} s, {len(kills)} kills, {len(results)} sends, "
            f"{len(failed) - len(cut_off)} failed, {len(cut_off)} cut off in flight by a kill "
            f"(502 upstream-ambiguous), {duplicates} duplicates, {inversions} order inversions; "
            f"{restores['counts']['succeeded']} restores; {len(held)} held, hold p50 "
            f"{pct(0.5):.0f} ms, p99 {pct(0.99):.0f} ms, max {held[-1] if held else 0:.0f} ms "
            f"(mean {statistics.fmean(held) if held else 0:.0f}); most starts at once per "
            f"instance: {most_starting}"
        )
        assert len(kills) >= max(1, int(DURATION // KILL_EVERY))
    finally:
        stop.set()
        proxy.stop()
        for sim in sims:
            sim.stop()
