#!/usr/bin/env bash
# Embeddings through an OpenAI-compatible upstream: a request's inputs sent one upstream
# call each (`embed_batch = 1`) versus `embed_batch` (default 256) a call. Two gateways
# side by side on one fixed-answer upstream (`loadtest stub`, which answers at once, so
# what is measured is the gateway's and the HTTP hops' own cost); for each INPUTS size,
# open-loop requests at RATE a second, each of INPUTS short texts. Prints per gateway and
# size: latency percentiles, upstream calls per request (the stub's count), and the
# gateway's CPU time per request.
#
#   bash bench/upstream_embeddings.sh
#   SIZES="16 2048" RATE=2 DURATION=10 bash bench/upstream_embeddings.sh
#   SIZES=2048 DIMENSIONS=1536 RATE=1 CLIENT_ENCODING=base64 ENCODING=float \
#     bash bench/upstream_embeddings.sh  # vectors of 1,536, asked of the upstream as numbers
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
RATE=${RATE:-4}
SIZES=${SIZES:-"16 256 2048"}
DIMENSIONS=${DIMENSIONS:-0} # ask the stub for vectors of this size (0: its own 4)
ENCODING=${ENCODING:-base64} # how the gateways ask the upstream for vectors
CLIENT_ENCODING=${CLIENT_ENCODING:-float} # how the client asks (the OpenAI SDKs: base64)
BATCH=${BATCH:-256}
STUB_PORT=${STUB_PORT:-19200}
ONE_PORT=${ONE_PORT:-19201}
MANY_PORT=${MANY_PORT:-19202}
cargo build --release -q -p gateway -p loadtest
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
gw_config() { # port, embed_batch
  cat <<TOML
[server]
listen = "127.0.0.1:$1"
[[models]]
id = "stub"
[[pools]]
name = "stub"
model = "stub"
workers = [{ kind = "openai", url = "http://127.0.0.1:$STUB_PORT", max_concurrency = 256, embed_batch = $2, embed_encoding = "$ENCODING" }]
[metering]
enabled = false
[[tenants]]
id = "bench"
keys_sha256 = ["179510ee3e248a7bfae1a518d344461ddef0e32bbf53b40845f2d3e157c5973f"]
TOML
}
gw_config "$ONE_PORT" 1 > "$tmp/one.toml"
gw_config "$MANY_PORT" "$BATCH" > "$tmp/many.toml"
./target/release/loadtest stub --listen 127.0.0.1:$STUB_PORT >/dev/null &
RUST_LOG=warn ./target/release/gateway serve --config "$tmp/one.toml" >/dev/null &
ONE_PID=$!
RUST_LOG=warn ./target/release/gateway serve --config "$tmp/many.toml" >/dev/null &
MANY_PID=$!
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; } # user + system CPU, in 1/100 s
for p in $ONE_PORT $MANY_PORT; do
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$p/ready" >/dev/null && break; sleep 0.1; done
done
calls() { curl -sf "http://127.0.0.1:$STUB_PORT/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"])'; }
printf '%-7s %-16s %9s %9s %9s %9s %7s %14s %16s\n' inputs gateway offered achieved p50_ms p99_ms errors calls/request gateway_cpu_ms
for n in $SIZES; do
  body=$(python3 -c 'import json,sys; n,d=int(sys.argv[1]),int(sys.argv[2]); b={"model":"stub","input":[f"input {i} of a batch" for i in range(n)]}; b.update({"dimensions":d} if d else {}); b["encoding_format"]=sys.argv[3]; print(json.dumps(b))' "$n" "$DIMENSIONS" "$CLIENT_ENCODING")
  for g in one:$ONE_PORT:1:$ONE_PID many:$MANY_PORT:$BATCH:$MANY_PID; do
    IFS=: read -r name port b pid <<<"$g"
    before=$(calls)
    cpu_before=$(ticks "$pid")
    out=$(./target/release/loadtest rate --url "http://127.0.0.1:$port/v1/embeddings" --rate "$RATE" \
      --duration "$DURATION" --warmup 0 --connections 16 --key sk-tollgate-demo --body "$body" \
      --label "embed_batch=$b")
    after=$(calls)
    cpu_after=$(ticks "$pid")
    python3 - "$out" "$n" "$before" "$after" "$((cpu_after - cpu_before))" <<'PY'
import json, sys
x = json.loads(sys.argv[1]); n = sys.argv[2]; calls = int(sys.argv[4]) - int(sys.argv[3])
done = max(1, x["ok"] + x["errors"])
per, cpu = calls / done, int(sys.argv[5]) * 10 / done
print(f"{n:<7} {x['label']:<16} {x['offered_rps']:>9} {x['achieved_rps']:>9} {x['p50_us']/1e3:>9.2f} {x['p99_us']/1e3:>9.2f} {x['errors']:>7} {per:>14.1f} {cpu:>16.1f}")
PY
  done
done
