"""The README's first command: `session-proxy demo` runs on a bare machine and shows recovery."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.helpers.processes import child_env


def test_demo_runs_and_shows_every_recovery() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "demo", "--fast"],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env({"NO_COLOR": "1"}),
    )
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert "send replayed" in out  # a crash met by a request
    assert 'answered "Session not found"' in out  # a move behind the proxy's back
    assert "already ejected" in out  # a crash found by a health check
    # The proxy restoring a crashed instance's sessions itself, a send held meanwhile.
    assert re.search(r"200, held \d+\.\d s while the session restarted on instance-\d", out), out
    assert "Every message was delivered" in out
    assert " -> 5" not in out and " -> 4" not in out  # no send answered with an error
