"""Where session-proxy's CPU goes, in one step: the same upstream and proxy as
``bench/proxy_bench.py``, wrk load, and py-spy on the proxy process.

    .venv/bin/python bench/profile.py [--method GET|POST] [--connections 8] [--seconds 10]
                                      [--out DIR] [--rate HZ] [--mode auto|attach|launch]
                                      [--source DIR]

Starts (all on 127.0.0.1, all torn down at exit) the fake instances (one nginx, fixed JSON) and
one session-proxy (``python -m proxy serve``, one worker, ``LOG_LEVEL=warning``, its routing
table warmed for the 100 load sessions), then records two profiles while wrk sends the chosen
shape (GET ``/api/sessions/<id>/status``, or the ~1 KB POST ``/api/messages/send``) at
``--connections``: ``profile.speedscope.json`` (open at https://www.speedscope.app) and
``profile.svg`` (a flame graph; open in a browser). It prints the top 30 functions by self time
(the innermost frame of each sample), the top 15 by total time (anywhere on the stack), and
the proxy's CPU per request over the profiled load, from /proc, which turns a share of the
samples into microseconds per request.

py-spy samples only while a thread runs (``--idle`` is off): time the event loop spends waiting
in epoll is not in the profile. ``--mode attach`` (``py-spy record --pid``) needs ptrace
permission (root, or CAP_SYS_PTRACE, or ``kernel.yama.ptrace_scope`` 0); ``--mode launch``
starts the proxy under ``py-spy record -- python -m proxy serve`` instead, which needs none,
but its profile then also holds the proxy's start-up and warm-up (a few per cent of the samples,
under ``<module>`` and importlib frames). ``auto`` tries ``py-spy dump`` on the running proxy
and attaches if that works.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_bench as pb  # the bench directory is not a package: imported by path

FORMATS = (("speedscope", "profile.speedscope.json"), ("flamegraph", "profile.svg"))


def py_spy() -> str:
    found = Path(sys.executable).with_name("py-spy")
    if found.exists():
        return str(found)
    which = shutil.which("py-spy")
    if which is None:
        raise SystemExit("py-spy not found: .venv/bin/pip install py-spy (it is in the dev extra)")
    return which


def can_attach(tool: str, pid: int) -> tuple[bool, str]:
    done = subprocess.run(
        [tool, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30
    )
    return done.returncode == 0, (done.stderr or done.stdout).strip()[-300:]


def python_child(root: int) -> int:
    """The interpreter py-spy launched (``launch`` mode): py-spy's one descendant."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        tree = [pid for pid in pb.process_tree(root) if pid != root]
        if tree:
            return tree[0]
        time.sleep(0.05)
    raise RuntimeError("py-spy started no process")


def script_for(work: Path, method: str) -> Path:
    path = work / f"profile-{method}.lua"
    text = pb.lua_get(pb.LOAD_SESSIONS) if method == "GET" else pb.lua_post(pb.LOAD_SESSIONS)
    path.write_text(text)
    return path


def start_wrk(port: int, script: Path, connections: int, seconds: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        pb.wrk_command(port, script, connections, seconds),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_wrk(proc: subprocess.Popen[str], seconds: int) -> dict[str, float]:
    stdout, stderr = proc.communicate(timeout=seconds + 30)
    return pb.wrk_result(proc.returncode, stdout, stderr)


def record_attached(
    tool: str,
    pid: int,
    port: int,
    script: Path,
    args: argparse.Namespace,
    out: Path,
) -> dict[str, Any]:
    """One py-spy recording per format on the running proxy, each under its own wrk run
    (started first, stopped after py-spy: the profile holds only loaded seconds)."""
    requests, cpu = 0, 0.0
    for fmt, name in FORMATS:
        wrk = start_wrk(port, script, args.connections, args.seconds + 2)
        time.sleep(0.5)
        before = pb.cpu_seconds(pid)
        spy = [tool, "record", "--pid", str(pid), "--duration", str(args.seconds)]
        spy += ["--rate", str(args.rate), "--format", fmt, "-o", str(out / name)]
        spy += ["--nonblocking"] if args.nonblocking else []
        done = subprocess.run(spy, capture_output=True, text=True, timeout=args.seconds + 60)
        cpu += pb.cpu_seconds(pid) - before
        result = finish_wrk(wrk, args.seconds + 2)
        if done.returncode != 0:
            raise RuntimeError(f"py-spy record failed: {done.stderr[-1500:]}")
        # wrk ran about 1.5 s longer than py-spy: count its requests over py-spy's window only.
        requests += round(result["requests"] * args.seconds / (result["duration_us"] / 1e6))
    return {"requests": requests, "cpu_s": cpu}


def record_launched(
    tool: str, work: Path, ports: pb.Ports, script: Path, args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    """The proxy started under py-spy once per format; py-spy writes its file when the proxy
    exits (SIGTERM to the interpreter, not to py-spy, which would die without writing)."""
    requests, cpu = 0, 0.0
    for fmt, name in FORMATS:
        wrapper = [tool, "record", "--rate", str(args.rate), "--format", fmt]
        wrapper += ["--nonblocking"] if args.nonblocking else []
        wrapper += ["-o", str(out / name), "--"]
        proc = pb.start_proxy(
            f"profiled-{fmt}",
            ports.proxy,
            [ports.a, ports.b],
            work,
            1,
            wrapper=wrapper,
            shutdown_drain="0",
        )
        child = python_child(proc.pid)
        pb.warm(ports.proxy, ports)
        before = pb.cpu_seconds(child)
        result = pb.run_wrk(ports.proxy, script, args.connections, args.seconds)
        cpu += pb.cpu_seconds(child) - before
        requests += int(result["requests"])
        os.kill(child, signal.SIGTERM)
        try:
            proc.wait(60)
        finally:
            pb.stop(proc)
        if not (out / name).exists():
            log = (work / f"profiled-{fmt}.log").read_text()[-1500:]
            raise RuntimeError(f"py-spy wrote no {name}: {log}")
    return {"requests": requests, "cpu_s": cpu}


def unprofiled(pid: int, port: int, script: Path, args: argparse.Namespace) -> float:
    """The proxy's CPU per request under the same load with no profiler attached: py-spy
    stops the process at every sample (unless ``--nonblocking``), which costs the process CPU
    of its own, so the shares of the samples are turned into microseconds with this figure."""
    before = pb.cpu_seconds(pid)
    result = pb.run_wrk(port, script, args.connections, args.seconds)
    return (pb.cpu_seconds(pid) - before) * 1e6 / max(1, result["requests"])


def speedscope_summary(path: Path) -> dict[str, Any]:
    """Sampled time by function (py-spy's frames are per line; they are summed per function and
    file): self (the innermost frame) and total (anywhere on the stack, once per sample), over
    every thread's profile."""
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    keys = [f"{f['name']} ({Path(f.get('file') or '?').name})" for f in frames]
    files = {key: f.get("file") or "" for key, f in zip(keys, frames, strict=True)}
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    weight_sum, samples = 0.0, 0
    for profile in data["profiles"]:
        weights = profile.get("weights") or [1.0] * len(profile["samples"])
        for stack, weight in zip(profile["samples"], weights, strict=True):
            if not stack:
                continue
            samples += 1
            weight_sum += weight
            own[keys[stack[-1]]] += weight
            for key in {keys[frame] for frame in stack}:
                total[key] += weight
    return {"weight": weight_sum, "samples": samples, "own": own, "total": total, "files": files}


def print_top(summary: dict[str, Any], us_per_request: float, top: int, key: str) -> None:
    weight = summary["weight"] or 1.0
    print(f"{'share':>6} {'us/req':>7}  function (file)  [where]")
    for function, got in summary[key].most_common(top):
        share = got / weight
        where = pb._area(summary["files"][function])
        print(f"{share:>6.1%} {share * us_per_request:>7.1f}  {function}  [{where}]")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("GET", "POST"), default="GET")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=10, help="seconds profiled per format")
    parser.add_argument("--out", type=Path, default=None, help="where the profiles go")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples a second")
    parser.add_argument("--mode", choices=("auto", "attach", "launch"), default="auto")
    parser.add_argument(
        "--nonblocking",
        action="store_true",
        help="py-spy --nonblocking: read the stacks without stopping the proxy (less overhead, "
        "now and then a torn stack)",
    )
    parser.add_argument("--source", type=Path, default=pb.ROOT, help="as proxy_bench --source")
    args = parser.parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out or Path(tempfile.gettempdir()) / f"session-proxy-profile-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    pb.SOURCE = args.source.resolve()
    tool = py_spy()
    pb.ensure_tools()
    signal.signal(signal.SIGTERM, pb._on_signal)
    atexit.register(pb.stop_all)
    uptime_start = pb.uptime()
    with pb.workdir() as work:
        ports = pb.Ports.pick()
        everything = [ports.a, ports.b, *ports.fleet]
        pb.start_nginx("upstream", pb.upstream_conf(work / "upstream", ports), work, everything)
        script = script_for(work, args.method)
        mode = args.mode
        proxy = None
        if mode in ("auto", "attach"):
            proxy = pb.start_proxy("proxy", ports.proxy, [ports.a, ports.b], work, 1)
            pb.warm(ports.proxy, ports)
            ok, why = can_attach(tool, proxy.pid)
            if not ok:
                if mode == "attach":
                    raise SystemExit(f"py-spy cannot attach here: {why}; try --mode launch")
                pb.progress(f"py-spy cannot attach ({why}): launching the proxy under py-spy")
                pb.stop(proxy)
                proxy, mode = None, "launch"
            else:
                mode = "attach"
        pb.progress(
            f"profiling {args.method} at c{args.connections}, {args.seconds} s per format, "
            f"py-spy {mode} mode, {args.rate} Hz; out {out}"
        )
        if proxy is None:  # the figure without a profiler, from a plain proxy of its own
            plain = pb.start_proxy("plain", ports.proxy, [ports.a, ports.b], work, 1)
            pb.warm(ports.proxy, ports)
            us_per_request = unprofiled(plain.pid, ports.proxy, script, args)
            pb.stop(plain)
            got = record_launched(tool, work, ports, script, args, out)
        else:
            us_per_request = unprofiled(proxy.pid, ports.proxy, script, args)
            got = record_attached(tool, proxy.pid, ports.proxy, script, args, out)
    profiled_us = got["cpu_s"] * 1e6 / max(1, got["requests"])
    summary = speedscope_summary(out / "profile.speedscope.json")
    print(
        f"session-proxy profile, {args.method} at c{args.connections}, py-spy {mode} mode "
        f"({'record --pid' if mode == 'attach' else 'record -- python -m proxy serve'}), "
        f"{args.rate} Hz, {args.seconds} s per format"
    )
    print(f"load: {uptime_start}\n   -> {pb.uptime()}")
    print(
        f"proxy CPU per request (/proc utime+stime of the proxy process): {us_per_request:.0f} us "
        f"under the same load without a profiler ({args.seconds} s), {profiled_us:.0f} us while "
        f"profiled ({got['requests']:,} requests; py-spy's own CPU not included);\n  us/req "
        "below = a function's share of the samples x the figure without a profiler"
    )
    print(f"files: {out / 'profile.speedscope.json'} (speedscope), {out / 'profile.svg'}")
    print(
        f"\ntop 30 by self time ({summary['samples']:,} samples of running threads; a C call "
        "counts as the Python function that made it:\n  Runner.run's self time is uvloop's own "
        "C code and socket reads; a transport.write, its send() included, counts as its caller)"
    )
    print_top(summary, us_per_request, 30, "own")
    print("\ntop 15 by total time (anywhere on the stack)")
    print_top(summary, us_per_request, 15, "total")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
