#!/usr/bin/env bash
# A long chain of stored answers (`previous_response_id`, each turn continuing the last;
# with CHAIN=conversation, each turn an answer in one conversation instead):
# TURNS requests in a row, each a ~100-byte input answered by a fixed-answer upstream (a
# stand-in for a model: what is measured is the gateway and its store). Prints the turns'
# latency by stretch of the chain, the stored bytes (`/admin/stored`) and the store's size
# on disk at the end, and the latency of listing the last answer's newest input items.
#
#   bash bench/response_chains.sh
#   GATEWAY=/tmp/gateway-old bash bench/response_chains.sh   # another build
#   TURNS=2000 bash bench/response_chains.sh
#   CHAIN=conversation bash bench/response_chains.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
TURNS=${TURNS:-1000}
CHAIN=${CHAIN:-previous_response_id}
PORT=${PORT:-19220}
ADMIN_PORT=${ADMIN_PORT:-19221}
STUB_PORT=${STUB_PORT:-19222}
GATEWAY=${GATEWAY:-./target/release/gateway}
cargo build --release -q -p gateway -p loadtest
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT
serve_stored_stub "$PORT" "$STUB_PORT" "$tmp" "$ADMIN_PORT" "$GATEWAY"
python3 - "$PORT" "$ADMIN_PORT" "$TURNS" "$tmp/responses.db" "$CHAIN" <<'PY'
import http.client, json, os, statistics, sys, time
port, admin, turns, db, chain = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
conn = http.client.HTTPConnection("127.0.0.1", port)
auth = {"Authorization": "Bearer sk-tollgate-demo", "content-type": "application/json"}
def call(method, path, body=None, headers=auth, c=None):
    c = c or conn
    t = time.perf_counter()
    c.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    r = c.getresponse(); data = r.read()
    if r.status != 200:
        sys.exit(f"{method} {path}: {r.status} {data[:300]!r}")
    return time.perf_counter() - t, json.loads(data)
prev, lat = None, []
conv = call("POST", "/v1/conversations", {})[1]["id"] if chain == "conversation" else None
for i in range(turns):
    body = {"model": "stub", "input": f"turn {i}: " + "a message of about a hundred bytes, " * 3,
            "max_output_tokens": 16}
    if conv:
        body["conversation"] = conv
    elif prev:
        body["previous_response_id"] = prev
    dt, r = call("POST", "/v1/responses", body)
    prev = r["id"]; lat.append(dt * 1e3)
print(f"{'turns':<14} {'p50_ms':>8} {'p99_ms':>8} {'max_ms':>8}")
step = max(turns // 5, 1)
for a in range(0, turns, step):
    xs = sorted(lat[a:a + step])
    print(f"{f'{a + 1}-{a + len(xs)}':<14} {statistics.median(xs):>8.2f} {xs[int(len(xs) * 0.99) - 1]:>8.2f} {xs[-1]:>8.2f}")
listing = sorted(call("GET", f"/v1/responses/{prev}/input_items?limit=20")[0] * 1e3 for _ in range(50))
print(f"input_items of the last (limit=20, 50 GETs): p50 {statistics.median(listing):.2f} ms, max {listing[-1]:.2f} ms")
ac = http.client.HTTPConnection("127.0.0.1", admin)
_, s = call("GET", "/admin/stored", headers={"Authorization": "Bearer sk-tollgate-admin-demo"}, c=ac)
t = [x for x in s["tenants"] if x["tenant"] == "bench"][0]
size = sum(os.path.getsize(db + sfx) for sfx in ("", "-wal") if os.path.exists(db + sfx))
print(f"stored ({chain}): {t['answers']} answers, {t['conversation_items']} conversation items, "
      f"{t['bytes'] / 1e6:.2f} MB of JSON; database on disk {size / 1e6:.1f} MB")
PY
