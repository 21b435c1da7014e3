#!/usr/bin/env bash
# Starts a throwaway PostgreSQL 15 on a loopback port (fsync off; data under a temp dir) and
# prints its URL. Used by .ci/run and by hand:
#   url=$(scripts/pg_throwaway.sh 55432 [DIR]) && export FWREPO_TEST_POSTGRES_URL=$url
# Stop it with: pg_ctl -D DIR/data stop (as the postgres user when run as root).
# initdb refuses root, so the cluster runs as the `postgres` user when started by root.
set -euo pipefail
port=${1:-55432}
bin=${PG_BIN:-/usr/lib/postgresql/15/bin}
dir=${2:-$(mktemp -d /tmp/fwrepo-pg.XXXXXX)}
as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
[ "$(id -u)" = 0 ] && chown postgres "$dir"
as_pg "$bin/initdb" -D "$dir/data" -U fwrepo --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1
as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=400 -c shared_buffers=256MB -c shared_preload_libraries=pg_stat_statements" \
    start >/dev/null
echo "postgres://fwrepo@127.0.0.1:$port/postgres"
