#!/usr/bin/env bash
# The Batch API on the real model (the CPU engine here, the GPU where one is): what a
# tenant's bulk work does to its own interactive chats when sent as plain concurrent
# requests, against the same work sent as a batch (`/v1/batches`: lowest scheduling
# weight, its own fair-share account); and the batch's throughput alone. One gateway (the
# quick-start config, the demo tenant's rate lifted, `[batches]` on), runs in turn:
#
#   alone   USERS streaming chat users (32-token answers), nothing else
#   direct  the same, and BULK more users of the same tenant sending BULK_TOKENS-token
#           requests back to back (bulk work as ordinary requests)
#   batch   the same chat users while a batch of REQUESTS such requests runs, BULK at once
#   bulk    the batch alone
#
#   bash bench/batches.sh                       # 30 s per run
#   DURATION=20 USERS=2 BULK=16 bash bench/batches.sh
#   ENGINE=", max_seqs = 8" bash bench/batches.sh   # engine slots contended: who goes first
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
DURATION=${DURATION:-30}
USERS=${USERS:-2}
BULK=${BULK:-16}
BULK_TOKENS=${BULK_TOKENS:-64}
REQUESTS=${REQUESTS:-3000}
PORT=${PORT:-19190}
ENGINE=${ENGINE:-}
cargo build --release -q -p gateway -p loadtest
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$tmp"' EXIT
quickstart_config "$PORT" "$ENGINE" "$tmp"
# The batch may run BULK at once: half the tenant's max_concurrency must allow it.
sed -i "s/^max_concurrency = .*/max_concurrency = $((2 * BULK + USERS))/" "$tmp/gw.toml"
printf '\n[batches]\nenabled = true\npath = "%s/batches.db"\nconcurrency = %s\n' "$tmp" "$BULK" >> "$tmp/gw.toml"
RUST_LOG=warn serve_quickstart "$PORT" "$tmp"
base="http://127.0.0.1:$PORT"
auth="Authorization: Bearer sk-tollgate-demo"

# scenario BULK_USERS: the chat users, and BULK_USERS bulk users if > 0.
scenario() {
  cat > "$tmp/sc.toml" <<TOML
target = "$base"
duration_secs = $DURATION
warmup_secs = 3
seed = 1
[[tenants]]
name = "chat"
key = "sk-tollgate-demo"
model = "smollm2-135m"
stream = true
max_tokens = 32
temperature = 0
prompt_words = 24
users = $USERS
TOML
  if [ "$1" -gt 0 ]; then
    cat >> "$tmp/sc.toml" <<TOML
[[tenants]]
name = "bulk"
key = "sk-tollgate-demo"
model = "smollm2-135m"
max_tokens = $BULK_TOKENS
temperature = 0
prompt_words = 24
users = $1
TOML
  fi
}

# row NAME REPORT BULK_TOKS_PER_S: one line of the table.
row() {
  python3 - "$1" "$2" "$3" <<'PY'
import json, sys
name, path, bulk = sys.argv[1], sys.argv[2], sys.argv[3]
t = {x["name"]: x for x in json.load(open(path))["tenants"]}
c = t["chat"]
if bulk == "direct":
    bulk = "%.0f" % t["bulk"]["completion_tokens_per_s"]
print("| %s | %.0f / %.0f | %.0f / %.0f | %.1f | %s |" % (
    name, c["ttft"]["p50_ms"], c["ttft"]["p99_ms"], c["e2e"]["p50_ms"], c["e2e"]["p99_ms"],
    c["completion_tokens_per_s"], bulk))
PY
}

# output_tokens BATCH: the batch's output tokens so far.
output_tokens() {
  curl -sf "$base/v1/batches/$1" -H "$auth" | python3 -c 'import json,sys; print(json.load(sys.stdin)["usage"]["output_tokens"])'
}

echo "| run | chat TTFT p50 / p99 ms | chat e2e p50 / p99 ms | chat out tok/s | bulk out tok/s |"
echo "|---|---:|---:|---:|---:|"
scenario 0
./target/release/loadtest run "$tmp/sc.toml" --json "$tmp/alone.json" > /dev/null
row alone "$tmp/alone.json" "-"
scenario "$BULK"
./target/release/loadtest run "$tmp/sc.toml" --json "$tmp/direct.json" > /dev/null
row "direct ($BULK bulk users)" "$tmp/direct.json" direct

# The batch: REQUESTS chat requests like the bulk users'.
python3 - "$REQUESTS" "$BULK_TOKENS" > "$tmp/in.jsonl" <<'PY'
import json, random, sys
n, tokens = int(sys.argv[1]), int(sys.argv[2])
words = "the of and to in is was for on that with as by at from his her which an be this are".split()
rng = random.Random(7)
for i in range(n):
    q = " ".join(rng.choice(words) for _ in range(24))
    print(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "smollm2-135m", "messages": [{"role": "user", "content": q}],
                 "max_tokens": tokens, "temperature": 0}}))
PY
file=$(curl -sf "$base/v1/files" -H "$auth" -F purpose=batch -F "file=@$tmp/in.jsonl" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
batch=$(curl -sf "$base/v1/batches" -H "$auth" -H 'content-type: application/json' \
  -d "{\"input_file_id\":\"$file\",\"endpoint\":\"/v1/chat/completions\",\"completion_window\":\"24h\"}" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
sleep 3
scenario 0
t0=$(date +%s.%N); o0=$(output_tokens "$batch")
./target/release/loadtest run "$tmp/sc.toml" --json "$tmp/batch.json" > /dev/null
t1=$(date +%s.%N); o1=$(output_tokens "$batch")
row "batch ($BULK at once)" "$tmp/batch.json" "$(python3 -c "print('%.0f' % (($o1 - $o0) / ($t1 - $t0)))")"
t0=$(date +%s.%N); o0=$(output_tokens "$batch")
sleep "$DURATION"
t1=$(date +%s.%N); o1=$(output_tokens "$batch")
echo "| batch alone | | | | $(python3 -c "print('%.0f' % (($o1 - $o0) / ($t1 - $t0)))") |"
state=$(curl -sf -X POST "$base/v1/batches/$batch/cancel" -H "$auth" | python3 -c 'import json,sys; b=json.load(sys.stdin); print(b["status"], b["request_counts"])')
echo "(batch $state when cancelled)"
