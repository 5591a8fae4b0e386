# shellcheck shell=bash
# Sourced by scripts/services.sh (./dev test): Debian's prometheus package, for tests/test_observability.py, which runs
# `promtool check rules` / `promtool test rules` on k8s/observability/prometheus/ and starts a real
# Prometheus (its own, on a free port of 127.0.0.1) scraping a real proxy. Without root or
# password-less sudo, sp_apt_install says what to install and the step fails.

prometheus_installed() {
  command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1
}

ensure_prometheus() {
  if prometheus_installed; then
    return 0
  fi
  # Without recommends: they pull in prometheus-node-exporter and its collectors, which the tests
  # do not use. The package lists are refreshed at most once per shell (scripts/apt.sh).
  sp_apt_install --no-install-recommends prometheus >/dev/null || return 1
  if ! prometheus_installed; then
    echo "ensure_prometheus: prometheus installed but prometheus/promtool are not on PATH" >&2
    return 1
  fi
}
