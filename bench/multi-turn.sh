#!/usr/bin/env bash
# Multi-turn chats on the real model (the CPU engine here, the GPU where one is): the
# scenario `config/scenarios/multi-turn.toml` (8 users, 6-turn conversations) played
# against the quick-start gateway with the engine's prefix cache on, then off, then
# single-turn chats for reference (the demo tenant's contract lifted: the engine is
# what is measured). Prints each run's loadtest table.
#
#   bash bench/multi-turn.sh                  # 20 s per run
#   DURATION=10 USERS=4 bash bench/multi-turn.sh
#   ENGINE=", max_batch_tokens = 128" RUNS="cached" bash bench/multi-turn.sh   # more engine
#                          # settings; only some of the runs (cached, uncached, single)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
DURATION=${DURATION:-20}
USERS=${USERS:-8}
PORT=${PORT:-19180}
ENGINE=${ENGINE:-}
RUNS=${RUNS:-"cached uncached single"}
cargo build --release -q -p gateway -p loadtest
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$tmp"' EXIT
run() { # name, prefix_caching, turns
  quickstart_config "$PORT" ", prefix_caching = $2 $ENGINE" "$tmp"
  sed -e "s/^users = .*/users = $USERS/" -e "s/^turns = .*/turns = $3/" \
      config/scenarios/multi-turn.toml > "$tmp/sc.toml"
  serve_quickstart "$PORT" "$tmp"
  local gw=$GW_PID
  echo "== $1 (prefix_caching = $2, turns = $3, $USERS users)"
  ./target/release/loadtest run "$tmp/sc.toml" --target "http://127.0.0.1:$PORT" --duration "$DURATION"
  kill "$gw"; wait "$gw" 2>/dev/null || true
}
for r in $RUNS; do
  case $r in
    cached) run "cached" true 6 ;;
    uncached) run "uncached" false 6 ;;
    single) run "single turn" true 1 ;;
    *) echo "unknown run $r" >&2; exit 1 ;;
  esac
done
