#!/usr/bin/env bash
# The e-commerce story with real effects: inventory in Cairn's key-value
# store, a charge over HTTP to a payment service (the project's
# fake-payments, idempotent as Stripe is), kill -9 right after the service
# took the charge, resume: the charge is sent again with the same
# Idempotency-Key and taken once. Then an order whose shipping fails for
# good: the workflow refunds and releases the stock (compensations).
set -euo pipefail
cd "$(dirname "$0")/.."

CAIRN=target/release/cairn
PAY=target/release/fake-payments
WASM=target/wasm32-wasip1/release/ecommerce.wasm
DEMO=$(mktemp -d "${TMPDIR:-/tmp}/cairn-demo-shop.XXXXXX")
export CAIRN_DB="$DEMO/cairn.db"
NS=shop

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
stats() { curl -s "$URL/stats" 2>/dev/null || python3 -c "import urllib.request,sys;print(urllib.request.urlopen(sys.argv[1]+'/stats').read().decode())" "$URL"; }
charges() { stats | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["charges"]))'; }

# The payment service lives as long as this script (its stdin is our pipe).
exec 3> >("$PAY" --max-seconds 300 >"$DEMO/pay.url")
until [ -s "$DEMO/pay.url" ]; do sleep 0.02; done
URL=$(head -n 1 "$DEMO/pay.url")
ALLOW=${URL#http://}

say "0. A payment service at $URL; 3 books in stock"
echo "\$ cairn kv put --namespace $NS stock/book 3"
"$CAIRN" kv put --namespace "$NS" stock/book 3
ORDER1='{"order_id":"A-1","customer":"ada@example.com","items":[{"sku":"book","qty":2,"unit_cents":1250}],"time_scale":0.3,"payment_url":"'"$URL"'"}'
echo "\$ cairn run ecommerce.wasm --kv-namespace $NS --allow-http $ALLOW --input '$ORDER1'"
"$CAIRN" run "$WASM" --run-id A-1 --kv-namespace "$NS" --allow-http "$ALLOW" --input "$ORDER1" >"$DEMO/a1.out" 2>"$DEMO/a1.err" &
PID=$!
until [ "$(charges)" -ge 1 ]; do sleep 0.02; done

say "1. The service took the charge; the step has not committed yet: kill -9 the host"
kill -9 "$PID"; wait "$PID" 2>/dev/null || true
stats; echo

say "2. Resume: the charge is sent again with the same key; the service answers with the first charge"
"$CAIRN" resume A-1
echo
stats; echo
[ "$(charges)" -eq 1 ] || { echo "the charge was taken twice!" >&2; exit 1; }
echo "stock left: $("$CAIRN" kv get --namespace "$NS" stock/book)"

say "3. Another order, whose shipping fails for good: refund and release, newest first"
ORDER2='{"order_id":"A-2","customer":"bob@example.com","items":[{"sku":"book","qty":1,"unit_cents":1250}],"payment_url":"'"$URL"'","fail_shipping":true}'
"$CAIRN" run "$WASM" --run-id A-2 --kv-namespace "$NS" --allow-http "$ALLOW" --input "$ORDER2" || true
stats; echo
echo "stock left: $("$CAIRN" kv get --namespace "$NS" stock/book) (the failed order's book is back)"
"$CAIRN" show A-2

say "4. The key-value store"
"$CAIRN" kv list --namespace "$NS"
exec 3>&-
echo
echo "database: $CAIRN_DB"
