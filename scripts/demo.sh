#!/usr/bin/env bash
# The crash-and-recover story on the onboarding workflow: create the
# account, kill -9 the host, resume: the account step is not run again and
# the two parallel branches (laptop, access) run side by side.
set -euo pipefail
cd "$(dirname "$0")/.."

CAIRN=target/release/cairn
WASM=target/wasm32-wasip1/release/onboarding.wasm
DEMO=$(mktemp -d "${TMPDIR:-/tmp}/cairn-demo.XXXXXX")
export CAIRN_DB="$DEMO/cairn.db"
mkdir -p "$DEMO/out"
ID=onboard-ada
INPUT='{"name":"Ada Lovelace","email":"ada@example.com","team":"engines","simulate_ms":1500}'

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
steps_done() { "$CAIRN" runs --json | sed -n 's/.*"steps": \([0-9]*\).*/\1/p' | head -n 1; }

say "1. Start onboarding (every service call takes 1.5 s)"
echo "\$ cairn run onboarding.wasm --run-id $ID --dir $DEMO/out::/out --input '$INPUT'"
"$CAIRN" run "$WASM" --run-id "$ID" --dir "$DEMO/out::/out" --input "$INPUT" >"$DEMO/first.out" &
PID=$!
until [ "$(steps_done)" -ge 1 ] 2>/dev/null; do sleep 0.02; done

say "2. The account is created and committed: kill -9 the host"
kill -9 "$PID"
wait "$PID" 2>/dev/null || true
echo "host killed; side effects so far:"
sed 's/^/   /' "$DEMO/out/effects.log"
echo
"$CAIRN" show "$ID"

say "3. Resume: create_account comes back from the history instantly; laptop and access run side by side"
echo "\$ cairn resume $ID"
START=$(date +%s%N)
"$CAIRN" resume "$ID" | tee "$DEMO/resumed.out"
END=$(date +%s%N)
echo "(resume took $(( (END - START) / 1000000 )) ms: the two 1.5 s branches overlapped, then three 1.5 s emails)"

say "4. Every side effect happened exactly once (count per step):"
cut -d' ' -f1 "$DEMO/out/effects.log" | sort | uniq -c | sed 's/^/   /'
if [ "$(cut -d' ' -f1,2 "$DEMO/out/effects.log" | sort | uniq -d | wc -l)" -ne 0 ]; then
    echo "a side effect happened twice!" >&2
    exit 1
fi
[ "$(wc -l <"$DEMO/out/effects.log")" -eq 6 ] || { echo "expected 6 side effects" >&2; exit 1; }

say "5. The history (branch attempts at the bottom: note their overlapping durations)"
"$CAIRN" show "$ID"
echo
echo "database: $CAIRN_DB (inspect it with: CAIRN_DB=$CAIRN_DB $CAIRN runs)"
