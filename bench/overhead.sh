#!/usr/bin/env bash
# Gateway overhead on loopback: client → stub directly versus client → gateway → stub,
# at fixed open-loop rates. Prints one JSON line per run and a table of added latency.
#
#   bash bench/overhead.sh                 # rates 1000 5000 10000, 10 s each
#   RATES="1000 2000" DURATION=5 bash bench/overhead.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RATES=${RATES:-"1000 5000 10000"}
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
STUB_PORT=${STUB_PORT:-19100}
GW_PORT=${GW_PORT:-19080}
cargo build --release -q -p gateway -p loadtest
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
cat > "$tmp/gw.toml" <<TOML
[server]
listen = "127.0.0.1:$GW_PORT"
[[models]]
id = "stub"
[[pools]]
name = "stub"
model = "stub"
workers = [{ kind = "openai", url = "http://127.0.0.1:$STUB_PORT", max_concurrency = 4096 }]
[[tenants]]
id = "bench"
keys_sha256 = ["179510ee3e248a7bfae1a518d344461ddef0e32bbf53b40845f2d3e157c5973f"]
TOML
./target/release/loadtest stub --listen 127.0.0.1:$STUB_PORT --tokens 4 >/dev/null &
RUST_LOG=warn ./target/release/gateway serve --config "$tmp/gw.toml" >/dev/null &
sleep 1
BODY='{"model":"stub","messages":[{"role":"user","content":"hello"}],"max_tokens":4}'
run() { ./target/release/loadtest rate --rate "$2" --duration "$DURATION" --connections "$CONNS" \
          --key sk-tollgate-demo --body "$BODY" --label "$1" --url "$3"; }
printf '%-8s %-10s %9s %9s %9s %9s\n' rate path achieved p50_us p99_us errors
for r in $RATES; do
  d=$(run direct "$r" "http://127.0.0.1:$STUB_PORT/v1/chat/completions")
  g=$(run gateway "$r" "http://127.0.0.1:$GW_PORT/v1/chat/completions")
  echo "$d" >> "$tmp/all.jsonl"; echo "$g" >> "$tmp/all.jsonl"
  python3 - "$d" "$g" <<'PY'
import json,sys
d,g=json.loads(sys.argv[1]),json.loads(sys.argv[2])
for x in (d,g):
    print(f"{x['offered_rps']:<8.0f} {x['label']:<10} {x['achieved_rps']:>9} {x['p50_us']:>9} {x['p99_us']:>9} {x['errors']:>9}")
print(f"{'':8} {'added':<10} {'':>9} {g['p50_us']-d['p50_us']:>9} {g['p99_us']-d['p99_us']:>9}")
PY
done
