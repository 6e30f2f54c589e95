#!/usr/bin/env bash
# A throwaway local PostgreSQL for the tests: the distribution's package (installed when missing,
# as root), its own data directory and port, trust auth on loopback only.
#   scripts/postgres.sh start DIR PORT   -> prints the SQLAlchemy URL
#   scripts/postgres.sh stop DIR
set -euo pipefail
cmd="$1"; dir="$2"; port="${3:-}"
find_bin() {
  command -v "$1" 2>/dev/null || ls /usr/lib/postgresql/*/bin/"$1" 2>/dev/null | sort -V | tail -n 1
}
if [[ -z "$(find_bin initdb)" ]]; then
  echo "[postgres] installing Debian's postgresql" >&2
  if [[ $(id -u) -ne 0 ]]; then echo "[postgres] not root: install postgresql yourself" >&2; exit 1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2 || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2; }
fi
initdb="$(find_bin initdb)"; pg_ctl="$(find_bin pg_ctl)"
as_pg() {  # initdb and the server refuse to run as root
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}
case "$cmd" in
  start)
    mkdir -p "$dir"
    [[ $(id -u) -eq 0 ]] && chown postgres "$dir"
    as_pg "$initdb" -D "$dir/data" -U skyrl --auth=trust -E UTF8 >/dev/null
    as_pg "$pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
    echo "postgresql+psycopg://skyrl@127.0.0.1:$port/postgres"
    ;;
  stop)
    as_pg "$pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
    ;;
  *) echo "usage: $0 start DIR PORT | stop DIR" >&2; exit 2 ;;
esac
