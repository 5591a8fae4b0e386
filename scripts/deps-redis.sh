# shellcheck shell=bash
# Sourced by ./dev test: redis-server and redis-cli, for the shared-table tests (each test runs a
# throwaway server of its own on a free port, so the machine's Redis is never stopped).

ensure_redis() {
  if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
    return 0
  fi
  sp_apt_install redis-server >/dev/null
}
