#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for tests, without Docker (issue 12).
#
#   scripts/pg-cluster.sh start DIR   # prints postgres://cairn@127.0.0.1:PORT/cairn
#   scripts/pg-cluster.sh restart DIR # restarts it (pg_ctl restart -m fast)
#   scripts/pg-cluster.sh stop DIR    # stops it and removes DIR
#
# CAIRN_PG_OPTIONS adds server settings (tests: "-c fsync=off").
#
# `start` installs Debian's postgresql when initdb is missing, then runs a
# cluster as an unprivileged user (initdb refuses root) in DIR, on a free
# loopback port, with trust authentication for loopback only. With
# CAIRN_TEST_PG set, it prints that URL instead and starts nothing.
set -euo pipefail

action=${1:-}
dir=${2:-}
[[ -n "$action" && -n "$dir" ]] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }

if [[ -n "${CAIRN_TEST_PG:-}" ]]; then
  [[ "$action" == start ]] && echo "$CAIRN_TEST_PG"
  exit 0
fi

bin_dir() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
  [[ -n "$d" && -x "$d/initdb" ]] && echo "$d"
}

# Run as the cluster's owner: root hands over to the `postgres` user.
as_owner() {
  if [[ $(id -u) -eq 0 ]]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

case "$action" in
  start)
    bin=$(bin_dir || true)
    if [[ -z "$bin" ]]; then
      echo "installing Debian's postgresql for the tests" >&2
      SUDO=""
      [[ $(id -u) -eq 0 ]] || SUDO="sudo"
      export DEBIAN_FRONTEND=noninteractive
      $SUDO apt-get update -qq >/dev/null
      $SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
      bin=$(bin_dir)
    fi
    mkdir -p "$dir"
    if [[ $(id -u) -eq 0 ]]; then
      chown postgres: "$dir"
      # The owner must reach DIR: every directory above it needs o+x.
      runuser -u postgres -- test -x "$dir" || {
        echo "$0: the postgres user cannot reach $dir (a parent directory lacks o+x)" >&2
        exit 1
      }
    fi
    chmod 700 "$dir"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_owner "$bin/initdb" -D "$dir/data" -U cairn -A trust -E UTF8 --no-instructions >/dev/null
    # TLS too (clients choose: sslmode=require): a certificate for
    # 127.0.0.1 from a throwaway authority, DIR/ca.crt (sslrootcert=).
    ssl=""
    if command -v openssl >/dev/null; then
      openssl req -new -x509 -days 2 -nodes -subj "/CN=cairn test authority" \
        -keyout "$dir/ca.key" -out "$dir/ca.crt" >/dev/null 2>&1
      openssl req -new -nodes -subj "/CN=127.0.0.1" -keyout "$dir/server.key" -out "$dir/server.csr" >/dev/null 2>&1
      printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > "$dir/server.ext"
      openssl x509 -req -days 2 -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
        -extfile "$dir/server.ext" -out "$dir/server.crt" >/dev/null 2>&1
      chmod 600 "$dir/server.key" "$dir/ca.key"
      [[ $(id -u) -eq 0 ]] && chown postgres: "$dir/server.key" "$dir/server.crt"
      ssl="-c ssl=on -c ssl_cert_file=$dir/server.crt -c ssl_key_file=$dir/server.key"
    fi
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 60 start \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=200 $ssl ${CAIRN_PG_OPTIONS:-}" >/dev/null
    as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U cairn cairn
    echo "$port" > "$dir/port"
    echo "postgres://cairn@127.0.0.1:$port/cairn"
    ;;
  restart)
    # Tests: a server restart in the middle of runs (`-m fast`).
    as_owner "$(bin_dir)/pg_ctl" -D "$dir/data" -m fast -w restart >/dev/null
    ;;
  stop)
    bin=$(bin_dir || true)
    if [[ -n "$bin" && -d "$dir/data" ]]; then
      as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
    ;;
  *)
    echo "usage: $0 start|stop DIR" >&2
    exit 2
    ;;
esac
