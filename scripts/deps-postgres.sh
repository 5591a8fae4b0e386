# shellcheck shell=bash
# Sourced by ./dev test: makes sure the tests have a PostgreSQL to talk to and exports
#   SESSION_PROXY_TEST_DATABASE_URL  the admin URL the tests create their databases on
#   SESSION_PROXY_TEST_PGBIN         where initdb/pg_ctl live, for tests that run their own cluster
# The shared server on 127.0.0.1:5432 is preferred because it costs nothing; a fresh machine
# without one gets a throwaway cluster that lives exactly as long as the sourcing shell.
# SESSION_PROXY_FORCE_THROWAWAY_PG=1 skips the 5432 probe, to exercise the throwaway path;
# SESSION_PROXY_THROWAWAY_PG_PORT moves the throwaway cluster off 55432.

_SP_PG_THROWAWAY_PORT=${SESSION_PROXY_THROWAWAY_PG_PORT:-55432}

_sp_pg_bin() {
  # The newest major wins when several are installed, matching tests/helpers/postgres.py. A
  # client-only major has no initdb, so the glob looks for initdb itself.
  local initdb
  initdb=$(printf '%s\n' /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)
  [ -x "$initdb" ] || return 1
  dirname "$initdb"
}

_sp_pg_answers() {
  # A real query, not just pg_isready: a server that wants a password would pass pg_isready and
  # then fail every test. -w never prompts, so an unusable server fails fast instead of hanging.
  local pgbin=$1 port=$2
  PGCONNECT_TIMEOUT=3 "$pgbin/psql" -w -h 127.0.0.1 -p "$port" -U postgres -d postgres \
    -Atqc 'select 1' >/dev/null 2>&1
}

_sp_port_busy() {
  (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

_sp_append_exit_trap() {
  # Other sourced scripts may already clean up on EXIT; chaining keeps their cleanup running.
  local existing
  existing=$(trap -p EXIT)
  if [ -n "$existing" ]; then
    local -a parts
    eval "parts=($existing)"
    # shellcheck disable=SC2064 # the command is meant to be fixed now, not at exit
    trap "${parts[2]}; $1" EXIT
  else
    # shellcheck disable=SC2064
    trap "$1" EXIT
  fi
}

_sp_pg_start_throwaway() {
  local pgbin=$1 port=$_SP_PG_THROWAWAY_PORT tries=0
  # A leftover from a run that was killed with -9 may still hold the port; take the next one
  # rather than fail or, worse, reuse a stranger's server.
  while _sp_port_busy "$port"; do
    tries=$((tries + 1))
    if [ "$tries" -ge 20 ]; then
      echo "ensure_postgres: ports $_SP_PG_THROWAWAY_PORT..$port are all taken" >&2
      return 1
    fi
    port=$((port + 1))
  done

  local pgdata
  pgdata=$(mktemp -d /tmp/sp-pgdata.XXXXXX)
  chown postgres:postgres "$pgdata"
  # Registered before initdb so a failure half way still removes the directory.
  _sp_append_exit_trap "(cd /tmp && runuser -u postgres -- '$pgbin/pg_ctl' -D '$pgdata' -m immediate -w stop) >/dev/null 2>&1; rm -rf '$pgdata'"

  # initdb and pg_ctl refuse root; /tmp as cwd spares them "could not change directory" noise
  # when the caller's directory is not readable by the postgres user.
  if ! (cd /tmp && runuser -u postgres -- "$pgbin/initdb" -D "$pgdata" -A trust -U postgres \
    -E UTF8 --no-sync >"$pgdata.initdb.log" 2>&1); then
    echo "ensure_postgres: initdb failed:" >&2
    cat "$pgdata.initdb.log" >&2
    rm -f "$pgdata.initdb.log"
    return 1
  fi
  rm -f "$pgdata.initdb.log"
  if ! (cd /tmp && runuser -u postgres -- "$pgbin/pg_ctl" -D "$pgdata" -l "$pgdata/server.log" \
    -w -t 60 -o "-p $port -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null); then
    echo "ensure_postgres: pg_ctl start failed:" >&2
    cat "$pgdata/server.log" >&2 || true
    return 1
  fi
  export SESSION_PROXY_TEST_DATABASE_URL="postgresql://postgres@127.0.0.1:$port/postgres"
  echo "postgres: tests use a throwaway cluster at 127.0.0.1:$port ($pgdata), stopped on exit"
}

ensure_postgres() {
  local pgbin
  if ! pgbin=$(_sp_pg_bin); then
    # Package lists are refreshed at most once per shell (shared with the other deps-*.sh).
    if [ -z "${_SESSION_PROXY_APT_UPDATED:-}" ]; then
      apt-get update -qq
      _SESSION_PROXY_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    if ! pgbin=$(_sp_pg_bin); then
      echo "ensure_postgres: postgresql installed but no initdb under /usr/lib/postgresql" >&2
      return 1
    fi
  fi
  export SESSION_PROXY_TEST_PGBIN="$pgbin"

  if [ -n "${SESSION_PROXY_TEST_DATABASE_URL:-}" ]; then
    echo "postgres: tests use SESSION_PROXY_TEST_DATABASE_URL as given"
    return 0
  fi
  if [ -z "${SESSION_PROXY_FORCE_THROWAWAY_PG:-}" ] && _sp_pg_answers "$pgbin" 5432; then
    export SESSION_PROXY_TEST_DATABASE_URL="postgresql://postgres@127.0.0.1:5432/postgres"
    echo "postgres: tests use the running server at 127.0.0.1:5432"
    return 0
  fi
  _sp_pg_start_throwaway "$pgbin"
}
