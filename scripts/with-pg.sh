#!/usr/bin/env bash
# Run a command with a PostgreSQL server for the tests: CAIRN_TEST_PG if it
# is set, else a throwaway cluster (scripts/pg-cluster.sh) that is stopped
# and removed when the command ends, however it ends. The command sees
# CAIRN_TEST_PG and CAIRN_REQUIRE_PG=1 (the PostgreSQL tests may not skip).
#
#   scripts/with-pg.sh cargo test --release
set -euo pipefail
cd "$(dirname "$0")/.."
export CAIRN_REQUIRE_PG=1
if [[ -n "${CAIRN_TEST_PG:-}" ]]; then
  exec "$@"
fi
dir=$(mktemp -d "${TMPDIR:-/tmp}/cairn-pg.XXXXXX")
chmod 755 "$dir"
trap 'CAIRN_TEST_PG= scripts/pg-cluster.sh stop "$dir/cluster"; rm -rf "$dir"' EXIT
# Durability is not under test here (make bench measures it with fsync on).
CAIRN_TEST_PG=$(CAIRN_PG_OPTIONS="-c fsync=off" scripts/pg-cluster.sh start "$dir/cluster")
export CAIRN_TEST_PG
# Tests that restart the server find it here.
export CAIRN_TEST_PG_DIR="$dir/cluster"
echo "PostgreSQL for the tests: $CAIRN_TEST_PG" >&2
"$@"
