#!/usr/bin/env bash
# What long prompts cost the gateway's other requests: the quick-start gateway (real
# model, the demo tenant's contract lifted, bodies up to 2 MiB) is sent SENDERS streams
# (default: one more than the CPUs, so that one shares the prober's serving thread) of
# chat requests of about MB megabytes of text each (tokenized by the model's tokenizer,
# then refused for the model's context: only the tokenizing is measured), while a prober
# asks `GET /v1/models` every 20 ms. Prints the probes' latency percentiles, with and
# without the long prompts. `GATEWAY=path` runs another build of the gateway (a before).
#
#   bash bench/long_prompts.sh
#   GATEWAY=/tmp/gateway-old SENDERS=3 MB=1 SECONDS_EACH=10 bash bench/long_prompts.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
SENDERS=${SENDERS:-$(( $(nproc) + 1 ))}
MB=${MB:-1}
SECONDS_EACH=${SECONDS_EACH:-10}
PORT=${PORT:-19182}
cargo build --release -q -p gateway
GATEWAY=${GATEWAY:-./target/release/gateway}
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$tmp"' EXIT
quickstart_config "$PORT" "" "$tmp"
sed -i 's/^max_body_bytes = .*/max_body_bytes = 2097152/' "$tmp/gw.toml"
serve_quickstart "$PORT" "$tmp" "$GATEWAY"
python3 - "$PORT" "$SENDERS" "$MB" "$SECONDS_EACH" <<'PY'
import http.client, json, sys, threading, time
port, senders, mb, each = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
key = {"Authorization": "Bearer sk-tollgate-demo", "content-type": "application/json"}
text = "The quick brown fox jumps over the lazy dog, and then it ran 42 miles! "
body = json.dumps({"model": "smollm2-135m", "max_tokens": 1,
                   "messages": [{"role": "user", "content": text * int(mb * 1e6 / len(text))}]})

def probe(seconds):
    c = http.client.HTTPConnection("127.0.0.1", port)
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        c.request("GET", "/v1/models", headers=key)
        c.getresponse().read()
        out.append((time.perf_counter() - t) * 1e3)
        time.sleep(0.02)
    return sorted(out)

def send(stop, done):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    while not stop.is_set():
        t = time.perf_counter()
        c.request("POST", "/v1/chat/completions", body=body, headers=key)
        r = c.getresponse(); r.read()
        done.append((r.status, time.perf_counter() - t))

def line(label, ms):
    q = lambda p: ms[min(len(ms) - 1, int(p * len(ms)))]
    print(f"{label:<28} probes {len(ms):>4}  p50 {q(0.5):7.2f} ms  p99 {q(0.99):7.2f} ms  max {ms[-1]:7.2f} ms")

line("alone", probe(each))
stop, done = threading.Event(), []
threads = [threading.Thread(target=send, args=(stop, done)) for _ in range(senders)]
for t in threads: t.start()
ms = probe(each)
stop.set()
for t in threads: t.join()
line(f"{senders} × {mb} MB prompts", ms)
statuses = sorted({s for s, _ in done})
mean = sum(d for _, d in done) / max(1, len(done))
print(f"long prompts answered: {len(done)} (status {statuses}), {mean * 1e3:.0f} ms each on average")
PY
