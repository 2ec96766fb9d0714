#!/usr/bin/env bash
# A disposable Postgres cluster in a temp dir on a free port.
#   eval "$(scripts/throwaway-postgres.sh start)"   # sets PG_DIR and TEST_DATABASE_URL
#   scripts/throwaway-postgres.sh stop "$PG_DIR"
set -euo pipefail
bin=""
for d in "${PG_BIN_DIR:-}" /usr/local/bin /usr/lib/postgresql/*/bin; do
  if [[ -n "$d" && -x "$d/initdb" ]]; then bin="$d"; break; fi
done
[[ -n "$bin" ]] || { echo "no Postgres server binaries; run scripts/install-deps.sh" >&2; exit 1; }
as_pg() { if [[ "$(id -u)" == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }

case "${1:-}" in
  start)
    dir="$(mktemp -d /tmp/saga-pg.XXXXXX)"
    [[ "$(id -u)" == 0 ]] && chown postgres:postgres "$dir"
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    as_pg "$bin/initdb" -A trust -U postgres -E UTF8 --no-sync -D "$dir/data" >/dev/null
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/pg.log" -w \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300" start >/dev/null
    echo "PG_DIR=$dir"
    echo "TEST_DATABASE_URL=postgres://postgres@127.0.0.1:$port/postgres"
    ;;
  stop)
    dir="${2:?usage: stop PG_DIR}"
    as_pg "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$dir"
    ;;
  *) echo "usage: $0 start | stop PG_DIR" >&2; exit 2 ;;
esac
