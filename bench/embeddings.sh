#!/usr/bin/env bash
# Embeddings on the real model (the CPU engine here, the GPU where one is): open-loop
# `POST /v1/embeddings` at a few rates against the quick-start gateway (the demo tenant's
# contract lifted, the prefix cache off: every request's inputs are the same text, and
# the cache would serve all but each input's last token), each request INPUTS inputs of
# about WORDS words. Prints one request's usage, then each rate's loadtest line (served
# requests, latency percentiles from intended send times).
#
#   bash bench/embeddings.sh
#   RATES="1 2" INPUTS=1 WORDS=400 DURATION=10 bash bench/embeddings.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
DURATION=${DURATION:-15}
RATES=${RATES:-"0.5 1 2 4"}
INPUTS=${INPUTS:-8}
WORDS=${WORDS:-60}
PORT=${PORT:-19181}
cargo build --release -q -p gateway -p loadtest
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$tmp"' EXIT
quickstart_config "$PORT" ", prefix_caching = false" "$tmp"
serve_quickstart "$PORT" "$tmp"
body=$(python3 -c '
import json, sys
inputs, words = int(sys.argv[1]), int(sys.argv[2])
text = lambda i: " ".join(f"word{(i * 7 + j) % 97} of input {i}" for j in range(words // 4))
print(json.dumps({"model": "smollm2-135m", "input": [text(i) for i in range(inputs)]}))
' "$INPUTS" "$WORDS")
url="http://127.0.0.1:$PORT/v1/embeddings"
usage=$(curl -sf "$url" -H 'Authorization: Bearer sk-tollgate-demo' -H 'content-type: application/json' \
  -d "$body" | python3 -c 'import json,sys; v=json.load(sys.stdin); print(len(v["data"]), "vectors of", len(v["data"][0]["embedding"]), "floats,", v["usage"]["prompt_tokens"], "input tokens per request")')
echo "== $INPUTS inputs a request: $usage"
for r in $RATES; do
  ./target/release/loadtest rate --url "$url" --rate "$r" --duration "$DURATION" --warmup 2 \
    --connections 16 --key sk-tollgate-demo --body "$body" --label "embeddings at $r req/s"
done
