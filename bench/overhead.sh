#!/usr/bin/env bash
# Gateway overhead on loopback: client → stub directly versus client → gateway → stub,
# at fixed open-loop rates. Two gateways: `plain` (no contract, no metering) and `limits`
# (the tenant under a token/request/concurrency contract that it stays inside, and every
# request metered durably into SQLite). Prints one JSON line per run and a table.
#
#   bash bench/overhead.sh                 # rates 1000 5000 10000, 10 s each
#   RATES="1000 2000" DURATION=5 bash bench/overhead.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RATES=${RATES:-"1000 5000 10000"}
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
STUB_PORT=${STUB_PORT:-19100}
PLAIN_PORT=${PLAIN_PORT:-19080}
LIMITS_PORT=${LIMITS_PORT:-19081}
cargo build --release -q -p gateway -p loadtest
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
gw_config() { # port, tenant contract lines, metering lines
  cat <<TOML
[server]
listen = "127.0.0.1:$1"
[[models]]
id = "stub"
[[pools]]
name = "stub"
model = "stub"
workers = [{ kind = "openai", url = "http://127.0.0.1:$STUB_PORT", max_concurrency = 4096 }]
[metering]
$3
[[tenants]]
id = "bench"
keys_sha256 = ["179510ee3e248a7bfae1a518d344461ddef0e32bbf53b40845f2d3e157c5973f"]
$2
TOML
}
gw_config "$PLAIN_PORT" "" "enabled = false" > "$tmp/plain.toml"
gw_config "$LIMITS_PORT" $'tokens_per_second = 1e9\nrequests_per_minute = 100000000\nmax_concurrency = 100000' \
  "path = \"$tmp/usage.db\"" > "$tmp/limits.toml"
./target/release/loadtest stub --listen 127.0.0.1:$STUB_PORT --tokens 4 >/dev/null &
RUST_LOG=warn ./target/release/gateway serve --config "$tmp/plain.toml" >/dev/null &
RUST_LOG=warn ./target/release/gateway serve --config "$tmp/limits.toml" >/dev/null &
sleep 1
BODY='{"model":"stub","messages":[{"role":"user","content":"hello"}],"max_tokens":4}'
run() { ./target/release/loadtest rate --rate "$2" --duration "$DURATION" --connections "$CONNS" \
          --key sk-tollgate-demo --body "$BODY" --label "$1" --url "$3"; }
printf '%-8s %-10s %9s %9s %9s %9s\n' rate path achieved p50_us p99_us errors
for r in $RATES; do
  d=$(run direct "$r" "http://127.0.0.1:$STUB_PORT/v1/chat/completions")
  p=$(run plain "$r" "http://127.0.0.1:$PLAIN_PORT/v1/chat/completions")
  l=$(run limits "$r" "http://127.0.0.1:$LIMITS_PORT/v1/chat/completions")
  printf '%s\n%s\n%s\n' "$d" "$p" "$l" >> "$tmp/all.jsonl"
  python3 - "$d" "$p" "$l" <<'PY'
import json,sys
d,p,l=(json.loads(a) for a in sys.argv[1:4])
for x in (d,p,l):
    print(f"{x['offered_rps']:<8.0f} {x['label']:<10} {x['achieved_rps']:>9} {x['p50_us']:>9} {x['p99_us']:>9} {x['errors']:>9}")
for x in (p,l):
    print(f"{'':8} {'added/'+x['label']:<10} {'':>9} {x['p50_us']-d['p50_us']:>9} {x['p99_us']-d['p99_us']:>9}")
PY
done
echo "usage records written: $(sqlite3 "$tmp/usage.db" 'select count(*) from usage' 2>/dev/null || echo '?')"
