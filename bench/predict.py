"""Predicted outputs (chat `prediction`), end to end: the same greedy chat requests with
and without a prediction of their answer, to gateways serving the model on the CPU; prints
each task's tokens/s both ways (two runs each, alternating: the first with its prefill,
the second meeting the prefix cache), the prediction's tokens kept and not kept, and
whether the answers were the same text; then 2 and 4 requests at once: all plain, all
with predictions, and only the first with one.

    # one or more gateways, e.g. config/gateway.toml with backend = "cpu" (and engines
    # with other `prediction_tokens` on other ports, to compare them)
    python3 bench/predict.py [PORT ...]
"""
import concurrent.futures as cf
import json
import sys
import time
import urllib.request

PORTS = [int(p) for p in sys.argv[1:]] or [8080]
CODE = '''def total_price(items, tax_rate):
    """Return the total price of the items with tax."""
    subtotal = 0
    for item in items:
        subtotal += item.price * item.quantity
    tax = subtotal * tax_rate
    return subtotal + tax


def cheapest(items):
    """Return the cheapest item."""
    best = None
    for item in items:
        if best is None or item.price < best.price:
            best = item
    return best
'''
FENCED = "```python\n" + CODE + "```"
TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
        "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. "
        "The five boxing wizards jump quickly. Jackdaws love my big sphinx of quartz.")
# (task, prompt, prediction)
TASKS = [
    ("copy code", "Copy this code exactly:\n\n" + FENCED, FENCED),
    ("edit code", "Add a line `print(subtotal)` after the loop in total_price. Answer with the "
                  "whole code:\n\n" + FENCED, FENCED),
    ("quote", f"Repeat the following text exactly, word for word:\n\n{TEXT}", TEXT),
]


def ask(port, prompt, prediction=None, max_tokens=250):
    body = {"model": "smollm2-135m", "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": prompt}]}
    if prediction is not None:
        body["prediction"] = {"type": "content", "content": prediction}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                 json.dumps(body).encode(),
                                 {"Authorization": "Bearer sk-tollgate-demo",
                                  "Content-Type": "application/json"})
    t = time.time()
    r = json.load(urllib.request.urlopen(req))
    u = r["usage"]
    d = u["completion_tokens_details"]
    return (time.time() - t, u["completion_tokens"], r["choices"][0]["message"]["content"],
            d["accepted_prediction_tokens"], d["rejected_prediction_tokens"])


for port in PORTS:
    for name, prompt, prediction in TASKS:
        runs = {"plain": [], "predicted": []}
        for how in ("plain", "predicted", "plain", "predicted"):
            runs[how].append(ask(port, prompt, prediction if how == "predicted" else None))
        same = all(a[2] == b[2] for a, b in zip(runs["plain"], runs["predicted"]))
        rate = lambda rs: [round(r[1] / r[0], 1) for r in rs]
        p = runs["predicted"][-1]
        print(f"{port} {name} ({p[1]} tokens): plain {rate(runs['plain'])} tokens/s, "
              f"predicted {rate(runs['predicted'])} tokens/s, kept {p[3]} not {p[4]}, "
              f"same text: {same}")
    # k at once: all plain, all predicted, and only the first predicted (the others' own
    # tokens/s: what a prediction's rows cost the requests beside it).
    for k in (2, 4):
        for how in ("plain", "predicted", "first", "plain", "predicted", "first"):
            tasks = [(i, TASKS[i % len(TASKS)]) for i in range(k)]
            predicted = lambda i: how == "predicted" or (how == "first" and i == 0)
            t = time.time()
            with cf.ThreadPoolExecutor(k) as ex:
                got = list(ex.map(lambda it: ask(port, it[1][1], it[1][2] if predicted(it[0]) else None),
                                  tasks))
            n = sum(g[1] for g in got)
            others = [g[1] / g[0] for i, g in enumerate(got) if i > 0]
            print(f"{port} {k} at once, {how}: {n} tokens, {n / (time.time() - t):.1f} tokens/s, "
                  f"kept {sum(g[3] for g in got)}, the others' own {sum(others) / len(others):.1f} tokens/s")
