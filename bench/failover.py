"""What a failover costs the request that runs into it, next to an ordinary proxied send.

Run from the repository root:

    .venv/bin/python bench/failover.py [--rounds N] [--normal-per-round N] [--time-limit S]

Everything is real and on loopback: three simulator processes and the proxy under uvicorn,
started by the test helpers. Each round:

1. starts a fresh proxy (see ``_round`` for why) and warms its route to every instance;
2. times ordinary sends to sessions whose owner is alive and already known (case a);
3. moves a known session between two live instances, so the old owner answers its own 404
   "Session not found", and times the next send (case c);
4. SIGKILLs a known session's owner after the session was restored on another instance, and
   times the next send: connection refused, rediscovery, replay (case b); then starts the killed
   instance again on the same port, so every round kills a new process.

Only sends that came back 200 from the expected instance after exactly the expected number of
attempts are counted; anything else is reported and leaves the sample out.
"""

from __future__ import annotations

import argparse
import math
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
# Run as a script, Python puts bench/ on the path, not the root the test helpers live under.
sys.path.insert(0, str(REPO_ROOT))

from tests.helpers.processes import (  # noqa: E402
    ProxyProcess,
    Simulator,
    kill_all,
)

API_KEY = "demo-key"
INSTANCES = 3
STATIC_SESSIONS = 4  # per instance, the targets of the normal sends
REQUEST_TIMEOUT = 10.0
MAX_ROUNDS = 500


@dataclass
class Samples:
    """Durations in seconds of sends that succeeded as expected, and what went wrong otherwise."""

    normal: list[float] = field(default_factory=list)
    direct: list[float] = field(default_factory=list)
    failover: list[float] = field(default_factory=list)
    moved: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class OutOfTime(Exception):
    """The overall time limit passed while a round was running."""


def _static_ids(index: int) -> list[str]:
    return [f"bench_i{index}_{k}" for k in range(STATIC_SESSIONS)]


def _body(sid: str, text: str) -> dict[str, str]:
    return {"session_id": sid, "api_key": API_KEY, "recipient_phone": "628100", "message": text}


def _timed_send(
    client: httpx.Client, base: str, sid: str, text: str
) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = client.post(f"{base}/api/messages/send", json=_body(sid, text))
    return time.perf_counter() - started, response


def _check(
    response: httpx.Response, expect_instance: str, expect_attempts: str | None, what: str
) -> str | None:
    """Why the send does not count, or None when it went exactly as the case says."""
    got_instance = response.headers.get("x-proxy-instance")
    got_attempts = response.headers.get("x-proxy-attempts")
    if response.status_code != 200:
        return f"{what}: HTTP {response.status_code} {response.text[:200]}"
    if got_instance != expect_instance or got_attempts != expect_attempts:
        return (
            f"{what}: answered by {got_instance} after {got_attempts} attempts,"
            f" expected {expect_instance} after {expect_attempts}"
        )
    return None


def _start_proxy(tmp: Path, sims: list[Simulator]) -> ProxyProcess:
    env = {
        "SESSION_PROXY_INSTANCES": ",".join(s.url for s in sims),
        "SESSION_PROXY_API_KEY": API_KEY,
        # Active checks would otherwise race the request to notice the death; this measures the
        # request that finds it, which is the one an application actually waits on.
        "SESSION_PROXY_HEALTH_INTERVAL": "60",
    }
    return ProxyProcess.start(tmp, env, ready_path="/readyz")


def _round(
    number: int,
    tmp: Path,
    sims: list[Simulator],
    client: httpx.Client,
    normal_count: int,
    samples: Samples,
) -> None:
    # A fresh proxy per round: a killed instance stays ejected until an active check passes, and
    # with checks 60 s apart the restarted one would never come back. Three healthy instances at
    # the start of every round keep rediscovery's fan-out the same in every sample.
    proxy = _start_proxy(tmp, sims)
    try:
        base = proxy.url
        dead = sims[number % INSTANCES]
        heir = sims[(number + 1) % INSTANCES]
        mover = sims[(number + 2) % INSTANCES]

        # The first send per session pays for discovery: warm every route, time none of these.
        targets = [sid for index in range(INSTANCES) for sid in _static_ids(index)]
        for sid in targets:
            _timed_send(client, base, sid, "warm")

        for k in range(normal_count):
            index = k % INSTANCES
            sid = _static_ids(index)[k % STATIC_SESSIONS]
            took, response = _timed_send(client, base, sid, "normal")
            problem = _check(response, sims[index].url, None, f"round {number} normal")
            if problem:
                samples.problems.append(problem)
            else:
                samples.normal.append(took)
            # The same send without the proxy, interleaved so both see the same machine load.
            took, response = _timed_send(client, sims[index].url, sid, "direct")
            if response.status_code == 200:
                samples.direct.append(took)

        moved_sid = f"bench_r{number}_moved"
        mover.add_session(moved_sid)
        _timed_send(client, base, moved_sid, "warm")  # the proxy now routes it to `mover`
        mover.drop_session(moved_sid)
        heir.add_session(moved_sid)
        took, response = _timed_send(client, base, moved_sid, "moved")
        problem = _check(response, heir.url, "2", f"round {number} moved")
        if problem:
            samples.problems.append(problem)
        else:
            samples.moved.append(took)

        failover_sid = f"bench_r{number}_failover"
        dead.add_session(failover_sid)
        _timed_send(client, base, failover_sid, "warm")  # the proxy now routes it to `dead`
        heir.add_session(failover_sid)
        dead.kill()
        took, response = _timed_send(client, base, failover_sid, "failover")
        problem = _check(response, heir.url, "2", f"round {number} failover")
        if problem:
            samples.problems.append(problem)
        else:
            samples.failover.append(took)
    finally:
        proxy.kill()  # nothing is in flight; a graceful stop would only add waiting
    dead.restart(sessions=_static_ids(number % INSTANCES))


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f}"


def _report(samples: Samples, rounds_done: int, elapsed: float) -> int:
    print(f"\n{rounds_done} complete rounds in {elapsed:.1f} s, loopback, {INSTANCES} instances")
    print(f"{'case':<44}{'n':>6}{'median ms':>12}{'p95 ms':>10}")
    rows = [
        ("direct to the instance (no proxy)", samples.direct),
        ("(a) normal proxied send", samples.normal),
        ("(b) failover: owner SIGKILLed, replayed", samples.failover),
        ("(c) moved: owner says 404, replayed", samples.moved),
    ]
    for label, values in rows:
        if values:
            median, p95 = statistics.median(values), _p95(values)
            print(f"{label:<44}{len(values):>6}{_ms(median):>12}{_ms(p95):>10}")
        else:
            print(f"{label:<44}{0:>6}{'-':>12}{'-':>10}")
    if not (samples.normal and samples.failover):
        print("not enough samples to compare", file=sys.stderr)
        return 1
    normal_median, normal_p95 = statistics.median(samples.normal), _p95(samples.normal)
    added = [("added by failover (b - a)", samples.failover)]
    if samples.moved:
        added.append(("added by moved (c - a)", samples.moved))
    for label, values in added:
        median, p95 = statistics.median(values) - normal_median, _p95(values) - normal_p95
        print(f"{label:<44}{'':>6}{_ms(median):>12}{_ms(p95):>10}")
    for problem in samples.problems:
        print(f"not counted: {problem}")
    failover_added = (statistics.median(samples.failover) - normal_median) * 1000
    print(
        f"failover adds {failover_added:.2f} ms (median) over a normal send of"
        f" {normal_median * 1000:.2f} ms"
    )
    return 0


def _on_alarm(_signum: int, _frame: FrameType | None) -> None:
    raise OutOfTime()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=20, help="kill rounds (default 20)")
    parser.add_argument(
        "--normal-per-round", type=int, default=60, help="timed normal sends per round"
    )
    parser.add_argument(
        "--time-limit", type=float, default=180.0, help="seconds for the whole run (default 180)"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= MAX_ROUNDS:
        parser.error(f"--rounds must be between 1 and {MAX_ROUNDS}")
    if args.normal_per_round < 1 or args.time_limit <= 0:
        parser.error("--normal-per-round and --time-limit must be positive")

    samples = Samples()
    started = time.monotonic()
    rounds_done = 0
    # The alarm is the hard stop, for a round that hangs; the check between rounds is the soft
    # one, so a run normally ends with whole rounds only.
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, args.time_limit)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp_name:
            tmp = Path(tmp_name)
            sims = [
                Simulator.start(tmp, f"instance-{n + 1}", sessions=_static_ids(n), api_key=API_KEY)
                for n in range(INSTANCES)
            ]
            try:
                with httpx.Client(trust_env=False, timeout=REQUEST_TIMEOUT) as client:
                    for number in range(args.rounds):
                        if time.monotonic() - started > args.time_limit * 0.8:
                            print(f"time limit near: stopping after {rounds_done} rounds")
                            break
                        _round(number, tmp, sims, client, args.normal_per_round, samples)
                        rounds_done += 1
                        print(f"round {rounds_done}/{args.rounds} done", file=sys.stderr)
            finally:
                for sim in sims:
                    sim.kill()
    except OutOfTime:
        print(f"hard time limit of {args.time_limit:g} s hit during round {rounds_done + 1}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        kill_all()
    return _report(samples, rounds_done, time.monotonic() - started)


if __name__ == "__main__":
    sys.exit(main())
