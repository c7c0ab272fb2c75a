#!/usr/bin/env bash
# Gateway overhead on loopback: client → stub directly versus client → gateway → stub,
# at fixed open-loop rates. Two gateways: `plain` (no contract, no metering) and `limits`
# (the tenant under a token/request/concurrency contract that it stays inside, and every
# request metered durably into SQLite). Prints one JSON line per run and a table.
#
#   bash bench/overhead.sh                 # rates 1000 5000 10000, 10 s each
#   RATES="1000 2000" DURATION=5 bash bench/overhead.sh
#   RUNTIMES="per_core shared" bash bench/overhead.sh   # a plain gateway per server.runtime
#   BASELINE=/tmp/gateway-old bash bench/overhead.sh     # also a `limits` gateway run from
#                                   # another build (A/B of a change, in the same sitting)
#   PIN=1 bash bench/overhead.sh        # gateways on the last CPU, the load generator and
#                                   # the stub on the others (no core shared with the client)
#   RESPONSES=1 bash bench/overhead.sh   # also the first plain gateway asked the same
#                                   # through POST /v1/responses (what its translation costs)
#
# The gateways' CPU per request (user + system, from /proc) is printed beside each run.
set -euo pipefail
cd "$(dirname "$0")/.."
RATES=${RATES:-"1000 5000 10000"}
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
RUNTIMES=${RUNTIMES:-per_core}
BASELINE=${BASELINE:-}
RESPONSES=${RESPONSES:-}
PIN=${PIN:-}
# With PIN: the gateways get the last CPU, everything else the rest.
ncpu=$(nproc)
if [ -n "$PIN" ] && [ "$ncpu" -ge 2 ]; then
  GW_CPUS=(taskset -c $((ncpu - 1)))
  REST_CPUS=(taskset -c 0-$((ncpu - 2)))
else
  GW_CPUS=()
  REST_CPUS=()
fi
STUB_PORT=${STUB_PORT:-19100}
PLAIN_PORT=${PLAIN_PORT:-19080}
LIMITS_PORT=${LIMITS_PORT:-19081}
cargo build --release -q -p gateway -p loadtest
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
gw_config() { # port, tenant contract lines, metering lines[, server.runtime]
  cat <<TOML
[server]
listen = "127.0.0.1:$1"
runtime = "${4:-per_core}"
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
# One plain gateway per runtime (ports PLAIN_PORT, PLAIN_PORT+2, ...), then `limits`.
declare -A PORT PID
port=$PLAIN_PORT
for rt in $RUNTIMES; do
  PORT[$rt]=$port
  gw_config "$port" "" "enabled = false" "$rt" > "$tmp/plain-$rt.toml"
  port=$((port + 2))
done
gw_config "$LIMITS_PORT" $'tokens_per_second = 1e9\nrequests_per_minute = 100000000\nmax_concurrency = 100000' \
  "path = \"$tmp/usage.db\"" > "$tmp/limits.toml"
"${REST_CPUS[@]}" ./target/release/loadtest stub --listen 127.0.0.1:$STUB_PORT --tokens 4 >/dev/null &
for rt in $RUNTIMES; do
  RUST_LOG=warn "${GW_CPUS[@]}" ./target/release/gateway serve --config "$tmp/plain-$rt.toml" >/dev/null &
  PID[$rt]=$!
done
RUST_LOG=warn "${GW_CPUS[@]}" ./target/release/gateway serve --config "$tmp/limits.toml" >/dev/null &
PID[limits]=$!
if [ -n "$BASELINE" ]; then
  mkdir -p "$tmp/baseline"
  gw_config "$((LIMITS_PORT + 2))" $'tokens_per_second = 1e9\nrequests_per_minute = 100000000\nmax_concurrency = 100000' \
    "path = \"$tmp/baseline/usage.db\"" > "$tmp/baseline/limits.toml"
  RUST_LOG=warn "${GW_CPUS[@]}" "$BASELINE" serve --config "$tmp/baseline/limits.toml" >/dev/null &
  PID[baseline]=$!
fi
sleep 1
BODY='{"model":"stub","messages":[{"role":"user","content":"hello"}],"max_tokens":4}'
RESPONSES_BODY='{"model":"stub","input":"hello","max_output_tokens":4}'
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; } # user + system CPU, in 1/100 s
run() { # label, rate, url[, pid whose CPU to count[, body]]
  local a b out
  [ -n "${4:-}" ] && a=$(ticks "$4")
  out=$("${REST_CPUS[@]}" ./target/release/loadtest rate --rate "$2" --duration "$DURATION" --connections "$CONNS" \
          --key sk-tollgate-demo --body "${5:-$BODY}" --label "$1" --url "$3")
  if [ -n "${4:-}" ]; then
    b=$(ticks "$4")
    out=$(python3 -c 'import json,sys; x=json.loads(sys.argv[1]); x["cpu_us_per_req"]=round((int(sys.argv[2])*1e4)/max(1,x["achieved_rps"]*float(sys.argv[3]))); print(json.dumps(x))' "$out" "$((b - a))" "$DURATION")
  fi
  echo "$out"
}
printf '%-8s %-16s %9s %9s %9s %9s %12s\n' rate path achieved p50_us p99_us errors cpu_us/req
for r in $RATES; do
  runs=("$(run direct "$r" "http://127.0.0.1:$STUB_PORT/v1/chat/completions")")
  for rt in $RUNTIMES; do
    runs+=("$(run "plain/$rt" "$r" "http://127.0.0.1:${PORT[$rt]}/v1/chat/completions" "${PID[$rt]}")")
  done
  if [ -n "$RESPONSES" ]; then
    rt=${RUNTIMES%% *}
    runs+=("$(run "responses/$rt" "$r" "http://127.0.0.1:${PORT[$rt]}/v1/responses" "${PID[$rt]}" "$RESPONSES_BODY")")
  fi
  runs+=("$(run limits "$r" "http://127.0.0.1:$LIMITS_PORT/v1/chat/completions" "${PID[limits]}")")
  if [ -n "$BASELINE" ]; then
    runs+=("$(run limits/baseline "$r" "http://127.0.0.1:$((LIMITS_PORT + 2))/v1/chat/completions" "${PID[baseline]}")")
  fi
  printf '%s\n' "${runs[@]}" >> "$tmp/all.jsonl"
  python3 - "${runs[@]}" <<'PY'
import json,sys
d,*gws=(json.loads(a) for a in sys.argv[1:])
for x in (d,*gws):
    print(f"{x['offered_rps']:<8.0f} {x['label']:<16} {x['achieved_rps']:>9} {x['p50_us']:>9} {x['p99_us']:>9} {x['errors']:>9} {x.get('cpu_us_per_req', ''):>12}")
for x in gws:
    print(f"{'':8} {'added/'+x['label']:<16} {'':>9} {x['p50_us']-d['p50_us']:>9} {x['p99_us']-d['p99_us']:>9}")
PY
done
echo "usage records written: $(sqlite3 "$tmp/usage.db" 'select count(*) from usage' 2>/dev/null || echo '?')"
