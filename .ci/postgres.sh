# Sourced by .ci/run: a throwaway PostgreSQL server for tests/test_postgres.py, installed with
# the system's package manager when absent, its cluster made by initdb in a temporary folder,
# listening on a free port of 127.0.0.1, stopped and removed when .ci/run exits. Where none can
# be had, the tests say so (skipped, with the reason) instead of passing silently.

start_postgres() {
  local bindir port
  bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
  if [ -z "$bindir" ]; then
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
           postgresql >/dev/null; } 2>&1 | tail -3; then :; fi
    bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
  fi
  if [ -z "$bindir" ] || ! id postgres >/dev/null 2>&1 || ! command -v runuser >/dev/null; then
    echo "ci: no PostgreSQL server could be had; tests/test_postgres.py will be skipped"
    return 0
  fi
  PG_TMP=$(mktemp -d)
  chown postgres "$PG_TMP"
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  if ! runuser -u postgres -- "$bindir/initdb" -D "$PG_TMP/data" -A trust -U postgres >"$PG_TMP/initdb.log" 2>&1 \
     || ! runuser -u postgres -- "$bindir/pg_ctl" -D "$PG_TMP/data" -l "$PG_TMP/server.log" -w \
          -o "-p $port -k $PG_TMP -c listen_addresses=127.0.0.1" start >/dev/null; then
    echo "ci: PostgreSQL did not start ($(tail -1 "$PG_TMP/server.log" 2>/dev/null)); tests/test_postgres.py will be skipped"
    return 0
  fi
  PG_CTL="$bindir/pg_ctl"
  trap 'runuser -u postgres -- "$PG_CTL" -D "$PG_TMP/data" -m immediate stop >/dev/null 2>&1; rm -rf "$PG_TMP"' EXIT
  export NAS_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$port/postgres"
  export NAS_TEST_PG_CTL="$PG_CTL" NAS_TEST_PG_DATA="$PG_TMP/data" NAS_TEST_PG_LOG="$PG_TMP/server.log"
  echo "ci: PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') on 127.0.0.1:$port for the storage tests"
}
