# Sourced by ./dev test: redis-server and redis-cli, for the shared-table tests (each test runs a
# throwaway server of its own on a free port, so the machine's Redis is never stopped).

ensure_redis() {
  if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
    return 0
  fi
  if [ -z "${_SESSION_PROXY_APT_UPDATED:-}" ]; then
    apt-get update -qq
    _SESSION_PROXY_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
}
