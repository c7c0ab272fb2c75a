#!/usr/bin/env bash
# The Batch API on the real model (the CPU engine here, the GPU where one is): what a
# tenant's bulk work does to its own interactive chats when sent as plain concurrent
# requests, against the same work sent as a batch (`/v1/batches`: lowest scheduling
# weight, its own fair-share account). One gateway (the
# quick-start config, the demo tenant's rate lifted, `[batches]` on), runs in turn:
#
#   alone   USERS streaming chat users (32-token answers), nothing else
#   direct  the same, and BULK more users of the same tenant sending BULK_TOKENS-token
#           requests back to back (bulk work as ordinary requests)
#   batch   the same chat users while a batch of REQUESTS such requests runs, BULK at once
#           (loadtest's batch tenant: uploaded and run through /v1/batches)
#
#   bash bench/batches.sh                       # 30 s per run
#   DURATION=20 USERS=2 BULK=16 bash bench/batches.sh
#   ENGINE=", max_seqs = 8" bash bench/batches.sh   # engine slots contended: who goes first
#   ENGINE=", lowest_weight_rows = 64" bash bench/batches.sh   # no cap on batch rows
#                                                   # beside the chats (CPU default: 2)
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

# scenario BULK: the chat users, and then nothing (`none`), BULK_USERS bulk users of the
# same tenant (`direct`), or the bulk requests as a batch of REQUESTS (`batch`).
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
  [ "$1" = none ] && return
  cat >> "$tmp/sc.toml" <<TOML
[[tenants]]
name = "bulk"
key = "sk-tollgate-demo"
model = "smollm2-135m"
max_tokens = $BULK_TOKENS
temperature = 0
prompt_words = 24
TOML
  case $1 in
    direct) echo "users = $BULK" >> "$tmp/sc.toml" ;;
    batch) echo "batch = $REQUESTS" >> "$tmp/sc.toml" ;;
  esac
}

# run NAME KIND: the scenario of KIND played; one line of the table.
run() {
  scenario "$2"
  ./target/release/loadtest run "$tmp/sc.toml" --json "$tmp/$2.json" > /dev/null
  python3 - "$1" "$tmp/$2.json" <<'PY'
import json, sys
name, path = sys.argv[1], sys.argv[2]
t = {x["name"]: x for x in json.load(open(path))["tenants"]}
c = t["chat"]
bulk = "%.0f" % t["bulk"]["completion_tokens_per_s"] if "bulk" in t else "-"
print("| %s | %.0f / %.0f | %.0f / %.0f | %.1f | %s |" % (
    name, c["ttft"]["p50_ms"], c["ttft"]["p99_ms"], c["e2e"]["p50_ms"], c["e2e"]["p99_ms"],
    c["completion_tokens_per_s"], bulk))
PY
}

echo "| run | chat TTFT p50 / p99 ms | chat e2e p50 / p99 ms | chat out tok/s | bulk out tok/s |"
echo "|---|---:|---:|---:|---:|"
run alone none
run "direct ($BULK bulk users)" direct
run "batch ($BULK at once)" batch
