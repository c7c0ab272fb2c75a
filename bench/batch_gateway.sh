#!/usr/bin/env bash
# The gateway's own cost per batch request: a batch of REQUESTS chat requests (50,000, a
# full OpenAI batch file) against simulated workers that answer at once, so that what is
# timed is the Batch API's path (upload, checking the file, each request through the
# pipeline, each result committed, the output file written). Prints the upload and batch
# times, requests/s, and the gateway's resident memory and threads after each of RUNS
# batches in a row.
#
#   bash bench/batch_gateway.sh
#   REQUESTS=10000 RUNS=2 CONCURRENCY=8 bash bench/batch_gateway.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
REQUESTS=${REQUESTS:-50000}
RUNS=${RUNS:-3}
CONCURRENCY=${CONCURRENCY:-16}
PORT=${PORT:-19195}
cargo build --release -q -p gateway
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$tmp"' EXIT
cat > "$tmp/gw.toml" <<TOML
[server]
listen = "127.0.0.1:$PORT"
[metering]
path = "$tmp/usage.db"
[[models]]
id = "m"
[[pools]]
name = "default"
model = "m"
workers = [{ kind = "sim", prefill_tokens_per_s = 0.0, decode_step_ms = 0.0, decode_step_ms_per_seq = 0.0, min_output_tokens = 8, max_output_tokens = 8 }]
[[tenants]]
id = "demo"
keys_sha256 = ["179510ee3e248a7bfae1a518d344461ddef0e32bbf53b40845f2d3e157c5973f"]
[batches]
enabled = true
path = "$tmp/batches.db"
concurrency = $CONCURRENCY
TOML
python3 - "$REQUESTS" > "$tmp/in.jsonl" <<'PY'
import json, sys
for i in range(int(sys.argv[1])):
    print(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": f"question number {i} about something"}],
                 "max_tokens": 8}}))
PY
RUST_LOG=warn serve_quickstart "$PORT" "$tmp"
base="http://127.0.0.1:$PORT"
auth="Authorization: Bearer sk-tollgate-demo"
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
echo "| run | upload s | batch s | requests/s | gateway RSS MiB | threads |"
echo "|---:|---:|---:|---:|---:|---:|"
for run in $(seq "$RUNS"); do
  t0=$(date +%s.%N)
  file=$(curl -sf "$base/v1/files" -H "$auth" -F purpose=batch -F "file=@$tmp/in.jsonl" | json '["id"]')
  t1=$(date +%s.%N)
  batch=$(curl -sf "$base/v1/batches" -H "$auth" -H 'content-type: application/json' \
    -d "{\"input_file_id\":\"$file\",\"endpoint\":\"/v1/chat/completions\",\"completion_window\":\"24h\"}" | json '["id"]')
  while :; do
    status=$(curl -sf "$base/v1/batches/$batch" -H "$auth" | json '["status"]')
    case $status in completed|failed|expired|cancelled) break ;; esac
    sleep 0.1
  done
  t2=$(date +%s.%N)
  [ "$status" = completed ] || { echo "batch $status" >&2; exit 1; }
  read -r rss threads < <(ps -o rss=,nlwp= -p "$GW_PID")
  python3 -c "print('| $run | %.2f | %.2f | %.0f | %.0f | $threads |' % ($t1 - $t0, $t2 - $t1, $REQUESTS / ($t2 - $t1), $rss / 1024))"
done
