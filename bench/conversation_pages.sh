#!/usr/bin/env bash
# Listing a conversation's items a page at a time (`GET /v1/conversations/{id}/items`):
# conversations of SIZES items (added 1,000 a call), then open-loop GETs of the newest
# page (`limit=20`) and of a page in the middle (`after` an item halfway) at RATE a
# second. Prints each size's latency percentiles. A fixed-answer upstream stands in for a
# model (no request here reaches it).
#
#   bash bench/conversation_pages.sh
#   GATEWAY=/tmp/gateway-old bash bench/conversation_pages.sh   # another build
#   SIZES="100 10000" RATE=200 DURATION=5 bash bench/conversation_pages.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
DURATION=${DURATION:-5}
RATE=${RATE:-200}
SIZES=${SIZES:-"100 1000 10000"}
PORT=${PORT:-19210}
STUB_PORT=${STUB_PORT:-19211}
GATEWAY=${GATEWAY:-./target/release/gateway}
cargo build --release -q -p gateway -p loadtest
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
serve_stored_stub "$PORT" "$STUB_PORT" "$tmp" "" "$GATEWAY"
base="http://127.0.0.1:$PORT/v1/conversations"
auth=(-H 'Authorization: Bearer sk-tollgate-demo' -H 'content-type: application/json')
printf '%-8s %-8s %9s %9s %9s %9s %7s\n' items page offered achieved p50_ms p99_ms errors
for n in $SIZES; do
  conv=$(curl -sf "${auth[@]}" "$base" -d '{}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  left=$n
  while [ "$left" -gt 0 ]; do
    k=$(( left < 1000 ? left : 1000 ))
    python3 -c 'import json,sys; k=int(sys.argv[1]); print(json.dumps({"items":[{"role":"user","content":f"message {i} of a long conversation"} for i in range(k)]}))' "$k" > "$tmp/items.json"
    curl -sf "${auth[@]}" "$base/$conv/items" -d @"$tmp/items.json" >/dev/null
    left=$((left - k))
  done
  # Halfway: from the first item, walk `after` cursors 100 at a time to the middle.
  mid=$(curl -sf "${auth[@]}" "$base/$conv/items?order=asc&limit=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["first_id"])')
  for _ in $(seq $(( n / 200 ))); do
    mid=$(curl -sf "${auth[@]}" "$base/$conv/items?order=asc&limit=100&after=$mid" | python3 -c 'import json,sys; print(json.load(sys.stdin)["last_id"])')
  done
  for page in newest middle; do
    url="$base/$conv/items?limit=20"
    [ "$page" = middle ] && url="$url&after=$mid"
    out=$(./target/release/loadtest rate --url "$url" --rate "$RATE" --duration "$DURATION" --warmup 1 \
      --connections 16 --key sk-tollgate-demo --label "$page")
    python3 - "$out" "$n" <<'PY'
import json, sys
x = json.loads(sys.argv[1]); n = sys.argv[2]
print(f"{n:<8} {x['label']:<8} {x['offered_rps']:>9} {x['achieved_rps']:>9} {x['p50_us']/1e3:>9.2f} {x['p99_us']/1e3:>9.2f} {x['errors']:>7}")
PY
  done
done
