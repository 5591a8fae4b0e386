"""Settings: parsed from the environment and flags; a bad value names its variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError, load_settings


def test_defaults_follow_the_upstream_contract() -> None:
    settings = load_settings({})
    assert settings.cache_url == "memory://"
    assert settings.replay_body_limit == 1024 * 1024
    # Longer than the instance's own limits (60 s sessions, 45 s sends, 5 s health, 30 s other).
    assert settings.timeout_for("/api/sessions/x/status") > 60
    assert settings.timeout_for("/api/messages/send") > 45
    assert settings.timeout_for("/health") > 5
    assert settings.timeout_for("/cleanup/run") > 30


def test_environment_values_are_parsed_and_normalised() -> None:
    settings = load_settings(
        {
            "SESSION_PROXY_INSTANCES": "http://127.0.0.1:3001/, http://127.0.0.1:3002",
            "SESSION_PROXY_INSTANCE_ALIASES": "http://localhost:3001=http://127.0.0.1:3001",
            "SESSION_PROXY_REPLAY_BODY_LIMIT": "2m",
            "SESSION_PROXY_ROUTE_TIMEOUTS": "/api=12.5,/=3",
            "SESSION_PROXY_LOG_FORMAT": "TEXT",
        }
    )
    assert settings.instances == ("http://127.0.0.1:3001", "http://127.0.0.1:3002")
    assert settings.instance_aliases == (("http://localhost:3001", "http://127.0.0.1:3001"),)
    assert settings.replay_body_limit == 2 * 1024 * 1024
    assert settings.timeout_for("/api/x") == 12.5
    assert settings.timeout_for("/other") == 3
    assert settings.log_format == "text"


def test_flags_override_the_environment() -> None:
    settings = load_settings({"SESSION_PROXY_PORT": "1"}, {"port": "9000", "host": None})
    assert settings.port == 9000


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("PORT", "eighty", "is not an integer"),
        ("PORT", "70000", "port number"),
        ("INSTANCES", "ftp://x:1", "is not an http(s)://host:port URL"),
        ("INSTANCES", "http://127.0.0.1:3001/api", "no path"),
        ("INSTANCE_ALIASES", "http://localhost:3001", "is not alias=url"),
        ("REPLAY_BODY_LIMIT", "lots", "is not a size"),
        ("LOG_FORMAT", "xml", "must be one of json, text"),
        ("TABLE_NAME", "accounts; drop table x", "plain SQL identifier"),
        ("SESSION_ID_PATTERN", "[a-", "regular expression"),
        ("PATH_PATTERNS", "/api/sessions/", "contain {id} once"),
        ("HEALTH_INTERVAL", "-1", "must be at least"),
        ("CACHE_URL", "memcached://x", "memory:// or redis://"),
    ],
)
def test_bad_values_name_the_variable_and_the_value(name: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({f"SESSION_PROXY_{name}": value})
    message = str(caught.value)
    assert f"SESSION_PROXY_{name}" in message
    assert says in message


def test_database_password_is_not_echoed_in_errors() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"SESSION_PROXY_DATABASE_URL": "mysql://u:hunter2@db/x"})
    assert "hunter2" not in str(caught.value)


def test_alias_must_point_at_a_configured_instance() -> None:
    with pytest.raises(ConfigError, match="not in SESSION_PROXY_INSTANCES"):
        load_settings(
            {
                "SESSION_PROXY_INSTANCES": "http://127.0.0.1:3001",
                "SESSION_PROXY_INSTANCE_ALIASES": "http://localhost:3009=http://127.0.0.1:3009",
            }
        )


def test_the_cli_reports_a_bad_setting_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.cli import main

    assert main(["serve", "--port", "nope"]) == 2
    assert "SESSION_PROXY_PORT='nope'" in capsys.readouterr().err


def test_https_instances_need_the_httpx_client() -> None:
    with pytest.raises(ConfigError, match="UPSTREAM_CLIENT=httpx"):
        load_settings({"SESSION_PROXY_INSTANCES": "https://10.0.0.1:3001"})
    settings = load_settings(
        {
            "SESSION_PROXY_INSTANCES": "https://10.0.0.1:3001",
            "SESSION_PROXY_UPSTREAM_CLIENT": "httpx",
        }
    )
    assert settings.instances == ("https://10.0.0.1:3001",)


def test_redis_table_is_part_of_what_pip_installs() -> None:
    """CACHE_URL=redis:// is offered by the README, so `pip install .` must bring its client."""
    import tomllib

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    names = [
        d.split(">")[0].split("=")[0].split("[")[0] for d in project["project"]["dependencies"]
    ]
    assert "redis" in names


def test_a_missing_redis_package_stops_start_up_naming_the_variable(tmp_path: Path) -> None:
    import subprocess
    import sys

    # A `redis` module that cannot be imported, first on the path: as if it were not installed.
    (tmp_path / "redis.py").write_text("raise ImportError('No module named redis')\n")
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "serve"],
        env={
            "PYTHONPATH": f"{tmp_path}:{Path(__file__).parent.parent}",
            "PATH": "/usr/bin:/bin",
            "SESSION_PROXY_INSTANCES": "http://127.0.0.1:9",
            "SESSION_PROXY_CACHE_URL": "redis://127.0.0.1:6379/0",
            "SESSION_PROXY_PORT": "0",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "SESSION_PROXY_CACHE_URL" in done.stderr and "redis" in done.stderr
    assert "Traceback" not in done.stderr


def test_list_calls_have_a_timeout_of_their_own() -> None:
    """LIST_TIMEOUT: a list of thousands of sessions is not a 3 s status probe."""
    settings = load_settings({})
    assert settings.list_timeout == 30.0 and settings.discovery_timeout == 3.0
    assert load_settings({"SESSION_PROXY_LIST_TIMEOUT": "12.5"}).list_timeout == 12.5
    with pytest.raises(ConfigError, match="SESSION_PROXY_LIST_TIMEOUT"):
        load_settings({"SESSION_PROXY_LIST_TIMEOUT": "soon"})
