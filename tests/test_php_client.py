"""A real PHP client (Guzzle, what Laravel's HTTP client is built on) talking to the proxy.

The Python tests prove the proxy's behaviour with httpx; this one proves that the application
the proxy was built for reads the answers as it reads an instance's: a send that needed a replay
is an ordinary 200 with the instance's body, and the proxy's own 404 is JSON that Laravel's
``http_errors => false`` style of calling decodes without tripping over anything.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import API_KEY, Fleet, start_fleet, stop_fleet
from tests.helpers.processes import child_env

GUZZLE_AUTOLOAD = "/usr/share/php/GuzzleHttp/autoload.php"
MISSING_PHP = "php with Guzzle is missing: run ./dev test (it installs php-guzzlehttp-guzzle)"
PHP_TIMEOUT = 60.0

# One request per run. Everything variable arrives as a JSON argument, so the script never has
# to be built by string formatting (and a session id can never be read as PHP code).
CLIENT_PHP = r"""<?php
require '__AUTOLOAD__';

$spec = json_decode($argv[1], true, 512, JSON_THROW_ON_ERROR);
$client = new GuzzleHttp\Client(['base_uri' => $spec['base_uri'], 'timeout' => 30]);
$options = ['json' => $spec['json'], 'headers' => $spec['headers']];
if (array_key_exists('http_errors', $spec)) {
    $options['http_errors'] = $spec['http_errors'];
}
$out = ['exception' => null];
try {
    $response = $client->post($spec['path'], $options);
} catch (GuzzleHttp\Exception\BadResponseException $e) {
    // Report what Guzzle refused instead of dying, so a failed assertion shows the answer.
    $response = $e->getResponse();
    $out['exception'] = get_class($e);
}
$raw = (string) $response->getBody();
$out += [
    'status' => $response->getStatusCode(),
    'content_type' => $response->getHeaderLine('Content-Type'),
    'body' => json_decode($raw, true),
    'raw' => $raw,
    'instance' => $response->hasHeader('X-Proxy-Instance')
        ? $response->getHeaderLine('X-Proxy-Instance') : null,
    'attempts' => $response->hasHeader('X-Proxy-Attempts')
        ? $response->getHeaderLine('X-Proxy-Attempts') : null,
    'proxy_error' => $response->hasHeader('X-Proxy-Error')
        ? $response->getHeaderLine('X-Proxy-Error') : null,
];
echo json_encode($out, JSON_UNESCAPED_SLASHES), "\n";
""".replace("__AUTOLOAD__", GUZZLE_AUTOLOAD)


@pytest.fixture(scope="module")
def php() -> str:
    # Failing (not skipping) is deliberate: ./dev test installs PHP, so a missing one is a broken
    # setup that must be seen, not a silently thinner suite.
    binary = shutil.which("php")
    if binary is None:
        pytest.fail(MISSING_PHP, pytrace=False)
    probe = subprocess.run(
        [binary, "-r", f"require '{GUZZLE_AUTOLOAD}';"],
        capture_output=True,
        text=True,
        timeout=PHP_TIMEOUT,
        check=False,
    )
    if probe.returncode != 0:
        pytest.fail(f"{MISSING_PHP}\n{probe.stdout}{probe.stderr}", pytrace=False)
    return binary


@pytest.fixture
def quiet_fleet(tmp_path: Path) -> Iterator[Fleet]:
    # Health checks every 60 s: the PHP request, not a background probe, is what finds the death.
    running = start_fleet(
        tmp_path, sessions_per_instance=3, env={"SESSION_PROXY_HEALTH_INTERVAL": "60"}
    )
    try:
        yield running
    finally:
        stop_fleet(running)


def _run_php(php: str, tmp_path: Path, spec: dict[str, Any]) -> dict[str, Any]:
    script = tmp_path / "guzzle_send.php"
    script.write_text(CLIENT_PHP, encoding="utf-8")
    # child_env sets NO_PROXY for loopback: Guzzle honours HTTP(S)_PROXY like curl does, and a
    # developer's proxy must not capture the request.
    done = subprocess.run(
        [php, str(script), json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=PHP_TIMEOUT,
        env=child_env(),
        check=False,
    )
    assert done.returncode == 0, f"php exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON line from php, got:\n{done.stdout}\n{done.stderr}"
    result: dict[str, Any] = json.loads(lines[0])
    return result


def _send_spec(
    fleet: Fleet, sid: str, message: str, request_id: str, **extra: Any
) -> dict[str, Any]:
    return {
        "base_uri": fleet.proxy.url,
        "path": "/api/messages/send",
        "json": {
            "session_id": sid,
            "api_key": API_KEY,
            "phone_number": "628100",
            "message": message,
        },
        "headers": {"X-Request-Id": request_id},
        **extra,
    }


def _sent_ids(fleet: Fleet) -> dict[str, list[str | None]]:
    return {sim.name: [e.get("request_id") for e in sim.events("sent")] for sim in fleet.instances}


def test_guzzle_send_during_a_failover_gets_an_ordinary_success(
    php: str, quiet_fleet: Fleet, tmp_path: Path
) -> None:
    fleet = quiet_fleet
    dead, heir = fleet.instances[0], fleet.instances[1]
    sid = next(s for s, owner in sorted(fleet.sessions.items()) if owner is dead)

    warm = _run_php(php, tmp_path, _send_spec(fleet, sid, "warm", "guzzle-warm"))
    assert warm["status"] == 200, warm
    assert warm["instance"] == dead.url  # the proxy now knows the owner; nothing will re-ask

    heir.add_session(sid)  # the fleet restores it elsewhere, as after a crash
    dead.kill()
    sent_by_dead_before = len(dead.events("sent"))

    r = _run_php(php, tmp_path, _send_spec(fleet, sid, "from guzzle", "guzzle-failover"))

    assert r["exception"] is None, r
    assert r["status"] == 200, r
    assert r["body"]["success"] is True, r
    assert r["content_type"].startswith("application/json"), r
    assert r["instance"] == heir.url, r
    assert r["attempts"] == "2", r
    assert r["proxy_error"] is None, r
    # Delivered exactly once, by the heir; the dead owner wrote nothing after the kill.
    sent = _sent_ids(fleet)
    assert sent[heir.name].count("guzzle-failover") == 1, sent
    assert "guzzle-failover" not in sent[dead.name], sent
    assert len(dead.events("sent")) == sent_by_dead_before, sent
    assert sum(ids.count("guzzle-failover") for ids in sent.values()) == 1, sent


def test_guzzle_reads_the_proxys_own_404_like_laravel_does(
    php: str, quiet_fleet: Fleet, tmp_path: Path
) -> None:
    fleet = quiet_fleet
    spec = _send_spec(fleet, "no_such_session_x", "hello", "guzzle-404", http_errors=False)

    r = _run_php(php, tmp_path, spec)

    assert r["exception"] is None, r  # http_errors => false: a 404 is an answer, not a throw
    assert r["status"] == 404, r
    assert r["content_type"].startswith("application/json"), r
    assert r["proxy_error"] == "session-not-found", r
    body = r["body"]
    assert isinstance(body, dict), r
    assert body["error"] == "Session not found", r
    assert body["code"] == "session-not-found", r
    assert body["request_id"] == "guzzle-404", r
    assert all(ids.count("guzzle-404") == 0 for ids in _sent_ids(fleet).values())
