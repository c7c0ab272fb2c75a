"""Speculative decoding by prompt lookup, end to end: the same chat requests (greedy) to
two gateways serving the same model on the CPU, one with `speculative_tokens` set, one
without; prints each task's tokens/s on both (two runs each, alternating: the first with
its prefill, the second meeting the prefix cache) and whether the answers were the same
text; then 2 and 4 requests at once.

    # two configs from config/gateway.toml: backend = "cpu" on 127.0.0.1:8080, and
    # backend = "cpu", speculative_tokens = 4 on 127.0.0.1:8090 (requests_per_minute raised)
    python3 bench/speculate.py [PLAIN_PORT SPECULATIVE_PORT]
"""
import concurrent.futures as cf
import json
import sys
import time
import urllib.request

PLAIN, SPEC = (int(p) for p in sys.argv[1:3]) if len(sys.argv) > 2 else (8080, 8090)
TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
        "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. "
        "The five boxing wizards jump quickly. Jackdaws love my big sphinx of quartz.")
TASKS = {
    "quote": f"Repeat the following text exactly, word for word:\n\n{TEXT}",
    "code": "Here is a Python function:\n\ndef add(a, b):\n    return a + b\n\ndef sub(a, b):\n"
            "    return a - b\n\nRewrite both functions with type hints, keeping everything else the same.",
    "poem": "Write a short poem about autumn leaves.",
}
MIXED = ["Write a short poem about autumn leaves.",
         "Repeat exactly: one fish two fish red fish blue fish, one fish two fish red fish blue fish.",
         "List the days of the week.", "Explain what a CPU is in two sentences."]


def ask(port, prompt, max_tokens=120):
    body = json.dumps({"model": "smollm2-135m", "max_tokens": max_tokens, "temperature": 0,
                       "messages": [{"role": "user", "content": prompt}]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                 {"Authorization": "Bearer sk-tollgate-demo",
                                  "Content-Type": "application/json"})
    t = time.time()
    r = json.load(urllib.request.urlopen(req))
    return time.time() - t, r["usage"]["completion_tokens"], r["choices"][0]["message"]["content"]


for name, prompt in TASKS.items():
    runs = {PLAIN: [], SPEC: []}
    for port in (PLAIN, SPEC, PLAIN, SPEC):
        runs[port].append(ask(port, prompt))
    same = all(a[2] == b[2] for a, b in zip(runs[PLAIN], runs[SPEC]))
    rate = lambda rs: [round(n / dt, 1) for dt, n, _ in rs]
    print(f"{name} ({runs[PLAIN][0][1]} tokens): plain {rate(runs[PLAIN])} tokens/s, "
          f"speculative {rate(runs[SPEC])} tokens/s, same text: {same}")
for k in (2, 4):
    for port in (PLAIN, SPEC, PLAIN, SPEC):
        t = time.time()
        with cf.ThreadPoolExecutor(k) as ex:
            got = list(ex.map(lambda p: ask(port, p, 100), MIXED[:k]))
        n = sum(g[1] for g in got)
        print(f"{k} at once on {port}: {n} tokens, {n / (time.time() - t):.1f} tokens/s")
