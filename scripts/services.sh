# shellcheck shell=bash
# Sourced by ./dev test: makes sure what the tests use is on the machine, installing packages and
# starting throwaway services when it has none. Exports what the tests read.
here="$(dirname "${BASH_SOURCE[0]}")"
# shellcheck source=scripts/apt.sh
source "$here/apt.sh"
# shellcheck source=scripts/deps-php.sh
source "$here/deps-php.sh"
# shellcheck source=scripts/deps-postgres.sh
source "$here/deps-postgres.sh"
# shellcheck source=scripts/deps-redis.sh
source "$here/deps-redis.sh"
# shellcheck source=scripts/deps-prometheus.sh
source "$here/deps-prometheus.sh"

ensure_services() {
  ensure_php
  ensure_postgres
  ensure_redis
  ensure_prometheus
}
