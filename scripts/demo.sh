#!/usr/bin/env bash
# The crash-and-recover story: start an order workflow, kill -9 the host
# after two steps are committed, resume it, and show that the committed
# steps were not run again.
set -euo pipefail
cd "$(dirname "$0")/.."

CAIRN=target/release/cairn
WASM=target/wasm32-wasip1/release/ecommerce.wasm
DEMO=$(mktemp -d "${TMPDIR:-/tmp}/cairn-demo.XXXXXX")
export CAIRN_DB="$DEMO/cairn.db"
mkdir -p "$DEMO/out"
ID=order-1001
INPUT='{"order_id":"A-1001","customer":"ada@example.com","items":[{"sku":"book","qty":2,"unit_cents":1250},{"sku":"pen","qty":3,"unit_cents":300}],"simulate_ms":700}'

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
steps_done() { "$CAIRN" runs --json | sed -n 's/.*"steps": \([0-9]*\).*/\1/p' | head -n 1; }

say "1. Start the order workflow (five steps, each calls a 'service' that takes 0.7 s)"
echo "\$ cairn run ecommerce.wasm --run-id $ID --dir $DEMO/out::/out --input '...'"
"$CAIRN" run "$WASM" --run-id "$ID" --dir "$DEMO/out::/out" --input "$INPUT" >"$DEMO/first.out" &
PID=$!
until [ "$(steps_done)" -ge 2 ] 2>/dev/null; do sleep 0.05; done

say "2. Two steps are committed: kill -9 the host in the middle of the third"
kill -9 "$PID"
wait "$PID" 2>/dev/null || true
echo "host killed; side effects so far:"
sed 's/^/   /' "$DEMO/out/effects.log"
echo
"$CAIRN" show "$ID"

say "3. Resume: committed steps come back from the history instantly, the rest run"
echo "\$ cairn resume $ID"
START=$(date +%s%N)
"$CAIRN" resume "$ID" | tee "$DEMO/resumed.out"
END=$(date +%s%N)
echo "(resume took $(( (END - START) / 1000000 )) ms for the 3 remaining steps of 700 ms each)"

say "4. Every side effect happened exactly once (count per step):"
cut -d' ' -f1 "$DEMO/out/effects.log" | sort | uniq -c | sed 's/^/   /'
if cut -d' ' -f1 "$DEMO/out/effects.log" | sort | uniq -d | grep -q .; then
    echo "a step ran twice!" >&2
    exit 1
fi
[ "$(wc -l <"$DEMO/out/effects.log")" -eq 5 ] || { echo "expected 5 side effects" >&2; exit 1; }

say "5. The history"
"$CAIRN" show "$ID"
echo
echo "database: $CAIRN_DB (inspect it with: CAIRN_DB=$CAIRN_DB $CAIRN runs)"
