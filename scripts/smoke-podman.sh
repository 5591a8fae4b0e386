#!/usr/bin/env bash
# Release smoke test: the container image and the Kubernetes sidecar layout, run for real.
#
#   sudo scripts/smoke-podman.sh          (root: podman, apt-get, debootstrap)
#
# 1. installs podman/buildah/runc/debootstrap/redis-server when missing (Debian/Ubuntu, apt-get);
# 2. builds a local base image with debootstrap when $SMOKE_BASE is missing and is the default
#    localhost/bookworm-py:local (no registry pull needed), then builds the Dockerfile on it;
# 3. starts two simulated instances on the host (127.0.0.1; the first holds s1 and s2) and a
#    throwaway Redis (127.0.0.1, a free port, no persistence) that both proxies below use as
#    their shared routing table (SESSION_PROXY_CACHE_URL=redis://127.0.0.1:<port>/0);
# 4. renders a Pod from k8s/overlays/sidecar (its probes, preStop, securityContext, resources and
#    volumes unchanged; the placeholder "app" container becomes the proxy image running
#    `simulate`; the ConfigMap and Secret are inlined; instances and ports point at this host);
# 5. runs it with `podman kube play --network host` and checks, through the pod's proxy:
#    GET /api/sessions/s1/status answers 200 from the instance holding s1 (X-Proxy-Instance),
#    /healthz and /readyz answer 200, the app container reaches the proxy on 127.0.0.1, the
#    proxy runs as uid 10001 on a read-only root filesystem, the liveness probe passes;
# 6. runs the image alone (docker-style, its own HEALTHCHECK) and checks it the same way;
# 7. checks the routing table is in Redis: `redis-cli --scan --pattern 'session-proxy:*'` lists
#    the session ids the requests used (s1, s2), each pointing at the instance holding it, no
#    proxy fell back to its local table, and the image run alone found s1 there (a table hit:
#    the pod's proxy had learned it);
# 8. sends SIGTERM to the pod and checks the drain;
# 9. tears everything down on exit (trap), also on failure or timeout.
#
# Bounded: the whole run is killed after $SMOKE_TIMEOUT seconds (default 900; a first run
# spends ~60 s in debootstrap and ~30 s building). Only 127.0.0.1 is ever contacted.
# Settings: SMOKE_BASE (base image, default localhost/bookworm-py:local), SMOKE_IMAGE (tag
# to build, default localhost/session-proxy:smoke), SMOKE_TIMEOUT. Images are kept for the
# next run; `podman rmi localhost/session-proxy:smoke localhost/bookworm-py:local` removes them.
set -euo pipefail

if [ -z "${SMOKE_UNDER_TIMEOUT:-}" ]; then
  export SMOKE_UNDER_TIMEOUT=1
  exec timeout -k 15 "${SMOKE_TIMEOUT:-900}" "$0" "$@"
fi

cd "$(dirname "$0")/.."
ROOT=$PWD
PY="$ROOT/.venv/bin/python"
BASE=${SMOKE_BASE:-localhost/bookworm-py:local}
IMAGE=${SMOKE_IMAGE:-localhost/session-proxy:smoke}
POD=session-proxy-smoke
SOLO=session-proxy-smoke-solo
WORK=$(mktemp -d /tmp/session-proxy-smoke.XXXXXX)
SIM_PIDS=()
REDIS_PIDFILE="$WORK/redis.pid"
REDIS_PID=
FAILED=0
START=$SECONDS

say() { printf '\n== [%3ds] %s\n' "$((SECONDS - START))" "$*"; }
fail() {
  printf 'FAIL: %s\n' "$*" >&2
  FAILED=1
}

# podman as the machines here need it: runc, and ulimits a container is allowed to set
# (podman kube play has no --ulimit flag, so they go in a containers.conf of our own).
cat >"$WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1000:1000"]
[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF="$WORK/containers.conf"
pm() { podman --runtime runc "$@"; }

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  say "teardown"
  if [ -f "$WORK/pod.yaml" ]; then
    timeout 60 podman kube down "$WORK/pod.yaml" >/dev/null 2>&1 || true
  fi
  timeout 30 podman pod rm -f "$POD" >/dev/null 2>&1 || true
  timeout 30 podman rm -f -t 5 "$SOLO" >/dev/null 2>&1 || true
  for pid in "${SIM_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${SIM_PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  # The Redis daemonizes (not our child): stopped by the pid it wrote, waited for by polling.
  if [ -s "$REDIS_PIDFILE" ]; then
    REDIS_PID=$(cat "$REDIS_PIDFILE")
  fi
  if [ -n "$REDIS_PID" ]; then
    kill "$REDIS_PID" 2>/dev/null || true
    for _ in $(seq 50); do
      kill -0 "$REDIS_PID" 2>/dev/null || break
      sleep 0.1
    done
  fi
  rm -rf "$WORK"
  echo "removed pod $POD, container $SOLO, simulators (pids ${SIM_PIDS[*]:-none}), redis (pid ${REDIS_PID:-none}), $WORK"
  if [ "$rc" -eq 0 ] && [ "$FAILED" -ne 0 ]; then
    rc=1
  fi
  if [ "$rc" -eq 0 ]; then
    echo "SMOKE OK ($((SECONDS - START)) s)"
  else
    echo "SMOKE FAILED (exit $rc, $((SECONDS - START)) s)"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# GET a URL on 127.0.0.1 and print status, the proxy's headers and the body (bounded: 5 s).
# Prints "STATUS <code> <X-Proxy-Instance>" last, for the checks.
http_get() {
  "$PY" - "$1" <<'EOF'
import sys, urllib.error, urllib.request

url = sys.argv[1]
try:
    response = urllib.request.urlopen(url, timeout=5)
except urllib.error.HTTPError as error:
    response = error
status = response.status if hasattr(response, "status") else response.code
body = response.read().decode("utf-8", "replace")
print(f"GET {url} -> {status}")
for name in ("content-type", "x-proxy-instance", "x-request-id", "x-proxy-attempts"):
    if response.headers.get(name):
        print(f"  {name}: {response.headers[name]}")
print("  body:", body if len(body) < 600 else body[:600] + "...")
print(f"STATUS {status} {response.headers.get('x-proxy-instance', '-')}")
EOF
}

# Wait (at most $2 seconds) until GET $1 answers 200.
wait_200() {
  local url=$1 deadline=$((SECONDS + $2))
  until "$PY" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
    "$url" 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      return 1
    fi
    sleep 0.5
  done
}

# Wait (at most $3 seconds) until GET $1 answers 200 while container $2 keeps running.
wait_ready() {
  local url=$1 name=$2 deadline=$((SECONDS + $3))
  until "$PY" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
    "$url" 2>/dev/null; do
    if [ "$(podman inspect --format '{{.State.Running}}' "$name" 2>/dev/null)" != "true" ]; then
      echo "container $name is not running:" >&2
      podman logs --tail 30 "$name" >&2 || true
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      podman logs --tail 30 "$name" >&2 || true
      return 1
    fi
    sleep 0.5
  done
}

# Check the last line of http_get's output: status and, if given, the answering instance.
expect() {
  local out=$1 status=$2 instance=${3:-}
  local last
  last=$(printf '%s\n' "$out" | tail -n 1)
  printf '%s\n' "$out" | sed '$d'
  read -r _ got_status got_instance <<<"$last"
  if [ "$got_status" != "$status" ]; then
    fail "expected status $status, got $got_status"
  fi
  if [ -n "$instance" ] && [ "$got_instance" != "$instance" ]; then
    fail "expected X-Proxy-Instance $instance, got $got_instance"
  fi
}

say "tools"
if [ "$(id -u)" -ne 0 ]; then
  echo "run as root (podman build/kube play as configured here, apt-get, debootstrap)" >&2
  exit 2
fi
if [ ! -x "$PY" ]; then
  echo "no $PY: run ./dev test (or ./dev demo) once to make the virtualenv" >&2
  exit 2
fi
missing=()
for tool in podman buildah runc debootstrap redis-server redis-cli; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc debootstrap \
    redis-server >/dev/null
fi
podman --version
redis-server --version

say "base image $BASE"
if podman image exists "$BASE"; then
  echo "present"
elif [ "$BASE" = "localhost/bookworm-py:local" ]; then
  echo "missing: debootstrap (about a minute)"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$WORK/rootfs" >"$WORK/debootstrap.log" 2>&1 ||
    {
      tail -20 "$WORK/debootstrap.log"
      exit 1
    }
  tar -C "$WORK/rootfs" -c . |
    podman import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      - "$BASE" >/dev/null
  rm -rf "$WORK/rootfs"
  podman image ls "$BASE"
else
  echo "missing, and only localhost/bookworm-py:local is built here: podman pull $BASE first" >&2
  exit 2
fi

say "build $IMAGE (Dockerfile, BASE=$BASE)"
build_args=(--pull=never --isolation=chroot --format docker --build-arg "BASE=$BASE" -t "$IMAGE")
# Where egress goes through a TLS-inspecting proxy, pip in the build needs the host's CA bundle:
# mounted for the RUN steps only, it is not part of the image.
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  build_args+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
fi
if ! podman build "${build_args[@]}" . >"$WORK/build.log" 2>&1; then
  tail -40 "$WORK/build.log"
  exit 1
fi
grep -E '^\[[0-9]/[0-9]\] STEP|Successfully (installed|tagged)' "$WORK/build.log" | cut -c1-160
podman image ls "$IMAGE"
podman image inspect "$IMAGE" \
  --format 'user={{.Config.User}} entrypoint={{.Config.Entrypoint}} cmd={{.Config.Cmd}} healthcheck={{if .Config.Healthcheck}}yes{{else}}no{{end}}'

say "ports, simulated instances and Redis on 127.0.0.1"
read -r P1 P2 P_APP P_PROXY P_SOLO P_REDIS < <("$PY" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
for s in socks:
    s.close()
EOF
)
echo "instances :$P1 :$P2, app placeholder :$P_APP, pod proxy :$P_PROXY, solo proxy :$P_SOLO, redis :$P_REDIS"
CACHE_URL="redis://127.0.0.1:$P_REDIS/0"
"$PY" -m proxy simulate --port "$P1" --api-key demo-key --connect-delay 0 --sessions s1,s2 \
  --name inst-1 >"$WORK/sim1.log" 2>&1 &
SIM_PIDS+=($!)
"$PY" -m proxy simulate --port "$P2" --api-key demo-key --connect-delay 0 --name inst-2 \
  >"$WORK/sim2.log" 2>&1 &
SIM_PIDS+=($!)
for port in "$P1" "$P2"; do
  wait_200 "http://127.0.0.1:$port/health" 30 || {
    cat "$WORK"/sim*.log
    exit 1
  }
done
echo "both answer /health (pids ${SIM_PIDS[*]})"
rcli() { timeout 10 redis-cli -h 127.0.0.1 -p "$P_REDIS" "$@"; }
redis-server --port "$P_REDIS" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
  --pidfile "$REDIS_PIDFILE" --dir "$WORK" --logfile "$WORK/redis.log" || {
  cat "$WORK/redis.log" 2>/dev/null
  exit 1
}
deadline=$((SECONDS + 15))
until [ "$(rcli ping 2>/dev/null)" = "PONG" ]; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "redis on :$P_REDIS never answered PING" >&2
    cat "$WORK/redis.log" 2>/dev/null
    exit 1
  fi
  sleep 0.2
done
REDIS_PID=$(cat "$REDIS_PIDFILE")
echo "redis answers PING (pid $REDIS_PID, $(rcli dbsize) keys): CACHE_URL=$CACHE_URL"

say "render the sidecar overlay into a Pod"
if command -v kubectl >/dev/null; then
  kubectl kustomize k8s/overlays/sidecar >"$WORK/rendered.yaml"
  echo "from: kubectl kustomize k8s/overlays/sidecar"
else
  # The overlay adds nothing but a namespace and the image name: its files render the same pod.
  cat k8s/base/configmap.yaml - k8s/overlays/sidecar/deployment.yaml <<<'---' >"$WORK/rendered.yaml"
  echo "from: k8s/base/configmap.yaml + k8s/overlays/sidecar/deployment.yaml (no kubectl)"
fi
"$PY" - "$WORK/rendered.yaml" "$WORK/pod.yaml" "$IMAGE" "$POD" "$P1" "$P2" "$P_APP" "$P_PROXY" \
  "$CACHE_URL" <<'EOF'
import sys

import yaml

src, dst, image, pod_name, p1, p2, p_app, p_proxy, cache_url = sys.argv[1:]
docs = [d for d in yaml.safe_load_all(open(src)) if d]
config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
deployment = next(d for d in docs if d["kind"] == "Deployment")
spec = deployment["spec"]["template"]["spec"]
# Stand-ins for what only a cluster has: the Secret, DNS discovery, free ports on this host.
secrets = {"api-key": "demo-key", "admin-token": "smoke-admin-token"}  # no database-url
overrides = {
    "SESSION_PROXY_INSTANCES": f"http://127.0.0.1:{p1},http://127.0.0.1:{p2}",
    "SESSION_PROXY_PORT": p_proxy,
    "SESSION_PROXY_HEALTH_INTERVAL": "1",
    "SESSION_PROXY_CACHE_URL": cache_url,  # the ConfigMap's memory:// -> the Redis on this host
}
for container in spec["containers"]:
    container["image"] = image
    container["imagePullPolicy"] = "Never"
    if container["name"] == "app":
        # The placeholder application: the proxy image running a simulated instance, which is
        # not one of the proxy's instances. It keeps the app's env (WHATSAPP_NODE_URL).
        container["args"] = ["simulate", "--port", p_app, "--name", "app-placeholder",
                             "--api-key", "demo-key", "--connect-delay", "0"]
        container.pop("ports", None)
        for var in container.get("env", []):
            if var["name"] == "WHATSAPP_NODE_URL":
                var["value"] = f"http://127.0.0.1:{p_proxy}"
        continue
    env = {}
    for source in container.pop("envFrom", []):
        assert source["configMapRef"]["name"] == "session-proxy-config"
        env.update(config)
    for var in container.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref is None:
            env[var["name"]] = var["value"]
        elif ref["key"] in secrets:
            env[var["name"]] = secrets[ref["key"]]
    env.pop("SESSION_PROXY_INSTANCES_DNS", None)
    env.update(overrides)
    container["env"] = [{"name": k, "value": v} for k, v in sorted(env.items())]
    # With the host's network podman refuses port mappings; the proxy listens on 127.0.0.1 anyway.
    container.pop("ports", None)
    # podman 4.x turns an exec liveness probe into a healthcheck by joining the command with
    # spaces and splitting it again, which breaks `python -c "..."`. The kubelet runs the
    # command array as it is: the script does the same with `podman exec`.
    with open(dst + ".probes", "w") as out:
        for kind in ("livenessProbe", "readinessProbe"):
            out.write(kind + "\t" + "\t".join(container.pop(kind)["exec"]["command"]) + "\n")
spec["hostNetwork"] = True
pod = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": pod_name, "labels": deployment["spec"]["template"]["metadata"]["labels"]},
    "spec": spec,
}
yaml.safe_dump(pod, open(dst, "w"), sort_keys=False)
proxy = next(c for c in spec["containers"] if c["name"] == "session-proxy")
print("containers:", ", ".join(f'{c["name"]} ({" ".join(c["args"])})' for c in spec["containers"]))
print("proxy securityContext:", proxy["securityContext"])
print("proxy preStop:", " ".join(proxy["lifecycle"]["preStop"]["exec"]["command"]),
      "| terminationGracePeriodSeconds:", spec["terminationGracePeriodSeconds"])
print("proxy env:", ", ".join(f'{e["name"]}={e["value"]}' for e in proxy["env"]
                              if not e["name"].endswith(("API_KEY", "ADMIN_TOKEN"))))
EOF

say "podman kube play --network host"
# Podman cannot schedule healthcheck timers without systemd and says so: not a failure here.
play_rc=0
pm kube play --network host "$WORK/pod.yaml" >"$WORK/play.log" 2>&1 || play_rc=$?
grep -v 'systemd connection' "$WORK/play.log" || true
if [ "$play_rc" -ne 0 ]; then
  fail "podman kube play exited $play_rc"
  exit 1
fi
podman pod ps --filter "name=$POD"
podman ps --pod --filter "pod=$POD" --format '{{.Names}}  {{.Image}}  {{.Command}}  {{.Status}}'
if ! wait_ready "http://127.0.0.1:$P_PROXY/readyz" "$POD-session-proxy" 60; then
  fail "the pod's proxy never became ready"
  exit 1
fi

say "requests through the pod's proxy (127.0.0.1:$P_PROXY)"
expect "$(http_get "http://127.0.0.1:$P_PROXY/api/sessions/s1/status?api_key=demo-key")" \
  200 "http://127.0.0.1:$P1"
expect "$(http_get "http://127.0.0.1:$P_PROXY/healthz")" 200
expect "$(http_get "http://127.0.0.1:$P_PROXY/readyz")" 200

say "the app container calls the proxy on 127.0.0.1 (inside the pod)"
app_out=$(pm exec "$POD-app" python -c '
import json, os, urllib.request
url = os.environ["WHATSAPP_NODE_URL"] + "/api/sessions/s2/status?api_key=demo-key"
r = urllib.request.urlopen(url, timeout=5)
print("app GET", url, "->", r.status, "X-Proxy-Instance:", r.headers["x-proxy-instance"])
print("  body:", json.loads(r.read()))
') || fail "the app container could not reach the proxy"
echo "$app_out"
grep -q -- "-> 200 X-Proxy-Instance: http://127.0.0.1:$P1" <<<"$app_out" ||
  fail "the app's request did not reach the instance holding s2"

say "the proxy container: user, read-only root, the probes"
pm exec "$POD-session-proxy" id
if pm exec "$POD-session-proxy" sh -c 'touch /opt/venv/x' 2>/dev/null; then
  fail "the proxy container could write to its root filesystem"
else
  echo "writing to / is refused (read-only root filesystem)"
fi
podman inspect "$POD-session-proxy" \
  --format 'ReadonlyRootfs={{.HostConfig.ReadonlyRootfs}} User={{.Config.User}} CapAdd={{.HostConfig.CapAdd}} Memory={{.HostConfig.Memory}} Ulimits={{.HostConfig.Ulimits}}'
# The overlay's exec probes, run as the kubelet runs them: the command array, in the container.
while IFS= read -r line; do
  IFS=$'\t' read -r -a cmd <<<"$line"
  kind=${cmd[0]}
  if pm exec "$POD-session-proxy" "${cmd[@]:1}"; then
    echo "$kind (exec ${cmd[1]} ${cmd[2]} '${cmd[3]}'): passed"
  else
    fail "$kind failed: ${cmd[*]:1}"
  fi
done <"$WORK/pod.yaml.probes"

say "the image alone (docker-style: default CMD serve, its own HEALTHCHECK)"
pm run -d --name "$SOLO" --network host \
  -e SESSION_PROXY_HOST=127.0.0.1 -e SESSION_PROXY_PORT="$P_SOLO" \
  -e SESSION_PROXY_INSTANCES="http://127.0.0.1:$P1,http://127.0.0.1:$P2" \
  -e SESSION_PROXY_API_KEY=demo-key -e SESSION_PROXY_LOG_FORMAT=text \
  -e SESSION_PROXY_CACHE_URL="$CACHE_URL" \
  "$IMAGE" 2>&1 | grep -v 'systemd connection' || true
if wait_ready "http://127.0.0.1:$P_SOLO/readyz" "$SOLO" 60; then
  expect "$(http_get "http://127.0.0.1:$P_SOLO/api/sessions/s1/status?api_key=demo-key")" \
    200 "http://127.0.0.1:$P1"
  if pm healthcheck run "$SOLO" >/dev/null 2>&1; then
    echo "image HEALTHCHECK (podman healthcheck run): healthy"
  else
    fail "the image's HEALTHCHECK failed"
  fi
else
  fail "the image run alone never became ready"
fi
podman logs --tail 5 "$SOLO" 2>&1 | cut -c1-200

say "the routing table is in Redis (127.0.0.1:$P_REDIS, shared by both proxies)"
mapfile -t redis_keys < <(rcli --scan --pattern 'session-proxy:*' | sort)
echo "redis-cli --scan --pattern 'session-proxy:*': ${redis_keys[*]:-(none)}"
for sid in s1 s2; do
  key="session-proxy:$sid"
  value=$(rcli get "$key" || true)
  ttl=$(rcli ttl "$key" || true)
  echo "  $key -> ${value:-(nil)} (ttl ${ttl:-?} s)"
  if ! printf '%s\n' "${redis_keys[@]}" | grep -qx -- "$key"; then
    fail "session $sid (used by the requests) is not in Redis"
  elif [ "$value" != "http://127.0.0.1:$P1" ]; then
    fail "Redis has $key -> $value, expected http://127.0.0.1:$P1 (the instance holding $sid)"
  fi
done
# Both proxies used Redis for every operation (no fall-back to the local table), and the image run
# alone, which only ever asked for s1, found it in the table the pod's proxy had filled.
"$PY" - "http://127.0.0.1:$P_PROXY" "http://127.0.0.1:$P_SOLO" <<'EOF' || fail "a proxy did not use the Redis table"
import json, re, sys, urllib.request

def metric(text, name, labels=""):
    match = re.search(rf"^{name}(?:_total)?{re.escape(labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0

ok = True
for role, base in zip(("pod proxy", "solo proxy"), sys.argv[1:]):
    ready = json.loads(urllib.request.urlopen(base + "/readyz", timeout=5).read())
    text = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
    fallbacks = metric(text, "session_proxy_cache_fallbacks")
    hits = metric(text, "session_proxy_table_lookups", '{result="hit"}')
    misses = metric(text, "session_proxy_table_lookups", '{result="miss"}')
    shared = ready.get("shared_table")
    print(f"  {role}: shared_table={shared} cache_fallbacks={fallbacks:g} "
          f"table hits={hits:g} misses={misses:g}")
    if shared != {"up": True} or fallbacks != 0:
        print(f"  {role}: the shared (Redis) table is not in use", file=sys.stderr)
        ok = False
    if role == "solo proxy" and (hits < 1 or misses != 0):
        print("  solo proxy: s1 was not found in the shared table", file=sys.stderr)
        ok = False
sys.exit(0 if ok else 1)
EOF

say "stop: SIGTERM to the pod; during the drain /readyz says 503 and requests still pass"
t0=$SECONDS
timeout 60 podman pod stop -t 30 "$POD" >"$WORK/stop.log" 2>&1 &
stop_pid=$!
"$PY" - "http://127.0.0.1:$P_PROXY" <<'EOF'
import sys, time, urllib.error, urllib.request

base, start = sys.argv[1], time.monotonic()

def status(path):
    try:
        return urllib.request.urlopen(base + path, timeout=2).status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError as error:
        return type(error).__name__

while time.monotonic() - start < 8:
    ready, proxied = status("/readyz"), status("/api/sessions/s1/status?api_key=demo-key")
    print(f"  t+{time.monotonic() - start:3.1f}s  /readyz {ready}  GET /api/sessions/s1/status {proxied}")
    if not isinstance(proxied, int):
        break
    time.sleep(0.5)
EOF
wait "$stop_pid" || fail "podman pod stop failed: $(cat "$WORK/stop.log")"
echo "pod stopped in $((SECONDS - t0)) s"
podman ps -a --pod --filter "pod=$POD" --format '{{.Names}}  {{.Status}}'
echo "--- last lines of the pod's proxy log"
podman logs --tail 6 "$POD-session-proxy" 2>&1 | cut -c1-220
