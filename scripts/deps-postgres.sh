# shellcheck shell=bash
# Sourced by ./dev test: makes sure the tests have a PostgreSQL to talk to and exports
#   SESSION_PROXY_TEST_DATABASE_URL  the admin URL the tests create their databases on
#   SESSION_PROXY_TEST_PGBIN         where initdb/pg_ctl live, for tests that run their own cluster
# The shared server on 127.0.0.1:5432 is preferred because it costs nothing; a fresh machine
# without one gets a throwaway cluster that lives exactly as long as the sourcing shell.
# SESSION_PROXY_FORCE_THROWAWAY_PG=1 skips the 5432 probe, to exercise the throwaway path;
# SESSION_PROXY_THROWAWAY_PG_PORT is the first port the throwaway cluster tries (default: 15432, or
# the first port above the kernel's ephemeral range when 15432 falls inside it); the ones after it
# are outside that range.

# The throwaway cluster's port stays out of the kernel's ephemeral range: a port in it (55432 used
# to be the default) can be the local end of any outgoing connection, and then the server's bind
# fails with "Address already in use" although nobody listens there.
_sp_pg_ephemeral_range() {
  local lo=32768 hi=60999
  if [ -r /proc/sys/net/ipv4/ip_local_port_range ]; then
    read -r lo hi </proc/sys/net/ipv4/ip_local_port_range || true
  fi
  echo "$lo $hi"
}

# _sp_pg_next_port PORT: PORT itself, or the first port after it that is outside the ephemeral
# range; prints nothing when there is none below 65536.
_sp_pg_next_port() {
  local port=$1 lo hi
  read -r lo hi <<<"$(_sp_pg_ephemeral_range)"
  if [ "$port" -ge "$lo" ] && [ "$port" -le "$hi" ]; then
    port=$((hi + 1))
  fi
  if [ "$port" -le 65535 ]; then
    echo "$port"
  fi
}

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
    # Each part in its own `|| true`: the trap runs under `set -e`, and a failing part would
    # otherwise skip the parts after it and change the script's exit code.
    # shellcheck disable=SC2064 # the command is meant to be fixed now, not at exit
    trap "{ ${parts[2]}; } || true; { $1; } || true" EXIT
  else
    # shellcheck disable=SC2064
    trap "{ $1; } || true" EXIT
  fi
}

# _sp_pg_as_owner command...: run an initdb/pg_ctl command as the cluster's owner. They refuse
# root, so root runs them as the postgres user; anyone else owns the cluster themselves. /tmp as
# cwd spares them "could not change directory" noise when the caller's directory is not readable
# by the postgres user.
_sp_pg_as_owner() {
  if [ "$(id -u)" -eq 0 ]; then
    (cd /tmp && runuser -u postgres -- "$@")
  else
    (cd /tmp && "$@")
  fi
}

# _sp_pg_cleanup PGBIN PGDATA: stop the throwaway cluster and remove its directory. Run from the
# EXIT trap under `set -e`, so no step may stop the ones after it: a failed stop (the server is
# already gone, or hangs) still removes the directory.
_sp_pg_cleanup() {
  local pgbin=$1 pgdata=$2 pid=""
  if [ -f "$pgdata/postmaster.pid" ]; then
    if ! _sp_pg_as_owner "$pgbin/pg_ctl" -D "$pgdata" -m immediate -w -t 20 stop >/dev/null 2>&1; then
      # Still running after all? Kill it, but only if that pid is this cluster's postmaster.
      pid=$(head -1 "$pgdata/postmaster.pid" 2>/dev/null) || pid=""
      if [ -n "$pid" ] && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF -- "$pgdata"; then
        kill -KILL "$pid" 2>/dev/null || true
      fi
    fi
  fi
  rm -rf "$pgdata" "$pgdata.initdb.log" "$pgdata.start.log" || true
}

_sp_pg_start_throwaway() {
  local pgbin=$1 port tries=0
  port=${SESSION_PROXY_THROWAWAY_PG_PORT:-$(_sp_pg_next_port 15432)}

  local pgdata
  pgdata=$(mktemp -d /tmp/sp-pgdata.XXXXXX)
  if [ "$(id -u)" -eq 0 ]; then
    chown postgres:postgres "$pgdata"
  fi
  # Registered before initdb so a failure half way still removes the directory.
  _sp_append_exit_trap "_sp_pg_cleanup '$pgbin' '$pgdata'"

  if ! _sp_pg_as_owner "$pgbin/initdb" -D "$pgdata" -A trust -U postgres -E UTF8 --no-sync \
    >"$pgdata.initdb.log" 2>&1; then
    echo "ensure_postgres: initdb failed:" >&2
    cat "$pgdata.initdb.log" >&2
    return 1
  fi
  rm -f "$pgdata.initdb.log"

  # A port someone listens on is skipped without trying (a leftover from a run killed with -9
  # must not be reused, nor a stranger's server); a start that fails to bind ("Address already in
  # use": the port is the local end of a connection, or was taken since the probe) moves on too.
  # The socket directory is the cluster's own, so no other server's /tmp lock file is in the way.
  while :; do
    if [ -z "$port" ] || [ "$tries" -ge 20 ]; then
      echo "ensure_postgres: no free port for the throwaway cluster after $tries tries" >&2
      return 1
    fi
    tries=$((tries + 1))
    if ! _sp_port_busy "$port"; then
      rm -f "$pgdata/server.log"
      if _sp_pg_as_owner "$pgbin/pg_ctl" -D "$pgdata" -l "$pgdata/server.log" -w -t 60 \
        -o "-p $port -k $pgdata -c listen_addresses=127.0.0.1 -c fsync=off" start \
        >"$pgdata.start.log" 2>&1; then
        rm -f "$pgdata.start.log"
        break
      fi
      if ! grep -qiE 'address already in use|could not create any TCP/IP sockets' \
        "$pgdata/server.log" 2>/dev/null; then
        echo "ensure_postgres: pg_ctl start failed:" >&2
        cat "$pgdata.start.log" "$pgdata/server.log" >&2 2>/dev/null || true
        return 1
      fi
      echo "postgres: port $port is in use, trying the next one" >&2
    fi
    port=$(_sp_pg_next_port $((port + 1)))
  done
  export SESSION_PROXY_TEST_DATABASE_URL="postgresql://postgres@127.0.0.1:$port/postgres"
  echo "postgres: tests use a throwaway cluster at 127.0.0.1:$port ($pgdata), stopped on exit"
}

ensure_postgres() {
  local pgbin
  if ! pgbin=$(_sp_pg_bin); then
    # Package lists are refreshed at most once per shell (scripts/apt.sh, shared with the others).
    sp_apt_install postgresql >/dev/null || return 1
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
