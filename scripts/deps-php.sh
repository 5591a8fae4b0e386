# shellcheck shell=bash
# Sourced by ./dev test: PHP with Guzzle, the client Laravel's HTTP client is built on, so the
# suite can show that a real PHP application reads the proxy's answers during a failover.
# Debian packages are used (not Composer) because the machines reach the Debian mirror and the
# test only needs the library to be loadable from one fixed path.

GUZZLE_AUTOLOAD=/usr/share/php/GuzzleHttp/autoload.php

php_has_guzzle() {
  command -v php >/dev/null 2>&1 && php -r "require '$GUZZLE_AUTOLOAD';" >/dev/null 2>&1
}

ensure_php() {
  if php_has_guzzle; then
    return 0
  fi
  # The package lists are refreshed at most once per shell (scripts/apt.sh): a second call
  # within the same ./dev run does not pay for another download.
  sp_apt_install php-cli php-curl php-guzzlehttp-guzzle >/dev/null || return 1
  if ! php_has_guzzle; then
    echo "ensure_php: php-guzzlehttp-guzzle installed but $GUZZLE_AUTOLOAD does not load" >&2
    return 1
  fi
}
